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
  the channels and reach ``F.scaled_dot_product_attention`` as strided views, without copies.

Symbols: B batch, M heads, R regions, T tokens per region, k top-k, c channels per head, n query regions of a chunk.

Explained in notebooks/03_attention.ipynb.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

__all__ = [
    "AUTO_CHUNK_BYTES",
    "RegionLayout",
    "Routing",
    "attention_scale",
    "auto_query_chunk",
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
    "route_regions",
    "routing_scale",
    "token_attention_fused",
    "token_attention_reference",
    "token_mask",
]

#: Budget (bytes) for the tensors gathered per chunk of query regions when ``query_chunk`` is automatic.
AUTO_CHUNK_BYTES: int = 4 * 2**20


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


def region_means(x: Tensor, valid: Tensor | None = None) -> Tensor:
    """Mean of each region's tokens, over real tokens only (a region of padding gets 0, never NaN).

    Args:
        x: ``(N, R, T, C)``.
        valid: ``(R, T)`` bool from :func:`token_mask`, or None when nothing is padded.

    Shape:
        ``(N, R, T, C)`` → ``(N, R, C)``.

    Example:
        >>> region_means(torch.ones(2, 8, 32, 3)).shape
        torch.Size([2, 8, 3])
    """
    if valid is None:
        return x.mean(dim=2)
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
    logits = torch.einsum("bqc,bkc->bqk", query_regions, key_regions) * scale  # (B, R, R)
    if key_valid is not None:
        logits = logits.masked_fill(~key_valid[None, None, :], float("-inf"))
    top_logits, indices = torch.topk(logits, k=topk, dim=-1)  # (B, R, k) each: select on logits, never on probs
    # eq. 3 probabilities of the chosen regions: exp(logit - logsumexp over all R regions), at least in float32.
    wide = torch.promote_types(logits.dtype, torch.float32)
    log_norm = torch.logsumexp(logits.to(wide), dim=-1, keepdim=True)  # (B, R, 1)
    scores = (top_logits.to(wide) - log_norm).exp().to(logits.dtype)  # (B, R, k)
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
) -> tuple[Tensor, Tensor, Tensor]:
    """STEP 2 and STEP 3 of V-BRA on region tensors: route regions (eq. 3), then attend token to token (eq. 4).

    Keys and values travel side by side in ``kv`` so one gather serves both. Query regions of the whole batch are
    processed in chunks of ``query_chunk``; only one chunk's gathered keys/values exist at a time.

    Args:
        q: ``(B, R, T, M·c)`` queries in regions, heads side by side in the channels.
        kv: ``(B, R, T, M·c + M·c_v)`` keys then values.
        num_heads: M.
        topk: key regions per query region.
        scale: token attention scale of eq. 4, :func:`attention_scale` (``c ** -0.5``).
        routing_scale: region routing scale of eq. 3, :func:`routing_scale` (``(M·c) ** -0.5``).
        valid: ``(R, T)`` bool real-token mask from :func:`token_mask`; None when nothing is padded.
        fused: use ``F.scaled_dot_product_attention`` (True) or the written-out reference (False).
        query_chunk: query regions per chunk (over all B·R). None: when autograd records, one chunk (the backward
            keeps every chunk's gather anyway); otherwise :func:`auto_query_chunk` with a budget of half the values'
            size, capped at :data:`AUTO_CHUNK_BYTES`: the gather then adds at most half a copy of v to the peak
            memory, which keeps V-BRA's peak below that of dense flash attention.
        gather: the key/value gather, :func:`gather_regions` (or :func:`naive_gather` to benchmark the legacy one).

    Shape:
        → output ``(B, R, T, M·c_v)``, indices ``(B, R, k)``, scores ``(B, R, k)``.

    Example:
        >>> out, idx, p = regional_routing_attention(torch.randn(2, 8, 16, 8), torch.randn(2, 8, 16, 16),
        ...     num_heads=2, topk=2, scale=0.5, routing_scale=0.35)
        >>> out.shape
        torch.Size([2, 8, 16, 8])
    """
    batch, num_regions, tokens, qk_channels = q.shape
    v_channels = kv.shape[-1] - qk_channels
    # STEP 2: region-to-region routing on region means over real tokens (no gradient flows through the choice).
    with torch.no_grad():
        q_r = region_means(q, valid)  # (B, R, M·c)
        k_r = region_means(kv[..., :qk_channels], valid)  # (B, R, M·c)
        key_valid = None if valid is None else valid.any(dim=1)  # (R,)
        indices, scores = route_regions(q_r, k_r, topk=topk, scale=routing_scale, key_valid=key_valid)

    # STEP 3: token-to-token attention over the gathered key/value regions, chunked over the B·R query regions.
    attend = token_attention_fused if fused else token_attention_reference
    num_queries = batch * num_regions
    if query_chunk is None and torch.is_grad_enabled() and (q.requires_grad or kv.requires_grad):
        query_chunk = num_queries
    elif query_chunk is None:
        query_chunk = auto_query_chunk(
            num_query_regions=num_queries,
            tokens_per_region=tokens,
            topk=topk,
            kv_channels=kv.shape[-1],
            num_heads=num_heads,
            element_size=kv.element_size(),
            fused=fused,
            budget=min(AUTO_CHUNK_BYTES, num_queries * tokens * v_channels * kv.element_size() // 2),
        )
    flat_q = q.reshape(num_queries, tokens, qk_channels)  # (B·R, T, M·c)
    flat_kv = kv.reshape(1, num_queries, tokens, kv.shape[-1])  # (1, B·R, T, M·(c + c_v))
    offsets = torch.arange(batch, device=indices.device)[:, None, None] * num_regions  # (B, 1, 1)
    flat_indices = (indices + offsets).reshape(1, num_queries, topk)  # (1, B·R, k) rows of flat_kv
    local_indices = indices.reshape(num_queries, topk)  # (B·R, k) region index within its own volume
    chunks = [(start, min(start + query_chunk, num_queries)) for start in range(0, num_queries, query_chunk)]
    out = None if len(chunks) == 1 else q.new_empty((num_queries, tokens, v_channels))  # (B·R, T, M·c_v)
    for start, stop in chunks:
        kv_sel = gather(flat_kv, flat_indices[:, start:stop])[0]  # (n, k·T, M·(c + c_v))
        mask = None if valid is None else gather_key_mask(valid, local_indices[None, start:stop])[0]  # (n, k·T)
        chunk_out = attend(
            flat_q[start:stop],
            kv_sel[..., :qk_channels],
            kv_sel[..., qk_channels:],
            num_heads=num_heads,
            scale=scale,
            key_mask=mask,
        )  # (n, T, M·c_v)
        del kv_sel  # free this chunk's gather before the next one is made
        if out is None:
            out = chunk_out
        else:
            out[start:stop] = chunk_out
    return out.reshape(batch, num_regions, tokens, v_channels), indices, scores
