"""Landmark anchors on the H/4 feature grid: the grid, target encoding (eq. 5) and decoding (eq. 7–8).

The anchor-based H3DE-Net (Sec. II-C-1, Fig. 3) predicts, at every location of the decoder's stride-4 feature map
and for each of its ``n_a`` anchors, an offset per landmark and the probability that the landmark exists there.
This module holds everything that does not learn: where the anchors are, which anchors are responsible for a
landmark, the regression targets ``t = (g - f) / r``, and how predictions become landmark coordinates again.

Departures from the paper (all listed in book/faithfulness.md):

- multi-scale anchors (the paper: ``n_a = 3``, radius up to ``1u``): three concentric balls of radius ``0.5u``,
  ``0.75u`` and ``1u`` at every location (:data:`ANCHOR_CONFIGS`);
- positives: a present landmark that no anchor ball contains makes the anchor with the smallest distance-to-radius
  ratio positive, so every present landmark has at least one positive anchor;
- decoding: a probability-weighted vote of the ``top`` (4) most probable anchors, counting only those whose decoded
  position lies within ``vote_radius`` (one stride) of the best anchor's; present when the highest probability
  reaches ``threshold`` (0.5).

Explained in notebooks/06_anchors.ipynb.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from einops import rearrange, repeat

__all__ = ["ANCHOR_CONFIGS", "AnchorGrid"]

#: Anchor radii per location, in units of the stride ``u``, for each configuration. ``"single"`` is the paper's
#: single-scale anchor (``r = 0.5u``, ``n_a = 1``). ``"multi"`` is the paper's multi-scale anchor, whose largest
#: radius is ``r = 1u`` with ``n_a = 3``: three concentric balls of radius ``0.5u, 0.75u, 1u`` at each location
#: (the three smallest scales of the reference code's anchor list ``[0.5, 0.75, 1.0, 1.25]``, in feature units).
ANCHOR_CONFIGS: dict[str, tuple[float, ...]] = {"single": (0.5,), "multi": (0.5, 0.75, 1.0)}


class AnchorGrid:
    """Anchors at the centres of the stride-``u`` feature grid of a volume, with target encoding and decoding.

    Implements the anchor definition and the offset targets of eq. 5 (``t = (g - f) / r``, with ``g`` the landmark,
    ``f`` the anchor centre and ``r`` its radius) and the decoding of eq. 7–8 (``g_hat = f + r * t_hat``, existence
    probability per anchor and landmark).

    Geometry (voxel-centre convention, voxel ``i`` is centred at coordinate ``i``): feature cell ``j`` along an axis
    covers the input voxels ``j*u ... (j+1)*u - 1``, so its anchors sit at ``f = j*u + (u - 1) / 2`` (1.5, 5.5, 9.5, …
    for ``u = 4``). A volume of size ``n`` along an axis has ``ceil(n / u)`` cells, the number a stride-``u`` map of a
    ``"same"``-padded network has; H3DENet requires sizes divisible by 32, where this is exactly ``n / u``.
    Anchors are ordered as the flatten of ``(d, h, w, n_a)``; :class:`~h3de_lite.models.heads.AnchorHead` produces the
    same order.

    Positives: an anchor is positive for a landmark when the landmark lies in its ball (distance ≤ ``r``). Balls of
    radius ``0.5u`` cover only about half of a cell (its corners are ``0.87u`` from the centre), so a present landmark
    that no ball contains makes the anchor with the smallest distance-to-radius ratio positive: every present landmark
    has at least one positive anchor. A missing landmark (``NaN`` row) has none.

    Args:
        volume_shape: ``(D, H, W)`` size of the input volume in voxels.
        stride: feature stride ``u`` in voxels (4 for the decoder's H/4 output ``U_1``).
        config: ``"single"`` (one anchor of radius ``0.5u`` per location) or ``"multi"`` (three anchors of radius
            ``0.5u, 0.75u, 1u``); see :data:`ANCHOR_CONFIGS`.

    Shape:
        - centers: ``(A, 3)`` anchor centres in input voxel coordinates, ``A = d * h * w * n_a``
        - radii: ``(A,)`` anchor radii in voxels
        - encode: landmarks ``(L, 3)`` or ``(B, L, 3)`` → offsets ``(B, A, L, 3)``,
          probabilities and positive ``(B, A, L)``
        - decode: offsets ``(B, A, L, 3)``, probabilities ``(B, A, L)`` → coords ``(B, L, 3)``,
          present and score ``(B, L)``

    Example:
        >>> grid = AnchorGrid((64, 64, 32), config="multi")
        >>> targets = grid.encode(torch.tensor([[10.0, 20.0, 30.0], [float("nan")] * 3]))
        >>> targets["offsets"].shape
        torch.Size([1, 6144, 2, 3])

    Explained in notebooks/06_anchors.ipynb.
    """

    def __init__(self, volume_shape: Sequence[int], *, stride: int = 4, config: str = "single") -> None:
        shape = tuple(int(s) for s in volume_shape)
        if len(shape) != 3 or any(s < 1 for s in shape) or any(s != v for s, v in zip(shape, volume_shape)):
            raise ValueError(f"volume_shape must be three positive integers (D, H, W), got {volume_shape!r}")
        if int(stride) != stride or stride < 1:
            raise ValueError(f"stride must be a positive integer number of voxels, got {stride!r}")
        if config not in ANCHOR_CONFIGS:
            raise ValueError(f"config must be one of {sorted(ANCHOR_CONFIGS)}, got {config!r}")
        self.volume_shape: tuple[int, int, int] = (shape[0], shape[1], shape[2])
        self.stride = int(stride)
        self.config = config
        fd, fh, fw = (math.ceil(s / self.stride) for s in shape)
        self.feature_shape: tuple[int, int, int] = (fd, fh, fw)
        scales = torch.tensor(ANCHOR_CONFIGS[config], dtype=torch.float64)
        d, h, w = self.feature_shape
        axes = [torch.arange(n, dtype=torch.float64) * self.stride + (self.stride - 1) / 2 for n in (d, h, w)]
        grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)  # (d, h, w, 3)
        n_a = len(scales)
        # Float64 copies for exact encoding / decoding; the public properties are float32.
        self._centers = repeat(grid, "d h w c -> (d h w n) c", n=n_a)  # (A, 3)
        self._radii = repeat(scales * self.stride, "n -> (d h w n)", d=d, h=h, w=w)  # (A,)

    # ------------------------------------------------------------------ properties
    @property
    def centers(self) -> torch.Tensor:
        """``(A, 3)`` float32 anchor centres in input voxel coordinates, in ``(d, h, w, n_a)`` flatten order."""
        return self._centers.float()

    @property
    def radii(self) -> torch.Tensor:
        """``(A,)`` float32 anchor radii in voxels."""
        return self._radii.float()

    @property
    def num_anchors_per_location(self) -> int:
        """``n_a``: 1 for ``"single"``, 3 for ``"multi"``."""
        return len(ANCHOR_CONFIGS[self.config])

    @property
    def num_anchors(self) -> int:
        """``A = d * h * w * n_a``, the number of anchors in the volume."""
        d, h, w = self.feature_shape
        return d * h * w * self.num_anchors_per_location

    def __repr__(self) -> str:
        return (
            f"AnchorGrid(volume_shape={self.volume_shape}, stride={self.stride}, config={self.config!r}, "
            f"feature_shape={self.feature_shape}, num_anchors={self.num_anchors})"
        )

    # ------------------------------------------------------------------ encoding (eq. 5)
    def encode(self, landmarks: torch.Tensor | np.ndarray) -> dict[str, torch.Tensor]:
        """Training targets for the anchor head: offsets ``t = (g - f) / r`` (eq. 5) and existence labels (eq. 8).

        Args:
            landmarks: ``(L, 3)`` or ``(B, L, 3)`` voxel coordinates in array-axis order; ``NaN`` rows are missing.
                Present landmarks must lie inside the volume (``-0.5 … size - 0.5``); mark those outside a crop as
                missing.

        Returns:
            ``{"offsets": (B, A, L, 3) float32`` (zero where not positive), ``"probabilities": (B, A, L) float32``
            (1 on positives, 0 elsewhere), ``"positive": (B, A, L) bool}``, on the device of ``landmarks``.

        Shape:
            landmarks ``(L, 3)`` (treated as ``B = 1``) or ``(B, L, 3)`` → offsets ``(B, A, L, 3)``.

        Example:
            >>> grid = AnchorGrid((32, 32, 32))
            >>> grid.encode(torch.tensor([[1.5, 1.5, 1.5]]))["positive"].shape
            torch.Size([1, 512, 1])
        """
        device = landmarks.device if isinstance(landmarks, torch.Tensor) else torch.device("cpu")
        g = torch.as_tensor(landmarks).detach().to(device="cpu", dtype=torch.float64)
        if g.ndim == 2:
            g = g[None]
        if g.ndim != 3 or g.shape[-1] != 3:
            raise ValueError(
                f"landmarks must have shape (L, 3) or (B, L, 3) in voxel coordinates, got {tuple(g.shape)}"
            )
        present = ~torch.isnan(g).any(dim=-1)  # (B, L)
        size = torch.tensor(self.volume_shape, dtype=torch.float64)
        g_safe = torch.where(present[..., None], g, torch.zeros_like(g))
        inside = ((g_safe >= -0.5 - 1e-6) & (g_safe <= size - 0.5 + 1e-6)).all(dim=-1)
        if not bool(inside[present].all()):
            b, l = (present & ~inside).nonzero()[0].tolist()
            raise ValueError(
                f"landmarks[{b}, {l}] = {g[b, l].tolist()} lies outside the volume of shape {self.volume_shape}; "
                "use voxel coordinates in array-axis order, and set landmarks outside a crop to NaN (missing)"
            )

        f, r = self._centers, self._radii  # (A, 3), (A,)
        delta = g_safe[:, None, :, :] - f[None, :, None, :]  # (B, A, L, 3)
        ratio = delta.norm(dim=-1) / r[None, :, None]  # (B, A, L) distance in radii
        positive = (ratio <= 1.0) & present[:, None, :]
        # Landmarks that no ball contains: the anchor closest relative to its radius becomes the positive.
        uncovered = present & ~positive.any(dim=1)  # (B, L)
        nearest = ratio.argmin(dim=1)  # (B, L)
        b_idx, l_idx = uncovered.nonzero(as_tuple=True)
        positive[b_idx, nearest[b_idx, l_idx], l_idx] = True

        offsets = torch.where(positive[..., None], delta / r[None, :, None, None], torch.zeros_like(delta))
        return {
            "offsets": offsets.to(device=device, dtype=torch.float32),
            "probabilities": positive.to(device=device, dtype=torch.float32),
            "positive": positive.to(device=device),
        }

    # ------------------------------------------------------------------ decoding (eq. 7–8)
    def decode(
        self,
        *,
        offsets: torch.Tensor,
        probabilities: torch.Tensor,
        threshold: float = 0.5,
        top: int = 4,
        vote_radius: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Landmark coordinates, presence and score from per-anchor offsets and existence probabilities.

        For each landmark, the ``top`` anchors with the highest probability each vote for ``f + r * t_hat`` (eq. 7
        inverted); the vote is weighted by their probabilities (eq. 8). Only anchors whose decoded position lies
        within ``vote_radius`` voxels of the best anchor's own decoded position vote: a confident anchor elsewhere
        (for instance on the look-alike molar of the other side) must not drag the estimate half-way across the
        jaw. The landmark is present when its highest probability reaches ``threshold``; its coordinates are ``NaN``
        otherwise.

        Args:
            offsets: ``(B, A, L, 3)`` predicted offsets ``t_hat`` in units of the anchor radius.
            probabilities: ``(B, A, L)`` existence probabilities in [0, 1] (sigmoid of the head's logits).
            threshold: presence threshold on the highest probability, in [0, 1].
            top: number of anchors that vote per landmark (at least 1).
            vote_radius: distance in voxels from the best anchor's decoded position within which the other top
                anchors vote (default: the stride ``u``, one feature cell).

        Returns:
            ``(coords (B, L, 3), present (B, L) bool, score (B, L))``, score being the highest probability.

        Shape:
            offsets ``(B, A, L, 3)``, probabilities ``(B, A, L)`` → coords ``(B, L, 3)``, present ``(B, L)``.

        Example:
            >>> grid = AnchorGrid((32, 32, 32))
            >>> t = grid.encode(torch.tensor([[3.0, 4.0, 5.0]]))
            >>> coords, present, score = grid.decode(offsets=t["offsets"], probabilities=t["probabilities"])
            >>> coords.shape
            torch.Size([1, 1, 3])
        """
        if not 0.0 <= float(threshold) <= 1.0:
            raise ValueError(f"threshold must lie in [0, 1], got {threshold!r}")
        if int(top) != top or top < 1:
            raise ValueError(f"top must be a positive integer (anchors voting per landmark), got {top!r}")
        if probabilities.ndim != 3 or probabilities.shape[1] != self.num_anchors:
            raise ValueError(
                f"probabilities must have shape (B, A={self.num_anchors}, L) for this grid, "
                f"got {tuple(probabilities.shape)}; check volume_shape and config of the AnchorGrid"
            )
        if offsets.shape != (*probabilities.shape, 3):
            raise ValueError(
                f"offsets must have shape {(*probabilities.shape, 3)} to match probabilities, "
                f"got {tuple(offsets.shape)}"
            )
        out_dtype = offsets.dtype if offsets.is_floating_point() else torch.float32
        p = probabilities.detach().to(torch.float64)
        t = offsets.detach().to(torch.float64)
        f = self._centers.to(p.device)
        r = self._radii.to(p.device)

        k = min(int(top), self.num_anchors)
        weight, idx = p.topk(k, dim=1)  # (B, k, L)
        t_top = t.gather(1, repeat(idx, "b k l -> b k l c", c=3))  # (B, k, L, 3)
        position = f[idx] + r[idx][..., None] * t_top  # (B, k, L, 3): f + r * t_hat
        radius = float(self.stride if vote_radius is None else vote_radius)
        if not radius >= 0.0:
            raise ValueError(f"vote_radius must be a distance >= 0 in voxels, got {vote_radius!r}")
        near = (position - position[:, :1]).norm(dim=-1) <= radius  # (B, k, L); the best anchor is always near
        weight = weight * near
        total = weight.sum(dim=1, keepdim=True)  # (B, 1, L)
        weight = torch.where(total > 0, weight / total.clamp_min(1e-300), near / near.sum(dim=1, keepdim=True))
        coords = (weight[..., None] * position).sum(dim=1)  # (B, L, 3)

        score = p.amax(dim=1)  # (B, L)
        present = score >= float(threshold)
        coords = torch.where(present[..., None], coords, torch.full_like(coords, float("nan")))
        return coords.to(out_dtype), present, score.to(out_dtype)

    # ------------------------------------------------------------------ helpers
    def anchor_index(self, location: Sequence[int], anchor: int = 0) -> int:
        """Flat index of anchor ``anchor`` at feature location ``(d, h, w)``, in the ``(d, h, w, n_a)`` order.

        Args:
            location: ``(d, h, w)`` index on the feature grid ``feature_shape``.
            anchor: which of the ``n_a`` anchors at that location (radii in :data:`ANCHOR_CONFIGS` order).

        Example:
            >>> AnchorGrid((8, 8, 8), config="multi").anchor_index((1, 0, 1), anchor=2)
            17
        """
        d, h, w = (int(i) for i in location)
        fd, fh, fw = self.feature_shape
        n_a = self.num_anchors_per_location
        if not (0 <= d < fd and 0 <= h < fh and 0 <= w < fw and 0 <= anchor < n_a):
            raise ValueError(
                f"location {tuple(location)} / anchor {anchor} is outside the feature grid {self.feature_shape} "
                f"with {n_a} anchor(s) per location"
            )
        return ((d * fh + h) * fw + w) * n_a + anchor

    def as_volume(self, values: torch.Tensor) -> torch.Tensor:
        """Reshape per-anchor values ``(B, A, ...)`` to ``(B, n_a, d, h, w, ...)``, e.g. to show probability maps.

        Args:
            values: ``(B, A, ...)`` tensor in this grid's anchor order.

        Shape:
            ``(B, A, ...)`` → ``(B, n_a, d, h, w, ...)``.

        Example:
            >>> grid = AnchorGrid((16, 16, 8), config="multi")
            >>> grid.as_volume(torch.zeros(2, grid.num_anchors, 14)).shape
            torch.Size([2, 3, 4, 4, 2, 14])
        """
        if values.ndim < 2 or values.shape[1] != self.num_anchors:
            raise ValueError(
                f"values must have shape (B, A={self.num_anchors}, ...) for this grid, got {tuple(values.shape)}"
            )
        d, h, w = self.feature_shape
        return rearrange(values, "b (d h w n) ... -> b n d h w ...", d=d, h=h, w=w)

