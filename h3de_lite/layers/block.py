"""The V-BRA transformer block (paper Fig. 1a; the BiFormer block in 3D) and stochastic depth.

Explained in notebooks/03_attention.ipynb.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from h3de_lite.layers.attention import BiLevelRoutingAttention3d, DepthwiseConv3d

__all__ = ["DropPath", "Mlp", "VBRABlock"]


class DropPath(nn.Module):
    """Stochastic depth: zero a whole sample's residual branch with probability ``drop_prob`` while training.

    Kept samples are scaled by ``1 / (1 - drop_prob)`` so the expectation is unchanged; identity in eval mode.

    Args:
        drop_prob: probability of dropping a sample's branch, in ``[0, 1)``.

    Shape:
        any ``(B, ...)`` → same shape.

    Example:
        >>> DropPath(drop_prob=0.1)(torch.ones(2, 3, 4)).shape
        torch.Size([2, 3, 4])

    Explained in notebooks/03_attention.ipynb.
    """

    def __init__(self, *, drop_prob: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop_prob (drop_path) must be in [0, 1), got {drop_prob}")
        self.drop_prob = drop_prob

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x
        keep = 1.0 - self.drop_prob
        mask = torch.empty((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype, device=x.device).bernoulli_(
            keep
        )  # (B, 1, ..., 1)
        return x * mask / keep


class Mlp(nn.Module):
    """Token-wise feed-forward network ``Linear → act → Linear`` on channels-last tokens.

    Args:
        dim: channels C in and out.
        hidden_dim: hidden channels (``mlp_ratio · dim`` in the block).
        act_layer: activation class.

    Shape:
        ``(..., C)`` → ``(..., C)``.

    Example:
        >>> Mlp(dim=8, hidden_dim=32)(torch.randn(2, 4, 4, 4, 8)).shape
        torch.Size([2, 4, 4, 4, 8])
    """

    def __init__(self, *, dim: int, hidden_dim: int, act_layer: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VBRABlock(nn.Module):
    """V-BRA transformer block (paper Fig. 1a): depthwise-conv position embedding, V-BRA and an MLP, pre-norm residuals.

    ``x = x + DWConv3x3x3(x)``; ``x = x + DropPath(V-BRA(LN(x)))``; ``x = x + DropPath(MLP(LN(x)))``. LayerNorm and
    the MLP act over channels on a channels-last view; the attention follows eq. 3–4
    (:class:`~h3de_lite.layers.attention.BiLevelRoutingAttention3d`).

    Args:
        dim: channels C.
        num_heads: attention heads M (``dim`` divisible by it).
        regions_per_side: S, or ``(S_d, S_h, S_w)``.
        topk: routed regions per query region, ``1 ≤ k ≤ S_d·S_h·S_w``.
        mlp_ratio: MLP hidden channels / C.
        drop_path: stochastic depth probability of both residual branches (0 → ``nn.Identity``).
        qk_dim: channels of q and k (default ``dim``).
        lepe_kernel: LePE depthwise kernel inside the attention (odd, 0 disables).
        norm_layer: normalisation class over channels, built as ``norm_layer(dim)``.
        act_layer: MLP activation class.
        backend: STEP 3 implementation of the attention, ``"gather"``, ``"flex"`` or ``"auto"``
            (:class:`~h3de_lite.layers.attention.BiLevelRoutingAttention3d`).
        checkpointing: activation checkpointing while training: the block keeps only its input for the backward
            and recomputes its activations there (``torch.utils.checkpoint``, non-reentrant; same values and
            gradients, about one more forward of compute, much less memory).

    Shape:
        ``(B, C, D, H, W)`` → ``(B, C, D, H, W)``.

    Example:
        >>> block = VBRABlock(dim=32, num_heads=4, regions_per_side=2, topk=2)
        >>> block(torch.randn(1, 32, 8, 8, 4)).shape
        torch.Size([1, 32, 8, 8, 4])

    Explained in notebooks/03_attention.ipynb.
    """

    def __init__(
        self,
        *,
        dim: int,
        num_heads: int = 8,
        regions_per_side: int | tuple[int, int, int] = 4,
        topk: int = 4,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        qk_dim: int | None = None,
        lepe_kernel: int = 5,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        act_layer: type[nn.Module] = nn.GELU,
        backend: str = "auto",
        checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be positive, got {mlp_ratio}")
        if not 0.0 <= drop_path < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {drop_path}")
        self.pos_embed = DepthwiseConv3d(channels=dim, kernel_size=3)
        self.norm1 = norm_layer(dim)
        self.attn = BiLevelRoutingAttention3d(
            dim=dim,
            num_heads=num_heads,
            regions_per_side=regions_per_side,
            topk=topk,
            qk_dim=qk_dim,
            lepe_kernel=lepe_kernel,
            backend=backend,
        )
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim=dim, hidden_dim=max(1, round(dim * mlp_ratio)), act_layer=act_layer)
        self.drop_path = DropPath(drop_prob=drop_path) if drop_path > 0 else nn.Identity()
        self.checkpointing = checkpointing

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, D, H, W)`` → ``(B, C, D, H, W)``."""
        if x.ndim != 5 or x.shape[1] != self.attn.dim:
            raise ValueError(f"VBRABlock expects (B, C={self.attn.dim}, D, H, W), got shape {tuple(x.shape)}")
        if self.checkpointing and torch.is_grad_enabled():
            # Recomputed in the backward with the same random state (DropPath draws the same samples).
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def _forward(self, x: Tensor) -> Tensor:
        x = x + self.pos_embed(x)  # (B, C, D, H, W)
        x = x.permute(0, 2, 3, 4, 1)  # (B, D, H, W, C), channels last for LayerNorm / MLP / attention
        x = x + self.drop_path(self.attn.forward_channels_last(self.norm1(x)))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x.permute(0, 4, 1, 2, 3)  # (B, C, D, H, W)
