"""Feature Fusion Module and its concat ablation: shape contract, known answers at the gate's extremes, errors."""

from __future__ import annotations

import pytest
import torch

from h3de_lite.layers.fusion import ConcatFusion, FeatureFusionModule

CASES = [
    # [kwargs, decoder shape, skip shape, expected]
    [{"decoder_channels": 8, "skip_channels": 4, "out_channels": 8}, (2, 8, 4, 4, 2), (2, 4, 4, 4, 2), (2, 8, 4, 4, 2)],
    [
        {"decoder_channels": 4, "skip_channels": 16, "out_channels": 6},
        (1, 4, 3, 5, 2),
        (1, 16, 3, 5, 2),
        (1, 6, 3, 5, 2),
    ],
    [{"decoder_channels": 2, "skip_channels": 2, "out_channels": 2}, (1, 2, 2, 2, 2), (1, 2, 2, 2, 2), (1, 2, 2, 2, 2)],
]


@pytest.mark.parametrize("cls", [FeatureFusionModule, ConcatFusion])
@pytest.mark.parametrize(("kwargs", "decoder_shape", "skip_shape", "expected"), CASES)
def test_shape_contract(cls, kwargs: dict, decoder_shape: tuple, skip_shape: tuple, expected: tuple) -> None:
    out = cls(**kwargs)(torch.randn(decoder_shape), torch.randn(skip_shape))
    assert out.shape == expected and torch.isfinite(out).all()


def _pair(ffm_gate_bias: float) -> tuple[FeatureFusionModule, ConcatFusion]:
    ffm = FeatureFusionModule(decoder_channels=6, skip_channels=3, out_channels=4)
    concat = ConcatFusion(decoder_channels=6, skip_channels=3, out_channels=4)
    concat.fuse.load_state_dict(ffm.fuse.state_dict())  # the same local fusion conv
    with torch.no_grad():
        last = ffm.attention[-2]
        last.weight.zero_()
        last.bias.fill_(ffm_gate_bias)  # gate = sigmoid(bias) everywhere
    return ffm, concat


def test_ffm_with_a_closed_gate_equals_concat_fusion() -> None:
    ffm, concat = _pair(-1e4)  # sigmoid(-1e4) = 0: F + F ⊙ 0 = F
    u, e = torch.randn(2, 6, 4, 4, 2), torch.randn(2, 3, 4, 4, 2)
    torch.testing.assert_close(ffm(u, e), concat(u, e))


def test_ffm_with_an_open_gate_doubles_the_fused_feature() -> None:
    ffm, concat = _pair(1e4)  # sigmoid(1e4) = 1: F + F ⊙ 1 = 2F
    u, e = torch.randn(1, 6, 3, 3, 3), torch.randn(1, 3, 3, 3, 3)
    torch.testing.assert_close(ffm(u, e), 2 * concat(u, e))


def test_ffm_gate_is_one_weight_per_sample_and_channel() -> None:
    ffm = FeatureFusionModule(decoder_channels=4, skip_channels=4, out_channels=8)
    fused = torch.randn(2, 8, 4, 4, 4)
    gate = ffm.attention(fused)
    assert gate.shape == (2, 8, 1, 1, 1)
    assert ((gate > 0) & (gate < 1)).all()


def test_every_parameter_gets_a_gradient() -> None:
    ffm = FeatureFusionModule(decoder_channels=4, skip_channels=2, out_channels=4)
    out = ffm(torch.randn(2, 4, 4, 4, 2), torch.randn(2, 2, 4, 4, 2))
    out.square().mean().backward()
    for name, p in ffm.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("cls", [FeatureFusionModule, ConcatFusion])
@pytest.mark.parametrize(
    ("decoder_shape", "skip_shape"),
    [
        ((1, 4, 4, 4, 2), (1, 2, 2, 2, 1)),  # decoder not upsampled to the skip's size
        ((1, 3, 4, 4, 2), (1, 2, 4, 4, 2)),  # wrong decoder channels
        ((2, 4, 4, 4, 2), (1, 2, 4, 4, 2)),  # batch mismatch
        ((4, 4, 4, 2), (2, 4, 4, 2)),  # not 5D
    ],
)
def test_mismatched_inputs_raise(cls, decoder_shape: tuple, skip_shape: tuple) -> None:
    fusion = cls(decoder_channels=4, skip_channels=2, out_channels=4)
    with pytest.raises(ValueError):
        fusion(torch.randn(decoder_shape), torch.randn(skip_shape))


def test_bad_reduction_raises() -> None:
    with pytest.raises(ValueError):
        FeatureFusionModule(decoder_channels=4, skip_channels=2, out_channels=4, reduction=0)
