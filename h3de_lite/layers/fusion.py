"""Feature Fusion Module (FFM, eq. 11): merges the upsampled decoder feature with the encoder skip of the same scale.

Also holds the ``use_ffm=False`` ablation: plain concatenation + convolution, the classic U-Net skip.

Departure from the paper (book/faithfulness.md): the paper names the FFM and its role but not its layers; the design
here is inferred, BiSeNet's feature fusion module in 3D: concat → 3×3×3 conv-InstanceNorm-LeakyReLU (F), a global
channel gate ``a = σ(W₂ act(W₁ GAP(F)))`` with hidden width ``max(C // 4, 4)``, and ``U = F + F ⊙ a``. The authors'
code has no FFM (it concatenates).

Explained in notebooks/04_model.ipynb.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from h3de_lite.layers.conv import Conv3d, ConvNormAct, NormFactory, instance_norm


def _check_pair(decoder: Tensor, skip: Tensor, decoder_channels: int, skip_channels: int) -> None:
    if decoder.ndim != 5 or skip.ndim != 5:
        raise ValueError(
            f"decoder and skip must be (B, C, D, H, W); got {tuple(decoder.shape)} and {tuple(skip.shape)}"
        )
    if decoder.shape[0] != skip.shape[0] or decoder.shape[2:] != skip.shape[2:]:
        raise ValueError(
            "decoder and skip must share batch size and spatial size (upsample the decoder feature first); "
            f"got {tuple(decoder.shape)} and {tuple(skip.shape)}"
        )
    if decoder.shape[1] != decoder_channels or skip.shape[1] != skip_channels:
        raise ValueError(
            f"expected {decoder_channels} decoder and {skip_channels} skip channels, "
            f"got {decoder.shape[1]} and {skip.shape[1]}"
        )


class ConcatFusion(nn.Module):
    """Concatenate decoder and skip features, then one 3×3×3 conv-norm-act (the plain U-Net skip; ``use_ffm=False``).

    ``U = act(norm(conv([U_up, E])))``.

    Args:
        decoder_channels: channels of the upsampled decoder feature.
        skip_channels: channels of the encoder skip feature.
        out_channels: output channels.
        norm_layer: builds the norm from a channel count.
        act_layer: activation class.

    Shape:
        - decoder: ``(B, C_dec, D, H, W)``; skip: ``(B, C_skip, D, H, W)``.
        - Output: ``(B, C_out, D, H, W)``.

    Example:
        >>> fusion = ConcatFusion(decoder_channels=16, skip_channels=8, out_channels=8)
        >>> fusion(torch.randn(1, 16, 8, 8, 4), torch.randn(1, 8, 8, 8, 4)).shape
        torch.Size([1, 8, 8, 8, 4])

    Explained in notebooks/04_model.ipynb.
    """

    def __init__(
        self,
        *,
        decoder_channels: int,
        skip_channels: int,
        out_channels: int,
        norm_layer: NormFactory = instance_norm,
        act_layer: type[nn.Module] = nn.LeakyReLU,
    ) -> None:
        super().__init__()
        self.decoder_channels = decoder_channels
        self.skip_channels = skip_channels
        self.fuse = ConvNormAct(
            in_channels=decoder_channels + skip_channels,
            out_channels=out_channels,
            norm_layer=norm_layer,
            act_layer=act_layer,
        )

    def forward(self, decoder: Tensor, skip: Tensor) -> Tensor:
        """Fuse ``(B, C_dec, D, H, W)`` and ``(B, C_skip, D, H, W)`` into ``(B, C_out, D, H, W)``."""
        _check_pair(decoder, skip, self.decoder_channels, self.skip_channels)
        return self.fuse(torch.cat([decoder, skip], dim=1))  # (B, C_out, D, H, W)


class FeatureFusionModule(ConcatFusion):
    """FFM (eq. 11): fuse the upsampled decoder feature with the encoder skip, reweighted by global channel attention.

    ``F = act(norm(conv3([U_up, E])))``, ``a = σ(W₂ act(W₁ GAP(F)))``, ``U = F + F ⊙ a``.

    STEP 1 local fusion: concatenation and a 3×3×3 conv-norm-act mix the coarse, semantic decoder feature with the
    fine, local encoder feature.
    STEP 2 global context: global average pooling summarises the whole fused volume per channel, and a bottleneck
    MLP (1×1×1 convs, ratio ``reduction``) with a sigmoid gives one weight per channel.
    STEP 3 reweighting: channels that carry landmark evidence across the volume are amplified (the residual form
    ``F + F ⊙ a`` keeps the fused feature when the gate is near zero).

    The paper names the FFM and its role (multi-scale fusion for precision and robustness) but its layer details
    were not available to us, and the authors' code fuses by plain concatenation; this design is the
    attention-refined fusion of BiSeNet's FFM (Yu et al., 2018) in 3D, so that ``use_ffm=False``
    (:class:`ConcatFusion`) isolates exactly the attention part.

    Args:
        decoder_channels: channels of the upsampled decoder feature.
        skip_channels: channels of the encoder skip feature.
        out_channels: output channels.
        reduction: channel reduction of the attention MLP (hidden width ``max(out_channels // reduction, 4)``).
        norm_layer: builds the norm from a channel count.
        act_layer: activation class.

    Shape:
        - decoder: ``(B, C_dec, D, H, W)``; skip: ``(B, C_skip, D, H, W)``.
        - Output: ``(B, C_out, D, H, W)``.

    Example:
        >>> ffm = FeatureFusionModule(decoder_channels=16, skip_channels=8, out_channels=8)
        >>> ffm(torch.randn(1, 16, 8, 8, 4), torch.randn(1, 8, 8, 8, 4)).shape
        torch.Size([1, 8, 8, 8, 4])

    Explained in notebooks/04_model.ipynb.
    """

    def __init__(
        self,
        *,
        decoder_channels: int,
        skip_channels: int,
        out_channels: int,
        reduction: int = 4,
        norm_layer: NormFactory = instance_norm,
        act_layer: type[nn.Module] = nn.LeakyReLU,
    ) -> None:
        if not isinstance(reduction, int) or reduction < 1:
            raise ValueError(f"reduction must be a positive integer, got {reduction!r}")
        super().__init__(
            decoder_channels=decoder_channels,
            skip_channels=skip_channels,
            out_channels=out_channels,
            norm_layer=norm_layer,
            act_layer=act_layer,
        )
        hidden = max(out_channels // reduction, 4)
        self.attention = nn.Sequential(
            nn.AdaptiveAvgPool3d(1),
            Conv3d(out_channels, hidden, 1),
            act_layer(),
            Conv3d(hidden, out_channels, 1),
            nn.Sigmoid(),
        )

    def forward(self, decoder: Tensor, skip: Tensor) -> Tensor:
        """Fuse ``(B, C_dec, D, H, W)`` and ``(B, C_skip, D, H, W)`` into ``(B, C_out, D, H, W)``."""
        fused = super().forward(decoder, skip)  # STEP 1: concat + conv-norm-act, (B, C_out, D, H, W)
        gate = self.attention(fused)  # STEP 2: (B, C_out, 1, 1, 1), values in (0, 1)
        return fused + fused * gate  # STEP 3: (B, C_out, D, H, W)
