"""Test-time augmentation: average a network with itself on the left–right mirror image of its input.

Not in the paper. The mandible is close to mirror-symmetric: flipped along the patient's left–right axis, a scan is
the scan of a (mirrored) patient whose left and right landmarks have swapped names (the same fact that
:func:`h3de_lite.data.augment.flip_lr` uses in training). :class:`MirrorAverage` runs the network on a window and
on its mirror image, maps the second output back (flip the volume axis, swap each L/R channel pair) and averages
the two raw outputs:

- for a ``softmax_ce`` model the raw outputs are logits, so the decoded heatmap ``exp(mean logits)`` is the geometric
  mean of the two views' probabilities: a peak survives only where both views put one. On phantom v2 this removed
  the far-off outliers of the first packaged ``heatmap`` model (book/benchmark_training.md);
- for an MSE model (the paper's eq. 13) the heatmaps themselves are averaged;
- for the anchor head (eq. 7–8) the existence logits and the offsets are averaged anchor by anchor: on a window whose
  size is a multiple of the stride ``u`` the mirror of the anchor in cell ``j`` (centre ``j·u + (u - 1)/2``) is the
  anchor of the same radius in cell ``n/u - 1 - j``, and its offset ``t = (g - f) / r`` (eq. 5) changes sign along
  the flipped axis.

Each sliding window is averaged with its own mirror, so this composes with
:func:`h3de_lite.inference.predict_volume` unchanged, at twice the network time.

Explained in notebooks/07_evaluation.ipynb.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from einops import rearrange
from torch import Tensor, nn

from h3de_lite.data.augment import mirror_rows
from h3de_lite.inference import ANCHOR_STRIDE

__all__ = ["TTA_MODES", "MirrorAverage", "with_tta"]

TTA_MODES: tuple[str, ...] = ("none", "flip")
"""Test-time augmentations: ``"none"``, or ``"flip"`` (:class:`MirrorAverage`)."""


class MirrorAverage(nn.Module):
    """A landmark network averaged with itself on the left–right mirror image of its input.

    ``out = (f(x) + swap(flip(f(flip(x))))) / 2``, ``flip`` mirroring the array axis ``axis`` of the volume (for
    anchor outputs: the anchor cells along that axis, offsets negated along it) and ``swap`` putting channel
    ``rows[i]`` in place ``i`` (:func:`~h3de_lite.data.augment.mirror_rows` of the landmark names). Equivariant by
    construction: the output for the mirrored input is the mirrored, swapped output.

    Args:
        model: network mapping ``(B, 1, D, H, W)`` to heatmaps (or heatmap logits) ``(B, L, D, H, W)``, or the anchor
            head's dict (``"offsets"`` ``(B, A, L, 3)``, ``"logits"`` ``(B, A, L)``, optionally ``"heatmaps"``).
        names: the L landmark names, one per output channel (``L…``/``R…`` pairs swap).
        axis: the volume axis along the patient's left–right direction (0 in h3de-lite, as in training).

    Raises:
        ValueError: ``axis`` not 0, 1 or 2; in ``forward``, outputs without one channel per name, or anchors that do
            not tile the window at the anchor stride.

    Shape:
        ``(B, 1, D, H, W)`` → ``(B, L, D, H, W)``, or the anchor dict with the model's shapes.

    Example:
        >>> net = nn.Conv3d(1, 2, kernel_size=3, padding=1)
        >>> MirrorAverage(net, names=("La", "Ra"))(torch.rand(1, 1, 8, 8, 4)).shape
        torch.Size([1, 2, 8, 8, 4])
    """

    def __init__(self, model: nn.Module, *, names: Sequence[str], axis: int = 0) -> None:
        super().__init__()
        if axis not in (0, 1, 2):
            raise ValueError(f"axis must be 0, 1 or 2 (the left–right volume axis), got {axis!r}")
        self.model = model
        self.axis = axis
        self.register_buffer("rows", torch.from_numpy(mirror_rows(tuple(names))), persistent=False)
        if hasattr(model, "input_size"):
            self.input_size = model.input_size  # sliding-window inference reads the window size from here

    def _checked(self, heatmaps: Tensor) -> Tensor:
        if heatmaps.ndim != 5 or heatmaps.shape[1] != self.rows.numel():
            raise ValueError(
                f"the model returned heatmaps of shape {tuple(heatmaps.shape)}; expected (B, L={self.rows.numel()}, "
                "D, H, W), one channel per landmark name"
            )
        return heatmaps

    def _heatmaps_back(self, mirrored: Tensor) -> Tensor:
        """Heatmaps ``(B, L, D, H, W)`` of the mirrored input in the input's frame: volume axis flipped, L/R swapped."""
        flipped = torch.flip(self._checked(mirrored), dims=[2 + self.axis])
        return flipped.index_select(1, self.rows.to(mirrored.device))

    def _anchors_back(self, name: str, mirrored: Tensor, window: Sequence[int]) -> Tensor:
        """Per-anchor ``(B, A, L)`` logits or ``(B, A, L, 3)`` offsets of the mirrored input in the input's anchors."""
        if any(s % ANCHOR_STRIDE for s in window):
            raise ValueError(f"anchor mirror averaging needs a window that is a multiple of the anchor stride "
                             f"{ANCHOR_STRIDE} on every axis, got {tuple(window)}")  # fmt: skip
        d, h, w = (s // ANCHOR_STRIDE for s in window)
        if mirrored.ndim < 3 or mirrored.shape[1] % (d * h * w) or mirrored.shape[2] != self.rows.numel():
            raise ValueError(f"the anchor head returned {name} of shape {tuple(mirrored.shape)}, which does not tile "
                             f"a {(d, h, w)} grid of cells with one channel per landmark name")  # fmt: skip
        cells = rearrange(mirrored, "b (d h w n) ... -> b d h w n ...", d=d, h=h, w=w)  # anchors as (d, h, w, n_a)
        cells = torch.flip(cells, dims=[1 + self.axis])  # cell j <-> cell (n/u - 1 - j), same radius (n)
        back = rearrange(cells, "b d h w n ... -> b (d h w n) ...").index_select(2, self.rows.to(mirrored.device))
        if name == "offsets":  # eq. 5: t = (g - f) / r changes sign along the mirrored axis
            sign = torch.ones(3, dtype=back.dtype, device=back.device)
            sign[self.axis] = -1.0
            back = back * sign
        return back

    def forward(self, x: Tensor) -> Tensor | dict[str, Tensor]:
        direct = self.model(x)
        mirrored = self.model(torch.flip(x, dims=[2 + self.axis]))  # the mirrored patient: L and R names swapped
        if isinstance(direct, Tensor):
            return (self._checked(direct) + self._heatmaps_back(mirrored)) / 2
        if not (isinstance(direct, Mapping) and "offsets" in direct and "logits" in direct):
            raise ValueError(f"test-time mirror averaging needs heatmaps (B, L, D, H, W) or the anchor head's dict "
                             f"with 'offsets' and 'logits', got {type(direct).__name__}")  # fmt: skip
        out = dict(direct)
        for name in ("offsets", "logits"):
            out[name] = (direct[name] + self._anchors_back(name, mirrored[name], x.shape[2:])) / 2
        if "heatmaps" in direct:
            out["heatmaps"] = (self._checked(direct["heatmaps"]) + self._heatmaps_back(mirrored["heatmaps"])) / 2
        return out


def with_tta(model: nn.Module, tta: str, *, names: Sequence[str], axis: int = 0) -> nn.Module:
    """``model`` itself for ``tta="none"``, :class:`MirrorAverage` of it for ``"flip"``.

    Raises:
        ValueError: an unknown ``tta``.

    Shape:
        as ``model``.

    Example:
        >>> type(with_tta(nn.Identity(), "none", names=())).__name__
        'Identity'
    """
    if tta not in TTA_MODES:
        raise ValueError(f"tta must be one of {TTA_MODES}, got {tta!r}")
    if tta == "none":
        return model
    return MirrorAverage(model, names=names, axis=axis)
