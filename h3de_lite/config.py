"""Dataclass presets of H3DE-Net: ``tiny`` (CPU, CI and the book) and the paper's 128×128×64 GPU settings.

A preset is an :class:`H3DENetConfig`; ``H3DENet.from_preset(name, **overrides)`` builds the network from it, and
``config.input_size`` tells training and benchmarks which crop the preset was sized for.

Explained in notebooks/04_model.ipynb.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

__all__ = ["PRESETS", "H3DENetConfig", "get_preset", "preset_names"]

RegionsPerSide = int | tuple[int, int, int]


@dataclass(frozen=True)
class H3DENetConfig:
    """Every constructor argument of :class:`~h3de_lite.models.h3de_net.H3DENet`, plus the input crop size.

    Per-stage tuples have one entry per encoder stage E_1 … E_5 (resolutions H/2 … H/32). ``num_heads``,
    ``regions_per_side`` and ``topk`` only matter for stages whose type is ``"vbra"``; the entries of ``"conv"``
    stages are ignored (they are kept so that the tuples line up with the stages).

    Args:
        in_channels: image channels (1 for CT).
        num_landmarks: L, heatmap channels.
        stem_channels: width of the full-resolution stem E_0 (eq. 9).
        channels: widths of E_1 … E_5.
        stage_types: ``"conv"`` (residual conv blocks) or ``"vbra"`` (V-BRA blocks) per stage.
        depths: blocks per stage.
        num_heads: attention heads M per stage.
        regions_per_side: S or ``(S_d, S_h, S_w)`` per stage.
        topk: routed regions k per stage.
        mlp_ratio: MLP hidden width / C in the V-BRA blocks.
        drop_path: largest stochastic-depth rate (rises linearly over the V-BRA blocks from 0).
        lepe_kernel: LePE depthwise kernel inside V-BRA.
        use_ffm: Feature Fusion Module (True) or concat + conv skips (False).
        use_srb: Super-Resolution Block (True) or trilinear upsampling (False).
        use_vbra: V-BRA stages as given (True) or every stage a conv stage (False).
        head: ``"heatmap"`` (anchor-free) or ``"anchor"`` (anchor-based: heatmaps plus the anchor head).
        anchors: ``"single"`` (n_a = 1, r = 0.5u) or ``"multi"`` (n_a = 3, r up to 1u); used by ``head="anchor"``.
        attention_backend: V-BRA STEP 3, ``"gather"``, ``"flex"`` (block-sparse flex_attention) or ``"auto"``
            (gather on CPU, the faster of the two measured on CUDA).
        checkpointing: activation checkpointing of the stem, every stage and every decoder level while training
            (much less memory, about one more forward pass of compute; same results).
        input_size: ``(D, H, W)`` crop the preset is sized for (each a multiple of 32); not a network argument.

    Shape:
        not a tensor module; ``input_size`` is the ``(D, H, W)`` of the network input ``(B, 1, D, H, W)``.

    Example:
        >>> cfg = get_preset("tiny")
        >>> cfg.input_size
        (64, 64, 32)

    Explained in notebooks/04_model.ipynb.
    """

    in_channels: int = 1
    num_landmarks: int = 14
    stem_channels: int = 16
    channels: tuple[int, int, int, int, int] = (32, 64, 128, 256, 512)
    stage_types: tuple[str, str, str, str, str] = ("conv", "vbra", "vbra", "vbra", "vbra")
    depths: tuple[int, int, int, int, int] = (1, 2, 2, 4, 2)
    num_heads: tuple[int, int, int, int, int] = (4, 8, 16, 32, 64)
    regions_per_side: tuple[RegionsPerSide, ...] = ((4, 4, 2),) * 5
    topk: tuple[int, int, int, int, int] = (1, 1, 4, 16, 16)
    mlp_ratio: float = 4.0
    drop_path: float = 0.0
    lepe_kernel: int = 5
    use_ffm: bool = True
    use_srb: bool = True
    use_vbra: bool = True
    head: str = "heatmap"
    anchors: str = "single"
    attention_backend: str = "auto"
    checkpointing: bool = False
    input_size: tuple[int, int, int] = (128, 128, 64)

    def model_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``H3DENet(...)``: every field except ``input_size``."""
        kwargs = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        del kwargs["input_size"]
        return kwargs

    def replace(self, **overrides: Any) -> H3DENetConfig:
        """A copy with some fields changed; unknown names raise ``ValueError`` listing the valid ones."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ValueError(f"unknown H3DENet config field(s) {unknown}; valid fields are {sorted(names)}")
        return dataclasses.replace(self, **overrides)


# The paper's network (128×128×64 crops). The widths, depths, heads (head width 8), region grid and top-k of the
# four transformer stages are those of the authors' code (ECNUACRush/H3DE-Net, models/BiFormer_Unet.py: embed_dim
# 64/128/256/512, depth 2/2/4/2, n_win (4, 4, 2), topk 1/4/16/16, qk_dim = dim, side_dwconv 5, mlp_ratio 4,
# drop_path 0); its full- and half-resolution conv branches (16 and 32 channels) become our stem and E_1.
_PAPER = H3DENetConfig()

# CPU-sized: 64×64×32 crops, 8–64 channels, one block per stage. H/4 has 16×16×8 tokens in 4×4×2 regions of
# 4×4×4 tokens; the last stage (2×2×1 tokens) is one region, i.e. dense attention.
_TINY = H3DENetConfig(
    stem_channels=8,
    channels=(16, 32, 32, 64, 64),
    depths=(1, 1, 1, 1, 1),
    num_heads=(2, 4, 4, 8, 8),
    regions_per_side=((4, 4, 2), (4, 4, 2), (4, 4, 2), (2, 2, 1), (1, 1, 1)),
    topk=(1, 4, 8, 2, 1),
    input_size=(64, 64, 32),
)

PRESETS: dict[str, H3DENetConfig] = {
    "tiny": _TINY,
    "paper": _PAPER,
    # The paper's three dataset settings. Complete cases: the anchor-free heatmap network. Incomplete and all cases
    # (landmarks may be missing): the anchor-based network, whose existence probabilities say which are absent.
    # Which anchor configuration the paper uses for each setting was not available to us; we use the multi-scale
    # anchors (n_a = 3, r up to 1u) for both, since larger, overlapping balls give every landmark several positive
    # anchors and hence a steadier existence signal. Override with anchors="single".
    "paper-complete": _PAPER,
    "paper-incomplete": _PAPER.replace(head="anchor", anchors="multi"),
    "paper-all": _PAPER.replace(head="anchor", anchors="multi"),
}


def preset_names() -> list[str]:
    """Names accepted by :func:`get_preset` and ``H3DENet.from_preset``."""
    return list(PRESETS)


def get_preset(name: str) -> H3DENetConfig:
    """Look up a preset by name.

    Args:
        name: one of :func:`preset_names` (``"tiny"``, ``"paper"``, ``"paper-complete"``, ``"paper-incomplete"``,
            ``"paper-all"``).

    Shape:
        not a tensor function.

    Example:
        >>> get_preset("paper").channels
        (32, 64, 128, 256, 512)

    Explained in notebooks/04_model.ipynb.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {preset_names()}")
    return PRESETS[name]
