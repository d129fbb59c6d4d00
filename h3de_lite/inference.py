"""Whole-volume inference: landmarks from a CT volume of any size with a network trained on fixed-size crops.

The networks see crops of ``roi_size`` voxels (the preset's ``input_size``, each a multiple of 32) at training time.
A scan is larger or smaller than that and of any shape, so :func:`predict_volume` offers two strategies:

- ``"sliding"`` (default): the volume is padded, covered by overlapping ``roi_size`` windows, and the outputs of the
  windows are blended with Gaussian weights (MONAI ``sliding_window_inference``, ``mode="gaussian"``), so each voxel
  is dominated by the windows that see it near their centre. The blended whole-volume heatmaps are decoded once by
  :func:`h3de_lite.decoding.predict_landmarks` (arg-max, eq. 2, plus sub-voxel refinement). For the anchor-based
  head the per-anchor existence probabilities (sigmoid of the logits, eq. 8) and offsets (eq. 7) are blended the same
  way on the stride-4 anchor grid: every window starts at a multiple of the stride, so a window's anchor ``j`` is
  always the same global anchor; the blended grid is decoded once, by ``predict_landmarks`` (which calls
  :meth:`AnchorGrid.decode`).
- ``"coarse_to_fine"``: the whole volume is zoomed (one factor for all axes, aspect ratio kept) so that it fits in one
  window, the network localises every landmark roughly on that coarse view, then full-resolution windows centred on
  the estimates (shared by landmarks that lie well inside the same window) give the final coordinates, presence and
  score, each landmark from the window built around it and within ``search_radius`` coarse voxels of its estimate.
  The coarse view is :func:`~h3de_lite.data.transforms.zoom_to_fit`'s: a network trained with some of those views
  (``LandmarkDataset(p_zoom=...)``, ``h3de-lite train --p-zoom``) has seen that scale; one trained on crops alone
  has not, and its coarse estimates are guesses.

Pre-processing convention shared with training: images are stored and returned by
:class:`~h3de_lite.data.dataset.LandmarkDataset` in [0, 255] (paper §III-A) and the network is fed
:func:`prepare_input` of them, i.e. [0, 1]. Padding uses the constant 0 of the [0, 255] scale, which after the HU
window (-1000 HU → 0) is air: the padded volume looks like a scan whose field of view ends in air, whereas
replicating the border would extend a cut jaw or skull into fake bone bars.

Nothing here reads landmarks: inference sees only the image.

Explained in notebooks/07_evaluation.ipynb.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from h3de_lite.anchors import ANCHOR_CONFIGS, AnchorGrid
from h3de_lite.data.case import Case
from h3de_lite.data.images import read_image
from h3de_lite.data.nifti import voxel_to_world
from h3de_lite.data.transforms import DEFAULT_WINDOW, normalize_intensity, zoom_shape
from h3de_lite.decoding import predict_landmarks

__all__ = [
    "INPUT_SCALE",
    "CasePrediction",
    "VolumeOutputs",
    "gaussian_weights",
    "predict_case",
    "predict_volume",
    "prepare_input",
    "sliding_window_outputs",
]

INPUT_SCALE: float = 255.0
"""Images are stored in [0, 255] (paper §III-A); the network input is ``image / INPUT_SCALE``, in [0, 1]."""

DIVISOR = 32  # five stride-2 stages: every window size must be a multiple of 2**5
ANCHOR_STRIDE = 4  # the anchor head reads the decoder's H/4 map
PAD_VALUE = 0.0  # [0, 255] scale: air after the HU window
SIGMA_SCALE = 0.125  # Gaussian blending weight: sigma = 0.125 × window size (MONAI's and nnU-Net's default)
STRATEGIES = ("sliding", "coarse_to_fine")

Size3 = tuple[int, int, int]


def prepare_input(image: Tensor) -> Tensor:
    """Network input from a [0, 255] image: ``image / INPUT_SCALE`` as float32, on the image's device.

    The single place where the intensity convention lives: training, validation and :func:`predict_volume` all feed
    the network ``prepare_input(batch["image"])``. (H3DE-Net itself is nearly scale-invariant, its first conv having
    no bias and being followed by instance norm, but the MONAI baselines are not.)

    Args:
        image: intensities in [0, 255], any shape (``(B, 1, D, H, W)`` for a batch).

    Shape:
        - image: any, e.g. ``(B, 1, D, H, W)``
        - output: same shape, float32 in [0, 1]

    Example:
        >>> prepare_input(torch.full((1, 1, 4, 4, 4), 255.0)).amax().item()
        1.0
        >>> prepare_input(torch.zeros(2, 1, 32, 32, 32)).shape
        torch.Size([2, 1, 32, 32, 32])

    Explained in notebooks/07_evaluation.ipynb.
    """
    return image.to(torch.float32) / INPUT_SCALE


# ---------------------------------------------------------------------------------------------------------- helpers
def _as_volume(image: Tensor | np.ndarray) -> Tensor:
    """``(D, H, W)`` or ``(1, D, H, W)`` → ``(1, 1, D, H, W)`` float32."""
    x = torch.as_tensor(image)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[0] != 1:
        raise ValueError(
            f"image must have shape (1, D, H, W) or (D, H, W) as LandmarkDataset returns it, got {tuple(x.shape)}; "
            "for a batch, call predict_volume once per volume or use predict_case"
        )
    if not x.is_floating_point():
        x = x.to(torch.float32)
    return x[None]


def _size3(name: str, value: Any) -> Size3:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        value = (value,) * 3
    try:
        sizes = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be three positive integers (D, H, W), got {value!r}") from None
    if len(sizes) != 3 or any(s < 1 for s in sizes) or any(s != v for s, v in zip(sizes, value)):
        raise ValueError(f"{name} must be three positive integers (D, H, W), got {value!r}")
    return sizes[0], sizes[1], sizes[2]


def _resolve_roi(model: nn.Module, roi_size: Sequence[int] | int | None, divisor: int) -> Size3:
    """The window size: ``roi_size``, else the model's ``input_size`` (or ``config.input_size``) when it has one."""
    if roi_size is None:
        roi_size = getattr(model, "input_size", None) or getattr(getattr(model, "config", None), "input_size", None)
    if roi_size is None:
        raise ValueError(
            f"{type(model).__name__} does not say which crop size it was trained on; pass roi_size=(D, H, W), "
            "e.g. roi_size=get_preset('tiny').input_size"
        )
    roi = _size3("roi_size", roi_size)
    if any(s % divisor for s in roi) or any(s % ANCHOR_STRIDE for s in roi):
        raise ValueError(
            f"roi_size {roi} must hold multiples of {divisor} (the networks halve the resolution five times); "
            f"use e.g. {tuple(max(divisor, round(s / divisor) * divisor) for s in roi)}"
        )
    return roi


def _model_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager:
    """float16 autocast on CUDA when ``amp``; a no-op elsewhere (mixed precision here is a GPU speed-up only)."""
    if amp and device.type == "cuda" and torch.cuda.is_available():
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    """``model.eval()`` and ``torch.inference_mode()`` for the block; the model's previous mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def _pad_to(x: Tensor, shape: Size3) -> tuple[Tensor, Size3]:
    """Pad ``(1, 1, D, H, W)`` symmetrically (extra voxel after) with :data:`PAD_VALUE` up to ``shape``."""
    before = tuple((t - s) // 2 for s, t in zip(x.shape[2:], shape))
    pads: list[int] = []
    for s, t, b in reversed(list(zip(x.shape[2:], shape, before))):  # F.pad wants the last axis first
        pads += [b, t - s - b]
    return F.pad(x, pads, value=PAD_VALUE), (before[0], before[1], before[2])


def _anchor_config(num_anchors: int, feature_shape: Size3) -> str:
    cells = math.prod(feature_shape)
    for name, radii in ANCHOR_CONFIGS.items():
        if cells * len(radii) == num_anchors:
            return name
    raise ValueError(
        f"the model's anchor head returns {num_anchors} anchors, which matches no anchor config "
        f"({sorted(ANCHOR_CONFIGS)}) on a {feature_shape} grid of stride {ANCHOR_STRIDE}"
    )


def _forward(model: nn.Module, x: Tensor, amp: bool) -> dict[str, Tensor]:
    """Model outputs as float32: ``{"heatmaps"}`` (heatmap head) or ``{"heatmaps"?, "offsets", "logits"}``."""
    with _autocast(x.device, amp):
        out = model(prepare_input(x))
    if isinstance(out, Tensor):
        return {"heatmaps": out.float()}
    if isinstance(out, Mapping) and "offsets" in out and "logits" in out:
        return {k: v.float() for k, v in out.items() if k in ("heatmaps", "offsets", "logits")}
    raise ValueError(
        f"the model must return heatmaps (B, L, D, H, W) or the anchor head's dict with 'offsets' and 'logits', "
        f"got {type(out).__name__}"
    )


def _threshold_kwargs(threshold: float | None) -> dict[str, float]:
    """``threshold=None`` leaves the decoder's own default (eq. 2 for heatmaps, 0.5 for anchors)."""
    return {} if threshold is None else {"threshold": float(threshold)}


def _cell_inside(grid: AnchorGrid, start: Sequence[int], size: Sequence[int]) -> Tensor:
    """``(A,)`` bool: the anchor's cell overlaps the box ``[start, start + size)`` of the grid's voxel coordinates."""
    half = (grid.stride - 1) / 2
    lo = grid.centers.double() - half  # (A, 3) first voxel of the cell
    hi = grid.centers.double() + half  # (A, 3) last voxel of the cell
    first = torch.tensor([float(s) for s in start], dtype=torch.float64)
    last = first + torch.tensor([float(s) for s in size], dtype=torch.float64) - 1
    return ((hi >= first) & (lo <= last)).all(dim=-1)


def _decode_anchors(
    grid: AnchorGrid,
    offsets: Tensor,
    probabilities: Tensor,
    *,
    content_start: Sequence[int],
    content_size: Sequence[int],
    threshold: float | None,
    top: int,
    keep: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Anchor decoding (eq. 7–8) of one volume by ``predict_landmarks``, cells wholly outside the content box
    excluded (probability 0, logit -inf), and anchors not in ``keep`` (``(A, L)`` bool) for their landmark;
    coordinates relative to the content box."""
    inside = _cell_inside(grid, content_start, content_size).to(probabilities.device)[:, None]  # (A, 1)
    if keep is not None:
        inside = inside & keep.to(probabilities.device)
    logits = torch.logit(probabilities.double() * inside)  # (A, L); sigmoid(logit(p)) = p in float64
    coords, present, score = predict_landmarks(
        {"offsets": offsets[None], "logits": logits[None]}, grid=grid, top=top, **_threshold_kwargs(threshold)
    )
    coords, score = coords.to(offsets.dtype), score.to(offsets.dtype)
    shift = torch.tensor([float(s) for s in content_start], dtype=coords.dtype, device=coords.device)
    return coords[0] - shift, present[0], score[0]


def _clamp_inside(coords: Tensor, shape: Sequence[int]) -> Tensor:
    """Clamp to the voxel centres ``[0, size - 1]``; ``NaN`` rows stay ``NaN``."""
    upper = torch.tensor([float(s - 1) for s in shape], dtype=coords.dtype, device=coords.device)
    return torch.minimum(torch.maximum(coords, torch.zeros_like(upper)), upper)


# ---------------------------------------------------------------------------------------------------------- sliding
@dataclass(frozen=True)
class VolumeOutputs:
    """Blended whole-volume outputs of :func:`sliding_window_outputs`.

    Args:
        heatmaps: ``(L, D, H, W)`` blended heatmaps on the input volume's grid (``None`` when not kept).
        offsets: ``(A, L, 3)`` blended anchor offsets of ``grid`` (anchor head only).
        probabilities: ``(A, L)`` blended existence probabilities of ``grid`` (anchor head only).
        grid: the :class:`~h3de_lite.anchors.AnchorGrid` of the *padded* volume (anchor head only).
        pad: voxels of padding before the input volume along each axis: input voxel ``x`` is ``x + pad`` in ``grid``.
        volume_shape: ``(D, H, W)`` of the input volume.
        num_windows: windows the network ran on.

    The tensors were made under ``torch.inference_mode()`` (the heatmaps are a view of the blended buffer, not a
    copy, which would double the memory of a large volume): read them freely, ``clone()`` them to modify in place.
    """

    heatmaps: Tensor | None
    offsets: Tensor | None
    probabilities: Tensor | None
    grid: AnchorGrid | None
    pad: Size3
    volume_shape: Size3
    num_windows: int

    def decode(
        self, *, method: str = "subvoxel", threshold: float | None = None, top: int = 4
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Landmarks ``(coords (L, 3), present (L,), score (L,))`` in input voxels, through ``predict_landmarks``.

        Heatmaps: eq. 2 (+ sub-voxel) on the blended heatmaps. Anchor head: eq. 7–8 (:meth:`AnchorGrid.decode`) on
        the blended anchor grid, anchors whose cell lies wholly in the padding excluded, coordinates clamped into the
        volume.
        """
        if self.grid is None:
            assert self.heatmaps is not None
            # One channel at a time: decoding works per channel, and the sub-voxel step copies its input to float64
            # (a whole 14-channel 192×192×128 volume would take 0.5 GB at once).
            decoded = [
                predict_landmarks(channel[None, None], method=method, **_threshold_kwargs(threshold))
                for channel in self.heatmaps
            ]  # L × ((1, 1, 3), (1, 1), (1, 1))
            coords, present, score = (torch.cat([d[i][0] for d in decoded]) for i in range(3))
            return coords, present, score
        assert self.offsets is not None and self.probabilities is not None
        coords, present, score = _decode_anchors(
            self.grid, self.offsets, self.probabilities, content_start=self.pad, content_size=self.volume_shape,
            threshold=threshold, top=top,
        )  # fmt: skip
        return _clamp_inside(coords, self.volume_shape), present, score


def _aligned_overlap(roi: Size3, overlap: float) -> tuple[float, ...]:
    """Per-axis overlap for MONAI whose window step ``int(roi * (1 - overlap))`` is a multiple of the anchor stride.

    The step is ``roi * (1 - overlap)`` rounded down to a multiple of :data:`ANCHOR_STRIDE` (at least one stride);
    MONAI's last window ends at the volume's end, which the padding makes a multiple of the stride too.
    """
    result = []
    for r in roi:
        step = max(ANCHOR_STRIDE, int(r * (1 - overlap)) // ANCHOR_STRIDE * ANCHOR_STRIDE)
        o = 0.0 if step >= r else 1.0 - (step + 0.5) / r  # the + 0.5 keeps int() away from a rounding edge
        assert (r if step >= r else int(r * (1 - o))) == min(step, r), (r, overlap, step, o)
        result.append(o)
    return tuple(result)


def gaussian_weights(roi_size: Sequence[int], *, sigma_scale: float = SIGMA_SCALE) -> Tensor:
    """Blending weight of a window: a separable Gaussian, σ = ``sigma_scale`` × window size per axis, peak 1.

    MONAI's own map (``compute_importance_map``) clamps every weight below 1e-3 up to 1e-3. In 3D the product of
    three axis profiles falls far below that near a window's edges and corners, so the clamp lets a window's least
    reliable voxels (zero-padded by the convolutions, least context) weigh as much as, or more than, a neighbouring
    window that sees the same voxel well inside: up to a quarter of the blend in the corner regions of 64×64×32
    windows. Here the profile is kept as it is (its minimum, exp(-24) for σ = size / 8, is still a normal float32),
    as nnU-Net does.

    Args:
        roi_size: window ``(D, H, W)``.
        sigma_scale: σ as a fraction of the window size.

    Shape:
        - output: ``roi_size``, float32, maximum 1 at the centre

    Example:
        >>> gaussian_weights((8, 8, 4)).shape
        torch.Size([8, 8, 4])

    Explained in notebooks/07_evaluation.ipynb.
    """
    profiles = []
    for n in roi_size:
        x = torch.arange(n, dtype=torch.float64) - (n - 1) / 2
        profiles.append(torch.exp(-(x**2) / (2 * (sigma_scale * n) ** 2)))
    weights = profiles[0][:, None, None] * profiles[1][None, :, None] * profiles[2][None, None, :]
    weights = weights / weights.max()
    return weights.to(torch.float32).clamp_min(torch.finfo(torch.float32).tiny)


def _count_windows(padded: Size3, roi: Size3, overlaps: Sequence[float]) -> int:
    count = 1
    for p, r, o in zip(padded, roi, overlaps):
        step = r if p == r else max(1, int(r * (1 - o)))
        count *= math.ceil((p - r) / step) + 1
    return count


def sliding_window_outputs(
    model: nn.Module,
    image: Tensor | np.ndarray,
    *,
    roi_size: Sequence[int] | int | None = None,
    overlap: float = 0.25,
    sw_batch_size: int = 1,
    device: torch.device | str | None = None,
    amp: bool = False,
    progress: bool = False,
    keep_heatmaps: bool = True,
    output_device: torch.device | str | None = None,
    divisor: int = DIVISOR,
) -> VolumeOutputs:
    """Gaussian-blended sliding-window outputs of a network over a whole volume of any size.

    The volume is padded (constant air, see the module docstring) to at least ``roi_size`` and to a multiple of the
    anchor stride, then MONAI ``sliding_window_inference`` runs the network on ``roi_size`` windows whose starts are
    multiples of the anchor stride and averages their outputs with Gaussian weights (σ = 0.125 × window). Heatmaps
    are blended at full resolution and cropped back to the input volume; anchor logits are turned into probabilities
    (eq. 8) and blended with the offsets on the global stride-4 grid. Runs in eval mode under
    ``torch.inference_mode()``; the model's training mode is restored afterwards.

    Args:
        model: :class:`~h3de_lite.models.h3de_net.H3DENet` (either head) or any network with the heatmap contract.
        image: ``(1, D, H, W)`` or ``(D, H, W)`` intensities in [0, 255] (:func:`prepare_input` is applied here).
        roi_size: window ``(D, H, W)``, multiples of ``divisor``; default the model's ``input_size`` if it has one.
        overlap: fraction of a window shared with its neighbour along each axis, in [0, 1).
        sw_batch_size: windows per forward pass.
        device: where the network runs (default: the model's device); the image is moved there.
        amp: float16 autocast on CUDA (ignored on CPU).
        progress: tqdm progress bar over the windows.
        keep_heatmaps: for the anchor head, also blend the heatmaps (the heatmap head always does).
        output_device: where the blended outputs are accumulated (default ``device``); ``"cpu"`` saves GPU memory.
        divisor: every ``roi_size`` entry must be a multiple of it (32 for H3DE-Net).

    Shape:
        - image: ``(1, D, H, W)`` or ``(D, H, W)``
        - output: ``heatmaps (L, D, H, W)``; anchor head: ``offsets (A, L, 3)``, ``probabilities (A, L)`` on the
          padded volume's grid

    Example:
        >>> model = nn.Conv3d(1, 2, kernel_size=1)  # stands in for H3DENet.from_preset("tiny", num_landmarks=2)
        >>> out = sliding_window_outputs(model, torch.rand(1, 40, 50, 20) * 255, roi_size=(64, 64, 32))
        >>> out.heatmaps.shape
        torch.Size([2, 40, 50, 20])

    Explained in notebooks/07_evaluation.ipynb.
    """
    from monai.inferers import sliding_window_inference  # lazy: MONAI is heavy to import

    if not 0.0 <= float(overlap) < 1.0:
        raise ValueError(f"overlap must lie in [0, 1), got {overlap!r}")
    if isinstance(sw_batch_size, bool) or not isinstance(sw_batch_size, int) or sw_batch_size < 1:
        raise ValueError(f"sw_batch_size must be a positive integer, got {sw_batch_size!r}")
    roi = _resolve_roi(model, roi_size, divisor)
    device = torch.device(device) if device is not None else _model_device(model)
    output_device = torch.device(output_device) if output_device is not None else device
    x = _as_volume(image).to(device)
    shape: Size3 = (x.shape[2], x.shape[3], x.shape[4])
    padded_shape = tuple(max(r, math.ceil(s / ANCHOR_STRIDE) * ANCHOR_STRIDE) for s, r in zip(shape, roi))
    x, pad = _pad_to(x, padded_shape)  # (1, 1, *padded_shape)
    overlaps = _aligned_overlap(roi, float(overlap))
    feature = tuple(r // ANCHOR_STRIDE for r in roi)
    seen: dict[str, int] = {}  # the first window's anchor count A (anchor head only)

    def predictor(window: Tensor) -> dict[str, Tensor]:
        out = _forward(model, window, amp)
        if "logits" in out:
            seen.setdefault("anchors", out["logits"].shape[1])
        maps = {}
        if "logits" not in out or keep_heatmaps:
            maps["heatmaps"] = out["heatmaps"]  # (n, L, *roi)
        if "logits" in out:
            fd, fh, fw = feature
            maps["probabilities"] = rearrange(
                torch.sigmoid(out["logits"]), "b (d h w n) l -> b (n l) d h w", d=fd, h=fh, w=fw
            )  # (n, n_a·L, *roi / 4)
            maps["offsets"] = rearrange(
                out["offsets"], "b (d h w n) l c -> b (n l c) d h w", d=fd, h=fh, w=fw
            )  # (n, n_a·L·3, *roi / 4)
        return maps

    with _evaluating(model):
        blended = sliding_window_inference(
            x, roi, sw_batch_size, predictor, overlap=overlaps, mode="gaussian", sigma_scale=SIGMA_SCALE,
            padding_mode="constant", cval=PAD_VALUE, sw_device=device, device=output_device, progress=progress,
            roi_weight_map=gaussian_weights(roi).to(device),
        )  # fmt: skip
    num_windows = _count_windows(padded_shape, roi, overlaps)
    crop = tuple(slice(p, p + s) for p, s in zip(pad, shape))
    heatmaps = blended["heatmaps"][(0, slice(None), *crop)] if "heatmaps" in blended else None  # a view: no copy
    if "anchors" not in seen:
        return VolumeOutputs(heatmaps, None, None, None, pad, shape, num_windows)

    config = _anchor_config(seen["anchors"], feature)
    n_a = len(ANCHOR_CONFIGS[config])
    probabilities = rearrange(
        blended["probabilities"][0], "(n l) d h w -> (d h w n) l", n=n_a
    )  # (A, L) in the grid's (d h w n) order
    offsets = rearrange(blended["offsets"][0], "(n l c) d h w -> (d h w n) l c", n=n_a, c=3)  # (A, L, 3)
    grid = AnchorGrid(padded_shape, stride=ANCHOR_STRIDE, config=config)
    assert grid.num_anchors == probabilities.shape[0], (grid, probabilities.shape)
    return VolumeOutputs(heatmaps, offsets, probabilities, grid, pad, shape, num_windows)


# ---------------------------------------------------------------------------------------------------- coarse → fine
def _decode_window(
    out: Mapping[str, Tensor],
    index: int,
    *,
    start: Sequence[int],
    pad: Sequence[int],
    shape: Sequence[int],
    roi: Size3,
    method: str,
    threshold: float | None,
    top: int,
    near: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Decode window ``index`` of a batch whose window starts at ``start`` in a volume padded by ``pad``.

    Only the part of the window inside the (unpadded) volume counts: heatmaps are cropped to it, anchors whose cell
    lies wholly outside it are ignored. With ``near = (centres (L, 3) in volume voxels, radii (3,) in voxels)`` each
    landmark is searched only within the ellipsoid of those radii around its centre (heatmap voxels, or anchor
    centres, outside it count as zero). Returns coordinates in the volume's voxels, clamped into it.
    """
    content_start = [p - s for p, s in zip(pad, start)]  # the volume's first voxel, in window coordinates
    if "logits" in out:
        feature = (roi[0] // ANCHOR_STRIDE, roi[1] // ANCHOR_STRIDE, roi[2] // ANCHOR_STRIDE)
        grid = AnchorGrid(roi, stride=ANCHOR_STRIDE, config=_anchor_config(out["logits"].shape[1], feature))
        keep = None
        if near is not None:
            centres = near[0] + torch.tensor(content_start, dtype=near[0].dtype, device=near[0].device)  # window
            keep = _within(grid.centers.to(near[0]), centres, near[1] + ANCHOR_STRIDE / 2)  # (A, L)
        coords, present, score = _decode_anchors(
            grid, out["offsets"][index], torch.sigmoid(out["logits"][index]), content_start=content_start,
            content_size=shape, threshold=threshold, top=top, keep=keep,
        )  # fmt: skip
        return _clamp_inside(coords, shape), present, score
    lo = [max(0, c) for c in content_start]
    hi = [min(r, c + s) for r, c, s in zip(roi, content_start, shape)]
    heatmaps = out["heatmaps"][index : index + 1, :, lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    if near is not None:
        axes = [torch.arange(a, b, dtype=near[0].dtype, device=heatmaps.device) - c for a, b, c in
                zip(lo, hi, content_start)]  # volume voxel coordinates of the cropped window  # fmt: skip
        voxels = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)  # (V, 3)
        keep = _within(voxels, near[0].to(heatmaps.device), near[1].to(heatmaps.device))  # (V, L)
        heatmaps = heatmaps * rearrange(keep, "(d h w) l -> 1 l d h w", d=hi[0] - lo[0], h=hi[1] - lo[1])
    coords, present, score = predict_landmarks(heatmaps, method=method, **_threshold_kwargs(threshold))
    shift = torch.tensor([float(a - c) for a, c in zip(lo, content_start)], dtype=coords.dtype, device=coords.device)
    return coords[0] + shift, present[0], score[0]


def _within(points: Tensor, centres: Tensor, radii: Tensor) -> Tensor:
    """``(P, L)`` bool: point ``p`` lies in the ellipsoid of ``radii`` (per axis) around centre ``l``."""
    scaled = (points[:, None, :] - centres[None, :, :]) / radii  # (P, L, 3)
    return (scaled * scaled).sum(dim=-1) <= 1.0


def _group_windows(centres: Tensor, roi: Size3, padded: Sequence[int], margin: Sequence[int]) -> tuple[list, list]:
    """Greedy window per landmark: reuse a window holding the centre at least ``margin`` from its faces, else a new
    window centred on it (clamped into the padded volume). Returns the window starts and each landmark's window."""
    starts: list[tuple[int, int, int]] = []
    owner: list[int] = []
    for c in centres.tolist():
        for k, st in enumerate(starts):
            if all(st[a] + margin[a] <= c[a] <= st[a] + roi[a] - 1 - margin[a] for a in range(3)):
                owner.append(k)
                break
        else:
            st = tuple(int(min(max(round(c[a]) - roi[a] // 2, 0), padded[a] - roi[a])) for a in range(3))
            starts.append((st[0], st[1], st[2]))
            owner.append(len(starts) - 1)
    return starts, owner


def _coarse_to_fine(
    model: nn.Module,
    x: Tensor,
    *,
    roi: Size3,
    sw_batch_size: int,
    amp: bool,
    progress: bool,
    method: str,
    threshold: float | None,
    top: int,
    search_radius: float | None,
) -> tuple[Tensor, Tensor, Tensor, int]:
    """Coarse whole-volume estimate, then full-resolution windows around it; ``x`` is ``(1, 1, D, H, W)``."""
    shape: Size3 = (x.shape[2], x.shape[3], x.shape[4])

    # STEP 1: the whole volume zoomed by one factor (aspect kept) to fit one window, padded to it (the coarse view
    # that training's zoom_to_fit makes: same zoomed shape, same area averaging, same centred padding).
    coarse_shape = zoom_shape(shape, roi)
    coarse, coarse_pad = _pad_to(F.interpolate(x, size=coarse_shape, mode="area"), roi)  # (1, 1, *roi)
    out = _forward(model, coarse, amp)
    coords, _, _ = _decode_window(
        out, 0, start=(0, 0, 0), pad=coarse_pad, shape=coarse_shape, roi=roi, method=method, threshold=0.0, top=top
    )  # every landmark gets a coarse position, present or not: the fine window decides presence
    scale = torch.tensor([s / c for s, c in zip(shape, coarse_shape)], dtype=coords.dtype, device=coords.device)
    estimate = _clamp_inside((coords + 0.5) * scale - 0.5, shape)  # (L, 3) full-resolution voxels
    near = None if search_radius is None else (estimate, scale * float(search_radius))

    # STEP 2: full-resolution windows around the estimates, shared where a landmark lies well inside one.
    padded_shape = tuple(max(r, s) for s, r in zip(shape, roi))
    xp, pad = _pad_to(x, padded_shape)
    centres = estimate + torch.tensor(pad, dtype=estimate.dtype, device=estimate.device)
    starts, owner = _group_windows(centres, roi, padded_shape, margin=[r // 4 for r in roi])

    # STEP 3: run the windows in batches; each landmark is decoded in its own window.
    results: list[tuple[Tensor, Tensor, Tensor]] = [None] * len(owner)  # type: ignore[list-item]
    batches = range(0, len(starts), sw_batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="fine windows", unit="batch")
    for b0 in batches:
        chunk = starts[b0 : b0 + sw_batch_size]
        windows = torch.cat([xp[:, :, s[0] : s[0] + roi[0], s[1] : s[1] + roi[1], s[2] : s[2] + roi[2]] for s in chunk])
        out = _forward(model, windows, amp)
        for i, st in enumerate(chunk):
            decoded = _decode_window(
                out, i, start=st, pad=pad, shape=shape, roi=roi, method=method, threshold=threshold, top=top,
                near=near,
            )  # fmt: skip
            for landmark, k in enumerate(owner):
                if k == b0 + i:
                    results[landmark] = tuple(t[landmark] for t in decoded)  # type: ignore[assignment]
    coords, present, score = (torch.stack(t) for t in zip(*results))
    return coords, present, score, 1 + len(starts)


# ---------------------------------------------------------------------------------------------------- public API
def predict_volume(
    model: nn.Module,
    image: Tensor | np.ndarray,
    *,
    roi_size: Sequence[int] | int | None = None,
    overlap: float = 0.25,
    sw_batch_size: int = 1,
    method: str = "subvoxel",
    threshold: float | None = None,
    device: torch.device | str | None = None,
    amp: bool = False,
    progress: bool = False,
    strategy: str = "sliding",
    top: int = 4,
    output_device: torch.device | str | None = None,
    search_radius: float | None = 2.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Landmarks of one whole volume of any size: coordinates, presence and score, from the image alone.

    ``strategy="sliding"``: Gaussian-blended sliding windows (:func:`sliding_window_outputs`), then one decoding of
    the whole-volume outputs with :func:`h3de_lite.decoding.predict_landmarks` (eq. 2 + sub-voxel refinement for
    heatmaps; eq. 7–8 on the blended anchor grid for the anchor head). ``strategy="coarse_to_fine"``: the zoomed
    whole volume gives a rough position of every landmark, then full-resolution windows centred on those positions
    give the result (see the module docstring); a volume that fits in one window is handled by one window either
    way. Runs in eval mode under ``torch.inference_mode()``; the model's training mode is restored afterwards.

    Args:
        model: :class:`~h3de_lite.models.h3de_net.H3DENet` (either head) or any network with the heatmap contract.
        image: ``(1, D, H, W)`` or ``(D, H, W)`` intensities in [0, 255] as ``LandmarkDataset`` returns them.
        roi_size: window ``(D, H, W)``, multiples of 32 (the training crop, e.g. ``get_preset("tiny").input_size``);
            default the model's ``input_size`` attribute if it has one, else required.
        overlap: overlap of neighbouring sliding windows, in [0, 1) (``"sliding"`` only).
        sw_batch_size: windows per forward pass.
        method: heatmap decoding, ``"subvoxel"`` or ``"argmax"`` (eq. 2).
        threshold: presence threshold passed to the decoder; ``None`` keeps its default (heatmaps: every landmark
            present, eq. 2; anchors: existence probability ≥ 0.5).
        device: where the network runs (default: the model's device).
        amp: float16 autocast on CUDA (ignored on CPU).
        progress: show a tqdm progress bar over the windows.
        strategy: ``"sliding"`` or ``"coarse_to_fine"``.
        top: anchors voting per landmark (anchor head).
        output_device: where sliding-window outputs are accumulated (default ``device``).
        search_radius: ``"coarse_to_fine"`` only: each landmark is searched in its fine window only within this
            many coarse voxels of its coarse estimate (an ellipsoid of ``search_radius`` zoom factors per axis), so
            a similar tooth elsewhere in the window cannot take its place; ``None`` searches the whole window.

    Returns:
        ``(coords (L, 3) float32 voxel coordinates of the input volume, present (L,) bool, score (L,) float32)`` on
        the CPU; coordinates are ``NaN`` for absent landmarks and inside ``[0, size - 1]`` otherwise.

    Shape:
        image ``(1, D, H, W)`` → coords ``(L, 3)``, present ``(L,)``, score ``(L,)``.

    Example:
        >>> model = nn.Conv3d(1, 2, kernel_size=1)  # stands in for H3DENet.from_preset("tiny", num_landmarks=2)
        >>> coords, present, score = predict_volume(model, torch.rand(1, 37, 50, 29) * 255, roi_size=(64, 64, 32))
        >>> coords.shape
        torch.Size([2, 3])

    Explained in notebooks/07_evaluation.ipynb.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if method not in ("argmax", "subvoxel"):
        raise ValueError(f"method must be 'argmax' or 'subvoxel', got {method!r}")
    if threshold is not None and not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold must be None or lie in [0, 1], got {threshold!r}")
    if search_radius is not None and not (math.isfinite(float(search_radius)) and float(search_radius) > 0):
        raise ValueError(f"search_radius must be None or a positive number of coarse voxels, got {search_radius!r}")
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ValueError(f"top must be a positive integer (anchors voting per landmark), got {top!r}")
    x = _as_volume(image)
    roi = _resolve_roi(model, roi_size, DIVISOR)
    fits = all(s <= r for s, r in zip(x.shape[2:], roi))
    if strategy == "sliding" or fits:
        outputs = sliding_window_outputs(
            model, x[0], roi_size=roi, overlap=overlap, sw_batch_size=sw_batch_size, device=device, amp=amp,
            progress=progress, keep_heatmaps=False, output_device=output_device,
        )  # fmt: skip
        coords, present, score = outputs.decode(method=method, threshold=threshold, top=top)
    else:
        if isinstance(sw_batch_size, bool) or not isinstance(sw_batch_size, int) or sw_batch_size < 1:
            raise ValueError(f"sw_batch_size must be a positive integer, got {sw_batch_size!r}")
        run_device = torch.device(device) if device is not None else _model_device(model)
        with _evaluating(model):
            coords, present, score, _ = _coarse_to_fine(
                model, x.to(run_device), roi=roi, sw_batch_size=sw_batch_size, amp=amp, progress=progress,
                method=method, threshold=threshold, top=top, search_radius=search_radius,
            )  # fmt: skip
    # Clones made outside inference mode are ordinary tensors (callers may modify them in place).
    return coords.float().cpu().clone(), present.cpu().clone(), score.float().cpu().clone()


@dataclass(frozen=True)
class CasePrediction:
    """Result of :func:`predict_case`.

    Args:
        coords: ``(L, 3)`` (or ``(B, L, 3)`` for a batch) voxel coordinates of the image predicted on.
        present: ``(L,)`` / ``(B, L)`` bool.
        score: ``(L,)`` / ``(B, L)`` peak heatmap value or highest existence probability.
        world: the same points in world coordinates (RAS, mm) through the affine, ``None`` without an affine;
            ``NaN`` rows for absent landmarks.
        case_id: the case identifier(s), when known.
    """

    coords: Tensor
    present: Tensor
    score: Tensor
    world: Tensor | None
    case_id: str | list[str] | None


def predict_case(
    model: nn.Module,
    case_or_path: Case | str | Path | Mapping[str, Any],
    *,
    affine: np.ndarray | Tensor | None = None,
    window: Sequence[float] | None = DEFAULT_WINDOW,
    **kwargs: Any,
) -> CasePrediction:
    """Landmarks of a case in voxels and, through its voxel → world affine, in world coordinates (RAS, mm).

    Accepts a :class:`~h3de_lite.data.case.Case` or a volume file in Hounsfield units (a NIfTI image or an MML
    ``<id>_volume.nrrd``; label files are never read), windowed to [0, 255] with ``window`` (paper §III-A); or a
    ``LandmarkDataset`` sample or ``DataLoader`` batch (a mapping with ``"image"`` already in [0, 255]), predicted
    volume by volume. Only the image is used: ground-truth landmarks in a ``Case`` or sample are ignored.

    Args:
        model: the network (see :func:`predict_volume`).
        case_or_path: ``Case``, path, or mapping with ``"image"`` ``(1, D, H, W)`` or ``(B, 1, D, H, W)``.
        affine: ``(4, 4)`` (or ``(B, 4, 4)``) voxel → world matrix of the image predicted on; default the case's or
            file's affine, none for a mapping (then ``world`` is ``None``). For a cropped or resampled dataset sample
            pass the affine of the sample's grid, or map ``coords`` back with
            :func:`h3de_lite.data.transforms.to_source_voxels`.
        window: HU window mapped to [0, 255] for cases and files; ``None`` when their intensities already are.
        kwargs: passed to :func:`predict_volume` (``roi_size``, ``strategy``, ``threshold``, ...).

    Shape:
        one volume → coords and world ``(L, 3)``, present and score ``(L,)``; a batch of B → ``(B, L, 3)`` and
        ``(B, L)``.

    Example:
        >>> model = nn.Conv3d(1, 2, kernel_size=1)  # stands in for H3DENet.from_preset("tiny", num_landmarks=2)
        >>> case = Case(volume=np.full((40, 40, 20), -1000.0), landmarks=np.full((2, 3), np.nan), spacing=[1, 1, 2],
        ...             names=("a", "b"))
        >>> predict_case(model, case, roi_size=(64, 64, 32)).world.shape
        torch.Size([2, 3])

    Explained in notebooks/07_evaluation.ipynb.
    """
    case_id: str | list[str] | None
    if isinstance(case_or_path, Mapping):
        if "image" not in case_or_path:
            raise ValueError(f"a sample must hold 'image' (LandmarkDataset), got keys {sorted(case_or_path)}")
        images = torch.as_tensor(case_or_path["image"])
        batched = images.ndim == 5
        if not batched:
            images = images[None]
        results = [predict_volume(model, image, **kwargs) for image in images]
        coords, present, score = (torch.stack(t) for t in zip(*results))
        case_id = case_or_path.get("case_id")
        if not batched:
            coords, present, score = coords[0], present[0], score[0]
    else:
        if isinstance(case_or_path, (str, Path)):
            case_or_path = read_image(case_or_path)  # the image alone: a label file is never opened
        if isinstance(case_or_path, Case):
            volume, case_affine, case_id = case_or_path.volume, case_or_path.affine, case_or_path.case_id
        else:
            raise ValueError(
                f"case_or_path must be a Case, a NIfTI/NRRD path or a LandmarkDataset sample, "
                f"got {type(case_or_path).__name__}"
            )
        image = np.asarray(volume, dtype=np.float32) if window is None else normalize_intensity(volume, window=window)
        coords, present, score = predict_volume(model, torch.from_numpy(np.ascontiguousarray(image))[None], **kwargs)
        affine = case_affine if affine is None else affine
    world = None
    if affine is not None:
        matrix = np.asarray(affine.detach().cpu() if isinstance(affine, Tensor) else affine, dtype=np.float64)
        points = coords.numpy().astype(np.float64)
        if matrix.ndim == 3:
            if points.ndim != 3 or len(matrix) != len(points):
                raise ValueError(f"affine of shape {matrix.shape} needs a batch of {len(matrix)} volumes")
            world = torch.from_numpy(np.stack([voxel_to_world(p, m) for p, m in zip(points, matrix)]))
        else:
            world = torch.from_numpy(voxel_to_world(points, matrix))
    return CasePrediction(coords=coords, present=present, score=score, world=world, case_id=case_id)
