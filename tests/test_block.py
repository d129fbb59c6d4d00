"""Tests of the V-BRA transformer block and DropPath."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from h3de_lite.layers.attention import BiLevelRoutingAttention3d
from h3de_lite.layers.block import DropPath, VBRABlock

SHAPE_CASES = [
    [{"dim": 16, "num_heads": 2, "regions_per_side": 2, "topk": 2}, (1, 16, 8, 8, 4), (1, 16, 8, 8, 4)],
    [{"dim": 16, "num_heads": 4, "regions_per_side": (2, 2, 1), "topk": 3}, (2, 16, 4, 8, 4), (2, 16, 4, 8, 4)],
    [
        {"dim": 8, "num_heads": 2, "regions_per_side": 4, "topk": 4, "mlp_ratio": 2.0},
        (1, 8, 9, 10, 7),
        (1, 8, 9, 10, 7),
    ],
    [
        {"dim": 8, "num_heads": 1, "regions_per_side": 1, "topk": 1, "qk_dim": 4, "lepe_kernel": 3},
        (1, 8, 4, 4, 4),
        (1, 8, 4, 4, 4),
    ],
]


@pytest.mark.parametrize(("kwargs", "input_shape", "expected_shape"), SHAPE_CASES)
def test_shapes(kwargs, input_shape, expected_shape):
    out = VBRABlock(**kwargs)(torch.randn(input_shape))
    assert out.shape == expected_shape
    assert torch.isfinite(out).all()


def test_every_parameter_gets_a_gradient():
    block = VBRABlock(dim=16, num_heads=2, regions_per_side=2, topk=3, drop_path=0.1)
    x = torch.randn(2, 16, 9, 6, 4, requires_grad=True)
    out = block(x)
    out.square().mean().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    for name, param in block.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name


def test_block_with_zeroed_branches_is_identity():
    block = VBRABlock(dim=8, num_heads=2, regions_per_side=2, topk=2)
    with torch.no_grad():
        for layer in (block.pos_embed, block.attn.proj, block.mlp.fc2):
            layer.weight.zero_()
            layer.bias.zero_()
    x = torch.randn(1, 8, 4, 4, 4)
    torch.testing.assert_close(block(x), x)


def test_block_follows_the_residual_recipe():
    """x ← x + DWConv(x); x ← x + attn(LN(x)); x ← x + MLP(LN(x)), recomputed by hand."""
    block = VBRABlock(dim=8, num_heads=2, regions_per_side=2, topk=2).double().eval()
    x = torch.randn(2, 8, 4, 6, 4, dtype=torch.float64)
    y = x + block.pos_embed(x)
    y = y + block.attn(block.norm1(y.permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3))
    y = y.permute(0, 2, 3, 4, 1)
    y = y + block.mlp.fc2(nn.functional.gelu(block.mlp.fc1(block.norm2(y))))
    torch.testing.assert_close(block(x), y.permute(0, 4, 1, 2, 3))


def test_options_become_modules():
    block = VBRABlock(dim=8, num_heads=2, regions_per_side=2, topk=2, norm_layer=nn.Identity, act_layer=nn.ReLU)
    assert isinstance(block.drop_path, nn.Identity)
    assert isinstance(block.norm1, nn.Identity) and isinstance(block.mlp.act, nn.ReLU)
    assert isinstance(block.attn, BiLevelRoutingAttention3d)
    assert block.attn.grid == (2, 2, 2) and block.attn.topk == 2
    assert block.mlp.fc1.out_features == 32
    assert isinstance(VBRABlock(dim=8, num_heads=2, regions_per_side=2, drop_path=0.2).drop_path, DropPath)


def test_drop_path_drops_whole_samples():
    drop = DropPath(drop_prob=0.5)
    x = torch.ones(64, 3, 2)
    out = drop(x)
    per_sample = out.flatten(1)
    assert set(per_sample.unique().tolist()) <= {0.0, 2.0}  # dropped, or kept and scaled by 1 / (1 - p)
    assert (per_sample == per_sample[:, :1]).all()  # one decision per sample
    assert 0 < (per_sample[:, 0] == 0).sum() < 64
    drop.eval()
    assert torch.equal(drop(x), x)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"drop_path": 1.0}, "drop_path"),
        ({"drop_path": -0.1}, "drop_path"),
        ({"mlp_ratio": 0.0}, "mlp_ratio"),
        ({"num_heads": 3}, "divisible by num_heads"),
        ({"topk": 9}, "topk"),
        ({"backend": "dense"}, "backend must be one of"),
    ],
)
def test_invalid_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VBRABlock(**{"dim": 8, "num_heads": 2, "regions_per_side": 2, "topk": 2, **kwargs})


def test_wrong_input_raises():
    with pytest.raises(ValueError, match="C=8"):
        VBRABlock(dim=8, num_heads=2, regions_per_side=2, topk=2)(torch.randn(1, 4, 4, 4, 4))


def test_checkpointing_gives_equal_outputs_and_gradients_and_keeps_less():
    """Same values and gradients (DropPath included: the recomputation replays the random state); the block keeps
    only its input for the backward instead of its activations."""
    torch.manual_seed(0)
    kwargs = dict(dim=8, num_heads=2, regions_per_side=2, topk=3, drop_path=0.5, lepe_kernel=3)
    plain = VBRABlock(**kwargs).double()
    ckpt = VBRABlock(**kwargs, checkpointing=True).double()
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(4, 8, 5, 4, 4, dtype=torch.float64)
    results = []
    for block in (plain, ckpt):
        saved: list[int] = []

        def pack(t: torch.Tensor, saved=saved) -> torch.Tensor:
            saved.append(t.numel())
            return t

        xi = x.clone().requires_grad_()
        torch.manual_seed(1)  # same DropPath draws
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = block(xi)
        grads = torch.autograd.grad(out.square().sum(), (xi, *block.parameters()))
        results.append((out, grads, sum(saved)))
    (out_a, grads_a, saved_a), (out_b, grads_b, saved_b) = results
    torch.testing.assert_close(out_b, out_a, atol=1e-12, rtol=0)
    for got, want in zip(grads_b, grads_a, strict=True):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    assert saved_b == x.numel()  # only the block input
    assert saved_a > 10 * x.numel()
    with torch.no_grad():  # no autograd: no checkpoint, same output
        torch.manual_seed(1)
        torch.testing.assert_close(ckpt(x), out_a, atol=1e-12, rtol=0)


def test_backend_reaches_the_attention():
    block = VBRABlock(dim=8, num_heads=2, regions_per_side=2, topk=2, backend="flex")
    assert block.attn.backend == "flex"
    assert VBRABlock(dim=8, num_heads=2, regions_per_side=2, topk=2).attn.backend == "auto"
