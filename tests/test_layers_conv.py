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
