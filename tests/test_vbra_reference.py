"""V-BRA against an independent reference written here from the paper (eq. 3–4), sharing only the module's weights.

The reference never cuts tokens into region tensors: it labels every token with its region by integer division of
its coordinates, routes with region means computed by a loop, chooses the top-k key regions by sorting, and runs
masked dense attention where a query may see a key only when the key's region is routed from the query's region.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from h3de_lite.layers.attention import BiLevelRoutingAttention3d, DenseAttention3d


def _reference_vbra(attn: BiLevelRoutingAttention3d, x: torch.Tensor) -> torch.Tensor:
    """Plain-code V-BRA for one module: ``(B, C, D, H, W)`` → ``(B, C, D, H, W)``."""
    b, c, d, h, w = x.shape
    sd, sh, sw = attn.grid
    td, th, tw = (math.ceil(n / s) for n, s in zip((d, h, w), (sd, sh, sw), strict=True))  # tokens per region, axis
    qk, m = attn.qk_dim, attn.num_heads
    tokens = x.permute(0, 2, 3, 4, 1).reshape(b, d * h * w, c)  # (B, N, C), C order over (d, h, w)
    qkv = tokens @ attn.qkv.weight.T + attn.qkv.bias  # (B, N, 2·qk_dim + C)
    q, k, v = qkv[..., :qk], qkv[..., qk : 2 * qk], qkv[..., 2 * qk :]
    zd, zh, zw = torch.meshgrid(torch.arange(d), torch.arange(h), torch.arange(w), indexing="ij")
    region = ((zd // td) * sh + zh // th) * sw + zw // tw  # (D, H, W) region of each real token
    region = region.reshape(-1)  # (N,)
    num_regions = sd * sh * sw
    out = torch.empty(b, d * h * w, c, dtype=x.dtype)
    for n in range(b):
        real = [r for r in range(num_regions) if (region == r).any()]
        q_mean = {r: q[n, region == r].mean(0) for r in real}
        k_mean = {r: k[n, region == r].mean(0) for r in real}
        allowed = torch.zeros(num_regions, num_regions, dtype=torch.bool)  # query region → key region
        for rq in real:
            logits = {rk: float(q_mean[rq] @ k_mean[rk]) / math.sqrt(qk) for rk in real}  # eq. 3 (softmax keeps order)
            for rk in sorted(real, key=lambda r: -logits[r])[: attn.topk]:
                allowed[rq, rk] = True
        mask = allowed[region][:, region]  # (N, N): query token i may see key token j
        heads = []
        for head in range(m):
            qs = slice(head * qk // m, (head + 1) * qk // m)
            vs = slice(head * c // m, (head + 1) * c // m)
            logits = q[n, :, qs] @ k[n, :, qs].T * attn.scale  # eq. 4, (N, N)
            weights = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)
            heads.append(weights @ v[n, :, vs])
        out[n] = torch.cat(heads, dim=-1)
    v_volume = v.reshape(b, d, h, w, c).permute(0, 4, 1, 2, 3)  # (B, C, D, H, W)
    lepe = F.conv3d(v_volume, attn.lepe.weight, attn.lepe.bias, padding=attn.lepe.padding, groups=c)
    out = out + lepe.permute(0, 2, 3, 4, 1).reshape(b, d * h * w, c)
    out = out @ attn.proj.weight.T + attn.proj.bias
    return out.reshape(b, d, h, w, c).permute(0, 4, 1, 2, 3)


@torch.no_grad()
def _reference(attn: BiLevelRoutingAttention3d, x: torch.Tensor) -> torch.Tensor:
    return _reference_vbra(attn, x)


@pytest.mark.parametrize(
    ("spatial", "grid", "topk"),
    [
        ((8, 8, 4), 2, 3),  # no padding, k < R = 8
        ((8, 6, 4), (2, 3, 1), 2),  # no padding, anisotropic grid
        ((9, 10, 7), 2, 3),  # padded on every axis
        ((9, 10, 7), 4, 5),  # padded, and the last D slab of regions is pure padding
    ],
)
@pytest.mark.parametrize("fused", [True, False])
def test_vbra_equals_independent_reference(spatial, grid, topk, fused):
    torch.manual_seed(0)
    attn = BiLevelRoutingAttention3d(dim=16, num_heads=2, regions_per_side=grid, topk=topk, fused=fused).double()
    x = torch.randn(2, 16, *spatial, dtype=torch.float64)
    torch.testing.assert_close(attn(x), _reference(attn, x), atol=1e-10, rtol=0)


def test_reference_with_all_regions_is_dense_attention():
    """The reference itself is right where the answer is known: k = R gives plain dense attention."""
    torch.manual_seed(1)
    attn = BiLevelRoutingAttention3d(dim=16, num_heads=2, regions_per_side=2, topk=8).double()
    dense = DenseAttention3d(dim=16, num_heads=2).double()
    dense.load_state_dict(attn.state_dict())
    x = torch.randn(1, 16, 9, 6, 5, dtype=torch.float64)
    torch.testing.assert_close(_reference(attn, x), dense(x), atol=1e-10, rtol=0)


@pytest.mark.parametrize(
    ("spatial", "grid", "topk"),
    [
        ((8, 8, 4), 2, 3),  # no padding
        ((9, 10, 7), 2, 3),  # padded on every axis: padded keys masked inside partial blocks
        ((9, 10, 7), 4, 5),  # padded, with regions of pure padding
        ((9, 10, 7), 2, 8),  # top-k = all regions
    ],
)
def test_flex_backend_equals_independent_reference(spatial, grid, topk):
    """The block-sparse flex path (eager flex_attention in float64) against the plain-code reference."""
    torch.manual_seed(0)
    attn = BiLevelRoutingAttention3d(dim=16, num_heads=2, regions_per_side=grid, topk=topk, backend="flex").double()
    x = torch.randn(2, 16, *spatial, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(attn(x), _reference(attn, x), atol=1e-10, rtol=0)


@pytest.mark.slow
def test_compiled_flex_backend_equals_independent_reference_float32():
    """The compiled CPU flex kernel (inference) in float32, padded grid, against the reference: to 1e-5."""
    torch.manual_seed(0)
    attn = BiLevelRoutingAttention3d(dim=16, num_heads=2, regions_per_side=2, topk=3, backend="flex")
    x = torch.randn(2, 16, 9, 10, 7)
    with torch.no_grad():
        got = attn(x)
    expected = _reference(attn.double(), x.double()).float()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
