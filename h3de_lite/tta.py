"""Test-time augmentation: average a heatmap network with its left–right mirror image.

Not in the paper. The mandible is close to mirror-symmetric: flipped along the patient's left–right axis, a scan is
the scan of a (mirrored) patient whose left and right landmarks have swapped names (the same fact that
:func:`h3de_lite.data.augment.flip_lr` uses in training). :class:`MirrorAverage` runs the network on a window and
on its mirror image, maps the second output back (flip the volume axis, swap each L/R channel pair) and averages
the two raw outputs:

- for a ``softmax_ce`` model the raw outputs are logits, so the decoded heatmap ``exp(mean logits)`` is the geometric
  mean of the two views' probabilities: a peak survives only where both views put one. On phantom v2 this removed
  the gross errors of the shipped ``heatmap`` model, a second, look-alike tooth that one view alone preferred
  (book/benchmark_training.md, "Mirror averaging");
- for an MSE model (the paper's eq. 13) the heatmaps themselves are averaged.

Each sliding window is averaged with its own mirror, so this composes with
:func:`h3de_lite.inference.predict_volume` unchanged, at twice the network time. The anchor head's outputs live on
an anchor grid whose mirror would need offsets negated and anchors re-indexed; it is not supported (a clear error).

Explained in notebooks/07_evaluation.ipynb.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from h3de_lite.data.augment import mirror_rows

__all__ = ["TTA_MODES", "MirrorAverage", "with_tta"]

TTA_MODES: tuple[str, ...] = ("none", "flip")
"""Test-time augmentations: ``"none"``, or ``"flip"`` (:class:`MirrorAverage`)."""


class MirrorAverage(nn.Module):
    """A heatmap network averaged with itself on the left–right mirror image of its input.

    ``out = (f(x) + swap(flip(f(flip(x))))) / 2``, ``flip`` mirroring the array axis ``axis`` of the volume and
    ``swap`` putting channel ``rows[i]`` in place ``i`` (:func:`~h3de_lite.data.augment.mirror_rows` of the
    landmark names). Equivariant by construction: the output for the mirrored input is the mirrored, swapped output.

    Args:
        model: network mapping ``(B, 1, D, H, W)`` to heatmaps (or heatmap logits) ``(B, L, D, H, W)``.
        names: the L landmark names, one per output channel (``L…``/``R…`` pairs swap).
        axis: the volume axis along the patient's left–right direction (0 in h3de-lite, as in training).

    Raises:
        ValueError: ``axis`` not 0, 1 or 2, or (in ``forward``) a model that does not return a heatmap tensor with
            one channel per name.

    Shape:
        ``(B, 1, D, H, W)`` → ``(B, L, D, H, W)``.

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

    def _heatmaps(self, x: Tensor) -> Tensor:
        out = self.model(x)
        if not isinstance(out, Tensor):
            raise ValueError(
                f"test-time mirror averaging needs a heatmap model (a tensor (B, L, D, H, W)), got "
                f"{type(out).__name__}; the anchor head is not supported: use tta='none'"
            )
        if out.ndim != 5 or out.shape[1] != self.rows.numel():
            raise ValueError(
                f"the model returned shape {tuple(out.shape)}; expected (B, L={self.rows.numel()}, D, H, W), one "
                "channel per landmark name"
            )
        return out

    def forward(self, x: Tensor) -> Tensor:
        dim = 2 + self.axis  # (B, C, D, H, W): volume axes start at 2
        direct = self._heatmaps(x)  # (B, L, D, H, W)
        mirrored = self._heatmaps(torch.flip(x, dims=[dim]))  # the mirrored patient: L and R names swapped
        back = torch.flip(mirrored, dims=[dim]).index_select(1, self.rows.to(mirrored.device))  # (B, L, D, H, W)
        return (direct + back) / 2


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
