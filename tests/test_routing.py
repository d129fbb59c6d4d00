"""Tests of the pure V-BRA functions: layout, padding, masks, routing (eq. 3), gathers, token attention (eq. 4)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from h3de_lite.layers.routing import (
    auto_query_chunk,
    gather_key_mask,
    gather_regions,
    make_layout,
    merge_regions,
    naive_gather,
    normalize_grid,
    pad_to_layout,
    partition_regions,
    region_means,
    regional_routing_attention,
    route_regions,
    token_attention_fused,
    token_attention_reference,
    token_mask,
)


@pytest.mark.parametrize(("value", "expected"), [(4, (4, 4, 4)), ((2, 3, 1), (2, 3, 1)), ([1, 2, 3], (1, 2, 3))])
def test_normalize_grid(value, expected):
    assert normalize_grid(value) == expected


@pytest.mark.parametrize("value", [0, -1, (2, 2), (2, 0, 2), (2.0, 2, 2), True])
def test_normalize_grid_rejects(value):
    with pytest.raises(ValueError, match="regions_per_side"):
        normalize_grid(value)


@pytest.mark.parametrize(
    ("spatial", "grid", "region_size", "padded"),
    [
        ((8, 8, 4), (2, 2, 2), (4, 4, 2), (8, 8, 4)),
        ((9, 10, 7), (2, 2, 2), (5, 5, 4), (10, 10, 8)),
        ((9, 10, 7), (4, 4, 4), (3, 3, 2), (12, 12, 8)),
        ((16, 8, 4), (4, 2, 1), (4, 4, 4), (16, 8, 4)),
    ],
)
def test_make_layout(spatial, grid, region_size, padded):
    layout = make_layout(spatial, grid)
    assert layout.region_size == region_size
    assert layout.padded_shape == padded
    assert layout.needs_padding == (padded != spatial)
    assert layout.num_regions == int(np.prod(grid))
    assert layout.tokens_per_region == int(np.prod(region_size))


def test_pad_pads_the_spatial_axes_at_the_far_end():
    layout = make_layout((9, 10, 7), (2, 2, 2))
    x = torch.rand(2, 9, 10, 7, 3) + 1.0
    padded = pad_to_layout(x, layout)
    assert padded.shape == (2, 10, 10, 8, 3)  # channels untouched, D and W padded
    assert torch.equal(padded[:, :9, :10, :7], x)
    assert padded[:, 9:].abs().sum() == 0 and padded[:, :, :, 7:].abs().sum() == 0


def test_partition_places_tokens_in_known_regions_and_merge_inverts():
    layout = make_layout((4, 6, 2), (2, 3, 1))  # regions of 2×2×2 tokens
    d, h, w = np.meshgrid(np.arange(4), np.arange(6), np.arange(2), indexing="ij")
    coords = torch.from_numpy(np.stack([d, h, w], axis=-1)).float()[None]  # (1, 4, 6, 2, 3)
    regions = partition_regions(coords, layout)  # (1, R, T, 3)
    assert regions.shape == (1, 6, 8, 3)
    for r in range(6):
        rd, rh, rw = np.unravel_index(r, layout.grid)
        tokens = regions[0, r]  # (T, 3)
        assert set(tokens[:, 0].int().tolist()) == {2 * rd, 2 * rd + 1}
        assert set(tokens[:, 1].int().tolist()) == {2 * rh, 2 * rh + 1}
        assert set(tokens[:, 2].int().tolist()) == {0, 1}
        assert tuple(tokens[3].int().tolist()) == (2 * rd + 0, 2 * rh + 1, 1)  # t = 3 ↔ (0, 1, 1) inside region
    assert torch.equal(merge_regions(regions, layout), coords)


def test_token_mask_counts_real_tokens():
    layout = make_layout((9, 10, 7), (4, 4, 4))
    valid = token_mask(layout)
    assert valid.shape == (64, 18) and valid.dtype == torch.bool
    assert valid.sum() == 9 * 10 * 7
    per_region = valid.sum(1).reshape(4, 4, 4)
    assert per_region[3].sum() == 0  # D = 9 → the 4th slab of regions (tokens 9–11) holds only padding
    assert per_region[0, 0, 0] == 3 * 3 * 2
    assert per_region[2, 3, 3] == 3 * 1 * 1  # H tokens 9..11 → only 9 real, W tokens 6..7 → only 6 real


def test_region_means_ignore_padding_and_never_nan():
    layout = make_layout((3, 1, 1), (2, 1, 1))  # regions of 2 tokens along D: [t0, t1], [t2, pad]
    x = torch.tensor([1.0, 3.0, 5.0]).reshape(1, 3, 1, 1, 1)
    regions = partition_regions(pad_to_layout(x, layout), layout)  # (1, 2, 2, 1)
    means = region_means(regions, token_mask(layout))
    assert means.flatten().tolist() == [2.0, 5.0]  # not (5 + 0) / 2
    empty = make_layout((1, 1, 1), (3, 1, 1))  # two regions of pure padding
    means = region_means(torch.zeros(1, 3, 1, 4), token_mask(empty))
    assert torch.isfinite(means).all() and means.abs().sum() == 0


def test_route_regions_picks_known_regions():
    # keys of region j point along axis j; the query of region i points along axis perm[i] (strongly) and
    # along axis second[i] (weakly): top-1 must be perm[i], top-2 second[i].
    perm = [2, 0, 3, 1]
    second = [1, 3, 0, 2]
    keys = torch.eye(4)[None]  # (1, 4, 4)
    queries = (4.0 * torch.eye(4)[perm] + 2.0 * torch.eye(4)[second])[None]
    indices, scores = route_regions(queries, keys, topk=2, scale=1.0)
    assert indices[0, :, 0].tolist() == perm
    assert indices[0, :, 1].tolist() == second
    probs = torch.softmax(queries[0] @ keys[0].T, dim=-1)  # eq. 3 by hand
    assert torch.allclose(scores[0], probs.gather(1, indices[0]))


def test_route_regions_skips_padding_regions_and_validates_topk():
    queries = torch.ones(1, 3, 2)
    keys = torch.tensor([[[5.0, 5.0], [0.0, 0.0], [1.0, 1.0]]])  # region 0 would win, but it is padding
    indices, scores = route_regions(queries, keys, topk=2, scale=1.0, key_valid=torch.tensor([False, True, True]))
    assert indices[0, :, 0].tolist() == [2, 2, 2] and indices[0, :, 1].tolist() == [1, 1, 1]
    assert torch.allclose(scores.sum(-1), torch.ones(1, 3))  # padding has probability 0
    for bad in (0, 4):
        with pytest.raises(ValueError, match="topk"):
            route_regions(queries, keys, topk=bad, scale=1.0)


def test_gathers_match_a_loop_and_each_other():
    x = torch.randn(3, 6, 5, 4, dtype=torch.float64, requires_grad=True)
    indices = torch.randint(0, 6, (3, 4, 2))
    fast = gather_regions(x, indices)
    naive = naive_gather(x, indices)
    loop = torch.stack([torch.stack([torch.cat([x[n, j] for j in indices[n, r]]) for r in range(4)]) for n in range(3)])
    assert fast.shape == (3, 4, 2 * 5, 4)
    assert torch.equal(fast, loop) and torch.equal(naive, loop)
    weights = torch.randn_like(fast)
    (grad_fast,) = torch.autograd.grad((fast * weights).sum(), x)
    (grad_naive,) = torch.autograd.grad((naive_gather(x, indices) * weights).sum(), x)
    assert torch.allclose(grad_fast, grad_naive)


def test_gather_key_mask():
    valid = torch.tensor([[True, False], [True, True], [False, False]])
    indices = torch.tensor([[[1, 0], [2, 1]]])
    mask = gather_key_mask(valid, indices)
    assert mask.tolist() == [[[True, True, True, False], [False, False, True, True]]]


@pytest.mark.parametrize("masked", [False, True])
def test_fused_equals_reference(masked):
    q = torch.randn(6, 5, 8, dtype=torch.float64)
    k = torch.randn(6, 10, 8, dtype=torch.float64)
    v = torch.randn(6, 10, 12, dtype=torch.float64)
    mask = torch.rand(6, 10) > 0.3 if masked else None
    if mask is not None:
        mask[..., 0] = True  # every query keeps at least one key
    ref = token_attention_reference(q, k, v, num_heads=2, scale=0.5, key_mask=mask)
    fused = token_attention_fused(q, k, v, num_heads=2, scale=0.5, key_mask=mask)
    assert ref.shape == (6, 5, 12)
    torch.testing.assert_close(fused, ref, atol=1e-10, rtol=0)
    if mask is not None:  # masked keys have no influence
        v2 = v.masked_fill(~mask[..., None], 1e3)
        torch.testing.assert_close(token_attention_reference(q, k, v2, num_heads=2, scale=0.5, key_mask=mask), ref)


def test_reference_is_per_head_softmax_attention():
    """Head 1 of the output only sees channels of head 1: compare with a one-head computation by hand."""
    q, k, v = (
        torch.randn(3, 4, 6, dtype=torch.float64),
        torch.randn(3, 7, 6, dtype=torch.float64),
        torch.randn(3, 7, 6, dtype=torch.float64),
    )
    out = token_attention_reference(q, k, v, num_heads=2, scale=0.7)
    weights = torch.softmax(q[..., 3:] @ k[..., 3:].transpose(1, 2) * 0.7, dim=-1)  # (3, 4, 7)
    torch.testing.assert_close(out[..., 3:], weights @ v[..., 3:])


def _routing_inputs(num_regions: int = 6, tokens: int = 5, batch: int = 2, channels: int = 8):
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(batch, num_regions, tokens, channels, dtype=torch.float64, generator=generator)
    kv = torch.randn(batch, num_regions, tokens, 2 * channels, dtype=torch.float64, generator=generator)
    return q, kv


@pytest.mark.parametrize("fused", [True, False])
def test_chunked_equals_unchunked(fused):
    q, kv = _routing_inputs()
    valid = torch.rand(6, 5) > 0.3
    valid[:, 0] = True
    kwargs = dict(num_heads=2, topk=3, scale=0.5, routing_scale=0.35, valid=valid, fused=fused)
    full, idx, scores = regional_routing_attention(q, kv, query_chunk=12, **kwargs)
    assert full.shape == (2, 6, 5, 8) and idx.shape == (2, 6, 3)
    for chunk in (1, 5, None):
        out, idx_c, scores_c = regional_routing_attention(q, kv, query_chunk=chunk, **kwargs)
        torch.testing.assert_close(out, full, atol=1e-12, rtol=0)
        assert torch.equal(idx_c, idx) and torch.equal(scores_c, scores)


def test_chunked_gradients_equal_unchunked():
    grads = []
    for chunk in (12, 5, 1):
        q, kv = (t.requires_grad_() for t in _routing_inputs())
        out, _, _ = regional_routing_attention(
            q, kv, num_heads=2, topk=3, scale=0.5, routing_scale=0.35, query_chunk=chunk
        )
        weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
        grads.append(torch.autograd.grad((out * weights).sum(), (q, kv)))
    for other in grads[1:]:
        for a, b in zip(grads[0], other, strict=True):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_batch_elements_route_and_attend_independently():
    q, kv = _routing_inputs()
    kwargs = dict(num_heads=2, topk=2, scale=0.5, routing_scale=0.35, query_chunk=4)
    out, indices, _ = regional_routing_attention(q, kv, **kwargs)
    for b in range(2):
        single, single_idx, _ = regional_routing_attention(q[b : b + 1], kv[b : b + 1], **kwargs)
        torch.testing.assert_close(out[b : b + 1], single)
        assert torch.equal(indices[b : b + 1], single_idx)


def test_unrouted_regions_do_not_reach_the_output():
    q, kv = _routing_inputs(batch=1)
    kwargs = dict(num_heads=2, topk=2, scale=0.5, routing_scale=0.35)
    out, indices, _ = regional_routing_attention(q, kv, **kwargs)
    unrouted = sorted(set(range(6)) - set(indices[0, 0].tolist()))
    kv2 = kv.clone()
    kv2[:, unrouted, :, 8:] += 100.0  # values of regions that query region 0 did not pick
    out2, indices2, _ = regional_routing_attention(q, kv2, **kwargs)
    assert torch.equal(indices2, indices)
    torch.testing.assert_close(out2[:, 0], out[:, 0])
    assert not torch.allclose(out2, out)


def test_auto_query_chunk():
    kwargs = dict(num_query_regions=64, tokens_per_region=256, topk=4, kv_channels=128, num_heads=4, element_size=4)
    per_region = 4 * 256 * 128 * 4  # k·T keys and values · channels · bytes
    assert auto_query_chunk(**kwargs, fused=True, budget=10 * per_region) == 10
    assert auto_query_chunk(**kwargs, fused=True, budget=10**12) == 64
    assert auto_query_chunk(**kwargs, fused=True, budget=1) == 1
    assert auto_query_chunk(**kwargs, fused=False, budget=10 * per_region) < 10  # the weights count too


# Region logits whose probabilities underflow: softmax gives exactly 0 beyond the first in float32 and float16.
_FAR_LOGITS = [0.0, -150.0, -120.0, -200.0, -110.0, -300.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_route_regions_selects_on_logits_when_probabilities_underflow(dtype):
    queries = torch.ones(1, 1, 1, dtype=dtype)  # one query region, C = 1: logits are the key means themselves
    keys = torch.tensor(_FAR_LOGITS, dtype=dtype).reshape(1, 6, 1)
    assert (torch.softmax(keys[0, :, 0].float(), 0)[1:] == 0).all()  # the case this test is about
    indices, scores = route_regions(queries, keys, topk=3, scale=1.0)
    assert indices[0, 0].tolist() == [0, 4, 2]  # logits 0 > -110 > -120, by hand
    assert scores.dtype == dtype
    assert scores[0, 0, 0].item() == 1.0 and (scores[0, 0, 1:] >= 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_route_regions_never_routes_padding_before_a_real_region(dtype):
    # Regions 1..4 are real but far below region 0; region 5 is pure padding. k = 5 must take all real regions.
    queries = torch.ones(1, 1, 1, dtype=dtype)
    keys = torch.tensor([0.0, -150.0, -120.0, -200.0, -110.0, 0.0], dtype=dtype).reshape(1, 6, 1)
    valid = torch.tensor([True, True, True, True, True, False])
    for topk in (2, 3, 4, 5):
        indices, _ = route_regions(queries, keys, topk=topk, scale=1.0, key_valid=valid)
        assert 5 not in indices[0, 0].tolist(), topk
    indices, scores = route_regions(queries, keys, topk=6, scale=1.0, key_valid=valid)
    assert indices[0, 0].tolist() == [0, 4, 2, 1, 3, 5]  # padding last
    assert scores[0, 0, -1].item() == 0.0


def test_route_regions_scores_are_eq3_probabilities():
    generator = torch.Generator().manual_seed(3)
    queries = torch.randn(2, 5, 4, dtype=torch.float64, generator=generator)
    keys = torch.randn(2, 5, 4, dtype=torch.float64, generator=generator)
    indices, scores = route_regions(queries, keys, topk=3, scale=0.5)
    for b in range(2):
        for r in range(5):
            logits = [0.5 * float(queries[b, r] @ keys[b, j]) for j in range(5)]  # eq. 3 by hand
            norm = sum(np.exp(logits))
            order = sorted(range(5), key=lambda j: -logits[j])[:3]
            assert indices[b, r].tolist() == order
            np.testing.assert_allclose(scores[b, r].numpy(), [np.exp(logits[j]) / norm for j in order], rtol=1e-12)


def test_routing_and_attention_scales():
    from h3de_lite.layers.routing import attention_scale, routing_scale

    assert routing_scale(64) == 0.125  # eq. 3: 1/sqrt(qk_dim)
    assert attention_scale(64, 4) == 0.25  # eq. 4: 1/sqrt(qk_dim / M)


# ---------------------------------------------------------------------------------------------------------------------
# STEP 3 implementations: CPU flash path with regathering backward, block-sparse flex path, backend choice
# ---------------------------------------------------------------------------------------------------------------------


def _padded_valid(num_regions: int = 6, tokens: int = 5) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    valid = torch.rand(num_regions, tokens, generator=generator) > 0.3
    valid[:, 0] = True
    valid[num_regions - 1] = False  # a region of pure padding
    return valid


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("chunk", [1, 5, None])
def test_cpu_flash_path_equals_plain_autograd_values_and_gradients(masked, chunk):
    """The CPU path (custom backward that regathers) against the readable gather path and the einsum reference."""
    from h3de_lite.layers.routing import _RoutedFlashAttentionCPU, gather_attention

    q, kv = _routing_inputs()
    q.requires_grad_()
    kv.requires_grad_()
    valid = _padded_valid() if masked else None
    kwargs = dict(num_heads=2, topk=3, scale=0.5, routing_scale=0.35, valid=valid)
    out, indices, _ = regional_routing_attention(q, kv, query_chunk=chunk, **kwargs)
    assert out.grad_fn.next_functions[0][0].name() == "_RoutedFlashAttentionCPUBackward"  # the fast path ran
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    grads = torch.autograd.grad((out * weights).sum(), (q, kv))

    rows = (indices + torch.arange(2)[:, None, None] * 6).reshape(12, 3)
    mask = None if valid is None else gather_key_mask(valid, indices).reshape(12, 15)
    for fused in (True, False):  # plain autograd through SDPA, and the written-out reference
        expected = gather_attention(
            q.reshape(12, 5, 8),
            kv.reshape(12, 5, 16),
            rows,
            num_heads=2,
            scale=0.5,
            key_mask=mask,
            fused=fused,
            query_chunk=12,
        ).reshape(out.shape)
        torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
        expected_grads = torch.autograd.grad((expected * weights).sum(), (q, kv))
        for got, want in zip(grads, expected_grads, strict=True):
            torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    assert issubclass(_RoutedFlashAttentionCPU, torch.autograd.Function)


@pytest.mark.parametrize("chunk", [1, 4, None])
def test_returned_values_carry_their_gradient_into_kv(chunk):
    """``return_values``: the values are kv's value half, and a loss on them (LePE's) reaches kv as through a slice.

    The CPU flash path hands back a copy whose gradient its own backward adds to kv's; the reference is plain
    autograd through the einsum path, where the values are the slice ``kv[..., M·c:]``.
    """
    q, kv = _routing_inputs()
    kwargs = dict(num_heads=2, topk=3, scale=0.5, routing_scale=0.35, valid=_padded_valid())
    results = []
    for fused in (True, False):
        qi, kvi = q.clone().requires_grad_(), kv.clone().requires_grad_()
        out, _, _, values = regional_routing_attention(
            qi, kvi, query_chunk=chunk, fused=fused, return_values=True, **kwargs
        )
        torch.testing.assert_close(values, kv[..., 8:], atol=0, rtol=0)
        w_out = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
        w_values = torch.linspace(2, -3, values.numel(), dtype=values.dtype).reshape(values.shape)
        results.append(torch.autograd.grad((out * w_out).sum() + (values * w_values).sum(), (qi, kvi)))
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    with torch.no_grad():  # inference: a view of kv, no copy
        *_, values = regional_routing_attention(q, kv, return_values=True, **kwargs)
    assert values.data_ptr() == kv[..., 8:].data_ptr()


@pytest.mark.parametrize("masked", [False, True])
def test_out_may_be_the_queries_in_inference(masked):
    """``out=q``: the CPU flash path writes each chunk over queries it has already read; same numbers."""
    q, kv = _routing_inputs()
    kwargs = dict(num_heads=2, topk=3, scale=0.5, routing_scale=0.35, valid=_padded_valid() if masked else None)
    expected, indices, _ = regional_routing_attention(q, kv, query_chunk=5, **kwargs)
    with torch.no_grad():
        for fused in (True, False):  # the flash path writes in place; the readable path copies its result
            q_copy = q.clone()
            out, got_indices, _ = regional_routing_attention(
                q_copy, kv, query_chunk=5, fused=fused, out=q_copy, **kwargs
            )
            assert out.data_ptr() == q_copy.data_ptr()
            assert torch.equal(got_indices, indices)
            torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="shape"):
        regional_routing_attention(q, kv, out=q[:, :, :2], **kwargs)
    with pytest.raises(ValueError, match="no_grad"):
        regional_routing_attention(q.requires_grad_(), kv, out=torch.empty_like(q), **kwargs)


def test_cpu_flash_path_keeps_no_gathered_keys_for_the_backward():
    """Autograd through the gather keeps k copies of the routed keys/values; the CPU path keeps q, kv, out, lse."""
    q, kv = _routing_inputs(num_regions=8, tokens=16)
    q.requires_grad_()
    kv.requires_grad_()
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, _, _ = regional_routing_attention(q, kv, num_heads=2, topk=4, scale=0.5, routing_scale=0.35)
    gathered = 4 * kv.numel() * kv.element_size()  # k copies of kv: what plain autograd keeps
    assert sum(saved) < gathered
    # q, kv, out and lse (M·B·R·T) plus the routed rows: nothing of size k·kv.
    expected = (q.numel() + kv.numel() + out.numel() + 2 * 8 * 16 * 2) * 8 + 2 * 8 * 4 * 8
    assert sum(saved) == expected


@pytest.mark.parametrize("topk", [2, 6])  # 6 = all regions
@pytest.mark.parametrize("masked", [False, True])
def test_flex_path_equals_gather_path_float32(topk, masked):
    from h3de_lite.layers.routing import flex_routed_attention

    q, kv = (t.float() for t in _routing_inputs())
    valid = _padded_valid() if masked else None
    kwargs = dict(num_heads=2, topk=topk, scale=0.5, routing_scale=0.35, valid=valid)
    with torch.no_grad():
        expected, indices, _ = regional_routing_attention(q, kv, backend="gather", **kwargs)
        got = flex_routed_attention(q, kv, indices, num_heads=2, scale=0.5, valid=valid, compiled=False)
    assert got.shape == expected.shape == (2, 6, 5, 8)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_flex_path_with_all_regions_is_dense_attention():
    """k = R over padded regions: plain attention over the real tokens, computed here by hand."""
    from h3de_lite.layers.routing import flex_routed_attention

    q, kv = _routing_inputs(batch=1)
    valid = _padded_valid()
    indices = torch.arange(6).repeat(1, 6, 1)  # (1, 6, 6) every region sees every region
    got = flex_routed_attention(q, kv, indices, num_heads=2, scale=0.5, valid=valid, compiled=False)
    keys, values = kv[0].reshape(30, 16)[valid.reshape(-1)].split([8, 8], dim=-1)  # real keys only
    queries = q[0].reshape(30, 8)
    for head in range(2):
        c = slice(4 * head, 4 * head + 4)
        weights = torch.softmax(queries[:, c] @ keys[:, c].T * 0.5, dim=-1)
        torch.testing.assert_close(got[0].reshape(30, 8)[:, c], weights @ values[:, c], atol=1e-12, rtol=0)


def test_routed_block_mask_marks_full_and_partial_blocks():
    from h3de_lite.layers.routing import routed_block_mask

    indices = torch.tensor([[[1, 2], [0, 2], [2, 1]]])  # (B=1, R=3, k=2)
    real = torch.tensor([[True, True], [True, False], [True, True]])  # region 1 holds a padding token
    mask = routed_block_mask(indices, real, 2)
    assert mask.shape == (1, 1, 6, 6) and mask.BLOCK_SIZE == (2, 2)
    assert mask.full_kv_num_blocks[0, 0].tolist() == [1, 2, 1]  # routed regions without padding
    assert mask.kv_num_blocks[0, 0].tolist() == [1, 0, 1]  # routed regions with padding (region 1)
    assert mask.kv_indices[0, 0, 0, 0].item() == 1 and mask.full_kv_indices[0, 0, 0, 0].item() == 2
    b, h = torch.tensor(0), torch.tensor(0)
    allowed = torch.tensor(
        [[bool(mask.mask_mod(b, h, torch.tensor(i), torch.tensor(j))) for j in range(6)] for i in range(6)]
    )
    by_hand = torch.tensor(
        [
            [0, 0, 1, 0, 1, 1],  # query region 0 → regions 1 (token 3 is padding) and 2
            [0, 0, 1, 0, 1, 1],
            [1, 1, 0, 0, 1, 1],  # query region 1 → regions 0 and 2
            [1, 1, 0, 0, 1, 1],
            [0, 0, 1, 0, 1, 1],  # query region 2 → regions 2 and 1
            [0, 0, 1, 0, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(allowed, by_hand)


def test_flex_path_refuses_to_train_on_cpu():
    from h3de_lite.layers.routing import flex_routed_attention

    q, kv = (t.float().requires_grad_() for t in _routing_inputs())
    indices = torch.zeros(2, 6, 1, dtype=torch.long)
    with pytest.raises(ValueError, match="cannot train on CPU"):
        flex_routed_attention(q, kv, indices, num_heads=2, scale=0.5)


def test_flex_block_size():
    from h3de_lite.layers.routing import flex_block_size

    assert flex_block_size(37, "cpu") == 37  # a block is one region
    assert [flex_block_size(t, "cuda") for t in (1, 64, 128, 129, 512)] == [128, 128, 128, 256, 512]


def test_backend_names_and_auto_rule():
    from h3de_lite.layers.routing import check_backend, fastest, resolve_backend

    assert check_backend("gather") == "gather"
    with pytest.raises(ValueError, match="backend must be one of"):
        check_backend("sparse")
    cpu = torch.device("cpu")
    assert resolve_backend("auto", key=("k",), device=cpu, candidates={}) == "gather"  # the CPU rule
    assert resolve_backend("flex", key=("k",), device=cpu, candidates={}) == "flex"

    def broken() -> None:
        raise RuntimeError("no Triton")

    import time as _time

    race = {"gather": lambda: _time.sleep(0.02), "flex": lambda: None, "other": broken}
    assert fastest(race, synchronize=lambda: None, repeats=2) == "flex"
    assert fastest({"other": broken}, synchronize=lambda: None) is None


def test_routing_is_chosen_in_float32_under_bfloat16_autocast():
    """Two key regions whose eq. 3 logits differ by 2⁻⁹ (below bfloat16's resolution at 1, 2⁻⁷; exact in float32):
    with bfloat16 q and k under autocast the routing still picks the larger, as float32 arithmetic does."""
    from h3de_lite.layers.routing import regional_routing_attention

    regions, tokens, channels = 4, 8, 8
    q = torch.zeros(1, regions, tokens, channels)
    q[..., :2] = 1.0  # every query scores a key as k0 + k1
    keys = torch.zeros(1, regions, tokens, channels)
    keys[:, 1, :, 0] = 1.0  # logit 1
    keys[:, 2, :, 0], keys[:, 2, :, 1] = 1.0, 2.0**-9  # logit 1 + 2⁻⁹: the best region for every query region
    kv = torch.cat([keys, torch.randn(1, regions, tokens, channels)], dim=-1)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        _, indices, _ = regional_routing_attention(
            q.bfloat16(), kv.bfloat16(), num_heads=1, topk=1, scale=1.0, routing_scale=1.0
        )
    assert indices.flatten().tolist() == [2] * regions


def test_routing_runs_on_meta_tensors():
    """Shape inference on the meta device (no data), where autocast does not exist: the float32 routing step must
    not open an autocast context there."""
    from h3de_lite.layers.routing import regional_routing_attention

    q, kv = torch.empty(1, 4, 8, 8, device="meta"), torch.empty(1, 4, 8, 16, device="meta")
    out, indices, _ = regional_routing_attention(q, kv, num_heads=1, topk=2, scale=1.0, routing_scale=1.0, fused=False)
    assert out.shape == (1, 4, 8, 8) and indices.shape == (1, 4, 2)


@pytest.fixture
def lanes_always(monkeypatch):
    """2 threads, and worker lanes for chunks of any size (the tests' chunks are far below ``LANE_MIN_MACS``);
    yields the list of pools each lane decision returned."""
    import h3de_lite.layers.routing as routing

    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    monkeypatch.setattr(routing, "LANE_MIN_MACS", 0)
    decisions: list = []
    real = routing._lane_workers

    def spy(*args, **kwargs):
        decisions.append(real(*args, **kwargs))
        return decisions[-1]

    monkeypatch.setattr(routing, "_lane_workers", spy)
    yield decisions
    torch.set_num_threads(previous)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_worker_lanes_give_the_same_values_and_gradients_bit_for_bit(masked, chunk, lanes_always):
    """With 2 threads the CPU chunks run on 2 single-threaded workers; the same arithmetic as one lane, bit for bit.

    The backward's lanes add their key/value gradients in chunk order, so even the sums of a region routed from
    several chunks are the same.
    """
    from h3de_lite.layers.workers import chunk_parallelism

    q, kv = _routing_inputs(num_regions=8, tokens=6, batch=2)
    kwargs = dict(num_heads=2, topk=3, scale=0.5, routing_scale=0.35, query_chunk=chunk, return_values=True)
    if masked:
        kwargs["valid"] = _padded_valid(num_regions=8, tokens=6)
    results = []
    for enabled in (True, False):
        with chunk_parallelism(enabled):
            qi, kvi = q.clone().requires_grad_(), kv.clone().requires_grad_()
            out, indices, _, values = regional_routing_attention(qi, kvi, **kwargs)
            w = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
            grads = torch.autograd.grad((out * w).sum() + (values * w.flip(0)).sum(), (qi, kvi))
            with torch.no_grad():
                q_copy = q.clone()
                inference, *_ = regional_routing_attention(q_copy, kv, out=q_copy, **kwargs)
            results.append((out.detach(), indices, *grads, inference))
    for got, want in zip(*results, strict=True):
        assert torch.equal(got, want)
    # forward, backward and inference with the lanes on, then the same three with them off
    assert [pool is not None for pool in lanes_always] == [True] * 3 + [False] * 3


def test_an_error_in_a_backward_lane_is_raised_not_waited_on(monkeypatch, lanes_always):
    """A lane that fails releases the lanes waiting for its chunk's gradient: the error reaches the caller."""
    import h3de_lite.layers.routing as routing

    calls = {"n": 0}
    real = routing._gather_chunk

    def failing(*args, **kwargs):
        if torch.is_grad_enabled() is False and threading.current_thread() is not threading.main_thread():
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("lane failed")
        return real(*args, **kwargs)

    q, kv = _routing_inputs(num_regions=8, tokens=6, batch=2)
    q.requires_grad_()
    out, *_ = regional_routing_attention(q, kv, num_heads=2, topk=3, scale=0.5, routing_scale=0.35, query_chunk=8)
    monkeypatch.setattr(routing, "_gather_chunk", failing)
    errors: list[BaseException] = []

    def backward() -> None:
        try:
            out.sum().backward()
        except RuntimeError as error:
            errors.append(error)

    thread = threading.Thread(target=backward, daemon=True)
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive(), "the backward hung"
    assert len(errors) == 1 and "lane failed" in str(errors[0])
    assert lanes_always[-1] is not None  # the backward ran on lanes


def test_a_stalled_lane_leaves_the_remaining_chunks_to_the_other_lane(monkeypatch, lanes_always):
    """Lanes claim chunks as they become free: while one lane is stuck in its first chunk the other takes all the
    rest (a fixed split would leave every second chunk waiting for the stalled lane), with the same output."""
    import h3de_lite.layers.routing as routing

    real = routing._gather_chunk
    lock = threading.Lock()
    calls: list[int] = []  # the thread of each chunk's gather, in the order they start

    def stalling(*args, **kwargs):
        with lock:
            calls.append(threading.get_ident())
            first = len(calls) == 1
        if first:
            time.sleep(1.0)  # far longer than the other lane needs for all other chunks
        return real(*args, **kwargs)

    q, kv = _routing_inputs(num_regions=8, tokens=6, batch=2)
    kwargs = dict(num_heads=2, topk=3, scale=0.5, routing_scale=0.35, query_chunk=2)  # 16 regions: 10 chunks
    with torch.no_grad():
        want, *_ = regional_routing_attention(q, kv, **kwargs)
        monkeypatch.setattr(routing, "_gather_chunk", stalling)
        got, *_ = regional_routing_attention(q, kv, **kwargs)
    assert lanes_always[-1] is not None  # it ran on lanes
    assert len(calls) == 10
    assert calls.count(calls[0]) == 1  # the stalled lane did only its first chunk
    assert torch.equal(got, want)


@pytest.mark.parametrize("total, size, lanes", [(64, 4, 2), (16, 2, 2), (7, 3, 4), (1, 8, 2), (100, 1, 2)])
def test_tapered_chunks_cover_every_region_once_and_shrink_to_the_end(total, size, lanes):
    from h3de_lite.layers.routing import _tapered_chunks

    chunks = _tapered_chunks(total, size, lanes=lanes)
    assert [start for start, _ in chunks] == [0] + [stop for _, stop in chunks[:-1]]  # contiguous, in order
    assert chunks[-1][1] == total
    sizes = [stop - start for start, stop in chunks]
    assert max(sizes) <= size and sizes == sorted(sizes, reverse=True)
    assert sizes[-1] == 1  # the last chunk to start is one region


@pytest.mark.parametrize("num_heads", [1, 2, 3, 4])
def test_split_tail_heads_covers_each_region_and_head_once_splitting_only_the_one_region_tail(num_heads):
    from h3de_lite.layers.routing import _split_tail_heads, _tapered_chunks

    chunks = _tapered_chunks(64, 4, lanes=2)  # ... 3, 3, 2, 1, 1, 1, 1
    pieces = _split_tail_heads(chunks, num_heads=num_heads)
    covered = torch.zeros(64, num_heads, dtype=torch.int64)
    for start, stop, heads in pieces:
        covered[start:stop, heads] += 1
    assert torch.equal(covered, torch.ones_like(covered))
    whole = [(start, stop) for start, stop, heads in pieces if heads == slice(None)]
    assert whole == (chunks if num_heads == 1 else chunks[:-4])  # one head: nothing to cut
    if num_heads > 1:
        tail = pieces[len(whole) :]
        assert [(start, stop) for start, stop, _ in tail] == [c for c in chunks[-4:] for _ in range(2)]
        assert {heads.stop - heads.start for _, _, heads in tail} <= {num_heads // 2, num_heads - num_heads // 2}
    assert _split_tail_heads([(0, 2), (2, 4)], num_heads=4) == [(0, 2, slice(None)), (2, 4, slice(None))]
