"""Tests of BiLevelRoutingAttention3d (V-BRA) and DenseAttention3d."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from h3de_lite.layers.attention import BiLevelRoutingAttention3d, DenseAttention3d, Routing
from h3de_lite.layers.routing import naive_gather


def _vbra(**kwargs) -> BiLevelRoutingAttention3d:
    kwargs = {"dim": 16, "num_heads": 2, **kwargs}
    return BiLevelRoutingAttention3d(**kwargs).double()


@pytest.mark.parametrize("spatial", [(8, 8, 4), (9, 10, 7)])
def test_topk_all_regions_equals_dense(spatial):
    """With k = R every query sees every key: any grid gives dense attention, padded or not."""
    x = torch.randn(2, 16, *spatial, dtype=torch.float64)
    one_region = _vbra(regions_per_side=1, topk=1)
    expected = one_region(x)
    state = one_region.state_dict()
    for grid, topk, fused in [(2, 8, True), (2, 8, False), ((2, 3, 1), 6, True), (4, 64, True)]:
        attn = _vbra(regions_per_side=grid, topk=topk, fused=fused)
        attn.load_state_dict(state)
        torch.testing.assert_close(attn(x), expected, atol=1e-10, rtol=0)
    dense = DenseAttention3d(dim=16, num_heads=2).double()
    dense.load_state_dict(state)
    torch.testing.assert_close(dense(x), expected, atol=1e-10, rtol=0)


def test_state_dict_is_independent_of_grid_and_topk():
    keys = set(_vbra(regions_per_side=1, topk=1).state_dict())
    assert keys == set(_vbra(regions_per_side=(2, 3, 4), topk=5).state_dict())
    assert keys == set(DenseAttention3d(dim=16, num_heads=2).state_dict())
    assert keys == {"qkv.weight", "qkv.bias", "lepe.weight", "lepe.bias", "proj.weight", "proj.bias"}


SHAPE_CASES = [
    [{"dim": 16, "num_heads": 2, "regions_per_side": 2, "topk": 2}, (1, 16, 8, 8, 4), (1, 16, 8, 8, 4)],
    [{"dim": 16, "num_heads": 4, "regions_per_side": (2, 2, 1), "topk": 4}, (2, 16, 6, 8, 4), (2, 16, 6, 8, 4)],
    [{"dim": 24, "num_heads": 3, "regions_per_side": 3, "topk": 5, "qk_dim": 12}, (1, 24, 7, 5, 9), (1, 24, 7, 5, 9)],
    [{"dim": 8, "num_heads": 1, "regions_per_side": 4, "topk": 1, "lepe_kernel": 0}, (1, 8, 3, 4, 2), (1, 8, 3, 4, 2)],
    [{"dim": 8, "num_heads": 2, "regions_per_side": 2, "topk": 3, "fused": False}, (1, 8, 4, 4, 4), (1, 8, 4, 4, 4)],
]


@pytest.mark.parametrize(("kwargs", "input_shape", "expected_shape"), SHAPE_CASES)
def test_shapes(kwargs, input_shape, expected_shape):
    out = BiLevelRoutingAttention3d(**kwargs)(torch.randn(input_shape))
    assert out.shape == expected_shape
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("spatial", [(8, 8, 4), (9, 10, 7)])
def test_every_parameter_gets_a_gradient(spatial):
    attn = BiLevelRoutingAttention3d(dim=16, num_heads=2, regions_per_side=4, topk=3)
    x = torch.randn(2, 16, *spatial, requires_grad=True)
    out = attn(x)
    out.square().mean().backward()
    assert torch.isfinite(out).all()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for name, param in attn.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("spatial", [(8, 8, 8), (9, 10, 7)])
def test_fused_equals_reference_and_chunked_equals_unchunked(spatial):
    x = torch.randn(2, 16, *spatial, dtype=torch.float64)
    reference = _vbra(regions_per_side=2, topk=3, fused=False, query_chunk=8)
    expected = reference(x)
    for fused, chunk in [(True, 8), (True, 1), (True, None), (False, 3), (False, None)]:
        attn = _vbra(regions_per_side=2, topk=3, fused=fused, query_chunk=chunk)
        attn.load_state_dict(reference.state_dict())
        torch.testing.assert_close(attn(x), expected, atol=1e-10, rtol=0)


def test_naive_gather_module_matches():
    x = torch.randn(1, 16, 9, 10, 7, dtype=torch.float64)
    attn = _vbra(regions_per_side=2, topk=3)
    expected = attn(x)
    attn.gather = naive_gather
    torch.testing.assert_close(attn(x), expected, atol=1e-12, rtol=0)


def test_routing_is_returned_for_drawing():
    attn = _vbra(regions_per_side=(2, 3, 2), topk=4)
    x = torch.randn(2, 16, 9, 10, 7, dtype=torch.float64)
    out, routing = attn(x, return_routing=True)
    assert isinstance(routing, Routing)
    assert out.shape == x.shape
    assert routing.indices.shape == (2, 12, 4) and routing.indices.dtype == torch.long
    assert routing.scores.shape == (2, 12, 4)
    assert routing.grid == (2, 3, 2) and routing.padded_shape == (10, 12, 8)
    assert (routing.scores[..., :-1] >= routing.scores[..., 1:]).all()  # best first
    assert (routing.scores.sum(-1) <= 1 + 1e-9).all()
    assert torch.equal(out, attn(x))


def test_padding_regions_are_never_routed_while_real_ones_remain():
    # D = 9 with S_d = 4: regions of 3 tokens, the last slab (tokens 9–11) is pure padding; 48 real regions remain.
    attn = _vbra(regions_per_side=4, topk=40)
    _, routing = attn(torch.randn(1, 16, 9, 10, 7, dtype=torch.float64), return_routing=True)
    slab = routing.indices // 16  # region index → its D slab
    assert (slab < 3).all()


def test_locality_with_few_regions_differs_from_dense():
    x = torch.randn(1, 16, 8, 8, 4, dtype=torch.float64)
    attn = _vbra(regions_per_side=2, topk=1)
    dense = DenseAttention3d(dim=16, num_heads=2).double()
    dense.load_state_dict(attn.state_dict())
    assert not torch.allclose(attn(x), dense(x), atol=1e-3)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dim": 16, "num_heads": 3}, "divisible by num_heads"),
        ({"dim": 16, "num_heads": 2, "qk_dim": 7}, "divisible by num_heads"),
        ({"dim": 16, "num_heads": 2, "regions_per_side": 2, "topk": 9}, "topk"),
        ({"dim": 16, "num_heads": 2, "topk": 0}, "topk"),
        ({"dim": 16, "num_heads": 2, "regions_per_side": (2, 2)}, "regions_per_side"),
        ({"dim": 16, "num_heads": 2, "lepe_kernel": 4}, "lepe_kernel"),
        ({"dim": 16, "num_heads": 2, "query_chunk": 0}, "query_chunk"),
        ({"dim": 16, "num_heads": 2, "backend": "sparse"}, "backend must be one of"),
    ],
)
def test_invalid_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BiLevelRoutingAttention3d(**kwargs)


def test_wrong_input_raises():
    attn = BiLevelRoutingAttention3d(dim=16, num_heads=2, regions_per_side=2, topk=2)
    with pytest.raises(ValueError, match="C=16"):
        attn(torch.randn(1, 8, 4, 4, 4))
    with pytest.raises(ValueError, match="C=16"):
        attn(torch.randn(16, 4, 4, 4))
    with pytest.raises(ValueError, match="C=16"):
        DenseAttention3d(dim=16, num_heads=2)(torch.randn(1, 8, 4, 4, 4))


@pytest.mark.parametrize("spatial", [(8, 8, 8), (9, 10, 7)])
def test_fast_path_gradients_equal_the_einsum_reference(spatial):
    """Module gradients (input and every parameter) through the CPU flash path and the written-out reference."""
    x = torch.randn(2, 16, *spatial, dtype=torch.float64)
    reference = _vbra(regions_per_side=2, topk=3, fused=False, query_chunk=8)
    fast = _vbra(regions_per_side=2, topk=3)  # fused, automatic chunks: the CPU flash path
    fast.load_state_dict(reference.state_dict())
    grads = []
    for attn in (reference, fast):
        xi = x.clone().requires_grad_()
        out = attn(xi)
        weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
        grads.append(torch.autograd.grad((out * weights).sum(), (xi, *attn.parameters())))
    for got, want in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=0)


@pytest.mark.parametrize("spatial", [(8, 8, 8), (9, 10, 7)])
@pytest.mark.parametrize("lepe_kernel", [5, 0])
def test_inference_path_equals_the_autograd_path(spatial, lepe_kernel):
    """Without autograd the CPU flash forward writes over q (no output buffer): same numbers as while recording.

    Channels-first and channels-last inputs, batch 2, padded or not, with and without LePE (its sum is fused with
    the merge back from regions when nothing is padded).
    """
    attn = _vbra(regions_per_side=2, topk=3, lepe_kernel=lepe_kernel)
    reference = _vbra(regions_per_side=2, topk=3, lepe_kernel=lepe_kernel, fused=False)
    reference.load_state_dict(attn.state_dict())
    x = torch.randn(2, 16, *spatial, dtype=torch.float64)
    recorded = attn(x)
    assert recorded.grad_fn is not None
    with torch.no_grad():
        inferred = attn(x)
        channels_last = attn.forward_channels_last(x.permute(0, 2, 3, 4, 1).contiguous())
        expected = reference(x)
    assert torch.equal(inferred, recorded)
    assert torch.equal(channels_last, inferred.permute(0, 2, 3, 4, 1))
    torch.testing.assert_close(inferred, expected, atol=1e-10, rtol=0)


def test_float32_inference_path_equals_the_autograd_path():
    """Float32 inference projects through oneDNN (no autograd formula) and attends over q; training uses F.linear."""
    from h3de_lite.layers.attention import _linear

    torch.manual_seed(0)
    attn = BiLevelRoutingAttention3d(dim=32, num_heads=4, regions_per_side=2, topk=3)
    dense = DenseAttention3d(dim=32, num_heads=4)
    dense.load_state_dict(attn.state_dict())
    x = torch.randn(2, 32, 8, 8, 8)
    for module in (attn, dense):
        recorded = module(x)
        with torch.no_grad():
            inferred = module(x)
        torch.testing.assert_close(inferred, recorded, atol=1e-5, rtol=0)
    tokens, weight, bias = torch.randn(5, 7, 32), torch.randn(48, 32), torch.randn(48)
    with torch.no_grad():
        torch.testing.assert_close(_linear(tokens, weight, bias), tokens @ weight.T + bias, atol=1e-5, rtol=0)
        torch.testing.assert_close(_linear(tokens, weight, None), tokens @ weight.T, atol=1e-5, rtol=0)


def test_flex_backend_equals_gather_backend_without_autograd():
    x = torch.randn(1, 16, 9, 10, 7, dtype=torch.float64)
    gather = _vbra(regions_per_side=(2, 3, 2), topk=4, backend="gather")
    flex = _vbra(regions_per_side=(2, 3, 2), topk=4, backend="flex")
    flex.load_state_dict(gather.state_dict())
    with torch.no_grad():
        out, routing = flex(x, return_routing=True)
        expected, expected_routing = gather(x, return_routing=True)
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=0)
    assert torch.equal(routing.indices, expected_routing.indices)
    assert "backend='flex'" in repr(flex)


@pytest.mark.parametrize(("kernel", "bias"), [(3, True), (5, True), (1, False)])
def test_depthwise_conv_gradients_equal_plain_conv(kernel, bias):
    """The faster backward (made of forward convolutions) against autograd through nn.Conv3d."""
    from h3de_lite.layers.attention import DepthwiseConv3d

    conv = DepthwiseConv3d(channels=3, kernel_size=kernel, bias=bias).double()
    plain = nn.Conv3d(3, 3, kernel, padding=kernel // 2, groups=3, bias=bias).double()
    plain.load_state_dict(conv.state_dict())
    x = torch.randn(2, 3, 5, 6, 4, dtype=torch.float64)
    x_cl = x.permute(0, 2, 3, 4, 1).contiguous().permute(0, 4, 1, 2, 3)  # channels-last, as LePE sees it
    weights = torch.randn(2, 3, 5, 6, 4, dtype=torch.float64)
    grads = []
    for module, inp in ((plain, x), (conv, x), (conv, x_cl)):
        xi = inp.clone().requires_grad_()
        out = module(xi)
        grads.append((out, *torch.autograd.grad((out * weights).sum(), (xi, *module.parameters()))))
    for other in grads[1:]:
        for got, want in zip(other, grads[0], strict=True):
            torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    small = DepthwiseConv3d(channels=2, kernel_size=3).double()
    assert torch.autograd.gradcheck(small, (torch.randn(1, 2, 3, 3, 2, dtype=torch.float64, requires_grad=True),))
    with pytest.raises(ValueError, match="odd"):
        DepthwiseConv3d(channels=2, kernel_size=4)


@pytest.mark.parametrize("spatial", [(8, 8, 4), (9, 10, 7)])
@pytest.mark.parametrize("channels_first", [True, False])
def test_region_projection_equals_linear_on_the_region_copy(spatial, channels_first):
    """STEP 1 while recording: q, k|v and every gradient equal ``F.linear`` on the padded region copy (plain autograd),
    for contiguous channels-last tokens and for a channels-first volume seen channels-last, padded or not."""
    from h3de_lite.layers.attention import _RegionProjection
    from h3de_lite.layers.routing import make_layout, pad_to_layout, partition_regions

    torch.manual_seed(0)
    qk, c = 6, 8
    layout = make_layout(spatial, (2, 2, 2))
    weight = torch.randn(2 * qk + c, c, dtype=torch.float64)
    bias = torch.randn(2 * qk + c, dtype=torch.float64)
    base = torch.randn(2, c, *spatial, dtype=torch.float64)
    base = base if channels_first else base.permute(0, 2, 3, 4, 1).contiguous()
    results = []
    for fast in (False, True):
        xb, w, b = (t.clone().requires_grad_() for t in (base, weight, bias))
        x = xb.permute(0, 2, 3, 4, 1) if channels_first else xb  # (B, D, H, W, C)
        if fast:
            q, kv = _RegionProjection.apply(x, w, b, layout, qk)
        else:
            regions = partition_regions(pad_to_layout(x, layout), layout)
            q, kv = F.linear(regions, w[:qk], b[:qk]), F.linear(regions, w[qk:], b[qk:])
        wq = torch.linspace(-1, 1, q.numel(), dtype=q.dtype).reshape(q.shape)
        wkv = torch.cos(torch.arange(kv.numel(), dtype=kv.dtype)).reshape(kv.shape)
        grads = torch.autograd.grad((q * wq).sum() + (kv * wkv).sum(), (xb, w, b))
        results.append((q.detach(), kv.detach(), *grads))
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


def test_vbra_keeps_its_input_not_a_region_copy_for_the_backward():
    """Forward+backward memory: the projection saves the caller's tokens; no (B, R, T, C) copy of them is kept."""
    attn = _vbra(dim=16, num_heads=2, regions_per_side=2, topk=2)
    x = torch.randn(1, 16, 8, 8, 4, dtype=torch.float64)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        attn(x)
    assert any(t.data_ptr() == x.data_ptr() for t in saved)  # the input itself, seen channels-last
    from h3de_lite.layers.routing import make_layout, partition_regions

    regions = partition_regions(x.permute(0, 2, 3, 4, 1), make_layout((8, 8, 4), (2, 2, 2)))  # (1, 8, 32, 16)
    assert not [t for t in saved if t.shape == regions.shape and torch.equal(t, regions)]


@pytest.mark.parametrize(("spatial", "topk"), [((8, 8, 4), 2), ((9, 10, 7), 8)])
def test_bfloat16_autocast_backward_matches_float32(spatial, topk):
    """Mixed precision (``--amp``; bfloat16 autocast on CPU): the custom backward passes (LePE's depthwise conv and
    the region projection) take low-precision gradients and float32 inputs and return float32 gradients close to a
    float32 pass, unpadded and padded.

    The padded case keeps every region (k = R): with fewer, bfloat16 rounding of the region means can swap two
    nearly tied key regions (it does here for one query region at k = 2), and the comparison would measure that
    discrete choice rather than the arithmetic."""
    torch.manual_seed(0)
    attn = BiLevelRoutingAttention3d(dim=16, num_heads=2, regions_per_side=2, topk=topk)
    x = torch.randn(2, 16, *spatial)
    grads = []
    for amp in (False, True):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out = attn(xi)
        weights = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
        grads.append(torch.autograd.grad((out.float() * weights).sum(), (xi, *attn.parameters())))
    for got, want in zip(grads[1], grads[0], strict=True):
        assert got.dtype == torch.float32
        assert (got - want).norm() <= 0.05 * want.norm()
