"""Conv blocks: shapes, the residual identity, the shortcut choice and user errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from h3de_lite.layers.conv import ConvNormAct, Downsample, ResidualConvBlock, instance_norm

SHAPE_CASES = [
    # [module class, kwargs, input shape, expected shape]
    [ConvNormAct, {"in_channels": 1, "out_channels": 4}, (2, 1, 8, 8, 4), (2, 4, 8, 8, 4)],
    [ConvNormAct, {"in_channels": 3, "out_channels": 4, "kernel_size": 1}, (1, 3, 6, 4, 2), (1, 4, 6, 4, 2)],
    [ConvNormAct, {"in_channels": 2, "out_channels": 4, "stride": 2}, (1, 2, 8, 8, 4), (1, 4, 4, 4, 2)],
    [ResidualConvBlock, {"in_channels": 4, "out_channels": 4}, (2, 4, 6, 6, 6), (2, 4, 6, 6, 6)],
    [ResidualConvBlock, {"in_channels": 4, "out_channels": 8, "stride": 2}, (1, 4, 8, 8, 4), (1, 8, 4, 4, 2)],
    [Downsample, {"in_channels": 4, "out_channels": 8}, (1, 4, 8, 8, 4), (1, 8, 4, 4, 2)],
    [Downsample, {"in_channels": 4, "out_channels": 4}, (1, 4, 6, 6, 2), (1, 4, 3, 3, 1)],
]


@pytest.mark.parametrize(("cls", "kwargs", "input_shape", "expected"), SHAPE_CASES)
def test_shapes(cls: type[nn.Module], kwargs: dict, input_shape: tuple, expected: tuple) -> None:
    assert cls(**kwargs)(torch.randn(input_shape)).shape == expected


def test_conv_norm_act_layers_and_bias() -> None:
    block = ConvNormAct(in_channels=2, out_channels=3)
    assert isinstance(block[0], nn.Conv3d) and block[0].bias is None  # the norm removes any bias
    assert isinstance(block[1], nn.InstanceNorm3d) and block[1].affine
    assert isinstance(block[2], nn.LeakyReLU)
    bare = ConvNormAct(in_channels=2, out_channels=3, norm_layer=None, act_layer=None)
    assert bare[0].bias is not None
    assert isinstance(bare[1], nn.Identity) and isinstance(bare[2], nn.Identity)


def test_conv_norm_act_without_norm_is_a_plain_conv() -> None:
    block = ConvNormAct(in_channels=2, out_channels=3, norm_layer=None, act_layer=None)
    x = torch.randn(1, 2, 5, 4, 3)
    expected = nn.functional.conv3d(x, block[0].weight, block[0].bias, padding=1)
    torch.testing.assert_close(block(x), expected)


def test_instance_norm_output_has_zero_mean_unit_variance() -> None:
    y = instance_norm(3)(torch.randn(2, 3, 6, 6, 6) * 5 + 2)
    # float32 sums over 216 voxels, and var / (var + eps) with eps = 1e-5 and var ≈ 25: 1 - 4e-7
    torch.testing.assert_close(y.mean(dim=(2, 3, 4)), torch.zeros(2, 3), atol=1e-6, rtol=0)
    torch.testing.assert_close(y.var(dim=(2, 3, 4), unbiased=False), torch.ones(2, 3), atol=2e-6, rtol=0)


def test_residual_block_is_act_of_input_when_the_residual_branch_is_silenced() -> None:
    block = ResidualConvBlock(in_channels=4, out_channels=4)
    assert isinstance(block.shortcut, nn.Identity)
    norm = block.conv2[1]
    with torch.no_grad():
        norm.weight.zero_()  # the second norm outputs its bias, 0: the residual branch adds nothing
        norm.bias.zero_()
    x = torch.randn(1, 4, 4, 4, 4)
    torch.testing.assert_close(block(x), nn.functional.leaky_relu(x))


def test_residual_block_projects_the_shortcut_when_the_shape_changes() -> None:
    assert isinstance(ResidualConvBlock(in_channels=4, out_channels=8).shortcut, ConvNormAct)
    assert isinstance(ResidualConvBlock(in_channels=4, out_channels=4, stride=2).shortcut, ConvNormAct)


def test_every_parameter_gets_a_gradient() -> None:
    model = nn.Sequential(
        ConvNormAct(in_channels=1, out_channels=4),
        Downsample(in_channels=4, out_channels=8),
        ResidualConvBlock(in_channels=8, out_channels=8),
        ResidualConvBlock(in_channels=8, out_channels=4, stride=2),
    )
    out = model(torch.randn(2, 1, 8, 8, 8))
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"in_channels": 0, "out_channels": 4}, "in_channels must be a positive integer, got 0"),
        ({"in_channels": 2, "out_channels": 4, "kernel_size": 2}, "kernel_size must be odd"),
        ({"in_channels": 2, "out_channels": 4, "stride": 0}, "stride must be a positive integer, got 0"),
    ],
)
def test_bad_arguments_raise(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ConvNormAct(**kwargs)


def _ran(fn) -> set[str]:
    """Names of the aten operators ``fn()`` ran."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {event.name for event in prof.events()}


@pytest.mark.parametrize(
    "kwargs, shape",
    [
        (dict(in_channels=16, out_channels=16, kernel_size=3, padding=1), (1, 16, 32, 32, 16)),  # slow_conv3d before
        (dict(in_channels=8, out_channels=14, kernel_size=1), (1, 8, 16, 16, 8)),
        (dict(in_channels=16, out_channels=32, kernel_size=3, stride=2, padding=1), (1, 16, 16, 16, 8)),
        (dict(in_channels=8, out_channels=8, kernel_size=3, padding=1, groups=8, bias=False), (1, 8, 9, 7, 5)),
    ],
)
def test_conv3d_single_volume_inference_runs_onednn_and_equals_nn_conv3d(kwargs, shape):
    """Batch-1 CPU inference goes to oneDNN (PyTorch's own rule picks slow_conv3d for the first case) with the same
    result as nn.Conv3d, also for a non-contiguous input; a batch of two and autograd keep nn.Conv3d's path."""
    from h3de_lite.layers.conv import Conv3d

    torch.manual_seed(0)
    ours = Conv3d(**kwargs)
    reference = nn.Conv3d(**kwargs)
    reference.load_state_dict(ours.state_dict())
    x = torch.randn(shape)
    strided = torch.randn(shape[0], *shape[2:], shape[1]).permute(0, 4, 1, 2, 3)  # channels-last view
    with torch.no_grad():
        for inp in (x, strided):
            want = reference(inp)
            assert "aten::mkldnn_convolution" in _ran(lambda inp=inp: ours(inp))
            got = ours(inp)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
        assert "aten::slow_conv3d_forward" not in _ran(lambda: ours(x))
        batch = torch.randn(2, *shape[1:])
        torch.testing.assert_close(ours(batch), reference(batch), rtol=0, atol=0)  # the same call as nn.Conv3d
    xi = x.clone().requires_grad_()
    out = ours(xi)
    assert out.grad_fn is not None
    torch.testing.assert_close(out, reference(x), rtol=0, atol=0)  # autograd: nn.Conv3d's own path


def test_model_flops_counts_the_onednn_convolutions():
    """Single-volume inference runs oneDNN convolutions; the FLOP count per volume is that of a batch of two."""
    from h3de_lite.models import H3DENet
    from h3de_lite.models.h3de_net import model_flops

    model = H3DENet.from_preset("tiny", num_landmarks=2).eval()
    assert model_flops(model, (1, 1, 64, 64, 32)) * 2 == model_flops(model, (2, 1, 64, 64, 32))
