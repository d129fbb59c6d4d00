"""Gaussian heatmap targets (paper eq. 1) and their decoding back to coordinates (paper eq. 2).

Each landmark ``l_i`` gets its own channel ``H_i(v) = exp(-‖v - l_i‖² / 2σ²)``: a peak of exactly 1 at the landmark's
sub-voxel position. Decoding takes the arg-max voxel (eq. 2) and, with ``method="subvoxel"``, refines it by fitting a
parabola to the log-heatmap at the peak and its two neighbours along each axis. The logarithm of a Gaussian is a
quadratic, so on a clean target the fit is exact and recovers the sub-voxel centre; on a network's output it is a
cheap, local refinement that falls back to the arg-max voxel wherever the peak is not curved downwards.

Explained in notebooks/01_heatmaps.ipynb.
"""

from __future__ import annotations

from typing import Literal, Sequence

import numpy as np
import torch
from torch import Tensor

from h3de_lite.data.case import validate_spacing

__all__ = ["gaussian_heatmaps", "decode"]

ArrayLike = Tensor | np.ndarray | Sequence


def _as_tensor(x: ArrayLike, *, dtype: torch.dtype | None = None, device: torch.device | None = None) -> Tensor:
    if isinstance(x, Tensor):
        return x.to(dtype=dtype or x.dtype, device=device or x.device)
    return torch.as_tensor(np.asarray(x), dtype=dtype, device=device)


def gaussian_heatmaps(
    coords: ArrayLike,
    shape: Sequence[int],
    sigma: float,
    spacing: ArrayLike | None = None,
    *,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Gaussian heatmaps centred exactly at (sub-voxel) landmark positions (paper eq. 1).

    Args:
        coords: landmark voxel coordinates in array-axis order, ``(B, L, 3)`` or ``(L, 3)``; ``NaN`` rows mark missing
            landmarks and give an all-zero channel.
        shape: spatial size ``(D, H, W)`` of the heatmaps.
        sigma: Gaussian standard deviation, in voxels, or in mm when ``spacing`` is given.
        spacing: voxel size in mm, ``(3,)`` or ``(B, 3)``; with it ``sigma`` is physical, so the Gaussian is round in mm
            (and elliptical in voxels when the spacing is anisotropic).
        dtype: floating dtype of the result.

    Shape:
        - coords: ``(B, L, 3)`` (or ``(L, 3)``, treated as ``B = 1``)
        - output: ``(B, L, D, H, W)``, values in ``[0, 1]``, peak value 1 at the landmark

    Example:
        >>> hm = gaussian_heatmaps(torch.tensor([[[10.3, 20.0, 5.5]]]), (32, 32, 16), sigma=2.0)
        >>> hm.shape
        torch.Size([1, 1, 32, 32, 16])

    Explained in notebooks/01_heatmaps.ipynb.
    """
    device = coords.device if isinstance(coords, Tensor) else None
    c = _as_tensor(coords, dtype=torch.float64, device=device)
    if c.ndim == 2:
        c = c.unsqueeze(0)
    if c.ndim != 3 or c.shape[-1] != 3:
        raise ValueError(f"coords must have shape (B, L, 3) or (L, 3), got {tuple(c.shape)}")
    if len(shape) != 3 or any(int(s) <= 0 for s in shape):
        raise ValueError(f"shape must be three positive sizes (D, H, W), got {tuple(shape)}")
    if not (np.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a positive number, got {sigma}")
    sizes = torch.tensor([int(s) for s in shape], dtype=torch.float64, device=c.device)
    present = ~torch.isnan(c).any(dim=-1)  # (B, L)
    inside = ((c >= -0.5) & (c <= sizes - 0.5)).all(dim=-1)
    if bool((present & ~inside).any()):
        bad = torch.nonzero(present & ~inside)[0].tolist()
        raise ValueError(
            f"landmark (batch {bad[0]}, index {bad[1]}) at {c[bad[0], bad[1]].tolist()} lies outside the heatmap shape "
            f"{tuple(shape)}; mark landmarks outside the volume as missing (NaN) or check the axis order"
        )
    sig = torch.full((c.shape[0], 3), float(sigma), dtype=torch.float64, device=c.device)
    if spacing is not None:
        sp_np = spacing.detach().cpu().numpy() if isinstance(spacing, Tensor) else spacing
        sp = torch.as_tensor(validate_spacing(sp_np, per_case=True), device=c.device)
        if sp.ndim == 2 and sp.shape[0] not in (1, c.shape[0]):
            raise ValueError(
                f"spacing has {sp.shape[0]} rows (one per case) but coords has B = {c.shape[0]} cases; pass spacing "
                f"of shape ({c.shape[0]}, 3), one row per case, or one (3,) spacing shared by all cases"
            )
        sig = sig / sp.expand(c.shape[0], 3)  # σ in mm → σ in voxels, per axis
    # Separable Gaussian: exp(-Σ_a d_a² / 2σ_a²) = Π_a exp(-d_a² / 2σ_a²); one 1-D profile per axis.
    centre = torch.nan_to_num(c, nan=0.0)
    profiles = []
    for axis in range(3):
        grid = torch.arange(int(shape[axis]), dtype=torch.float64, device=c.device)  # (N_a,)
        d = grid.view(1, 1, -1) - centre[..., axis : axis + 1]  # (B, L, N_a)
        profiles.append(torch.exp(-(d**2) / (2 * sig[:, axis].view(-1, 1, 1) ** 2)).to(dtype))
    heat = (
        profiles[0][..., :, None, None] * profiles[1][..., None, :, None] * profiles[2][..., None, None, :]
    )  # (B, L, D, H, W)
    return heat * present[..., None, None, None].to(dtype)


def decode(
    heatmaps: Tensor,
    method: Literal["argmax", "subvoxel"] = "subvoxel",
    *,
    return_score: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Landmark coordinates from heatmaps: the arg-max voxel (paper eq. 2), optionally refined to sub-voxel precision.

    ``method="subvoxel"`` fits, along each axis, a parabola through the log-values at the peak and its two neighbours;
    its vertex is the peak of a Gaussian exactly (log of a Gaussian is quadratic). The refinement is clamped to
    ±0.5 voxel and skipped on an axis where the peak lies on the border or the log-profile is not concave.

    Args:
        heatmaps: ``(B, L, D, H, W)`` heatmaps (any real values; the refinement uses values clamped to ``> 0``).
        method: ``"argmax"`` (integer voxel) or ``"subvoxel"``.
        return_score: also return the peak value of every channel.

    Shape:
        - heatmaps: ``(B, L, D, H, W)``
        - output: ``(B, L, 3)`` float voxel coordinates (and ``(B, L)`` peak values with ``return_score=True``)

    Example:
        >>> hm = gaussian_heatmaps(torch.tensor([[[10.3, 20.0, 5.5]]]), (32, 32, 16), sigma=2.0)
        >>> decode(hm).shape
        torch.Size([1, 1, 3])

    Explained in notebooks/01_heatmaps.ipynb.
    """
    if not isinstance(heatmaps, Tensor):
        heatmaps = torch.as_tensor(np.asarray(heatmaps))
    if heatmaps.ndim != 5:
        raise ValueError(f"heatmaps must have shape (B, L, D, H, W), got {tuple(heatmaps.shape)}")
    if method not in ("argmax", "subvoxel"):
        raise ValueError(f"method must be 'argmax' or 'subvoxel', got {method!r}")
    b, l, *spatial = heatmaps.shape
    flat = heatmaps.reshape(b, l, -1)
    score, index = flat.max(dim=-1)  # (B, L)
    peak = torch.stack(torch.unravel_index(index, tuple(spatial)), dim=-1)  # (B, L, 3) long
    coords = peak.to(torch.float64)
    if method == "subvoxel":
        bi = torch.arange(b, device=heatmaps.device).view(b, 1).expand(b, l)
        li = torch.arange(l, device=heatmaps.device).view(1, l).expand(b, l)
        tiny = torch.finfo(torch.float64).tiny
        hm = heatmaps.to(torch.float64)
        centre_log = torch.log(hm[bi, li, peak[..., 0], peak[..., 1], peak[..., 2]].clamp_min(tiny))
        for axis in range(3):
            size = spatial[axis]
            lo, hi = peak.clone(), peak.clone()
            lo[..., axis] = (peak[..., axis] - 1).clamp_min(0)
            hi[..., axis] = (peak[..., axis] + 1).clamp_max(size - 1)
            f_lo = torch.log(hm[bi, li, lo[..., 0], lo[..., 1], lo[..., 2]].clamp_min(tiny))
            f_hi = torch.log(hm[bi, li, hi[..., 0], hi[..., 1], hi[..., 2]].clamp_min(tiny))
            curvature = f_lo - 2 * centre_log + f_hi
            interior = (peak[..., axis] > 0) & (peak[..., axis] < size - 1)
            ok = interior & (curvature < 0)
            shift = torch.where(ok, 0.5 * (f_lo - f_hi) / torch.where(ok, curvature, -1.0), 0.0)
            coords[..., axis] += shift.clamp(-0.5, 0.5)
    coords = coords.to(heatmaps.dtype if heatmaps.is_floating_point() else torch.float32)
    return (coords, score) if return_score else coords
