"""H3DENet: shapes over presets and sizes, gradients, ablation switches, the anchor head, presets, errors, counting."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from h3de_lite.anchors import AnchorGrid
from h3de_lite.config import PRESETS, H3DENetConfig, get_preset, preset_names
from h3de_lite.layers.attention import BiLevelRoutingAttention3d, DenseAttention3d
from h3de_lite.layers.block import VBRABlock
from h3de_lite.layers.conv import ResidualConvBlock
from h3de_lite.layers.fusion import ConcatFusion, FeatureFusionModule
from h3de_lite.layers.super_resolution import SuperResolutionBlock, TrilinearUpsample
from h3de_lite.models.h3de_net import H3DENet, count_parameters, model_flops

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


@pytest.mark.parametrize(("anchors", "n_a"), [("single", 1), ("multi", 3)])
def test_anchor_head_outputs(anchors: str, n_a: int) -> None:
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


# Parameter counts written out from the architecture (H3DENet docstring, layer docstrings), not from the code:
# a conv has out·in·k³ weights (÷ groups), a conv followed by a norm has no bias, an affine norm has 2 per channel.
def _conv_norm(c_in: int, c_out: int, k: int = 3) -> int:  # ConvNormAct and Downsample: bias-free conv + norm
    return c_out * c_in * k**3 + 2 * c_out


def _vbra_block(c: int, mlp_ratio: float, lepe: int) -> int:
    hidden = round(c * mlp_ratio)
    pos_embed = 27 * c + c  # depthwise 3×3×3 conv with bias
    qkv, lepe_conv, proj = 3 * c * c + 3 * c, lepe**3 * c + c, c * c + c  # qk_dim = dim
    mlp = (c * hidden + hidden) + (hidden * c + c)
    return pos_embed + 2 * c + qkv + lepe_conv + proj + 2 * c + mlp  # two LayerNorms


def _decoder_level(c_coarse: int, c: int) -> int:
    srb = 27 * c_coarse + 8 * c_coarse * c + 2 * c  # depthwise 3×3×3, pointwise to c·2³, norm
    hidden = max(c // 4, 4)
    ffm = _conv_norm(2 * c, c) + (c * hidden + hidden) + (hidden * c + c)  # concat conv + channel-gate MLP
    return srb + ffm + _conv_norm(c, c)  # + refinement conv


def expected_parameters(cfg: H3DENetConfig) -> int:
    """Trainable parameters of the network cfg describes (per-stage settings given as 5-tuples)."""
    widths = (cfg.stem_channels, *cfg.channels)  # E_0 … E_5; D_i has the width of E_i
    total = _conv_norm(cfg.in_channels, widths[0]) + _conv_norm(widths[0], widths[0])  # two-conv stem
    for i in range(5):
        total += _conv_norm(widths[i], widths[i + 1])  # stride-2 downsampling
        c = widths[i + 1]
        block = 2 * _conv_norm(c, c) if cfg.stage_types[i] == "conv" else _vbra_block(c, cfg.mlp_ratio, cfg.lepe_kernel)
        total += cfg.depths[i] * block
        total += _decoder_level(widths[i + 1], widths[i])
    total += widths[0] * cfg.num_landmarks + cfg.num_landmarks  # 1×1×1 heatmap head
    if cfg.head == "anchor":
        c, outputs = widths[2], cfg.num_landmarks * {"single": 1, "multi": 3}[cfg.anchors]
        branch = 27 * c * c + 2 * c  # bias-free 3×3×3 conv + GroupNorm, per branch
        total += 2 * branch + (c * 3 * outputs + 3 * outputs) + (c * outputs + outputs)
    return total


MICRO_CONFIG = H3DENetConfig(
    stem_channels=4,
    channels=(8, 8, 16, 16, 16),
    depths=(1, 1, 1, 1, 1),
    num_heads=(2, 2, 2, 2, 2),
    regions_per_side=((2, 2, 1),) * 5,
    topk=(2, 2, 2, 2, 2),
)


def test_micro_parameter_count_by_hand() -> None:
    """The smallest case, with its stem and conv stage E_1 written out."""
    stem = (4 * 1 * 27 + 2 * 4) + (4 * 4 * 27 + 2 * 4)  # two conv-norm layers: 116 + 440
    e1 = (8 * 4 * 27 + 2 * 8) + 2 * (8 * 8 * 27 + 2 * 8)  # downsample 880 + residual block 3 488
    assert (stem, e1) == (556, 4368)
    model = H3DENet.from_config(MICRO_CONFIG)
    assert count_parameters(model.stem) == stem and count_parameters(model.stages[0]) == e1
    assert count_parameters(model) == expected_parameters(MICRO_CONFIG) == 105_002


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"head": "anchor", "anchors": "single"},
        {"head": "anchor", "anchors": "multi", "num_landmarks": 3},
        {"stage_types": ("conv", "conv", "vbra", "conv", "vbra"), "depths": (2, 1, 2, 1, 1), "mlp_ratio": 2.0},
        {"lepe_kernel": 3, "in_channels": 2},
    ],
)
def test_parameter_count_matches_the_architecture(overrides: dict) -> None:
    cfg = MICRO_CONFIG.replace(**overrides)
    assert count_parameters(H3DENet.from_config(cfg)) == expected_parameters(cfg)


@pytest.mark.parametrize(
    ("name", "overrides", "millions"),
    [("tiny", {}, 0.98), ("paper", {}, 23.66), ("paper", {"head": "anchor", "anchors": "multi"}, 23.89)],
)
def test_preset_parameter_counts(name: str, overrides: dict, millions: float) -> None:
    """The presets' sizes quoted in the README and notebook 04 (paper: 23.7 M), and the formula above."""
    cfg = get_preset(name).replace(**overrides)
    n = count_parameters(H3DENet.from_preset(name, **overrides))
    assert n == expected_parameters(cfg)
    assert round(n / 1e6, 2) == millions


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
    ("kwargs", "match"),
    [
        ({"head": "boxes"}, "head must be one of"),
        ({"anchors": "double"}, "anchors must be one of"),
        ({"channels": (8, 8, 8, 8)}, r"channels must be a single value or one value per stage \(5 entries\)"),
        ({"depths": (1, 1, 0, 1, 1)}, "depths must hold positive integers"),
        ({"stage_types": ("conv", "attention", "vbra", "vbra", "vbra")}, "stage_types entries must be one of"),
        ({"num_heads": 3}, "num_heads=3 does not divide"),  # does not divide 8 or 16
        ({"drop_path": 1.0}, r"drop_path must be in \[0, 1\)"),
        ({"stem_channels": 0}, "stem_channels must hold positive integers"),
        ({"topk": 5}, "topk must be an int between 1 and the number of regions 4"),  # more than the 2·2·1 regions
    ],
)
def test_bad_constructor_arguments_raise(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        micro(**kwargs)


def test_count_parameters_by_hand() -> None:
    conv = nn.Conv3d(2, 4, 3, padding=1)
    assert count_parameters(conv) == 4 * 2 * 27 + 4
    conv.bias.requires_grad_(False)
    assert count_parameters(conv) == 4 * 2 * 27
    assert count_parameters(conv, trainable_only=False) == 4 * 2 * 27 + 4


# FLOPs by hand: a multiply–add is 2 FLOPs; norms, activations, softmax and element-wise ops are not counted.
def test_model_flops_of_a_conv_and_a_linear() -> None:
    # every output voxel of every output channel: 2·27 multiply-adds per input channel
    assert model_flops(nn.Conv3d(2, 4, 3, padding=1), (1, 2, 4, 4, 4)) == 2 * 64 * 4 * 2 * 27
    assert model_flops(nn.Conv3d(3, 6, 3, stride=2, padding=1), (2, 3, 8, 8, 4)) == 2 * (2 * 4 * 4 * 2) * 6 * 3 * 27
    assert model_flops(nn.Conv3d(4, 4, 3, padding=1, groups=4), (1, 4, 4, 4, 2)) == 2 * 32 * 4 * 27  # depthwise
    assert model_flops(nn.Linear(5, 7), (2, 3, 5)) == 2 * 6 * 5 * 7


def test_model_flops_of_dense_attention() -> None:
    # N = 4·4·2 = 32 tokens, C = 8 channels, 2 heads of 4, LePE 3×3×3.
    n, c = 32, 8
    expected = (
        2 * n * c * 3 * c  # qkv projection
        + 2 * 2 * n * n * c  # QKᵀ and AV over all heads: 2·N²·C each
        + 2 * n * c * c  # output projection
        + 2 * n * c * 27  # LePE depthwise conv
    )
    assert expected == 62_976
    attn = DenseAttention3d(dim=c, num_heads=2, lepe_kernel=3).eval()
    assert model_flops(attn, (1, c, 4, 4, 2)) == expected


@pytest.mark.parametrize("fused", [True, False])
def test_model_flops_of_routed_attention(fused: bool) -> None:
    # N = 64 tokens in R = 2·2·2 regions of T = 8; each query region attends to k = 2 regions (16 keys).
    n, c, r, t, k = 64, 8, 8, 8, 2
    expected = (
        2 * n * c * 3 * c  # q and k, v projections
        + 2 * r * r * c  # region routing Qʳ Kʳᵀ (eq. 3)
        + 2 * 2 * r * t * (k * t) * c  # token attention QKᵀ and AV inside the routed regions (eq. 4)
        + 2 * n * c * c  # output projection
        + 2 * n * c * 27  # LePE depthwise conv
    )
    assert expected == 94_208
    attn = BiLevelRoutingAttention3d(dim=c, num_heads=2, regions_per_side=2, topk=k, lepe_kernel=3, fused=fused)
    assert model_flops(attn.eval(), (1, c, 4, 4, 4)) == expected


def test_model_flops_of_a_vbra_block() -> None:
    n, c = 64, 8
    attention = 94_208  # the routed attention above
    expected = 2 * n * c * 27 + attention + 2 * 2 * n * c * 4 * c  # position conv, attention, MLP C → 4C → C
    block = VBRABlock(dim=c, num_heads=2, regions_per_side=2, topk=2, lepe_kernel=3).eval()
    assert model_flops(block, (1, c, 4, 4, 4)) == expected


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


def test_presets_remember_their_input_size() -> None:
    assert H3DENet.from_preset("tiny").input_size == (64, 64, 32)
    assert H3DENet.from_preset("paper", head="anchor").input_size == (128, 128, 64)
