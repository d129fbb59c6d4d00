"""Table I baselines: the H3DENet heatmap contract, the MONAI classes behind them, sizes and errors."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import UNet, VNet
from monai.networks.nets.basic_unet import BasicUNet

from h3de_lite.models.baselines import BASELINES, ScaledVNet, build_baseline
from h3de_lite.models.h3de_net import count_parameters

CASES = [
    # [name, kwargs, input shape, expected shape]
    ["unet3d", {}, (1, 1, 32, 32, 16), (1, 14, 32, 32, 16)],
    ["resunet3d", {}, (2, 1, 32, 16, 32), (2, 14, 32, 16, 32)],
    ["vnet", {}, (1, 1, 32, 32, 16), (1, 14, 32, 32, 16)],
    ["unet3d", {"num_landmarks": 3, "in_channels": 2}, (1, 2, 16, 32, 32), (1, 3, 16, 32, 32)],
    ["resunet3d", {"num_landmarks": 5}, (1, 1, 32, 32, 32), (1, 5, 32, 32, 32)],
    ["vnet", {"num_landmarks": 2, "in_channels": 2}, (1, 2, 16, 16, 32), (1, 2, 16, 16, 32)],
]


@pytest.mark.parametrize(("name", "kwargs", "input_shape", "expected"), CASES)
def test_tiny_shape_contract(name: str, kwargs: dict, input_shape: tuple, expected: tuple) -> None:
    model = build_baseline(name, size="tiny", **kwargs).eval()
    with torch.no_grad():
        out = model(torch.randn(input_shape))
    assert out.shape == expected and torch.isfinite(out).all()


@pytest.mark.parametrize(("name", "cls"), [("unet3d", BasicUNet), ("resunet3d", UNet), ("vnet", VNet)])
def test_built_from_monai(name: str, cls: type) -> None:
    for size in ("tiny", "paper"):
        assert isinstance(build_baseline(name, size=size), cls)


@pytest.mark.parametrize("name", list(BASELINES))
def test_tiny_has_a_quarter_of_the_width(name: str) -> None:
    """Conv weights scale with width², so a quarter of the width has 1/16 of them; only the input and output convs,
    biases and norms scale linearly, which keeps the ratio a little under 16."""
    ratio = count_parameters(build_baseline(name, size="paper")) / count_parameters(build_baseline(name, size="tiny"))
    assert 15.0 < ratio < 16.0


def test_scaled_vnet_at_width_16_is_monais_vnet() -> None:
    ours = ScaledVNet(in_channels=1, out_channels=3, base_channels=16)
    monai = VNet(spatial_dims=3, in_channels=1, out_channels=3)
    theirs = {k: v.shape for k, v in monai.state_dict().items()}
    assert {k: v.shape for k, v in ours.state_dict().items()} == theirs
    ours.load_state_dict(monai.state_dict())
    ours.eval()
    monai.eval()
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), monai(x))


def test_tiny_baselines_get_gradients() -> None:
    for name in BASELINES:
        model = build_baseline(name, num_landmarks=2, size="tiny").train()
        out = model(torch.randn(2, 1, 32, 16, 16))  # instance norm needs > 1 voxel at 1/16
        out.square().mean().backward()
        for pname, p in model.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), f"{name}.{pname}"


def test_unknown_name_lists_the_names() -> None:
    with pytest.raises(ValueError, match="unet3d"):
        build_baseline("transunet")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"size": "huge"}, r"size must be one of \('tiny', 'paper'\), got 'huge'"),
        ({"num_landmarks": 0}, "num_landmarks must be a positive integer, got 0"),
        ({"in_channels": 0}, "in_channels must be a positive integer, got 0"),
    ],
)
def test_bad_arguments_raise(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_baseline("unet3d", **kwargs)


def test_vnet_width_must_be_a_multiple_of_the_input_channels() -> None:
    with pytest.raises(ValueError, match="base_channels"):
        ScaledVNet(in_channels=3, base_channels=4)
