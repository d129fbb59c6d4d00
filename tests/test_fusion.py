"""Feature Fusion Module and its concat ablation: shape contract, known answers at the gate's extremes, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

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


def _local_fusion(module: ConcatFusion, u: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """F = LeakyReLU(InstanceNorm(conv3x3x3([U, E]))), written with torch.nn.functional from the module's weights."""
    conv, norm = module.fuse[0], module.fuse[1]
    x = F.conv3d(torch.cat([u, e], dim=1), conv.weight, conv.bias, padding=1)
    x = F.instance_norm(x, weight=norm.weight, bias=norm.bias, eps=norm.eps)
    return F.leaky_relu(x, negative_slope=0.01)


def _randomise(module: torch.nn.Module) -> None:
    with torch.no_grad():  # away from the initialisation (norm affine 1/0), so every term matters
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.5)


def test_concat_fusion_is_concat_conv_norm_act() -> None:
    fusion = ConcatFusion(decoder_channels=6, skip_channels=3, out_channels=4)
    _randomise(fusion)
    u, e = torch.randn(2, 6, 4, 4, 2), torch.randn(2, 3, 4, 4, 2)
    torch.testing.assert_close(fusion(u, e), _local_fusion(fusion, u, e))


def test_ffm_is_the_fused_feature_reweighted_by_its_channel_gate() -> None:
    """U = F + F ⊙ σ(W₂ act(W₁ GAP(F))), computed by hand."""
    ffm = FeatureFusionModule(decoder_channels=6, skip_channels=3, out_channels=8, reduction=2)
    _randomise(ffm)
    u, e = torch.randn(2, 6, 4, 4, 2), torch.randn(2, 3, 4, 4, 2)
    fused = _local_fusion(ffm, u, e)  # (2, 8, 4, 4, 2)
    w1, w2 = ffm.attention[1], ffm.attention[3]  # 1×1×1 convs 8 → 4 → 8
    pooled = fused.mean(dim=(2, 3, 4))  # (2, 8)
    gate = torch.sigmoid(F.leaky_relu(pooled @ w1.weight.flatten(1).T + w1.bias) @ w2.weight.flatten(1).T + w2.bias)
    torch.testing.assert_close(ffm(u, e), fused + fused * gate[:, :, None, None, None])


@pytest.mark.parametrize(("bias", "factor"), [(-1e4, 1.0), (1e4, 2.0)])
def test_ffm_gate_extremes(bias: float, factor: float) -> None:
    """A closed gate (σ = 0) leaves F, an open one (σ = 1) doubles it."""
    ffm = FeatureFusionModule(decoder_channels=6, skip_channels=3, out_channels=4)
    with torch.no_grad():
        ffm.attention[-2].weight.zero_()
        ffm.attention[-2].bias.fill_(bias)
    u, e = torch.randn(1, 6, 3, 3, 3), torch.randn(1, 3, 3, 3, 3)
    torch.testing.assert_close(ffm(u, e), factor * _local_fusion(ffm, u, e))


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
    ("decoder_shape", "skip_shape", "match"),
    [
        ((1, 4, 4, 4, 2), (1, 2, 2, 2, 1), "share batch size and spatial size"),  # decoder not upsampled yet
        ((1, 3, 4, 4, 2), (1, 2, 4, 4, 2), "expected 4 decoder and 2 skip channels, got 3 and 2"),
        ((2, 4, 4, 4, 2), (1, 2, 4, 4, 2), "share batch size and spatial size"),  # batch mismatch
        ((4, 4, 4, 2), (2, 4, 4, 2), r"must be \(B, C, D, H, W\)"),  # not 5D
    ],
)
def test_mismatched_inputs_raise(cls, decoder_shape: tuple, skip_shape: tuple, match: str) -> None:
    fusion = cls(decoder_channels=4, skip_channels=2, out_channels=4)
    with pytest.raises(ValueError, match=match):
        fusion(torch.randn(decoder_shape), torch.randn(skip_shape))


def test_bad_reduction_raises() -> None:
    with pytest.raises(ValueError, match="reduction must be a positive integer, got 0"):
        FeatureFusionModule(decoder_channels=4, skip_channels=2, out_channels=4, reduction=0)
