"""The anchor-based head of H3DE-Net: per-anchor landmark offsets (eq. 7) and existence logits (eq. 8).

Departure from the paper (book/faithfulness.md): the head's layers are not in the paper. Here each branch is a
3×3×3 conv → GroupNorm → GELU → 1×1×1 conv on the H/4 decoder feature; offsets are linear (the reference code squashes
them with ``tanh``) and the existence bias starts at the prior ``p = 0.01``.

Explained in notebooks/06_anchors.ipynb.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import nn

from h3de_lite.layers.conv import Conv3d

__all__ = ["AnchorHead"]


def _branch(in_channels: int, hidden_channels: int, out_channels: int) -> nn.Sequential:
    """3×3×3 conv → GroupNorm → GELU → 1×1×1 conv: a small per-location predictor (internal helper)."""
    groups = math.gcd(hidden_channels, 8)
    return nn.Sequential(
        Conv3d(in_channels, hidden_channels, kernel_size=3, padding=1, bias=False),
        nn.GroupNorm(groups, hidden_channels),
        nn.GELU(),
        Conv3d(hidden_channels, out_channels, kernel_size=1),
    )


class AnchorHead(nn.Module):
    """Offsets and existence logits for every anchor of the stride-4 feature map ``U_1``.

    Two branches read the decoder's H/4 feature map. The offset branch predicts, for each of the ``n_a`` anchors at
    each location and each landmark, the offset ``t_hat`` of eq. 7 (``g_hat = f + r * t_hat``); the existence branch
    predicts the logit of the probability of eq. 8 that the landmark exists and belongs to this anchor. The head returns
    logits; the sigmoid is applied inside :func:`h3de_lite.losses.existence_loss` (``binary_cross_entropy_with_logits``)
    and by :func:`h3de_lite.decoding.predict_landmarks` before :meth:`h3de_lite.anchors.AnchorGrid.decode`.

    Each branch is a 3×3×3 conv → GroupNorm → GELU → 1×1×1 conv. The offsets are linear (no ``tanh`` as in the
    reference code): targets of positive anchors lie within about ±1 per axis, and a linear output can reach them
    exactly. The existence bias starts at ``log(p / (1 - p))`` with prior ``p = 0.01`` (the focal-loss / RetinaNet
    initialisation): fewer than one anchor–landmark pair in a thousand is positive, so a zero bias (p = 0.5 everywhere)
    would open training with a large loss whose gradient is all "push the negatives down"; starting from a low prior
    puts the head near the rare positive rate, and the first steps learn where landmarks are instead.

    Args:
        in_channels: channels ``C`` of the input feature map ``U_1``.
        num_landmarks: number of landmarks ``L``.
        num_anchors: anchors per location ``n_a`` (1 for ``"single"``, 3 for ``"multi"``; see
            :data:`h3de_lite.anchors.ANCHOR_CONFIGS`).
        hidden_channels: width of each branch's 3×3×3 conv; defaults to ``in_channels``.
        prior_probability: initial existence probability of every anchor, in (0, 1).

    Shape:
        - input: ``(B, C, d, h, w)``
        - output: ``{"offsets": (B, A, L, 3), "logits": (B, A, L)}`` with ``A = d * h * w * n_a`` in the
          ``(d, h, w, n_a)`` flatten order of :class:`~h3de_lite.anchors.AnchorGrid`.

    Example:
        >>> head = AnchorHead(in_channels=16, num_landmarks=14, num_anchors=3)
        >>> out = head(torch.randn(2, 16, 4, 4, 2))
        >>> out["offsets"].shape, out["logits"].shape
        (torch.Size([2, 96, 14, 3]), torch.Size([2, 96, 14]))

    Explained in notebooks/06_anchors.ipynb.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        num_landmarks: int,
        num_anchors: int = 1,
        hidden_channels: int | None = None,
        prior_probability: float = 0.01,
    ) -> None:
        super().__init__()
        sizes = {"in_channels": in_channels, "num_landmarks": num_landmarks, "num_anchors": num_anchors}
        for name, value in sizes.items():
            if int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        hidden_channels = in_channels if hidden_channels is None else hidden_channels
        if int(hidden_channels) != hidden_channels or hidden_channels < 1:
            raise ValueError(f"hidden_channels must be a positive integer or None, got {hidden_channels!r}")
        if not 0.0 < prior_probability < 1.0:
            raise ValueError(f"prior_probability must lie strictly between 0 and 1, got {prior_probability!r}")
        self.in_channels = int(in_channels)
        self.num_landmarks = int(num_landmarks)
        self.num_anchors = int(num_anchors)
        self.offset_branch = _branch(self.in_channels, int(hidden_channels), 3 * self.num_landmarks * self.num_anchors)
        self.logit_branch = _branch(self.in_channels, int(hidden_channels), self.num_landmarks * self.num_anchors)
        # Offsets start near zero (landmark at the anchor centre); existence starts at the prior.
        nn.init.normal_(self.offset_branch[-1].weight, std=0.01)
        nn.init.zeros_(self.offset_branch[-1].bias)
        nn.init.normal_(self.logit_branch[-1].weight, std=0.01)
        nn.init.constant_(self.logit_branch[-1].bias, math.log(prior_probability / (1.0 - prior_probability)))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Predict ``{"offsets": (B, A, L, 3), "logits": (B, A, L)}`` from ``x`` of shape ``(B, C, d, h, w)``."""
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"AnchorHead expects input of shape (B, {self.in_channels}, d, h, w), got {tuple(x.shape)}"
            )
        n, l = self.num_anchors, self.num_landmarks
        offsets = rearrange(self.offset_branch(x), "b (n l c) d h w -> b (d h w n) l c", n=n, l=l, c=3)
        logits = rearrange(self.logit_branch(x), "b (n l) d h w -> b (d h w n) l", n=n, l=l)
        return {"offsets": offsets, "logits": logits}
