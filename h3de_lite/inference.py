"""Whole-volume inference (minimal stand-in: one forward pass on the volume padded to a multiple of 32).

Placeholder with the signature of the real module (sliding windows, written separately); only what
:func:`h3de_lite.training.fit` needs for validation.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from h3de_lite.decoding import predict_landmarks

__all__ = ["predict_volume"]

DIVISOR = 32  # five stride-2 stages


def predict_volume(
    model: nn.Module,
    image: torch.Tensor,
    *,
    roi_size: Any = None,
    overlap: float = 0.25,
    sw_batch_size: int = 1,
    method: str = "subvoxel",
    threshold: float | None = None,
    device: Any = None,
    amp: bool = False,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Landmarks of one whole volume: scale to [0, 1], pad, one forward pass, decode, in the input's voxels.

    ``roi_size``, ``overlap``, ``sw_batch_size`` and ``progress`` are accepted and ignored here.

    Args:
        model: a model with the heatmap (or anchor dict) contract, in eval mode.
        image: ``(1, D, H, W)`` in [0, 255], as :class:`~h3de_lite.data.LandmarkDataset` returns it.
        method: heatmap decoding, ``"subvoxel"`` or ``"argmax"``.
        threshold: presence threshold of :func:`~h3de_lite.decoding.predict_landmarks` (``None``: its default).
        device: where the model runs (default: the device of its parameters).
        amp: bfloat16 autocast on CUDA.

    Shape:
        image ``(1, D, H, W)`` → coords ``(L, 3)``, present ``(L,)``, score ``(L,)``.
    """
    if image.ndim != 4 or image.shape[0] != 1:
        raise ValueError(f"image must have shape (1, D, H, W), got {tuple(image.shape)}")
    if device is None:
        device = next(model.parameters()).device
    size = tuple(int(s) for s in image.shape[1:])
    padded = [max(DIVISOR, math.ceil(s / DIVISOR) * DIVISOR) for s in size]
    if max(padded) < 2 * DIVISOR:
        padded[0] = 2 * DIVISOR
    x = image.to(device=device, dtype=torch.float32)[None] / 255.0  # (1, 1, D, H, W) in [0, 1]
    pad = [p for s, t in zip(reversed(size), reversed(padded), strict=True) for p in (0, t - s)]
    x = F.pad(x, pad)
    with torch.no_grad(), torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=amp):
        out = model(x)
    if isinstance(out, torch.Tensor):
        out = out[..., : size[0], : size[1], : size[2]].float()
    else:
        out = {k: v.float() for k, v in out.items()}
    kwargs = {} if threshold is None else {"threshold": threshold}
    coords, present, score = predict_landmarks(out, method=method, **kwargs)
    return coords[0], present[0], score[0]
