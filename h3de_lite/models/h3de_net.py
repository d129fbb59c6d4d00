"""H3DE-Net: the hybrid CNN + V-BRA encoder–decoder for 3D landmark heatmaps, with an optional anchor head.

Also holds :func:`count_parameters` and :func:`model_flops`, used by the model benchmark and the book.

Departures from the paper (all listed in book/faithfulness.md):

- stem (eq. 9 is one conv): two 3×3×3 conv-norm-act layers at full resolution;
- E_1 (H/2) is a convolutional stage (stride-2 conv + residual conv blocks); V-BRA stages are E_2 … E_5;
- five decoder levels (eq. 11 has four fusion levels), one per encoder resolution H/16 … H, each
  SRB → FFM → a 3×3×3 refinement conv (the refinement conv is inferred);
- the FFM and SRB internals are inferred (see :mod:`h3de_lite.layers.fusion`, :mod:`h3de_lite.layers.super_resolution`);
  layer sizes are the authors' code's (:mod:`h3de_lite.config`);
- the anchor head's layers are inferred (:mod:`h3de_lite.models.heads`); it reads D_2 (H/4).

Explained in notebooks/04_model.ipynb.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count, sdpa_flop_count

from h3de_lite.config import H3DENetConfig, get_preset
from h3de_lite.layers.block import VBRABlock
from h3de_lite.layers.conv import Conv3d, ConvNormAct, Downsample, ResidualConvBlock
from h3de_lite.layers.fusion import ConcatFusion, FeatureFusionModule
from h3de_lite.layers.routing import BACKENDS
from h3de_lite.layers.super_resolution import SuperResolutionBlock, TrilinearUpsample

__all__ = ["H3DENet", "count_parameters", "model_flops"]

NUM_STAGES = 5
DIVISOR = 2**NUM_STAGES  # every input size must be a multiple of 32
ANCHOR_LEVEL = 2  # the anchor head reads the decoder feature at H/4 (stride u = 4)
ANCHORS_PER_LOCATION = {"single": 1, "multi": 3}
STAGE_TYPES = ("conv", "vbra")
HEADS = ("heatmap", "anchor")

RegionsPerSide = int | tuple[int, int, int]


def _per_stage(name: str, value: Any, *, is_scalar: Any) -> list[Any]:
    """Broadcast a scalar to the five stages or check a per-stage sequence has five entries."""
    if is_scalar(value):
        return [value] * NUM_STAGES
    if isinstance(value, Sequence) and not isinstance(value, str) and len(value) == NUM_STAGES:
        return list(value)
    raise ValueError(f"{name} must be a single value or one value per stage ({NUM_STAGES} entries), got {value!r}")


def _is_str(value: Any) -> bool:
    return isinstance(value, str)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_region_spec(value: Any) -> bool:
    return _is_int(value) or (isinstance(value, (tuple, list)) and len(value) == 3 and all(_is_int(v) for v in value))


def _check_positive_ints(name: str, values: Sequence[Any]) -> None:
    if not all(_is_int(v) and v >= 1 for v in values):
        raise ValueError(f"{name} must hold positive integers, got {tuple(values)!r}")


class H3DENet(nn.Module):
    """H3DE-Net (Huang et al., BIBM 2025): CNN stem and stage, V-BRA stages, FFM + SRB decoder, heatmap head.

    Encoder (eq. 9–10). The stem ``E_0 = Stem(X)`` (two 3×3×3 conv-norm-act at full resolution, eq. 9) is followed
    by five stages ``E_i = Stage_i(E_{i-1})``, each opened by a stride-2 conv (:class:`Downsample`) so that E_i has
    resolution ``H / 2^i`` (eq. 10), then ``depths[i]`` blocks of its type:

    * ``"conv"`` (E_1 at H/2 by default): residual conv blocks. At 128×128×64 the H/2 grid has 131 072 tokens; even
      routed attention there costs more than all other stages together, and at that scale the features are local
      (edges, enamel/bone texture), which convolutions model well. Likewise the stem at full resolution.
    * ``"vbra"`` (E_2 … E_5, H/4 … H/32): :class:`~h3de_lite.layers.block.VBRABlock` (DWConv + V-BRA + LayerNorm +
      MLP, eq. 3–4). From H/4 on (≤ 16 384 tokens) routed attention is affordable, and global context matters:
      which molar a tooth is, and on which side, is decided by the whole jaw, not by a local patch. This is also the
      split of the authors' code (BiFormer stages from H/4, conv branches above).

    Decoder (eq. 11). Writing D_i for the decoder feature at the resolution of E_i: ``D_5 = E_5`` and, for
    i = 4 … 0, ``D_i = Refine(Fusion(Up(D_{i+1}), E_i))``, where Up is the Super-Resolution Block (sub-voxel conv +
    3D pixel shuffle, ×2), Fusion the Feature Fusion Module and Refine a 3×3×3 conv-norm-act. D_0 is at full
    resolution.

    Heads (eq. 12). The anchor-free head is a 1×1×1 conv from D_0 to L heatmaps at input resolution. With
    ``head="anchor"`` an :class:`~h3de_lite.models.heads.AnchorHead` also reads D_2 (H/4, stride u = 4; the
    ``U_1`` of the anchor-based branch) and predicts offsets and existence logits for ``n_a`` anchors per location.

    Ablations: ``use_ffm=False`` replaces every FFM by :class:`ConcatFusion`, ``use_srb=False`` every SRB by
    :class:`TrilinearUpsample`, ``use_vbra=False`` makes every stage a conv stage.

    The paper gives the module sequence but not every layer size; the choices we inferred (widths mirrored in the
    decoder, a refinement conv per level, the FFM and SRB internals) are documented on the layers; every departure
    from the paper is listed in book/faithfulness.md, and the costs in book/benchmark_models.md. Use
    :meth:`from_preset` for the sizes of ``h3de_lite.config``.

    Args:
        in_channels: image channels.
        num_landmarks: L.
        stem_channels: width of E_0 (and of D_0).
        channels: widths of E_1 … E_5 (D_i mirrors E_i).
        stage_types: ``"conv"`` or ``"vbra"`` per stage (one value for all, or five).
        depths: blocks per stage.
        num_heads: attention heads per stage (ignored for conv stages).
        regions_per_side: S or ``(S_d, S_h, S_w)`` per stage (ignored for conv stages).
        topk: routed regions per stage (ignored for conv stages).
        mlp_ratio: MLP hidden width / C in V-BRA blocks.
        drop_path: largest stochastic-depth rate, rising linearly from 0 over the V-BRA blocks.
        lepe_kernel: LePE depthwise kernel inside V-BRA.
        use_ffm: FFM skips (True) or concat + conv (False).
        use_srb: SRB upsampling (True) or trilinear (False).
        use_vbra: V-BRA stages as given (True) or all conv (False).
        head: ``"heatmap"`` or ``"anchor"``.
        anchors: ``"single"`` (n_a = 1) or ``"multi"`` (n_a = 3), for ``head="anchor"``.
        attention_backend: STEP 3 of V-BRA, ``"gather"``, ``"flex"`` or ``"auto"`` (gather on CPU, the faster one
            measured on CUDA); see :class:`~h3de_lite.layers.attention.BiLevelRoutingAttention3d`.
        checkpointing: activation checkpointing while training: the stem, every encoder stage (V-BRA blocks
            included) and every decoder level keep only their inputs for the backward and recompute their
            activations there (``torch.utils.checkpoint``, non-reentrant): same values and gradients, about one
            more forward pass of compute, and a fraction of the activation memory (book/benchmark_attention.md).

    Shape:
        - Input: ``(B, in_channels, D, H, W)`` with D, H, W multiples of 32, not all equal to 32.
        - Output, ``head="heatmap"``: ``(B, L, D, H, W)``.
        - Output, ``head="anchor"``: ``{"heatmaps": (B, L, D, H, W), "offsets": (B, A, L, 3), "logits": (B, A, L)}``
          with ``A = (D/4)·(H/4)·(W/4)·n_a``.

    Example:
        >>> model = H3DENet.from_preset("tiny")
        >>> model(torch.randn(1, 1, 64, 64, 32)).shape
        torch.Size([1, 14, 64, 64, 32])

    Explained in notebooks/04_model.ipynb.
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        num_landmarks: int = 14,
        stem_channels: int = 16,
        channels: Sequence[int] = (32, 64, 128, 256, 512),
        stage_types: str | Sequence[str] = ("conv", "vbra", "vbra", "vbra", "vbra"),
        depths: int | Sequence[int] = (1, 2, 2, 4, 2),
        num_heads: int | Sequence[int] = (4, 8, 16, 32, 64),
        regions_per_side: RegionsPerSide | Sequence[RegionsPerSide] = (4, 4, 2),
        topk: int | Sequence[int] = (1, 1, 4, 16, 16),
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        lepe_kernel: int = 5,
        use_ffm: bool = True,
        use_srb: bool = True,
        use_vbra: bool = True,
        head: str = "heatmap",
        anchors: str = "single",
        attention_backend: str = "auto",
        checkpointing: bool = False,
    ) -> None:
        super().__init__()
        _check_positive_ints(
            "in_channels, num_landmarks and stem_channels", (in_channels, num_landmarks, stem_channels)
        )
        channels = _per_stage("channels", channels, is_scalar=_is_int)
        _check_positive_ints("channels", channels)
        stage_types = _per_stage("stage_types", stage_types, is_scalar=_is_str)
        if any(t not in STAGE_TYPES for t in stage_types):
            raise ValueError(f"stage_types entries must be one of {STAGE_TYPES}, got {tuple(stage_types)!r}")
        if not use_vbra:
            stage_types = ["conv"] * NUM_STAGES
        depths = _per_stage("depths", depths, is_scalar=_is_int)
        _check_positive_ints("depths", depths)
        num_heads = _per_stage("num_heads", num_heads, is_scalar=_is_int)
        regions = [
            r if _is_int(r) else tuple(r)
            for r in _per_stage("regions_per_side", regions_per_side, is_scalar=_is_region_spec)
        ]
        topk = _per_stage("topk", topk, is_scalar=_is_int)
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        if anchors not in ANCHORS_PER_LOCATION:
            raise ValueError(f"anchors must be one of {tuple(ANCHORS_PER_LOCATION)}, got {anchors!r}")
        if not 0.0 <= drop_path < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {drop_path}")
        if attention_backend not in BACKENDS:
            raise ValueError(f"attention_backend must be one of {BACKENDS}, got {attention_backend!r}")
        for i, (kind, dim, heads) in enumerate(zip(stage_types, channels, num_heads, strict=True)):
            if kind == "vbra" and (not _is_int(heads) or heads < 1 or dim % heads):
                raise ValueError(
                    f"stage {i + 1} is a V-BRA stage with {dim} channels, which num_heads={heads!r} does not divide; "
                    "choose a head count that divides the stage width"
                )

        self.in_channels = in_channels
        self.num_landmarks = num_landmarks
        self.head_type = head
        self.anchors = anchors
        self.stage_types = tuple(stage_types)
        self.checkpointing = checkpointing
        self.encoder_channels = (stem_channels, *channels)  # E_0 … E_5
        self.decoder_channels = self.encoder_channels[:-1]  # D_0 … D_4 (D_5 = E_5)

        # Encoder: stem (eq. 9) and five stages that halve the resolution (eq. 10).
        self.stem = nn.Sequential(
            ConvNormAct(in_channels=in_channels, out_channels=stem_channels),
            ConvNormAct(in_channels=stem_channels, out_channels=stem_channels),
        )
        num_vbra_blocks = sum(d for d, kind in zip(depths, stage_types, strict=True) if kind == "vbra")
        rates = torch.linspace(0, drop_path, max(num_vbra_blocks, 1)).tolist()
        self.stages = nn.ModuleList()
        for i, kind in enumerate(stage_types):
            c_in, c_out = self.encoder_channels[i], self.encoder_channels[i + 1]
            blocks: list[nn.Module] = [Downsample(in_channels=c_in, out_channels=c_out)]
            for _ in range(depths[i]):
                if kind == "vbra":
                    blocks.append(
                        VBRABlock(
                            dim=c_out,
                            num_heads=num_heads[i],
                            regions_per_side=regions[i],
                            topk=topk[i],
                            mlp_ratio=mlp_ratio,
                            drop_path=rates.pop(0),
                            lepe_kernel=lepe_kernel,
                            backend=attention_backend,
                        )
                    )
                else:
                    blocks.append(ResidualConvBlock(in_channels=c_out, out_channels=c_out))
            self.stages.append(nn.Sequential(*blocks))

        # Decoder (eq. 11): level i = 4 … 0 upsamples D_{i+1}, fuses it with E_i and refines. Stored finest first.
        upsample_cls = SuperResolutionBlock if use_srb else TrilinearUpsample
        fusion_cls = FeatureFusionModule if use_ffm else ConcatFusion
        self.upsamplers = nn.ModuleList()
        self.fusions = nn.ModuleList()
        self.refines = nn.ModuleList()
        level_channels = (*self.decoder_channels, self.encoder_channels[-1])  # D_0 … D_5
        for i in range(NUM_STAGES):
            c_dec = level_channels[i]
            self.upsamplers.append(upsample_cls(in_channels=level_channels[i + 1], out_channels=c_dec))
            self.fusions.append(
                fusion_cls(decoder_channels=c_dec, skip_channels=self.encoder_channels[i], out_channels=c_dec)
            )
            self.refines.append(ConvNormAct(in_channels=c_dec, out_channels=c_dec))

        # Heads (eq. 12; anchors eq. 7–8).
        self.heatmap_head = Conv3d(stem_channels, num_landmarks, kernel_size=1)
        self.num_anchors = ANCHORS_PER_LOCATION[anchors]
        if head == "anchor":
            from h3de_lite.models.heads import AnchorHead  # lazy: the anchor-free network does not need it

            self.anchor_head: nn.Module | None = AnchorHead(
                in_channels=self.decoder_channels[ANCHOR_LEVEL],
                num_landmarks=num_landmarks,
                num_anchors=self.num_anchors,
            )
        else:
            self.anchor_head = None

    @classmethod
    def from_config(cls, config: H3DENetConfig) -> H3DENet:
        """Build the network an :class:`~h3de_lite.config.H3DENetConfig` describes.

        The network remembers the crop its preset was sized for as ``input_size``, the default sliding-window size of
        :func:`h3de_lite.inference.predict_volume`.
        """
        model = cls(**config.model_kwargs())
        model.input_size = tuple(config.input_size)
        return model

    @classmethod
    def from_preset(cls, name: str, num_landmarks: int = 14, **overrides: Any) -> H3DENet:
        """Build a preset of :mod:`h3de_lite.config`, with any config field overridden.

        Args:
            name: ``"tiny"``, ``"paper"``, ``"paper-complete"``, ``"paper-incomplete"`` or ``"paper-all"``
                (unknown names raise ``ValueError`` listing them).
            num_landmarks: L.
            overrides: any :class:`~h3de_lite.config.H3DENetConfig` field, e.g. ``head="anchor"``, ``use_ffm=False``.

        Example:
            >>> H3DENet.from_preset("tiny", head="anchor", anchors="multi").num_anchors
            3
        """
        return cls.from_config(get_preset(name).replace(num_landmarks=num_landmarks, **overrides))

    def _check_input(self, x: Tensor) -> None:
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"H3DENet expects x of shape (B, {self.in_channels}, D, H, W), got {tuple(x.shape)}")
        sizes = tuple(x.shape[2:])
        if any(s % DIVISOR for s in sizes) or max(sizes) < 2 * DIVISOR:
            nearest = tuple(max(DIVISOR, round(s / DIVISOR) * DIVISOR) for s in sizes)
            if max(nearest) < 2 * DIVISOR:
                nearest = (2 * DIVISOR, *nearest[1:])
            raise ValueError(
                f"H3DENet needs every spatial size to be a multiple of {DIVISOR} (five stride-2 stages) and at least "
                f"one of them {2 * DIVISOR} or more (instance norm needs more than one voxel at H/{DIVISOR}); got "
                f"(D, H, W) = {sizes}; crop or pad to sizes such as {nearest} (e.g. 64, 96, 128)"
            )

    def _segment(self, function: Any, *args: Any) -> Tensor:
        """Run one stage or decoder level, through activation checkpointing when enabled and autograd records."""
        if self.checkpointing and torch.is_grad_enabled():
            return checkpoint(function, *args, use_reentrant=False)
        return function(*args)

    def _decode_level(self, i: int, coarse: Tensor, skip: Tensor) -> Tensor:
        """``D_i = Refine(Fusion(Up(D_{i+1}), E_i))`` (eq. 11)."""
        up = self.upsamplers[i](coarse)  # (B, C_dec_i, D/2^i, H/2^i, W/2^i)
        return self.refines[i](self.fusions[i](up, skip))

    def forward_encoder(self, x: Tensor) -> list[Tensor]:
        """Encoder features ``[E_0, …, E_5]``; E_i is ``(B, encoder_channels[i], D/2^i, H/2^i, W/2^i)``."""
        features = [self._segment(self.stem, x)]  # E_0 (eq. 9)
        for stage in self.stages:
            features.append(self._segment(stage, features[-1]))  # E_i = Stage_i(E_{i-1}) (eq. 10)
        return features

    def forward_decoder(self, features: Sequence[Tensor]) -> list[Tensor]:
        """Decoder features ``[D_0, …, D_5]`` from ``[E_0, …, E_5]``; D_i has E_i's resolution, D_5 = E_5."""
        decoded = [features[-1]]  # D_5, coarsest first while building
        for i in reversed(range(NUM_STAGES)):
            decoded.append(self._segment(self._decode_level, i, decoded[-1], features[i]))  # D_i (eq. 11)
        return decoded[::-1]

    def forward(self, x: Tensor) -> Tensor | dict[str, Tensor]:
        """Heatmaps ``(B, L, D, H, W)``, or with ``head="anchor"`` a dict adding ``offsets`` and ``logits``."""
        self._check_input(x)
        decoded = self.forward_decoder(self.forward_encoder(x))
        heatmaps = self.heatmap_head(decoded[0])  # (B, L, D, H, W) (eq. 12)
        if self.anchor_head is None:
            return heatmaps
        return {"heatmaps": heatmaps, **self.anchor_head(decoded[ANCHOR_LEVEL])}


def count_parameters(model: nn.Module, *, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters of a model.

    Args:
        model: any module.
        trainable_only: count only parameters with ``requires_grad``.

    Shape:
        not a tensor function; returns an int.

    Example:
        >>> count_parameters(nn.Conv3d(1, 8, 3))
        224

    Explained in notebooks/04_model.ipynb.
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _cpu_sdpa_flops(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any) -> int:
    """FLOPs of CPU's fused attention kernel, which torch's flop registry lacks: the same as any SDPA kernel."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _onednn_linear_flops(input_shape: Any, weight_shape: Any, *args: Any, **kwargs: Any) -> int:
    """FLOPs of oneDNN's linear (what the attention projections run in CPU inference): ``2 · tokens · in · out``."""
    tokens = 1
    for size in input_shape[:-1]:
        tokens *= size
    return 2 * tokens * weight_shape[0] * weight_shape[1]


def _onednn_conv_flops(x_shape: Any, w_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """FLOPs of oneDNN's convolution (what :class:`~h3de_lite.layers.conv.Conv3d` runs for one CPU volume in
    inference): counted as torch counts ``aten.convolution``."""
    return conv_flop_count(list(x_shape), list(w_shape), list(out_shape))


_EXTRA_FLOP_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}
if torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
    _EXTRA_FLOP_FORMULAS[torch.ops.mkldnn._linear_pointwise] = _onednn_linear_flops
if torch.backends.mkldnn.is_available():
    _EXTRA_FLOP_FORMULAS[torch.ops.aten.mkldnn_convolution] = _onednn_conv_flops


def model_flops(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Floating-point operations of one forward pass, counted by ``torch.utils.flop_counter.FlopCounterMode``.

    A multiply–add counts as 2 FLOPs (convolutions, matmuls, fused attention); element-wise ops, norms and
    softmax are not counted. Runs one forward under ``torch.no_grad()`` on a zero input, on the model's device.

    Args:
        model: the network.
        input_shape: ``(B, C, D, H, W)``.

    Shape:
        not a tensor function; returns an int.

    Example:
        >>> model_flops(nn.Conv3d(1, 8, 3, padding=1), (1, 1, 4, 4, 4))
        27648

    Explained in notebooks/04_model.ipynb.
    """
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    x = torch.zeros(tuple(input_shape), device=device)
    counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOP_FORMULAS)
    with torch.no_grad(), counter:
        model(x)
    return int(counter.get_total_flops())
