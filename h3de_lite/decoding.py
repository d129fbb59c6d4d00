"""Model outputs of either head → landmark coordinates, presence and score: one call for training, evaluation, book.

- Anchor-free output (a heatmap tensor): arg-max or sub-voxel decoding (eq. 2, :func:`h3de_lite.heatmaps.decode`);
  the score is the peak value of each channel. By default every landmark is present and gets its coordinate, as in
  eq. 2, which has no presence test; a presence threshold on the peak is an option (``threshold=``).
- Anchor-based output (a dict with ``"offsets"`` and ``"logits"``): sigmoid of the logits (eq. 8), then the
  probability-weighted anchor vote of :meth:`h3de_lite.anchors.AnchorGrid.decode` (eq. 7); a landmark is present when
  its highest existence probability reaches the threshold (default 0.5).

Where this departs from the paper (see book/faithfulness.md): the anchor vote over the ``top`` anchors within
``vote_radius`` of the best one, and the optional heatmap threshold, are ours; the paper gives eq. 2 and eq. 7–8 only.

Explained in notebooks/06_anchors.ipynb.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from h3de_lite.anchors import ANCHOR_CONFIGS, AnchorGrid
from h3de_lite.heatmaps import decode as decode_heatmaps

__all__ = ["ANCHOR_THRESHOLD", "predict_landmarks"]

#: Default presence threshold on the highest existence probability of an anchor-based output (eq. 8).
ANCHOR_THRESHOLD = 0.5


def _grid_for(outputs: Mapping[str, torch.Tensor], stride: int) -> AnchorGrid:
    """Build the anchor grid matching an anchor-based output from its heatmap shape and anchor count."""
    if "heatmaps" not in outputs:
        raise ValueError(
            "predict_landmarks: anchor outputs without 'heatmaps' need grid=AnchorGrid(volume_shape, config=...)"
        )
    volume_shape = tuple(outputs["heatmaps"].shape[-3:])
    num_anchors = outputs["logits"].shape[1]
    for config in ANCHOR_CONFIGS:
        grid = AnchorGrid(volume_shape, stride=stride, config=config)
        if grid.num_anchors == num_anchors:
            return grid
    raise ValueError(
        f"predict_landmarks: {num_anchors} anchors match no anchor config ({sorted(ANCHOR_CONFIGS)}) for a volume of "
        f"shape {volume_shape} at stride {stride}; pass grid=AnchorGrid(...) explicitly"
    )


def predict_landmarks(
    outputs: torch.Tensor | Mapping[str, torch.Tensor],
    *,
    grid: AnchorGrid | None = None,
    threshold: float | None = None,
    method: str = "subvoxel",
    top: int = 4,
    stride: int = 4,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Landmarks from the output of either H3DE-Net head.

    Heatmaps (anchor-free): coordinates by :func:`h3de_lite.heatmaps.decode` (``method="argmax"`` is eq. 2,
    ``"subvoxel"`` adds a parabolic refinement); score = the channel's peak value. With the default
    ``threshold=None`` every landmark is present and has a coordinate, as eq. 2 prescribes (the paper's anchor-free
    network is for complete cases). With a number, a landmark is present when its peak reaches it and its coordinates
    are ``NaN`` otherwise: the Gaussian targets peak at 1 (eq. 1) and a missing landmark's target channel is zero, so
    e.g. ``threshold=0.5`` calls a landmark absent when its peak is below half the target's height. This presence
    test is ours, not the paper's.

    Anchor dict (anchor-based): probabilities = sigmoid(logits) (eq. 8), then :meth:`AnchorGrid.decode` (eq. 7) with
    presence = highest probability ≥ ``threshold`` (``None`` means :data:`ANCHOR_THRESHOLD`, 0.5); coordinates are
    ``NaN`` where the landmark is absent. The dict's ``"heatmaps"`` (H3DENet returns them too) only give the volume
    shape when ``grid`` is not passed; the config (single / multi) is inferred from the anchor count.

    Nothing here sees ground truth.

    Args:
        outputs: ``(B, L, D, H, W)`` heatmaps, or ``{"offsets": (B, A, L, 3), "logits": (B, A, L)[, "heatmaps"]}``.
        grid: the :class:`~h3de_lite.anchors.AnchorGrid` of the anchor outputs; built from the heatmap shape if None.
        threshold: presence threshold in [0, 1] on the score (peak value, or highest existence probability).
            ``None`` (default): heatmaps keep every landmark (eq. 2); anchor outputs use :data:`ANCHOR_THRESHOLD`.
        method: heatmap decoding, ``"subvoxel"`` (default) or ``"argmax"``; ignored for anchor outputs.
        top: anchors voting per landmark (anchor outputs only).
        stride: feature stride used when building ``grid`` (4, the H/4 map).

    Returns:
        ``(coords (B, L, 3), present (B, L) bool, score (B, L))``.

    Shape:
        heatmaps ``(B, L, D, H, W)`` or offsets ``(B, A, L, 3)`` + logits ``(B, A, L)`` → coords ``(B, L, 3)``.

    Example:
        >>> from h3de_lite.heatmaps import gaussian_heatmaps
        >>> hm = gaussian_heatmaps(torch.tensor([[[10.3, 20.0, 5.5]]]), (32, 32, 16), sigma=2.0)
        >>> coords, present, score = predict_landmarks(hm)
        >>> coords.shape
        torch.Size([1, 1, 3])

    Explained in notebooks/06_anchors.ipynb.
    """
    if threshold is not None and not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold must lie in [0, 1] or be None (the head's default), got {threshold!r}")
    if isinstance(outputs, torch.Tensor):
        if outputs.ndim != 5:
            raise ValueError(f"heatmap outputs must have shape (B, L, D, H, W), got {tuple(outputs.shape)}")
        if method not in ("argmax", "subvoxel"):
            raise ValueError(f"method must be 'argmax' or 'subvoxel', got {method!r}")
        coords, score = decode_heatmaps(outputs.detach(), method=method, return_score=True)
        if threshold is None:  # eq. 2: every landmark is where its heatmap peaks
            return coords, torch.ones_like(score, dtype=torch.bool), score
        present = score >= float(threshold)
        coords = torch.where(present[..., None], coords, torch.full_like(coords, float("nan")))
        return coords, present, score
    if isinstance(outputs, Mapping):
        if "offsets" not in outputs or "logits" not in outputs:
            raise ValueError(
                "predict_landmarks: a dict output needs 'offsets' and 'logits' (the anchor head's output); "
                f"got keys {sorted(outputs)}"
            )
        if grid is None:
            grid = _grid_for(outputs, stride)
        probabilities = torch.sigmoid(outputs["logits"].detach())
        if threshold is None:
            threshold = ANCHOR_THRESHOLD
        return grid.decode(offsets=outputs["offsets"], probabilities=probabilities, threshold=threshold, top=top)
    raise ValueError(
        f"predict_landmarks: outputs must be a heatmap tensor or the anchor head's dict, got {type(outputs).__name__}"
    )
