"""H3DENet: shapes over presets and sizes, gradients, ablation switches, the anchor head, presets, errors, counting."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

from h3de_lite.config import PRESETS, H3DENetConfig, get_preset, preset_names
from h3de_lite.layers.block import VBRABlock
from h3de_lite.layers.conv import ResidualConvBlock
from h3de_lite.layers.fusion import ConcatFusion, FeatureFusionModule
from h3de_lite.layers.super_resolution import SuperResolutionBlock, TrilinearUpsample
from h3de_lite.models.h3de_net import H3DENet, count_parameters, model_flops

HAS_HEADS = importlib.util.find_spec("h3de_lite.models.heads") is not None

# A network smaller than "tiny", for the many shape cases.
MICRO = {
    "stem_channels": 4,
    "channels": (8, 8, 16, 16, 16),
    "depths": 1,
    "num_heads": 2,
    "regions_per_side": (2, 2, 1),
    "topk": 2,
}


def micro(**overrides) -> H3DENet:
    return H3DENet(**{**MICRO, **overrides})


SHAPE_CASES = [
    # [kwargs, input shape, expected output shape]
    [{}, (1, 1, 64, 64, 32), (1, 14, 64, 64, 32)],
    [{}, (2, 1, 32, 32, 64), (2, 14, 32, 32, 64)],
    [{"num_landmarks": 3}, (1, 1, 64, 32, 32), (1, 3, 64, 32, 32)],
    [{"in_channels": 2}, (1, 2, 32, 64, 32), (1, 14, 32, 64, 32)],
    [{"use_ffm": False, "use_srb": False}, (1, 1, 64, 64, 32), (1, 14, 64, 64, 32)],
    [{"use_vbra": False}, (1, 1, 32, 64, 32), (1, 14, 32, 64, 32)],
    [{"stage_types": "vbra"}, (1, 1, 64, 64, 32), (1, 14, 64, 64, 32)],
    [{"regions_per_side": 3, "topk": 4}, (1, 1, 64, 64, 32), (1, 14, 64, 64, 32)],  # regions need padding
]


@pytest.mark.parametrize(("kwargs", "input_shape", "expected"), SHAPE_CASES)
def test_shapes(kwargs: dict, input_shape: tuple, expected: tuple) -> None:
    model = micro(**kwargs).eval()
    with torch.no_grad():
        out = model(torch.randn(input_shape))
    assert out.shape == expected and torch.isfinite(out).all()


@pytest.mark.parametrize("input_shape", [(1, 1, 64, 64, 32), (1, 1, 32, 32, 64)])
def test_tiny_preset_shapes(input_shape: tuple) -> None:
    model = H3DENet.from_preset("tiny").eval()
    with torch.no_grad():
        out = model(torch.randn(input_shape))
    assert out.shape == (1, 14, *input_shape[2:])


def test_encoder_and_decoder_resolutions() -> None:
    model = micro().eval()
    x = torch.randn(1, 1, 64, 64, 32)
    with torch.no_grad():
        encoded = model.forward_encoder(x)
        decoded = model.forward_decoder(encoded)
    assert len(encoded) == len(decoded) == 6
    for i, (e, d) in enumerate(zip(encoded, decoded, strict=True)):
        size = (64 >> i, 64 >> i, 32 >> i)
        assert e.shape == (1, model.encoder_channels[i], *size)
        expected_channels = model.decoder_channels[i] if i < 5 else model.encoder_channels[5]
        assert d.shape == (1, expected_channels, *size)
    assert decoded[5] is encoded[5]


def test_every_parameter_gets_a_gradient_and_nothing_is_nan() -> None:
    model = H3DENet.from_preset("tiny", drop_path=0.1).train()
    out = model(torch.randn(1, 1, 32, 32, 64))
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def _types(model: nn.Module) -> set[type]:
    return {type(m) for m in model.modules()}


def test_default_uses_vbra_ffm_and_srb() -> None:
    model = micro()
    assert model.stage_types == ("conv", "vbra", "vbra", "vbra", "vbra")
    assert all(isinstance(f, FeatureFusionModule) for f in model.fusions)
    assert all(isinstance(u, SuperResolutionBlock) for u in model.upsamplers)
    assert isinstance(model.stages[0][1], ResidualConvBlock)
    assert all(isinstance(stage[1], VBRABlock) for stage in model.stages[1:])


@pytest.mark.parametrize(
    ("switch", "gone", "present"),
    [
        ("use_ffm", FeatureFusionModule, ConcatFusion),
        ("use_srb", SuperResolutionBlock, TrilinearUpsample),
        ("use_vbra", VBRABlock, ResidualConvBlock),
    ],
)
def test_ablation_switches_change_the_module_types(switch: str, gone: type, present: type) -> None:
    assert gone in _types(micro())
    ablated = _types(micro(**{switch: False}))
    assert gone not in ablated
    assert present in ablated


def test_use_vbra_false_makes_every_stage_a_conv_stage() -> None:
    model = micro(use_vbra=False)
    assert model.stage_types == ("conv",) * 5
    assert all(isinstance(stage[1], ResidualConvBlock) for stage in model.stages)


def test_drop_path_rises_linearly_over_the_vbra_blocks() -> None:
    model = H3DENet.from_preset("paper", drop_path=0.2)
    rates = [
        m.drop_path.drop_prob if not isinstance(m.drop_path, nn.Identity) else 0.0
        for m in model.modules()
        if isinstance(m, VBRABlock)
    ]
    assert len(rates) == 2 + 2 + 4 + 2
    torch.testing.assert_close(torch.tensor(rates), torch.linspace(0, 0.2, 10))


@pytest.mark.skipif(not HAS_HEADS, reason="h3de_lite.models.heads (AnchorHead, helper E) is not written yet")
@pytest.mark.parametrize(("anchors", "n_a"), [("single", 1), ("multi", 3)])
def test_anchor_head_outputs(anchors: str, n_a: int) -> None:
    from h3de_lite.anchors import AnchorGrid

    model = micro(head="anchor", anchors=anchors, num_landmarks=5).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, 64, 32, 32))
    assert set(out) == {"heatmaps", "offsets", "logits"}
    num_anchors = 16 * 8 * 8 * n_a
    assert out["heatmaps"].shape == (2, 5, 64, 32, 32)
    assert out["offsets"].shape == (2, num_anchors, 5, 3)
    assert out["logits"].shape == (2, num_anchors, 5)
    assert AnchorGrid((64, 32, 32), config=anchors).num_anchors == num_anchors
    assert model.anchor_head.in_channels == model.decoder_channels[2]  # reads D_2, the H/4 decoder feature


@pytest.mark.skipif(not HAS_HEADS, reason="h3de_lite.models.heads (AnchorHead, helper E) is not written yet")
def test_anchor_network_gets_gradients_everywhere() -> None:
    model = micro(head="anchor", anchors="multi").train()
    out = model(torch.randn(1, 1, 32, 32, 64))
    (out["heatmaps"].square().mean() + out["offsets"].square().mean() + out["logits"].mean()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_presets() -> None:
    assert {"tiny", "paper", "paper-complete", "paper-incomplete", "paper-all"} <= set(preset_names())
    for name, cfg in PRESETS.items():
        assert isinstance(cfg, H3DENetConfig)
        assert all(s % 32 == 0 for s in cfg.input_size), name
    assert get_preset("paper").input_size == (128, 128, 64)
    assert get_preset("paper-complete").head == "heatmap"
    assert get_preset("paper-incomplete").head == get_preset("paper-all").head == "anchor"


def test_from_preset_applies_overrides() -> None:
    model = H3DENet.from_preset("tiny", num_landmarks=3, use_ffm=False, channels=(8, 8, 8, 8, 8), num_heads=2)
    assert model.num_landmarks == 3
    assert model.encoder_channels == (8, 8, 8, 8, 8, 8)
    assert isinstance(model.fusions[0], ConcatFusion)
    assert model.heatmap_head.out_channels == 3


def test_constructor_defaults_are_the_paper_preset() -> None:
    default, paper = H3DENet(), H3DENet.from_preset("paper")
    assert {k: v.shape for k, v in default.state_dict().items()} == {k: v.shape for k, v in paper.state_dict().items()}
    assert str(default) == str(paper)


def test_regions_per_side_accepts_a_list_triple() -> None:
    model = micro(regions_per_side=[2, 2, 1])
    assert model.stages[1][1].attn.grid == (2, 2, 1)


def test_from_preset_builds_the_configured_network() -> None:
    cfg = get_preset("tiny")
    model = H3DENet.from_preset("tiny")
    assert model.encoder_channels == (cfg.stem_channels, *cfg.channels)
    assert count_parameters(model) == count_parameters(H3DENet(**cfg.model_kwargs()))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["paper", "paper-incomplete"])
def test_paper_preset_runs_on_cpu_at_128x128x64(name: str) -> None:
    model = H3DENet.from_preset(name).eval()
    with torch.no_grad():
        out = model(torch.zeros(1, 1, 128, 128, 64))
    heatmaps = out if isinstance(out, torch.Tensor) else out["heatmaps"]
    assert heatmaps.shape == (1, 14, 128, 128, 64)
    assert torch.isfinite(heatmaps).all()


@pytest.mark.parametrize("size", [(1, 1, 48, 64, 32), (1, 1, 64, 64, 30), (1, 1, 32, 32, 32)])
def test_input_size_errors_say_which_sizes_work(size: tuple) -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        micro()(torch.randn(size))


def test_wrong_input_channels_raise() -> None:
    with pytest.raises(ValueError, match="expects x of shape"):
        micro()(torch.randn(1, 2, 64, 64, 32))


def test_bad_preset_name_lists_the_names() -> None:
    with pytest.raises(ValueError, match="tiny"):
        H3DENet.from_preset("huge")


def test_unknown_override_lists_the_fields() -> None:
    with pytest.raises(ValueError, match="valid fields"):
        H3DENet.from_preset("tiny", chanels=(8, 8, 8, 8, 8))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"head": "boxes"},
        {"anchors": "double"},
        {"channels": (8, 8, 8, 8)},
        {"depths": (1, 1, 0, 1, 1)},
        {"stage_types": ("conv", "attention", "vbra", "vbra", "vbra")},
        {"num_heads": 3},  # does not divide 8 or 16
        {"drop_path": 1.0},
        {"stem_channels": 0},
        {"topk": 5},  # more than the 2·2·1 regions
    ],
)
def test_bad_constructor_arguments_raise(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        micro(**kwargs)


def test_count_parameters_and_flops_by_hand() -> None:
    conv = nn.Conv3d(2, 4, 3, padding=1)
    assert count_parameters(conv) == 4 * 2 * 27 + 4
    conv.bias.requires_grad_(False)
    assert count_parameters(conv) == 4 * 2 * 27
    assert count_parameters(conv, trainable_only=False) == 4 * 2 * 27 + 4
    # every output voxel of every output channel: 2·27 multiply-adds = 2 FLOPs each
    assert model_flops(conv, (1, 2, 4, 4, 4)) == 64 * 4 * 2 * 27 * 2


def test_model_flops_counts_the_attention() -> None:
    from torch.utils.flop_counter import FlopCounterMode

    from h3de_lite.models.h3de_net import _EXTRA_FLOP_FORMULAS

    model = micro().eval()
    counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOP_FORMULAS)
    with torch.no_grad(), counter:
        model(torch.zeros(1, 1, 64, 32, 32))
    per_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    attention = per_op.get("aten._scaled_dot_product_flash_attention_for_cpu", 0) + per_op.get("aten.bmm", 0)
    assert attention > 0
    assert counter.get_total_flops() == sum(per_op.values())


def test_checkpointing_gives_equal_gradients_on_a_small_config() -> None:
    """Checkpointed stages and decoder levels (recomputed in the backward): same loss and gradients, and the
    backward keeps a fraction of the activations."""
    torch.manual_seed(0)
    plain = micro(drop_path=0.3)
    ckpt = micro(drop_path=0.3, checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 1, 64, 32, 32)
    results = []
    for model in (plain, ckpt):
        saved: list[int] = []

        def pack(t: torch.Tensor, saved=saved) -> torch.Tensor:
            saved.append(t.numel())
            return t

        torch.manual_seed(1)  # same DropPath draws
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(x).square().mean()
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}, sum(saved)))
    (loss_a, grads_a, saved_a), (loss_b, grads_b, saved_b) = results
    # The recomputation repeats the same float32 operations: equal up to summation order in the backward.
    torch.testing.assert_close(loss_b, loss_a, atol=0, rtol=0)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], atol=1e-7, rtol=1e-5, msg=name)
    assert saved_b < 0.3 * saved_a  # segment inputs only (28 % here)


def test_checkpointing_and_attention_backend_are_preset_options() -> None:
    assert get_preset("paper").checkpointing is False and get_preset("paper").attention_backend == "auto"
    model = H3DENet.from_preset("tiny", checkpointing=True, attention_backend="gather")
    assert model.checkpointing
    blocks = [m for m in model.modules() if isinstance(m, VBRABlock)]
    assert blocks and all(b.attn.backend == "gather" for b in blocks)
    with pytest.raises(ValueError, match="attention_backend must be one of"):
        micro(attention_backend="sparse")
