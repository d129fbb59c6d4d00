"""Attention modules: V-BRA (volumetric bi-level routing attention) and its dense counterpart.

Both share one parameter layout (``qkv``, ``lepe``, ``proj``), so a state dict trained with one runs in the other, and
V-BRA with ``topk`` equal to the number of regions computes exactly dense attention.

Explained in notebooks/03_attention.ipynb.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from h3de_lite.layers.conv import records_autograd
from h3de_lite.layers.routing import (
    RegionLayout,
    Routing,
    attention_scale,
    check_backend,
    gather_regions,
    make_layout,
    merge_regions,
    normalize_grid,
    pad_to_layout,
    partition_regions,
    regional_routing_attention,
    routing_scale,
    token_mask,
)

__all__ = ["BiLevelRoutingAttention3d", "DenseAttention3d", "DepthwiseConv3d", "Routing"]

#: oneDNN's linear op is there and enabled (``torch.backends.mkldnn``): checked once, see :func:`_linear`.
_ONEDNN_LINEAR: bool = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class _DepthwiseConv3dFunction(torch.autograd.Function):
    """Depthwise 3D convolution (stride 1, 'same' padding) whose backward is made of forward convolutions.

    oneDNN's backward of depthwise 3D convolutions is 3–9× slower than its forward on CPU (PyTorch 2.13). Both
    gradients are convolutions themselves: the input gradient convolves the output gradient with the flipped
    kernel; the weight gradient of channel c correlates the padded input of channel c with its output gradient,
    i.e. a grouped convolution whose "kernel" is the output gradient (one sample at a time, summed).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, padding):  # noqa: ANN001, ANN205
        ctx.save_for_backward(x, weight)
        ctx.padding = padding
        ctx.has_bias = bias is not None
        return F.conv3d(x, weight, bias, padding=padding, groups=x.shape[1])

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        x, weight = ctx.saved_tensors
        pad, channels = ctx.padding, x.shape[1]
        # Under autocast the forward ran in a lower precision than x and weight: compute in the gradient's dtype,
        # as autocast's own conv backward does, and hand each gradient back in its input's dtype.
        low = grad.dtype
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            flipped = weight.flip(2, 3, 4).to(low)
            grad_x = F.conv3d(grad, flipped, padding=pad, groups=channels).to(x.dtype)  # (B, C, D, H, W)
        if ctx.needs_input_grad[1]:
            # Channel c of sample i: the input (1, C, D, H, W) "convolved" with its output gradient as kernel.
            grad_w = (
                sum(
                    F.conv3d(x[i : i + 1].to(low), grad[i : i + 1].transpose(0, 1), padding=pad, groups=channels)
                    for i in range(x.shape[0])
                )
                .transpose(0, 1)
                .to(weight.dtype)
            )  # (C, 1, k, k, k)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum(dim=(0, 2, 3, 4)).to(weight.dtype)
        return grad_x, grad_w, grad_b, None


class DepthwiseConv3d(nn.Conv3d):
    """Depthwise 3D convolution with stride 1 and 'same' padding (odd kernel), with a faster CPU backward.

    An ``nn.Conv3d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels)`` (same parameters and
    state dict) whose backward runs as forward convolutions (:class:`_DepthwiseConv3dFunction`): same gradients,
    several times faster than oneDNN's depthwise 3D backward on CPU. Used for LePE and the block's position
    embedding.

    Args:
        channels: C, in and out.
        kernel_size: odd kernel size k.
        bias: learn a bias.

    Shape:
        ``(B, C, D, H, W)`` → ``(B, C, D, H, W)``.

    Example:
        >>> DepthwiseConv3d(channels=4, kernel_size=3)(torch.randn(1, 4, 5, 6, 7)).shape
        torch.Size([1, 4, 5, 6, 7])
    """

    def __init__(self, *, channels: int, kernel_size: int, bias: bool = True) -> None:
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd for 'same' padding, got {kernel_size}")
        super().__init__(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return _DepthwiseConv3dFunction.apply(x, self.weight, self.bias, self.padding[0])


def _to_regions(x: Tensor, layout: RegionLayout) -> Tensor:
    """Channels-last tokens ``(B, D, H, W, C)`` → padded region layout ``(B, R, T, C)`` (a copy, unless R = 1)."""
    return partition_regions(pad_to_layout(_channels_last_contiguous(x), layout), layout)


class _RegionProjection(torch.autograd.Function):
    """STEP 1 of V-BRA while autograd records: q and k|v of the tokens, in region layout, keeping the caller's tokens.

    The projections need the region layout (the attention reads regions), so the tokens are copied into it first.
    ``F.linear`` on that copy would keep the copy for its weight gradient until the backward: ``B·N·C`` floats that
    live through the whole forward and backward. This function keeps the caller's tensor instead (the block's
    LayerNorm output, or the module's input: alive anyway, or the copy's equal in size) and makes the region copy
    again in the backward, for the moment the weight gradient needs it. Same arithmetic as ``F.linear``; padded
    tokens are zeros, so their projections are the bias, as before.

    Shape:
        x ``(B, D, H, W, C)`` (any strides), weight ``(2·qk_dim + C, C)``, bias ``(2·qk_dim + C,)`` →
        q ``(B, R, T, qk_dim)``, kv ``(B, R, T, qk_dim + C)``.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, layout, qk_dim):  # noqa: ANN001, ANN205
        regions = _to_regions(x, layout)  # (B, R, T, C)
        q = F.linear(regions, weight[:qk_dim], bias[:qk_dim])  # (B, R, T, qk_dim)
        kv = F.linear(regions, weight[qk_dim:], bias[qk_dim:])  # (B, R, T, qk_dim + C)
        ctx.save_for_backward(x, weight)
        ctx.layout, ctx.qk_dim = layout, qk_dim
        return q, kv

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_q, grad_kv):  # noqa: ANN001, ANN205
        x, weight = ctx.saved_tensors
        layout, qk = ctx.layout, ctx.qk_dim
        grad_x = grad_w = grad_b = None
        c = weight.shape[1]
        b, r, t = layout_shape = (x.shape[0], layout.num_regions, layout.tokens_per_region)
        # Under autocast the projections ran in a lower precision: compute in the gradients' dtype, as autocast's own
        # linear backward does, and hand each gradient back in its input's dtype.
        low = (grad_q if grad_q is not None else grad_kv).dtype
        if grad_q is None:  # an output that reached no loss
            grad_q = weight.new_zeros(*layout_shape, qk, dtype=low)
        if grad_kv is None:
            grad_kv = weight.new_zeros(*layout_shape, weight.shape[0] - qk, dtype=low)
        grad_q, grad_kv = grad_q.reshape(b * r * t, -1), grad_kv.reshape(b * r * t, -1)  # (B·R·T, ·)
        if ctx.needs_input_grad[1]:
            regions = _to_regions(x, layout).reshape(-1, c).to(low)  # (B·R·T, C), made again for this product
            grad_w = torch.cat([grad_q.t() @ regions, grad_kv.t() @ regions]).to(weight.dtype)  # (2·qk + C, C)
            del regions
        if ctx.needs_input_grad[2]:
            grad_b = torch.cat([grad_q.sum(0), grad_kv.sum(0)]).to(weight.dtype)  # (2·qk + C,)
        if ctx.needs_input_grad[0]:
            w_low = weight.to(low)
            grad_regions = torch.addmm(grad_kv @ w_low[qk:], grad_q, w_low[:qk])  # (B·R·T, C)
            d, h, w = layout.spatial_shape
            grad_x = merge_regions(grad_regions.view(b, r, t, c), layout)[:, :d, :h, :w].to(x.dtype)  # (B, D, H, W, C)
        return grad_x, grad_w, grad_b, None, None


def _linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear``, through oneDNN's matmul (bias fused) for float32 CPU inference.

    PyTorch 2.13's ``F.linear`` on CPU fills the output with the bias and then calls MKL's sgemm on it; oneDNN's
    inner product (``torch.ops.mkldnn._linear_pointwise``, what ``torch.compile`` calls on CPU) adds the bias inside
    the matmul, 1.2–1.5× faster for the token projections here, same float32 result. It has no autograd formula, so
    it runs only when autograd does not record (and when oneDNN is available and enabled); otherwise ``F.linear``.

    Shape:
        ``(..., in)`` → ``(..., out)``.
    """
    onednn = _ONEDNN_LINEAR and torch.backends.mkldnn.enabled
    if onednn and not records_autograd(x, weight, bias) and x.dtype == torch.float32 and x.device.type == "cpu":
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class _Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state dict) whose forward is :func:`_linear`."""

    def forward(self, x: Tensor) -> Tensor:
        return _linear(x, self.weight, self.bias)


def _channels_last_contiguous(x: Tensor) -> Tensor:
    """A contiguous copy of channels-last tokens ``(B, D, H, W, C)`` (``x`` itself when it is contiguous already).

    A channels-first volume seen channels-last (``x.permute(0, 2, 3, 4, 1)`` of a contiguous ``(B, C, D, H, W)``, what
    :meth:`BiLevelRoutingAttention3d.forward` passes) is transposed as B ``(C, D·H·W)`` matrices: PyTorch copies a
    transposed 2D float tensor block by block, about twice as fast as the same copy seen as a 5D permutation.
    """
    if x.is_contiguous():
        return x
    b, d, h, w, c = x.shape
    if not x.permute(0, 4, 1, 2, 3).is_contiguous():
        return x.contiguous()
    if b == 1:
        return x.reshape(d * h * w, c).contiguous().view(b, d, h, w, c)  # (D·H·W, C) from a (C, D·H·W).T view
    return torch.stack([t.reshape(d * h * w, c).contiguous() for t in x.unbind(0)]).view(b, d, h, w, c)


def _add_regions(lepe: Tensor | None, out: Tensor, layout: RegionLayout) -> Tensor:
    """``lepe + merge_regions(out)`` cropped to the volume; added into ``lepe`` in place when nothing is padded.

    Without padding the region layout is a permutation of the volume's memory (a strided view): the sum then reads
    ``out`` through that view and writes into ``lepe``, one pass with no merged copy and no new tensor.

    Args:
        lepe: ``(B, D, H, W, C)`` contiguous (overwritten), or None (LePE disabled: the merged ``out`` alone).
        out: ``(B, R, T, C)`` contiguous region layout.
        layout: from :func:`~h3de_lite.layers.routing.make_layout`.

    Shape:
        → ``(B, D, H, W, C)``.
    """
    d, h, w = layout.spatial_shape
    if lepe is None or layout.needs_padding or not lepe.is_contiguous():
        merged = merge_regions(out, layout)[:, :d, :h, :w]  # (B, D, H, W, C), padding cropped
        return merged if lepe is None else lepe + merged
    (sd, sh, sw), (td, th, tw) = layout.grid, layout.region_size
    b, c = out.shape[0], out.shape[-1]
    regions = out.view(b, sd, sh, sw, td, th, tw, c).permute(0, 1, 4, 2, 5, 3, 6, 7)  # (B, sd, td, sh, th, sw, tw, C)
    lepe.view(b, sd, td, sh, th, sw, tw, c).add_(regions)  # the volume (B, D, H, W, C) seen as regions of tokens
    return lepe


class _AttentionBase(nn.Module):
    """Shared parameters and validation: ``qkv`` projection, LePE depthwise conv on v, output projection ``proj``."""

    def __init__(self, *, dim: int, num_heads: int, qk_dim: int | None, lepe_kernel: int) -> None:
        super().__init__()
        qk_dim = dim if qk_dim is None else qk_dim
        if dim < 1 or num_heads < 1:
            raise ValueError(f"dim and num_heads must be positive, got dim={dim}, num_heads={num_heads}")
        if dim % num_heads or qk_dim % num_heads:
            raise ValueError(
                f"dim ({dim}) and qk_dim ({qk_dim}) must be divisible by num_heads ({num_heads}); "
                "change num_heads or the channel counts"
            )
        if lepe_kernel < 0 or (lepe_kernel > 0 and lepe_kernel % 2 == 0):
            raise ValueError(f"lepe_kernel must be odd (e.g. 3 or 5) or 0 to disable LePE, got {lepe_kernel}")
        self.dim = dim
        self.num_heads = num_heads
        self.qk_dim = qk_dim
        self.qkv = _Linear(dim, 2 * qk_dim + dim)
        self.lepe = DepthwiseConv3d(channels=dim, kernel_size=lepe_kernel) if lepe_kernel > 0 else None
        self.proj = _Linear(dim, dim)

    def _check_input(self, x: Tensor) -> None:
        if x.ndim != 5 or x.shape[-1] != self.dim:
            raise ValueError(
                f"{type(self).__name__} expects channels-last input (B, D, H, W, C={self.dim}) here, "
                f"got shape {tuple(x.shape)}"
            )

    def _lepe(self, v: Tensor) -> Tensor:
        """LePE: depthwise 3D conv of the values ``(B, D, H, W, C)`` → ``(B, D, H, W, C)``; zeros when disabled.

        oneDNN's depthwise 3D conv is about 3× faster when ``v`` is contiguous (the conv then runs channels-last 3D
        and so does its result) than on a strided view such as a channel slice of the qkv projection (PyTorch 2.13).
        """
        if self.lepe is None:
            return torch.zeros_like(v)
        return self.lepe(v.permute(0, 4, 1, 2, 3)).permute(0, 2, 3, 4, 1)  # conv in (B, C, D, H, W), back

    def forward_channels_last(self, x: Tensor) -> Tensor:  # pragma: no cover - overridden
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, D, H, W)`` → ``(B, C, D, H, W)``."""
        if x.ndim != 5 or x.shape[1] != self.dim:
            raise ValueError(f"{type(self).__name__} expects (B, C={self.dim}, D, H, W), got shape {tuple(x.shape)}")
        out = self.forward_channels_last(x.permute(0, 2, 3, 4, 1))  # (B, D, H, W, C)
        return out.permute(0, 4, 1, 2, 3)  # (B, C, D, H, W)


class BiLevelRoutingAttention3d(_AttentionBase):
    """Volumetric bi-level routing attention, V-BRA (paper Sec. II, eq. 3–4; BiFormer's BRA in 3D).

    STEP 1 projects tokens to q, k, v. STEP 2 cuts the volume into ``S_d × S_h × S_w`` regions, averages q and k per
    region (real tokens only) and keeps, per query region, the ``topk`` key regions of highest
    ``softmax(Qʳ Kʳᵀ/√d)`` (eq. 3). STEP 3 lets every query token attend, with ``num_heads`` heads, to the tokens of
    its region's routed regions (eq. 4); a depthwise 3D conv of v (LePE) is added and the result projected.

    Sizes that do not divide into regions are zero-padded at the far end of D, H and W; padded tokens are left out of
    the region means and masked out of the attention, and the output is cropped back.

    Inference (autograd not recording) takes a leaner path with the same numbers: float32 projections through oneDNN
    (:func:`_linear`), the attention output written over q in larger chunks (``out=`` of
    :func:`~h3de_lite.layers.routing.regional_routing_attention`) and LePE added into the merged output in place.
    While autograd records, the projections keep the caller's tokens for their backward rather than the region copy
    they read (:class:`_RegionProjection`), and the CPU attention keeps no gathered keys/values: forward+backward
    peak memory below dense attention's at 32×32×16 tokens (``benchmarks/attention.py``).

    Args:
        dim: channels C.
        num_heads: heads M; ``dim`` and ``qk_dim`` must be divisible by it.
        regions_per_side: S, or ``(S_d, S_h, S_w)``.
        topk: k key regions per query region, ``1 ≤ k ≤ S_d·S_h·S_w``.
        qk_dim: channels of q and k (default ``dim``).
        lepe_kernel: kernel of the LePE depthwise conv (odd), 0 to disable.
        qk_scale: token attention scale of eq. 4 (default ``(qk_dim / num_heads) ** -0.5``); the routing of eq. 3
            always scales by ``qk_dim ** -0.5`` (see "the two scales" in :mod:`h3de_lite.layers.routing`).
        fused: ``F.scaled_dot_product_attention`` (True) or the written-out einsum reference (False); gather path.
        query_chunk: query regions per chunk of the gather path (over the B·R of the batch); None picks it from the
            gathered size (:func:`~h3de_lite.layers.routing.auto_query_chunk`).
        backend: STEP 3 implementation: ``"gather"`` (gather the routed keys/values, attend per region),
            ``"flex"`` (block-sparse ``flex_attention``, no gather) or ``"auto"`` (gather on CPU; on CUDA the faster
            of the two, measured once per shape). See :func:`~h3de_lite.layers.routing.regional_routing_attention`.

    Shape:
        input ``(B, C, D, H, W)`` → output ``(B, C, D, H, W)``; with ``return_routing=True`` also a
        :class:`~h3de_lite.layers.routing.Routing` with indices/scores ``(B, R, k)``.

    Example:
        >>> attn = BiLevelRoutingAttention3d(dim=32, num_heads=4, regions_per_side=2, topk=2)
        >>> attn(torch.randn(1, 32, 8, 8, 4)).shape
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
        qk_dim: int | None = None,
        lepe_kernel: int = 5,
        qk_scale: float | None = None,
        fused: bool = True,
        query_chunk: int | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__(dim=dim, num_heads=num_heads, qk_dim=qk_dim, lepe_kernel=lepe_kernel)
        self.grid = normalize_grid(regions_per_side)
        num_regions = self.grid[0] * self.grid[1] * self.grid[2]
        if not (isinstance(topk, int) and 1 <= topk <= num_regions):
            raise ValueError(
                f"topk must be an int between 1 and the number of regions {num_regions} "
                f"(regions_per_side={self.grid}), got {topk!r}"
            )
        if query_chunk is not None and query_chunk < 1:
            raise ValueError(f"query_chunk must be a positive number of regions or None (automatic), got {query_chunk}")
        self.topk = topk
        # eq. 4 scales per head, eq. 3 by the full query/key width: see h3de_lite.layers.routing (the two scales).
        self.scale = qk_scale if qk_scale is not None else attention_scale(self.qk_dim, num_heads)
        self.routing_scale = routing_scale(self.qk_dim)
        self.fused = fused
        self.query_chunk = query_chunk
        self.backend = check_backend(backend)
        # The key/value gather; benchmarks swap in routing.naive_gather (the BiFormer-legacy expansion) here.
        self.gather = gather_regions

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, regions_per_side={self.grid}, topk={self.topk}, "
            f"backend={self.backend!r}"
        )

    def forward_channels_last(self, x: Tensor, *, return_routing: bool = False) -> Tensor | tuple[Tensor, Routing]:
        """V-BRA on channels-last tokens ``(B, D, H, W, C)`` → ``(B, D, H, W, C)`` (what :class:`VBRABlock` calls)."""
        self._check_input(x)
        d, h, w = x.shape[1:4]
        layout = make_layout((d, h, w), self.grid)
        valid = token_mask(layout, device=x.device) if layout.needs_padding else None  # (R, T) or None

        # STEP 1: linear projection to q and to k, v (side by side, so one gather serves both), in region layout.
        weight, bias = self.qkv.weight, self.qkv.bias  # rows: q (qk_dim), k (qk_dim), v (dim)
        if records_autograd(x, weight, bias):
            q, kv = _RegionProjection.apply(x, weight, bias, layout, self.qk_dim)  # keeps x, not a region copy
        else:
            x = _to_regions(x, layout)  # (B, R, T, C)
            q = _linear(x, weight[: self.qk_dim], bias[: self.qk_dim])  # (B, R, T, qk_dim)
            kv = _linear(x, weight[self.qk_dim :], bias[self.qk_dim :])  # (B, R, T, qk_dim + C)
        del x

        # STEP 2 + STEP 3: region-to-region routing (eq. 3) and token-to-token attention (eq. 4). In inference the
        # output overwrites q chunk by chunk (each chunk of queries is read first): no memory of its own.
        inference = not (torch.is_grad_enabled() and q.requires_grad)
        out, indices, scores, values = regional_routing_attention(
            q,
            kv,
            num_heads=self.num_heads,
            topk=self.topk,
            scale=self.scale,
            routing_scale=self.routing_scale,
            valid=valid,
            fused=self.fused,
            query_chunk=self.query_chunk,
            gather=self.gather,
            backend=self.backend,
            out=q if inference and self.qk_dim == self.dim else None,
            return_values=True,
        )  # (B, R, T, C) each; values: v, whose gradient joins kv's inside the attention's backward when it records
        del q, kv

        # LePE: depthwise conv of v on the (unpadded) volume, added before the output projection.
        lepe = None
        if self.lepe is not None:
            v = merge_regions(values, layout)[:, :d, :h, :w].contiguous()  # (B, D, H, W, C)
            del values  # a view of kv in inference: free kv before the conv
            lepe = self._lepe(v)  # (B, D, H, W, C)
            del v
        out = self.proj(_add_regions(lepe, out, layout))  # (B, D, H, W, C)
        if return_routing:
            return out, Routing(indices=indices, scores=scores, grid=layout.grid, padded_shape=layout.padded_shape)
        return out

    def forward(self, x: Tensor, *, return_routing: bool = False) -> Tensor | tuple[Tensor, Routing]:
        """``(B, C, D, H, W)`` → ``(B, C, D, H, W)`` (and the :class:`Routing` when ``return_routing``)."""
        if x.ndim != 5 or x.shape[1] != self.dim:
            raise ValueError(f"{type(self).__name__} expects (B, C={self.dim}, D, H, W), got shape {tuple(x.shape)}")
        result = self.forward_channels_last(x.permute(0, 2, 3, 4, 1), return_routing=return_routing)
        if return_routing:
            out, routing = result
            return out.permute(0, 4, 1, 2, 3), routing  # (B, C, D, H, W)
        return result.permute(0, 4, 1, 2, 3)  # (B, C, D, H, W)


class DenseAttention3d(_AttentionBase):
    """Plain multi-head self-attention over all ``D·H·W`` tokens, with V-BRA's parameters (``qkv``, ``lepe``, ``proj``).

    The dense reference of the attention benchmark, and what V-BRA computes when ``topk`` equals the number of
    regions. Uses ``F.scaled_dot_product_attention``; its projections run like V-BRA's (:func:`_linear`).

    Args:
        dim: channels C.
        num_heads: heads M.
        qk_dim: channels of q and k (default ``dim``).
        lepe_kernel: kernel of the LePE depthwise conv (odd), 0 to disable.

    Shape:
        ``(B, C, D, H, W)`` → ``(B, C, D, H, W)``.

    Example:
        >>> DenseAttention3d(dim=32, num_heads=4)(torch.randn(1, 32, 8, 8, 4)).shape
        torch.Size([1, 32, 8, 8, 4])

    Explained in notebooks/03_attention.ipynb.
    """

    def __init__(self, *, dim: int, num_heads: int = 8, qk_dim: int | None = None, lepe_kernel: int = 5) -> None:
        super().__init__(dim=dim, num_heads=num_heads, qk_dim=qk_dim, lepe_kernel=lepe_kernel)

    def forward_channels_last(self, x: Tensor) -> Tensor:
        """Dense attention on channels-last tokens ``(B, D, H, W, C)`` → ``(B, D, H, W, C)``."""
        self._check_input(x)
        d, h, w = x.shape[1:4]
        q, k, v = self.qkv(x).split([self.qk_dim, self.qk_dim, self.dim], dim=-1)  # (B, D, H, W, ·) each
        lepe = self._lepe(v)  # (B, D, H, W, C)
        to_heads = "b d h w (m c) -> b m (d h w) c"
        q, k, v = (rearrange(t, to_heads, m=self.num_heads) for t in (q, k, v))  # (B, M, N, c)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, M, N, C/M)
        del q, k, v  # free before the output projection
        out = rearrange(out, "b m (d h w) c -> b d h w (m c)", d=d, h=h, w=w)  # (B, D, H, W, C)
        return self.proj(out + lepe)  # (B, D, H, W, C)
