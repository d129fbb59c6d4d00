"""Pure functions behind volumetric bi-level routing attention (V-BRA, paper eq. 3–4).

The volume of tokens is cut into ``S_d × S_h × S_w`` regions. Each region is summarised by the mean of its queries and
keys; a region-to-region affinity ``softmax(Qʳ Kʳᵀ / √d_k)`` (eq. 3) keeps the ``k`` best key regions per query region;
then every query token attends to the tokens of those ``k`` regions only (eq. 4).

**The two scales.** Routing (eq. 3) is one affinity between whole region means, not split into heads, so its
``d_k`` is the width of ``Qʳ`` and ``Kʳ``: ``qk_dim`` (:func:`routing_scale`). Token attention (eq. 4) is multi-head,
and each head scales by its own width ``c = qk_dim / M`` (:func:`attention_scale`), as in every multi-head transformer.
BiFormer uses ``qk_dim ** -0.5`` for both; the top-k choice does not depend on the routing scale (it is taken on the
logits, and a positive scale keeps their order), only the reported eq. 3 probabilities do.

Fixes over the BiFormer / H3DE-Net legacy code:

* sizes that do not divide are padded on the three spatial axes (not the channel axis) and padded tokens are
  **masked**: they do not enter the region means and get no attention weight;
* the key/value gather indexes a flat ``(B·R, T, C)`` view with ``(B, R, k)`` region indices, so only the
  ``(B, R, k·T, C)`` result is allocated (never a ``(B, R, R, T, C)`` expansion), keys and values in one go;
* the token attention runs over chunks of query regions, which bounds the gathered memory; heads stay side by side in
  the channels and reach ``F.scaled_dot_product_attention`` as strided views, without copies;
* on CPU the backward gathers each chunk again instead of keeping every gathered key and value
  (:class:`_RoutedFlashAttentionCPU`): training keeps no k-fold copy of the keys and values;
* on CPU without autograd the output can overwrite the queries chunk by chunk (``out=q``), so inference allocates
  no output of its own and spends that memory on fewer, larger chunks.

STEP 3 has a second implementation without any gather: one block-sparse ``flex_attention`` call whose BlockMask is
the routing (:func:`flex_routed_attention`); ``backend="auto"`` picks between the two (:func:`resolve_backend`).

Symbols: B batch, M heads, R regions, T tokens per region, k top-k, c channels per head, n query regions of a chunk.

Explained in notebooks/03_attention.ipynb.
"""

from __future__ import annotations

import math
import threading
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from h3de_lite.layers.workers import ChunkClaims, ChunkWorkers, chunk_workers, parallel_lanes

__all__ = [
    "AUTO_CHUNK_BYTES",
    "BACKENDS",
    "CUDA_FLEX_BLOCK",
    "LANE_MIN_MACS",
    "RegionLayout",
    "Routing",
    "attention_scale",
    "auto_query_chunk",
    "check_backend",
    "fastest",
    "flex_block_size",
    "flex_routed_attention",
    "gather_attention",
    "gather_key_mask",
    "gather_regions",
    "make_layout",
    "merge_regions",
    "naive_gather",
    "normalize_grid",
    "pad_to_layout",
    "partition_regions",
    "region_means",
    "regional_routing_attention",
    "resolve_backend",
    "route_regions",
    "routed_block_mask",
    "routing_scale",
    "token_attention_fused",
    "token_attention_reference",
    "token_mask",
]

#: Budget (bytes) for the tensors gathered per chunk of query regions when ``query_chunk`` is automatic.
AUTO_CHUNK_BYTES: int = 4 * 2**20

#: Least attention work per chunk (multiply-adds of QKᵀ and AV) for V-BRA's CPU chunks to run on worker threads
#: (:mod:`h3de_lite.layers.workers`). On the 2-core machine the worker threads made 16×16×8 tokens (chunks of about
#: 3·10⁶ multiply-adds) slower and 32×32×16 tokens (3·10⁷ and more) faster: ``benchmarks/attention.py``, ``serial``
#: against ``gather``.
LANE_MIN_MACS: int = 2**24


class RegionLayout(NamedTuple):
    """How a ``(D, H, W)`` token grid is cut into regions.

    Attributes:
        grid: ``(S_d, S_h, S_w)`` regions per axis.
        region_size: ``(t_d, t_h, t_w)`` tokens per region and axis, ``t = ceil(size / S)``.
        spatial_shape: ``(D, H, W)`` of the unpadded tokens.
        padded_shape: ``(S_d·t_d, S_h·t_h, S_w·t_w)``.
    """

    grid: tuple[int, int, int]
    region_size: tuple[int, int, int]
    spatial_shape: tuple[int, int, int]
    padded_shape: tuple[int, int, int]

    @property
    def num_regions(self) -> int:
        """R = S_d·S_h·S_w."""
        return math.prod(self.grid)

    @property
    def tokens_per_region(self) -> int:
        """T = t_d·t_h·t_w."""
        return math.prod(self.region_size)

    @property
    def needs_padding(self) -> bool:
        """True when the padded grid is larger than the input grid."""
        return self.padded_shape != self.spatial_shape


class Routing(NamedTuple):
    """The region-to-region routing of one V-BRA call (what the attention notebook draws).

    Attributes:
        indices: ``(B, R, k)`` long, the key regions routed to each query region, best first.
        scores: ``(B, R, k)`` float, their eq. 3 probabilities ``softmax(Qʳ Kʳᵀ/√d_k)`` over all R key regions,
            with ``d_k = qk_dim`` (:func:`routing_scale`).
        grid: ``(S_d, S_h, S_w)``; region ``r`` sits at ``np.unravel_index(r, grid)``.
        padded_shape: ``(D', H', W')`` token grid after padding to whole regions.
    """

    indices: Tensor
    scores: Tensor
    grid: tuple[int, int, int]
    padded_shape: tuple[int, int, int]


def normalize_grid(regions_per_side: int | tuple[int, int, int] | list[int]) -> tuple[int, int, int]:
    """Return ``regions_per_side`` as a triple ``(S_d, S_h, S_w)`` of positive ints.

    Args:
        regions_per_side: one int for all axes or three ints.

    Example:
        >>> normalize_grid(4)
        (4, 4, 4)
    """
    if isinstance(regions_per_side, bool):
        raise ValueError(f"regions_per_side must be an int or three ints, got {regions_per_side!r}")
    if isinstance(regions_per_side, int):
        grid = (regions_per_side,) * 3
    else:
        grid = tuple(regions_per_side)
    if len(grid) != 3 or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in grid):
        raise ValueError(
            f"regions_per_side must be a positive int or three positive ints (S_d, S_h, S_w), got {regions_per_side!r}"
        )
    return grid  # type: ignore[return-value]


def routing_scale(qk_dim: int) -> float:
    """The eq. 3 scale ``1/√d_k`` of region routing, with ``d_k = qk_dim`` (routing is not split into heads).

    Args:
        qk_dim: channels of the queries and keys (all heads together).

    Example:
        >>> routing_scale(64)
        0.125
    """
    return float(qk_dim) ** -0.5


def attention_scale(qk_dim: int, num_heads: int) -> float:
    """The eq. 4 scale ``1/√c`` of token attention, with ``c = qk_dim / num_heads`` the width of one head.

    Args:
        qk_dim: channels of the queries and keys (all heads together).
        num_heads: M.

    Example:
        >>> attention_scale(64, 4)
        0.25
    """
    return float(qk_dim // num_heads) ** -0.5


def make_layout(spatial_shape: tuple[int, int, int], grid: tuple[int, int, int]) -> RegionLayout:
    """Cut a ``(D, H, W)`` token grid into ``grid`` regions of ``ceil(size / S)`` tokens, padding at the far end.

    A region can end up holding only padding (e.g. D=9, S=4 gives regions of 3 and a last region of padding); such
    regions are masked everywhere and cropped from the output.

    Args:
        spatial_shape: ``(D, H, W)``.
        grid: ``(S_d, S_h, S_w)``.

    Example:
        >>> make_layout((9, 10, 7), (2, 2, 2)).padded_shape
        (10, 10, 8)
    """
    spatial = tuple(int(s) for s in spatial_shape)
    size = tuple(-(-n // s) for n, s in zip(spatial, grid, strict=True))
    padded = tuple(s * t for s, t in zip(grid, size, strict=True))
    return RegionLayout(grid=tuple(grid), region_size=size, spatial_shape=spatial, padded_shape=padded)  # type: ignore[arg-type]


def pad_to_layout(x: Tensor, layout: RegionLayout) -> Tensor:
    """Zero-pad a channels-last volume at the far end of D, H and W up to ``layout.padded_shape``.

    Args:
        x: ``(B, D, H, W, C)``.
        layout: from :func:`make_layout`.

    Shape:
        ``(B, D, H, W, C)`` → ``(B, D', H', W', C)``.

    Example:
        >>> pad_to_layout(torch.ones(1, 9, 10, 7, 2), make_layout((9, 10, 7), (2, 2, 2))).shape
        torch.Size([1, 10, 10, 8, 2])
    """
    if not layout.needs_padding:
        return x
    pd, ph, pw = (p - s for p, s in zip(layout.padded_shape, layout.spatial_shape, strict=True))
    # F.pad lists the last axis first: (C: none, W, H, D) — the channel axis is never padded.
    return F.pad(x, (0, 0, 0, pw, 0, ph, 0, pd))


def partition_regions(x: Tensor, layout: RegionLayout) -> Tensor:
    """Group a padded channels-last volume into regions of tokens.

    Args:
        x: ``(B, D', H', W', C)`` with ``(D', H', W') == layout.padded_shape``.
        layout: from :func:`make_layout`.

    Shape:
        ``(B, D', H', W', C)`` → ``(B, R, T, C)``, regions in ``(S_d, S_h, S_w)`` C order.

    Example:
        >>> lay = make_layout((8, 8, 4), (2, 2, 2))
        >>> partition_regions(torch.zeros(1, 8, 8, 4, 3), lay).shape
        torch.Size([1, 8, 32, 3])
    """
    sd, sh, sw = layout.grid
    return rearrange(x, "b (sd td) (sh th) (sw tw) c -> b (sd sh sw) (td th tw) c", sd=sd, sh=sh, sw=sw)


def merge_regions(x: Tensor, layout: RegionLayout) -> Tensor:
    """Inverse of :func:`partition_regions`.

    Args:
        x: ``(B, R, T, C)``.
        layout: from :func:`make_layout`.

    Shape:
        ``(B, R, T, C)`` → ``(B, D', H', W', C)``.

    Example:
        >>> lay = make_layout((8, 8, 4), (2, 2, 2))
        >>> merge_regions(torch.zeros(1, 8, 32, 3), lay).shape
        torch.Size([1, 8, 8, 4, 3])
    """
    sd, sh, sw = layout.grid
    td, th, tw = layout.region_size
    return rearrange(
        x, "b (sd sh sw) (td th tw) c -> b (sd td) (sh th) (sw tw) c", sd=sd, sh=sh, sw=sw, td=td, th=th, tw=tw
    )


def token_mask(layout: RegionLayout, *, device: torch.device | str | None = None) -> Tensor:
    """Which tokens of each region are real (True) rather than padding (False).

    Args:
        layout: from :func:`make_layout`.
        device: device of the returned mask.

    Shape:
        ``(R, T)`` bool.

    Example:
        >>> token_mask(make_layout((3, 2, 2), (2, 1, 1))).sum().item()
        12
    """
    d, h, w = layout.spatial_shape
    real = torch.zeros(layout.padded_shape, dtype=torch.bool, device=device)
    real[:d, :h, :w] = True
    return partition_regions(real[None, ..., None], layout)[0, ..., 0]  # (R, T)


def region_means(x: Tensor, valid: Tensor | None = None, *, dtype: torch.dtype | None = None) -> Tensor:
    """Mean of each region's tokens, over real tokens only (a region of padding gets 0, never NaN).

    Args:
        x: ``(N, R, T, C)``.
        valid: ``(R, T)`` bool from :func:`token_mask`, or None when nothing is padded.
        dtype: accumulate and return in this dtype (default: ``x``'s).

    Shape:
        ``(N, R, T, C)`` → ``(N, R, C)``.

    Example:
        >>> region_means(torch.ones(2, 8, 32, 3)).shape
        torch.Size([2, 8, 3])
    """
    if valid is None:
        return x.mean(dim=2, dtype=dtype)
    x = x if dtype is None else x.to(dtype)
    weights = valid.to(x.dtype)  # (R, T)
    count = weights.sum(dim=1).clamp(min=1.0)  # (R,)
    return torch.einsum("nrtc,rt->nrc", x, weights) / count[:, None]  # (N, R, C)


def route_regions(
    query_regions: Tensor,
    key_regions: Tensor,
    *,
    topk: int,
    scale: float,
    key_valid: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Region-to-region routing (paper eq. 3): ``Aʳ = softmax(Qʳ Kʳᵀ · scale)``, keep the top-k key regions.

    The top-k is taken on the **logits** ``Qʳ Kʳᵀ · scale`` (padding regions at ``-inf``), not on the probabilities:
    softmax is monotonic, so the choice is the same whenever the probabilities are distinct, but probabilities
    underflow to exactly 0 once logits differ by more than about 104 (float32) or 17 (float16), and ``topk`` would
    then break those ties arbitrarily, even picking a region of pure padding. The scores are the eq. 3 probabilities
    of the chosen regions, computed in at least float32 (and returned in the input dtype).

    Key regions made only of padding (``key_valid`` False) get probability 0 and are picked only after every real
    region (when ``topk`` exceeds the number of real regions).

    Args:
        query_regions: ``(B, R, C)`` region means of the queries, Qʳ.
        key_regions: ``(B, R, C)`` region means of the keys, Kʳ.
        topk: how many key regions each query region keeps, ``1 ≤ k ≤ R``.
        scale: ``1/√d_k`` in eq. 3 (:func:`routing_scale`).
        key_valid: ``(R,)`` bool, True for regions holding at least one real token; None if all do.

    Shape:
        → indices ``(B, R, k)`` long (best first), scores ``(B, R, k)`` probabilities.

    Example:
        >>> idx, p = route_regions(torch.randn(1, 8, 4), torch.randn(1, 8, 4), topk=2, scale=0.5)
        >>> idx.shape
        torch.Size([1, 8, 2])
    """
    num_regions = key_regions.shape[1]
    if not 1 <= topk <= num_regions:
        raise ValueError(f"topk must be between 1 and the number of regions R={num_regions}, got {topk}")
    # Few, small ops (B·R² logits): a forward makes this call once, and on 64 regions each op's fixed cost dominates.
    logits = torch.bmm(query_regions, key_regions.transpose(1, 2)).mul_(scale)  # (B, R, R)
    if key_valid is not None:
        logits.masked_fill_(~key_valid[None, None, :], float("-inf"))
    indices = torch.topk(logits, k=topk, dim=-1).indices  # (B, R, k): select on logits, never on probabilities
    # eq. 3 probabilities of the chosen regions, computed in at least float32.
    wide = torch.promote_types(logits.dtype, torch.float32)
    scores = torch.softmax(logits, dim=-1, dtype=wide).gather(-1, indices).to(logits.dtype)  # (B, R, k)
    return indices, scores


def gather_regions(x: Tensor, indices: Tensor) -> Tensor:
    """Collect, for each query region, the tokens of its routed regions.

    Indexes a flat ``(N·R, T, C)`` view with one ``index_select``; only the ``(N, R_q, k·T, C)`` result is allocated.

    Args:
        x: ``(N, R, T, C)`` keys and/or values in regions (N: batch).
        indices: ``(N, R_q, k)`` long region indices in ``[0, R)``.

    Shape:
        → ``(N, R_q, k·T, C)``.

    Example:
        >>> gather_regions(torch.randn(2, 8, 32, 3), torch.zeros(2, 8, 4, dtype=torch.long)).shape
        torch.Size([2, 8, 128, 3])
    """
    n, r, t, c = x.shape
    _, rq, k = indices.shape
    offsets = torch.arange(n, device=indices.device)[:, None, None] * r  # (N, 1, 1)
    flat = (indices + offsets).reshape(-1)  # (N·R_q·k,)
    # A 2D (rows, T·C) view: index_select copies whole rows, much faster than on the 3D view.
    picked = x.reshape(n * r, t * c).index_select(0, flat)  # (N·R_q·k, T·C)
    return picked.view(n, rq, k * t, c)  # (N, R_q, k·T, C)


def naive_gather(x: Tensor, indices: Tensor) -> Tensor:
    """The BiFormer-legacy gather, kept as a benchmark baseline: expand to ``(N, R_q, R, T, C)`` then ``torch.gather``.

    The expand itself is a view, but ``torch.gather`` needs an index as large as its output and autograd scatters
    into the full expanded shape, so memory and time grow with ``R``. Equal to :func:`gather_regions`.

    Args:
        x: ``(N, R, T, C)``.
        indices: ``(N, R_q, k)`` long.

    Shape:
        → ``(N, R_q, k·T, C)``.

    Example:
        >>> naive_gather(torch.randn(2, 8, 32, 3), torch.zeros(2, 8, 4, dtype=torch.long)).shape
        torch.Size([2, 8, 128, 3])
    """
    n, r, t, c = x.shape
    _, rq, k = indices.shape
    expanded = x[:, None].expand(n, rq, r, t, c)  # (N, R_q, R, T, C), a view
    index = indices[..., None, None].expand(n, rq, k, t, c)  # (N, R_q, k, T, C)
    return torch.gather(expanded, 2, index).reshape(n, rq, k * t, c)  # (N, R_q, k·T, C)


def gather_key_mask(valid: Tensor, indices: Tensor) -> Tensor:
    """Real-token mask of the gathered keys.

    Args:
        valid: ``(R, T)`` bool from :func:`token_mask`.
        indices: ``(N, R_q, k)`` long.

    Shape:
        → ``(N, R_q, k·T)`` bool.

    Example:
        >>> gather_key_mask(torch.ones(8, 32, dtype=torch.bool), torch.zeros(2, 8, 4, dtype=torch.long)).shape
        torch.Size([2, 8, 128])
    """
    return rearrange(valid[indices], "n r k t -> n r (k t)")  # (N, R_q, k·T)


def token_attention_reference(
    q: Tensor, k: Tensor, v: Tensor, *, num_heads: int, scale: float, key_mask: Tensor | None = None
) -> Tensor:
    """Token-to-token attention inside routed regions (paper eq. 4), written out: einsum, mask, softmax, einsum.

    Each of the n query regions attends, head by head, to its own S = k·T gathered keys.

    Args:
        q: ``(n, T, M·c)`` queries of n regions, heads side by side in the channels.
        k: ``(n, S, M·c)`` gathered keys.
        v: ``(n, S, M·c_v)`` gathered values.
        num_heads: M.
        scale: ``1/√c``.
        key_mask: ``(n, S)`` bool, True for real keys; None when nothing is padded.

    Shape:
        → ``(n, T, M·c_v)``.

    Example:
        >>> token_attention_reference(torch.randn(8, 32, 8), torch.randn(8, 64, 8), torch.randn(8, 64, 10),
        ...                           num_heads=2, scale=0.5).shape
        torch.Size([8, 32, 10])
    """
    q, k, v = (rearrange(t, "n t (m c) -> n m t c", m=num_heads) for t in (q, k, v))  # (n, M, T|S, c)
    logits = torch.einsum("nmtc,nmsc->nmts", q, k) * scale  # (n, M, T, S)
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    weights = logits.softmax(dim=-1)  # (n, M, T, S)
    out = torch.einsum("nmts,nmsc->nmtc", weights, v)  # (n, M, T, c_v)
    return rearrange(out, "n m t c -> n t (m c)")  # (n, T, M·c_v)


def token_attention_fused(
    q: Tensor, k: Tensor, v: Tensor, *, num_heads: int, scale: float, key_mask: Tensor | None = None
) -> Tensor:
    """Same as :func:`token_attention_reference` through ``F.scaled_dot_product_attention``.

    Heads become SDPA's batch axis and regions its head axis, both as strided views (no copies); PyTorch's flash
    kernel never stores the ``(T, S)`` weights, and its output keeps the queries' memory layout, so folding the
    heads back into the channels is a view too.

    Args:
        q: ``(n, T, M·c)``.
        k: ``(n, S, M·c)``.
        v: ``(n, S, M·c_v)``.
        num_heads: M.
        scale: ``1/√c``.
        key_mask: ``(n, S)`` bool, True for real keys; None when nothing is padded.

    Shape:
        → ``(n, T, M·c_v)``.

    Example:
        >>> token_attention_fused(torch.randn(8, 32, 8), torch.randn(8, 64, 8), torch.randn(8, 64, 10),
        ...                       num_heads=2, scale=0.5).shape
        torch.Size([8, 32, 10])
    """
    q, k, v = (rearrange(t, "n t (m c) -> m n t c", m=num_heads) for t in (q, k, v))  # (M, n, T|S, c), views
    mask = None if key_mask is None else key_mask[None, :, None, :]  # (1, n, 1, S)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)  # (M, n, T, c_v)
    return rearrange(out, "m n t c -> n t (m c)")  # (n, T, M·c_v)


def auto_query_chunk(
    *,
    num_query_regions: int,
    tokens_per_region: int,
    topk: int,
    kv_channels: int,
    num_heads: int,
    element_size: int,
    fused: bool,
    budget: int,
) -> int:
    """Number of query regions per chunk so that what one chunk gathers stays within ``budget`` bytes.

    Per query region the gather holds ``k·T`` keys and values of ``kv_channels`` channels; the reference path also
    stores ``M·T·k·T`` attention weights (twice: logits and softmax). At least one region per chunk.

    Args:
        num_query_regions: B·R, all query regions of the batch.
        tokens_per_region: T.
        topk: k.
        kv_channels: channels of a key plus a value, ``M·(c + c_v)``.
        num_heads: M.
        element_size: bytes per element.
        fused: whether the fused path (no stored weights) runs.
        budget: bytes per chunk.

    Example:
        >>> auto_query_chunk(num_query_regions=64, tokens_per_region=256, topk=4, kv_channels=128, num_heads=4,
        ...                  element_size=4, fused=True, budget=2**22)
        8
    """
    keys = topk * tokens_per_region
    per_region = keys * kv_channels * element_size
    if not fused:
        per_region += 2 * num_heads * tokens_per_region * keys * element_size
    return max(1, min(num_query_regions, budget // per_region))


def _chunks(total: int, size: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` covering ``range(total)`` in pieces of ``size``."""
    return [(start, min(start + size, total)) for start in range(0, total, size)]


def gather_attention(
    q: Tensor,
    kv: Tensor,
    rows: Tensor,
    *,
    num_heads: int,
    scale: float,
    key_mask: Tensor | None = None,
    fused: bool = True,
    query_chunk: int,
    gather: Callable[[Tensor, Tensor], Tensor] = gather_regions,
) -> Tensor:
    """STEP 3, the readable gather path: per chunk of query regions, gather the routed keys/values, then attend.

    Plain autograd: while autograd records, the backward keeps every chunk's gathered keys and values. On CPU,
    :func:`regional_routing_attention` runs the same computation through :class:`_RoutedFlashAttentionCPU`, which
    keeps none of them (tested equal, values and gradients).

    Args:
        q: ``(N, T, M·c)`` queries of all N = B·R query regions.
        kv: ``(N, T, M·c + M·c_v)`` keys then values, rows of the same N regions.
        rows: ``(N, k)`` long, the kv rows (regions, batch offsets included) routed to each query region.
        num_heads: M.
        scale: ``1/√c`` (eq. 4).
        key_mask: ``(N, k·T)`` bool, True for real gathered keys; None when nothing is padded.
        fused: :func:`token_attention_fused` (True) or :func:`token_attention_reference` (False).
        query_chunk: query regions per chunk.
        gather: :func:`gather_regions` or :func:`naive_gather`.

    Shape:
        → ``(N, T, M·c_v)``.

    Example:
        >>> rows = torch.tensor([[0, 1], [1, 2], [2, 0]])
        >>> gather_attention(torch.randn(3, 4, 8), torch.randn(3, 4, 16), rows, num_heads=2, scale=0.5,
        ...                  query_chunk=2).shape
        torch.Size([3, 4, 8])
    """
    num_queries, tokens, qk_channels = q.shape
    attend = token_attention_fused if fused else token_attention_reference
    flat_kv = kv[None]  # (1, N, T, M·(c + c_v)): one "batch" whose regions are all rows
    chunks = _chunks(num_queries, query_chunk)
    out = None if len(chunks) == 1 else q.new_empty((num_queries, tokens, kv.shape[-1] - qk_channels))
    for start, stop in chunks:
        kv_sel = gather(flat_kv, rows[None, start:stop])[0]  # (n, k·T, M·(c + c_v))
        k_sel, v_sel = kv_sel.split([qk_channels, kv_sel.shape[-1] - qk_channels], dim=-1)  # split: no zero-filled
        mask = None if key_mask is None else key_mask[start:stop]  # slice gradients in the backward
        chunk_out = attend(q[start:stop], k_sel, v_sel, num_heads=num_heads, scale=scale, key_mask=mask)
        del kv_sel, k_sel, v_sel  # free this chunk's gather before the next one is made
        if out is None:
            out = chunk_out
        else:
            out[start:stop] = chunk_out
    return out


def _additive_mask(key_mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """``(n, S)`` bool → ``(n, 1, 1, S)`` additive mask (0 or −inf) in ``dtype``: the CPU kernel's mask format."""
    if key_mask is None:
        return None
    additive = torch.zeros(key_mask.shape, dtype=dtype, device=key_mask.device).masked_fill_(~key_mask, float("-inf"))
    return additive[:, None, None, :]  # (n, 1, 1, S): one row per query region, broadcast over heads and queries


def _split_heads(x: Tensor, num_heads: int) -> Tensor:
    """``(n, L, M·c)`` → ``(n, M, L, c)``, a view: regions are the flash kernel's batch, heads its heads."""
    n, length, channels = x.shape
    return x.view(n, length, num_heads, channels // num_heads).transpose(1, 2)


def _gather_chunk(
    kv_rows: Tensor, rows: Tensor, buffer: Tensor, *, qk_channels: int, num_heads: int
) -> tuple[Tensor, Tensor]:
    """Gather the kv rows of one chunk into ``buffer``; return its keys and values as ``(n, M, k·T, c)`` views."""
    n, topk = rows.shape
    picked = torch.index_select(kv_rows, 0, rows.reshape(-1), out=buffer[: n * topk])  # (n·k, T·M·(c + c_v))
    picked = picked.view(n, -1, 2 * qk_channels)  # (n, k·T, M·(c + c_v)): the k regions' tokens one after the other
    return _split_heads(picked[..., :qk_channels], num_heads), _split_heads(picked[..., qk_channels:], num_heads)


def _routed_flash_forward(
    q: Tensor,
    kv: Tensor,
    rows: Tensor,
    key_mask: Tensor | None,
    *,
    num_heads: int,
    scale: float,
    query_chunk: int,
    out: Tensor | None = None,
    keep_lse: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """The forward of :class:`_RoutedFlashAttentionCPU`: output ``(N, T, M·c)`` and, if ``keep_lse``, ``(N, M, T)``.

    Regions are the flash kernel's batch axis and heads its head axis, so that the kernel's output, laid out
    ``(n, T, M, c)``, is already a contiguous chunk of the region-layout output: one plain copy per chunk into ``out``.
    ``out`` may be ``q`` itself (inference): a chunk's queries are read by the kernel before its output lands there.

    With more than one thread the chunks run on :func:`~h3de_lite.layers.workers.chunk_workers`' single-threaded
    workers, in lanes that each claim the next chunk when free (:class:`~h3de_lite.layers.workers.ChunkClaims`),
    each lane with its own gather buffer, the chunks shrinking towards the end (:func:`_tapered_chunks`) and the last
    one-region chunks cut into halves of the heads (:func:`_split_tail_heads`): the same arithmetic per query region
    and head, so the same result bit for bit.
    """
    num_queries, tokens, qk_channels = q.shape
    attention = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    kv_rows = kv.reshape(num_queries, -1)  # (N, T·M·(c + c_v)) one row per region
    out = q.new_empty((num_queries, tokens, qk_channels)) if out is None else out  # (N, T, M·c)
    q_heads = _split_heads(q, num_heads)  # (N, M, T, c) view
    out_heads = out.view(num_queries, tokens, num_heads, -1)  # (N, T, M, c) view
    # In the kernel's accumulation dtype: float64 for float64, float32 otherwise.
    lse = q.new_empty((num_queries, num_heads, tokens), dtype=_lse_dtype(q.dtype)) if keep_lse else None
    chunks = _chunks(num_queries, query_chunk)
    workers = _lane_workers(chunks, tokens=tokens, keys=rows.shape[1] * tokens, channels=qk_channels)
    lanes = 1 if workers is None else min(workers.num_workers, len(chunks))
    if lanes > 1:
        chunks = _tapered_chunks(num_queries, query_chunk, lanes=lanes)

    pieces = _split_tail_heads(chunks, num_heads=num_heads) if lanes > 1 else [(a, b, slice(None)) for a, b in chunks]
    claims = ChunkClaims(count=len(pieces))

    def run(lane: int) -> None:  # the pieces this lane claims: one gather buffer, reused by each
        buffer = kv.new_empty((min(query_chunk, num_queries) * rows.shape[1], kv_rows.shape[1]))
        gathered = None  # the (start, stop) whose keys and values the buffer holds
        for start, stop, heads in (pieces[i] for i in iter(claims, None)):
            if gathered != (start, stop):
                k_sel, v_sel = _gather_chunk(
                    kv_rows, rows[start:stop], buffer, qk_channels=qk_channels, num_heads=num_heads
                )
                gathered = (start, stop)
            mask = None if key_mask is None else _additive_mask(key_mask[start:stop], q.dtype)
            chunk_out, chunk_lse = attention(
                q_heads[start:stop, heads], k_sel[:, heads], v_sel[:, heads], 0.0, False, attn_mask=mask, scale=scale
            )
            out_heads[start:stop, :, heads].copy_(chunk_out.transpose(1, 2))  # (n, T, M', c)
            if lse is not None:
                assert chunk_lse.dtype == lse.dtype, (chunk_lse.dtype, lse.dtype)
                lse[start:stop, heads] = chunk_lse  # (n, M', T)

    if workers is None:
        run(0)
    else:  # lanes on worker threads: chunks are independent and write disjoint rows of out and lse
        workers.map(run, range(lanes))
    return out, lse


def _tapered_chunks(total: int, size: int, *, lanes: int) -> list[tuple[int, int]]:
    """Chunks of at most ``size`` covering ``range(total)`` that shrink towards the end (guided scheduling).

    Each chunk takes at most ``ceil(remaining / (2·lanes))`` items, so the last chunks are small and the lanes that
    claim them (:class:`~h3de_lite.layers.workers.ChunkClaims`) finish close together: with equal chunks the last one
    to start keeps one lane busy for a whole chunk while the others have nothing left.

    Example:
        >>> [stop - start for start, stop in _tapered_chunks(64, 4, lanes=2)]
        [4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 3, 3, 2, 1, 1, 1, 1]
    """
    chunks, start = [], 0
    while start < total:
        stop = start + max(1, min(size, math.ceil((total - start) / (2 * lanes))))
        chunks.append((start, stop))
        start = stop
    return chunks


def _split_tail_heads(chunks: list[tuple[int, int]], *, num_heads: int) -> list[tuple[int, int, slice]]:
    """The chunks as ``(start, stop, heads)`` pieces, each final chunk of one region cut into two groups of heads.

    The lanes finish together to within one piece: the flash kernel treats each head on its own, so half a region's
    heads is half its work, with the same arithmetic per head (the same result bit for bit). A lane that claims both
    halves of a region gathers its keys and values once.

    Example:
        >>> _split_tail_heads([(0, 2), (2, 3)], num_heads=4)
        [(0, 2, slice(None, None, None)), (2, 3, slice(0, 2, None)), (2, 3, slice(2, 4, None))]
    """
    split = num_heads // 2  # 0: one head, nothing to cut
    tail = len(chunks)  # where the final run of one-region chunks begins
    while split and tail > 0 and chunks[tail - 1][1] - chunks[tail - 1][0] == 1:
        tail -= 1
    pieces = [(start, stop, slice(None)) for start, stop in chunks[:tail]]
    for start, stop in chunks[tail:]:
        pieces += [(start, stop, slice(0, split)), (start, stop, slice(split, num_heads))]
    return pieces


def _lane_workers(chunks: list[tuple[int, int]], *, tokens: int, keys: int, channels: int) -> ChunkWorkers | None:
    """The worker pool for these chunks of query regions, or None: run them here.

    Only when a chunk holds at least :data:`LANE_MIN_MACS` multiply-adds of attention (QKᵀ and AV: ``2·n·T·keys·M·c``
    for ``n`` query regions of ``T`` tokens): below that, handing chunks to threads costs more than it saves.
    """
    regions = max(stop - start for start, stop in chunks)
    if _attention_macs(regions, tokens=tokens, keys=keys, channels=channels) < LANE_MIN_MACS:
        return None
    return chunk_workers(len(chunks))


def _attention_macs(regions: int, *, tokens: int, keys: int, channels: int) -> int:
    """Multiply-adds of QKᵀ and AV for ``regions`` query regions of ``tokens`` queries, ``keys`` keys, ``M·c``
    channels."""
    return 2 * regions * tokens * keys * channels


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the CPU flash kernel's log-sum-exp for inputs of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class _RoutedFlashAttentionCPU(torch.autograd.Function):
    """STEP 3 on CPU through PyTorch's flash-attention kernel, with a backward that keeps no gathered tensor.

    The forward gathers each chunk's keys and values into one reused buffer and calls
    ``aten._scaled_dot_product_flash_attention_for_cpu`` with the chunk's query regions as the kernel's batch and the
    heads as its heads (:func:`_routed_flash_forward`), keeping the output and the log-sum-exp. The backward gathers
    each chunk again (a copy, far cheaper than attention), calls the kernel's backward, and adds the key/value
    gradients back to their regions with one ``index_add_`` per chunk. Memory: one chunk's gather at a time in both
    passes (in the backward a quarter of the forward's chunk, whose gather, kernel gradients and their copy coexist),
    against all k·N gathered keys and values (plus their gradients) that plain autograd keeps. Same numbers as
    :func:`gather_attention` with ``fused=True`` (tested, values and gradients).

    Inputs as :func:`gather_attention`, with ``c_v == c`` (the kernel needs one head size). Without autograd,
    :func:`regional_routing_attention` calls :func:`_routed_flash_forward` directly.

    The second output is a contiguous copy of the values ``(N, T, M·c_v)`` when ``with_values`` (LePE's input), else
    an empty tensor. Its gradient is added into the key/value gradient this backward makes anyway: a slice
    ``kv[..., M·c:]`` read by LePE would instead get a zero-filled gradient of all of ``kv`` from autograd, one more
    ``kv``-sized buffer at the peak of the backward.
    """

    @staticmethod
    def forward(ctx, q, kv, rows, key_mask, num_heads, scale, query_chunk, with_values):  # noqa: ANN001, ANN205
        out, lse = _routed_flash_forward(
            q, kv, rows, key_mask, num_heads=num_heads, scale=scale, query_chunk=query_chunk, keep_lse=True
        )
        ctx.save_for_backward(q, kv, rows, key_mask, out, lse)
        ctx.num_heads, ctx.scale, ctx.query_chunk = num_heads, scale, query_chunk
        values = kv[..., q.shape[-1] :].contiguous() if with_values else kv.new_empty(0)  # (N, T, M·c_v) or empty
        if not with_values:
            ctx.mark_non_differentiable(values)
        return out, values

    @staticmethod
    def backward(ctx, grad_out, grad_values):  # noqa: ANN001, ANN205
        q, kv, rows, key_mask, out, lse = ctx.saved_tensors
        num_heads, scale, query_chunk = ctx.num_heads, ctx.scale, ctx.query_chunk
        num_queries, tokens, qk_channels = q.shape
        topk = rows.shape[1]
        attention_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
        grad_out = grad_out.contiguous()
        kv_rows = kv.reshape(num_queries, -1)
        # A quarter of the forward's chunk: a chunk's gather, its kernel gradients and their copy live at once here.
        chunk = max(1, query_chunk // 4)
        grad_q = torch.empty_like(q)
        grad_kv = torch.empty_like(kv)  # (N, T, M·(c + c_v)): zero keys, LePE's value gradient (if any) or zeros
        grad_kv[..., :qk_channels].zero_()
        if grad_values is not None and grad_values.numel():
            grad_kv[..., qk_channels:].copy_(grad_values)
        else:
            grad_kv[..., qk_channels:].zero_()
        grad_rows = grad_kv.view(num_queries, -1)  # (N, T·M·(c + c_v))
        q_heads, out_heads, grad_heads = (_split_heads(t, num_heads) for t in (q, out, grad_out))  # (N, M, T, c)
        grad_q_heads = grad_q.view(num_queries, tokens, num_heads, -1)  # (N, T, M, c)
        chunks = _chunks(num_queries, chunk)
        workers = _lane_workers(chunks, tokens=tokens, keys=topk * tokens, channels=qk_channels)
        lanes = 1 if workers is None else min(workers.num_workers, len(chunks))
        # On worker lanes the kernels run side by side, but each chunk adds into grad_kv only after the chunk before
        # it has: the same additions in the same order as one lane, so the same gradient bit for bit.
        added = [threading.Event() for _ in chunks] if lanes > 1 else None

        claims = ChunkClaims(count=len(chunks))

        def run(lane: int) -> None:  # the chunks this lane claims, in increasing order; buffers of its own, reused
            buffer = kv.new_empty((min(chunk, num_queries) * topk, kv_rows.shape[1]))  # the gather
            grad_buffer = torch.empty_like(buffer).view(-1, tokens, 2 * qk_channels)  # the gathered regions' gradients
            for i in iter(claims, None):
                start, stop = chunks[i]
                n = stop - start
                k_sel, v_sel = _gather_chunk(
                    kv_rows, rows[start:stop], buffer, qk_channels=qk_channels, num_heads=num_heads
                )
                mask = None if key_mask is None else _additive_mask(key_mask[start:stop], q.dtype)
                dq, dk, dv = attention_backward(
                    grad_heads[start:stop],
                    q_heads[start:stop],
                    k_sel,
                    v_sel,
                    out_heads[start:stop],
                    lse[start:stop],
                    0.0,
                    False,
                    attn_mask=mask,
                    scale=scale,
                )  # (n, M, T, c), (n, M, k·T, c) twice
                grad_q_heads[start:stop].copy_(dq.transpose(1, 2))
                grad_sel = grad_buffer[: n * topk]  # (n·k, T, M·(c + c_v)): each gathered region's gradient, row layout
                grad_sel[..., :qk_channels].view(n, topk * tokens, num_heads, -1).copy_(dk.transpose(1, 2))
                grad_sel[..., qk_channels:].view(n, topk * tokens, num_heads, -1).copy_(dv.transpose(1, 2))
                del dq, dk, dv
                if added is not None and i > 0:
                    added[i - 1].wait()
                # Add each gathered region's gradient back to its row, in order (a region routed twice gets both).
                grad_rows.index_add_(0, rows[start:stop].reshape(-1), grad_sel.view(n * topk, -1))
                if added is not None:
                    added[i].set()

        def run_lane(lane: int) -> None:
            try:
                run(lane)
            except BaseException:
                for event in added:  # let the other lanes finish rather than wait forever; the error is re-raised
                    event.set()
                raise

        if workers is None:
            run(0)
        else:
            workers.map(run_lane, range(lanes))
        return grad_q, grad_kv, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------------------------------
# STEP 3 as block-sparse attention: flex_attention with a BlockMask made from the routing (no gather at all)
# ----------------------------------------------------------------------------------------------------------------------

#: Token block of flex_attention's CUDA (Triton) kernels: regions are padded up to a multiple of it there.
CUDA_FLEX_BLOCK: int = 128

_COMPILED_FLEX: dict[str, Callable[..., Tensor]] = {}


def flex_block_size(tokens_per_region: int, device: torch.device | str) -> int:
    """Tokens per region after padding for :func:`flex_routed_attention`: the BlockMask block is one region.

    On CPU the compiled kernel takes any block size, so a block is exactly the T tokens of a region. The CUDA
    kernels tile the sequence in blocks of 128 tokens, so there regions are padded up to a multiple of
    :data:`CUDA_FLEX_BLOCK` (padding tokens are masked); with small regions (T ≪ 128) that wastes work and
    ``backend="auto"`` then measures the gather path as faster.

    Args:
        tokens_per_region: T.
        device: where the attention runs.

    Example:
        >>> flex_block_size(64, "cpu"), flex_block_size(64, "cuda")
        (64, 128)
    """
    if torch.device(device).type == "cuda":
        return -(-tokens_per_region // CUDA_FLEX_BLOCK) * CUDA_FLEX_BLOCK
    return tokens_per_region


def routed_block_mask(indices: Tensor, real: Tensor | None, block: int):  # noqa: ANN201 (BlockMask, imported lazily)
    """The routing as a ``flex_attention`` BlockMask over tokens in region order, one block per region.

    Query block r may see key block j iff j is among the routed ``indices[b, r]``. A routed key region made only of
    real tokens is a *full* block (no per-token mask); one holding padding is a *partial* block, where the mask
    function drops the padded keys. The mask function encodes the whole rule (routing and padding), so
    eager ``flex_attention``, which ignores the block structure and evaluates it on every (query, key) pair, gives
    the same result as the compiled kernels, which skip unrouted blocks.

    Args:
        indices: ``(B, R, k)`` long routed key regions.
        real: ``(R, block)`` bool, True for real tokens (padding included); None when nothing is padded.
        block: tokens per region as laid out in the sequence (:func:`flex_block_size`).

    Shape:
        → a BlockMask of shape ``(B, 1, R·block, R·block)``.

    Example:
        >>> routed_block_mask(torch.tensor([[[0], [0]]]), None, 4).shape
        (1, 1, 8, 8)
    """
    from torch.nn.attention.flex_attention import BlockMask

    batch, num_regions, topk = indices.shape
    routed = torch.zeros(batch, num_regions, num_regions, dtype=torch.bool, device=indices.device)
    routed.scatter_(2, indices, True)  # (B, R_q, R_k) query region → key region
    region_full = torch.ones(num_regions, dtype=torch.bool, device=indices.device) if real is None else real.all(dim=1)
    full = region_full[indices]  # (B, R, k)
    full_num = full.sum(dim=-1, dtype=torch.int32)  # (B, R)

    def packed(first: Tensor) -> Tensor:
        """Routed indices with the ``first`` ones moved to the front, padded with zeros to R columns."""
        order = torch.argsort((~first).to(torch.int32), dim=-1, stable=True)
        table = torch.zeros(batch, 1, num_regions, num_regions, dtype=torch.int32, device=indices.device)
        table[:, 0, :, :topk] = indices.gather(-1, order).to(torch.int32)
        return table  # (B, 1, R, R)

    tokens_real = None if real is None else real.reshape(-1)  # (R·block,)

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        allowed = routed[b, q_idx // block, kv_idx // block]
        return allowed if tokens_real is None else allowed & tokens_real[kv_idx]

    return BlockMask.from_kv_blocks(
        (topk - full_num)[:, None],  # partial blocks per query block
        packed(~full),
        full_num[:, None],
        packed(full),
        BLOCK_SIZE=(block, block),
        mask_mod=mask_mod,
    )


def _flex_kernel(compiled: bool) -> Callable[..., Tensor]:
    """``flex_attention`` itself (eager) or its ``torch.compile``\\ d version, compiled once per process."""
    from torch.nn.attention.flex_attention import flex_attention

    if not compiled:
        return flex_attention
    if "flex" not in _COMPILED_FLEX:
        _COMPILED_FLEX["flex"] = torch.compile(flex_attention, dynamic=False)
    return _COMPILED_FLEX["flex"]


def flex_routed_attention(
    q: Tensor,
    kv: Tensor,
    indices: Tensor,
    *,
    num_heads: int,
    scale: float,
    valid: Tensor | None = None,
    compiled: bool | None = None,
) -> Tensor:
    """STEP 3 as one block-sparse ``flex_attention`` call: tokens in region order, blocks = regions, no gather.

    The tokens of all regions form one sequence per volume, region after region (the ``(B, R, T, C)`` layout read
    as ``(B, R·T, C)``), so that a BlockMask block is a region and :func:`routed_block_mask` lets each query region
    attend to its k routed key regions only. Keys and values are read in place; nothing is gathered.

    Which kernel runs (``compiled=None``): the compiled one (``torch.compile(flex_attention)``, compiled once per
    shape), except for float64, which PyTorch's compiled CPU kernel does not take: there eager ``flex_attention``
    runs, which materialises the full ``(R·T)²`` score matrix (fine for tests, not for large volumes). On CPU
    ``flex_attention`` has no backward in PyTorch (eager or compiled), so this path is inference-only there.

    Args:
        q: ``(B, R, T, M·c)`` queries in regions.
        kv: ``(B, R, T, M·c + M·c_v)`` keys then values in regions.
        indices: ``(B, R, k)`` routed key regions.
        num_heads: M.
        scale: ``1/√c`` (eq. 4).
        valid: ``(R, T)`` bool real-token mask; None when nothing is padded.
        compiled: force the compiled (True) or eager (False) kernel; None: automatic (see above).

    Raises:
        ValueError: on CPU while autograd records (no CPU backward in PyTorch's flex_attention).

    Shape:
        → ``(B, R, T, M·c_v)``.

    Example:
        >>> idx = torch.tensor([[[0], [0]]])
        >>> flex_routed_attention(torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 16), idx, num_heads=2,
        ...                       scale=0.5, compiled=False).shape
        torch.Size([1, 2, 4, 8])
    """
    batch, num_regions, tokens, qk_channels = q.shape
    if not torch.is_grad_enabled():
        q, kv = q.detach(), kv.detach()
    if q.device.type == "cpu" and (q.requires_grad or kv.requires_grad):
        raise ValueError(
            "backend='flex' cannot train on CPU: PyTorch's flex_attention has no CPU backward; use backend='gather' "
            "or 'auto' for training on CPU, or run the flex path under torch.no_grad()"
        )
    if compiled is None:
        compiled = q.dtype != torch.float64
    block = flex_block_size(tokens, q.device)
    real = valid
    if block != tokens:  # pad every region's token axis up to the kernel block; the padding is masked as keys
        real = torch.ones(num_regions, tokens, dtype=torch.bool, device=q.device) if valid is None else valid
        real = F.pad(real, (0, block - tokens), value=False)  # (R, block)
        q, kv = (F.pad(t, (0, 0, 0, block - tokens)) for t in (q, kv))  # (B, R, block, ·)
    k, v = kv.split([qk_channels, kv.shape[-1] - qk_channels], dim=-1)
    to_sequence = "b r t (m c) -> b m (r t) c"
    q, k, v = (rearrange(t, to_sequence, m=num_heads) for t in (q, k, v))  # (B, M, R·block, c)
    mask = routed_block_mask(indices, real, block)
    with warnings.catch_warnings():
        # eager flex warns that it is unfused; here that is the intended CPU training / test path.
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        out = _flex_kernel(compiled)(q, k, v, block_mask=mask, scale=scale)  # (B, M, R·block, c_v)
    out = rearrange(out, "b m (r t) c -> b r t (m c)", r=num_regions)  # (B, R, block, M·c_v)
    return out[:, :, :tokens]


# ----------------------------------------------------------------------------------------------------------------------
# STEP 2 + STEP 3
# ----------------------------------------------------------------------------------------------------------------------

#: STEP 3 implementations: ``gather`` (gather routed keys/values, dense attention per region), ``flex`` (block-sparse
#: flex_attention), ``auto`` (see :func:`resolve_backend`).
BACKENDS: tuple[str, ...] = ("gather", "flex", "auto")

_AUTO_CHOICE: dict[tuple, str] = {}


def check_backend(backend: str) -> str:
    """Return ``backend`` if it is one of :data:`BACKENDS`, else raise ``ValueError`` naming the valid ones.

    Example:
        >>> check_backend("flex")
        'flex'
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def fastest(
    candidates: dict[str, Callable[[], object]], *, synchronize: Callable[[], None], repeats: int = 3
) -> str | None:
    """Name of the fastest candidate: one warm-up call each, then ``repeats`` timed calls; None if all raise.

    A candidate that raises (e.g. flex_attention without a working Triton) is left out of the race.

    Args:
        candidates: name → a call to time.
        synchronize: waits for queued device work (``torch.cuda.synchronize`` on CUDA).
        repeats: timed calls per candidate.

    Example:
        >>> fastest({"quick": lambda: None, "slow": lambda: time.sleep(0.01)}, synchronize=lambda: None)
        'quick'
    """
    timings: dict[str, float] = {}
    for name, run in candidates.items():
        try:
            run()  # warm-up: flex compiles here
            synchronize()
            start = time.perf_counter()
            for _ in range(repeats):
                run()
            synchronize()
            timings[name] = time.perf_counter() - start
        except Exception:  # noqa: BLE001 - a failing candidate just leaves the race
            continue
    return min(timings, key=timings.__getitem__) if timings else None


def resolve_backend(
    backend: str, *, key: tuple, device: torch.device, candidates: dict[str, Callable[[], object]]
) -> str:
    """Turn ``"auto"`` into ``"gather"`` or ``"flex"``; other names pass through.

    The rule: on CPU, ``gather`` (PyTorch's flex_attention has no CPU backward, and its compiled CPU kernel
    measured slower than the gather path in ``benchmarks/attention.py``). On CUDA the candidates race once under
    ``torch.no_grad()`` (:func:`fastest`, forward only) and the winner is remembered for ``key`` (shapes, dtype,
    device, k, padding) for the rest of the process.

    Args:
        backend: one of :data:`BACKENDS`.
        key: what the choice depends on.
        device: where the attention runs.
        candidates: backend name → a call running STEP 3 with it.

    Example:
        >>> resolve_backend("auto", key=(), device=torch.device("cpu"), candidates={})
        'gather'
    """
    if backend != "auto":
        return backend
    if device.type != "cuda":
        return "gather"
    if key not in _AUTO_CHOICE:
        with torch.no_grad():
            winner = fastest(candidates, synchronize=lambda: torch.cuda.synchronize(device))
        _AUTO_CHOICE[key] = winner or "gather"
    return _AUTO_CHOICE[key]


def _cpu_flash_applies(q: Tensor, kv: Tensor, *, fused: bool, gather: Callable) -> bool:
    """Whether STEP 3 can run through :class:`_RoutedFlashAttentionCPU` (same result as the readable path)."""
    return (
        fused
        and gather is gather_regions
        and q.device.type == "cpu"
        and kv.shape[-1] == 2 * q.shape[-1]  # one head size for q, k and v: what the CPU flash kernel takes
        and q.dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16)
        and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")
    )


def regional_routing_attention(
    q: Tensor,
    kv: Tensor,
    *,
    num_heads: int,
    topk: int,
    scale: float,
    routing_scale: float,
    valid: Tensor | None = None,
    fused: bool = True,
    query_chunk: int | None = None,
    gather: Callable[[Tensor, Tensor], Tensor] = gather_regions,
    backend: str = "gather",
    out: Tensor | None = None,
    return_values: bool = False,
) -> tuple[Tensor, Tensor, Tensor] | tuple[Tensor, Tensor, Tensor, Tensor]:
    """STEP 2 and STEP 3 of V-BRA on region tensors: route regions (eq. 3), then attend token to token (eq. 4).

    STEP 3 has two implementations (``backend``), equal up to rounding:

    * ``"gather"``: per chunk of ``query_chunk`` query regions, gather the k routed regions' keys and values (keys
      and values side by side in ``kv``, so one gather serves both) and attend densely inside them
      (:func:`gather_attention`). On CPU with ``fused=True`` the same runs through PyTorch's flash kernel directly:
      :class:`_RoutedFlashAttentionCPU` while autograd records (its backward regathers chunk by chunk instead of
      keeping the gathers), its plain forward otherwise.
    * ``"flex"``: one block-sparse ``flex_attention`` call, no gather (:func:`flex_routed_attention`).

    Args:
        q: ``(B, R, T, M·c)`` queries in regions, heads side by side in the channels.
        kv: ``(B, R, T, M·c + M·c_v)`` keys then values.
        num_heads: M.
        topk: key regions per query region.
        scale: token attention scale of eq. 4, :func:`attention_scale` (``c ** -0.5``).
        routing_scale: region routing scale of eq. 3, :func:`routing_scale` (``(M·c) ** -0.5``).
        valid: ``(R, T)`` bool real-token mask from :func:`token_mask`; None when nothing is padded.
        fused: use ``F.scaled_dot_product_attention`` (True) or the written-out reference (False); gather path only.
        query_chunk: query regions per chunk of the gather path (over all B·R). None: :func:`auto_query_chunk`
            with a budget of half the values' size, capped at :data:`AUTO_CHUNK_BYTES` (the gather then adds at
            most half a copy of v to the peak memory), plus the output's size when the CPU flash path writes into a
            given ``out`` (the output then needs no memory of its own; fewer, larger chunks run faster) — except on
            the plain-autograd path while autograd records, where it is one chunk (its backward keeps every chunk's
            gather anyway).
        gather: the key/value gather, :func:`gather_regions` (or :func:`naive_gather` to benchmark the legacy one).
        backend: ``"gather"``, ``"flex"`` or ``"auto"`` (:func:`resolve_backend`).
        out: inference only (autograd not recording): a contiguous ``(B, R, T, M·c_v)`` tensor the output is
            written to and returned as. It may be ``q`` itself when ``c_v == c`` and ``q`` is not needed afterwards:
            the CPU flash path reads each chunk of queries before its output overwrites them, so the output then
            takes no memory of its own (what :class:`~h3de_lite.layers.attention.BiLevelRoutingAttention3d` does).
        return_values: also return the values ``kv[..., M·c:]`` for LePE, as a fourth output whose gradient (if any)
            reaches ``kv`` without a zero-filled ``kv``-sized buffer on the CPU flash path while autograd records (a
            contiguous copy there, a view of ``kv`` otherwise).

    Raises:
        ValueError: ``out`` given while autograd records, or of the wrong shape or layout.

    Shape:
        → output ``(B, R, T, M·c_v)``, indices ``(B, R, k)``, scores ``(B, R, k)`` (and values ``(B, R, T, M·c_v)``).

    Example:
        >>> out, idx, p = regional_routing_attention(torch.randn(2, 8, 16, 8), torch.randn(2, 8, 16, 16),
        ...     num_heads=2, topk=2, scale=0.5, routing_scale=0.35)
        >>> out.shape
        torch.Size([2, 8, 16, 8])
    """
    check_backend(backend)
    batch, num_regions, tokens, qk_channels = q.shape
    v_channels = kv.shape[-1] - qk_channels
    recording = torch.is_grad_enabled() and (q.requires_grad or kv.requires_grad)
    if out is not None:
        if recording:
            raise ValueError(
                "out= is for inference: call regional_routing_attention under torch.no_grad() or without it"
            )
        if out.shape != (batch, num_regions, tokens, v_channels) or not out.is_contiguous():
            raise ValueError(
                f"out must be a contiguous tensor of shape {(batch, num_regions, tokens, v_channels)}, "
                f"got {tuple(out.shape)}"
            )
    # STEP 2: region-to-region routing on region means over real tokens (no gradient flows through the choice). In
    # at least float32 and outside autocast: the top-k is a discrete choice, and in bfloat16 (8 significant bits)
    # near ties between key regions are decided by rounding.
    wide = torch.promote_types(q.dtype, torch.float32)
    device = q.device.type
    no_autocast = torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device) else nullcontext()
    with torch.no_grad(), no_autocast:
        q_r = region_means(q, valid, dtype=wide)  # (B, R, M·c)
        k_r = region_means(kv[..., :qk_channels], valid, dtype=wide)  # (B, R, M·c)
        key_valid = None if valid is None else valid.any(dim=1)  # (R,)
        indices, scores = route_regions(q_r, k_r, topk=topk, scale=routing_scale, key_valid=key_valid)

    # STEP 3: token-to-token attention over the routed regions.
    def run_flex() -> tuple[Tensor, Tensor | None]:
        return flex_routed_attention(q, kv, indices, num_heads=num_heads, scale=scale, valid=valid), None

    def run_gather() -> tuple[Tensor, Tensor | None]:
        num_queries = batch * num_regions
        cpu_flash = _cpu_flash_applies(q, kv, fused=fused, gather=gather)
        chunk = query_chunk
        if chunk is None and not cpu_flash and recording:
            chunk = num_queries
        elif chunk is None:
            v_bytes = num_queries * tokens * v_channels * kv.element_size()  # the values, and the output
            in_place = cpu_flash and out is not None  # the CPU flash forward writes into out: no output buffer
            budget = min(AUTO_CHUNK_BYTES, v_bytes // 2 + (v_bytes if in_place else 0))
            lanes = parallel_lanes() if cpu_flash else 1  # worker threads, each with a chunk's gather at a time
            for share in (lanes, 1) if lanes > 1 else (1,):
                chunk = auto_query_chunk(
                    num_query_regions=num_queries,
                    tokens_per_region=tokens,
                    topk=topk,
                    kv_channels=kv.shape[-1],
                    num_heads=num_heads,
                    element_size=kv.element_size(),
                    fused=fused,
                    budget=budget // share,
                )
                if _attention_macs(chunk, tokens=tokens, keys=topk * tokens, channels=qk_channels) >= LANE_MIN_MACS:
                    break  # enough work per chunk for the lanes (:func:`_lane_workers`); else one lane, whole budget
        offsets = torch.arange(batch, device=indices.device)[:, None, None] * num_regions  # (B, 1, 1)
        rows = (indices + offsets).reshape(num_queries, topk)  # (B·R, k) rows of the flattened kv
        key_mask = None if valid is None else gather_key_mask(valid, indices).reshape(num_queries, topk * tokens)
        flat_q = q.reshape(num_queries, tokens, qk_channels)  # (B·R, T, M·c)
        flat_kv = kv.reshape(num_queries, tokens, kv.shape[-1])  # (B·R, T, M·(c + c_v))
        values = None
        if cpu_flash and not recording:  # no autograd: the plain forward, straight into ``out`` when given
            flat_out = None if out is None else out.view(num_queries, tokens, v_channels)
            result, _ = _routed_flash_forward(
                flat_q, flat_kv, rows, key_mask, num_heads=num_heads, scale=scale, query_chunk=chunk, out=flat_out
            )
        elif cpu_flash:
            result, values = _RoutedFlashAttentionCPU.apply(
                flat_q, flat_kv, rows, key_mask, num_heads, scale, chunk, return_values
            )
            values = values.view(batch, num_regions, tokens, v_channels) if return_values else None
        else:
            result = gather_attention(
                flat_q,
                flat_kv,
                rows,
                num_heads=num_heads,
                scale=scale,
                key_mask=key_mask,
                fused=fused,
                query_chunk=chunk,
                gather=gather,
            )
        return result.reshape(batch, num_regions, tokens, v_channels), values

    runs = {"gather": run_gather, "flex": run_flex}
    key = (q.device, q.dtype, tuple(q.shape), tuple(kv.shape), num_heads, topk, valid is None)
    result, values = runs[resolve_backend(backend, key=key, device=q.device, candidates=runs)]()
    if out is not None and result.data_ptr() != out.data_ptr():
        result = out.copy_(result)
    if not return_values:
        return result, indices, scores
    return result, indices, scores, kv[..., qk_channels:] if values is None else values
