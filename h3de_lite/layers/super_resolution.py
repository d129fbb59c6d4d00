"""Super-Resolution Block (SRB): learned ×2 upsampling of the decoder by a 3D sub-voxel convolution (pixel shuffle).

Also holds the pure 3D pixel shuffle / unshuffle and the ``use_srb=False`` ablation's plain trilinear upsampling.

Departure from the paper (book/faithfulness.md): the paper does not give the SRB's layers; the design here is
inferred (ESPCN in 3D): a depthwise 3×3×3 conv, a 1×1×1 conv to ``C_out·8`` channels (ICNR-initialised), a 3D pixel
shuffle, InstanceNorm and LeakyReLU. ``separable=False`` uses one dense 3×3×3 conv instead, as the authors' code
(which defines an SRB but does not use it).

Explained in notebooks/04_model.ipynb.
"""

from __future__ import annotations

import torch
from einops import rearrange, repeat
from torch import Tensor, nn

from h3de_lite.layers.conv import Conv3d, NormFactory, instance_norm


def _check_scale(scale: int) -> None:
    if not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be a positive integer upsampling factor, got {scale!r}")


def pixel_shuffle_3d(x: Tensor, scale: int) -> Tensor:
    """Rearrange channel groups into sub-voxels: the 3D form of ``torch.nn.functional.pixel_shuffle``.

    Output voxel ``(c, d·r + i, h·r + j, w·r + k)`` is input channel ``c·r³ + i·r² + j·r + k`` at ``(d, h, w)``.

    Args:
        x: ``(B, C·r³, D, H, W)`` features.
        scale: upsampling factor r per axis.

    Shape:
        - Input: ``(B, C·r³, D, H, W)``.
        - Output: ``(B, C, D·r, H·r, W·r)``.

    Example:
        >>> pixel_shuffle_3d(torch.randn(2, 16, 4, 4, 2), 2).shape
        torch.Size([2, 2, 8, 8, 4])

    Explained in notebooks/04_model.ipynb.
    """
    _check_scale(scale)
    if x.ndim != 5 or x.shape[1] % scale**3 != 0:
        raise ValueError(
            f"pixel_shuffle_3d needs x of shape (B, C*{scale}^3, D, H, W); got {tuple(x.shape)}, "
            f"whose channel count is not a multiple of {scale**3}"
        )
    return rearrange(x, "b (c r1 r2 r3) d h w -> b c (d r1) (h r2) (w r3)", r1=scale, r2=scale, r3=scale)


def pixel_unshuffle_3d(x: Tensor, scale: int) -> Tensor:
    """Inverse of :func:`pixel_shuffle_3d`: fold each ``r×r×r`` block of voxels into ``r³`` channels.

    Args:
        x: ``(B, C, D·r, H·r, W·r)`` features.
        scale: downsampling factor r per axis.

    Shape:
        - Input: ``(B, C, D·r, H·r, W·r)``.
        - Output: ``(B, C·r³, D, H, W)``.

    Example:
        >>> pixel_unshuffle_3d(torch.randn(2, 2, 8, 8, 4), 2).shape
        torch.Size([2, 16, 4, 4, 2])

    Explained in notebooks/04_model.ipynb.
    """
    _check_scale(scale)
    if x.ndim != 5 or any(size % scale for size in x.shape[2:]):
        raise ValueError(
            f"pixel_unshuffle_3d needs x of shape (B, C, D, H, W) with D, H, W multiples of {scale}; "
            f"got {tuple(x.shape)}"
        )
    return rearrange(x, "b c (d r1) (h r2) (w r3) -> b (c r1 r2 r3) d h w", r1=scale, r2=scale, r3=scale)


@torch.no_grad()
def icnr_(weight: Tensor, scale: int) -> Tensor:
    """ICNR initialisation (Aitken et al., 2017) of a conv that feeds :func:`pixel_shuffle_3d`, in place.

    All ``r³`` sub-voxel filters of an output channel start equal, so at initialisation the shuffle equals
    nearest-neighbour upsampling of a Kaiming-initialised conv: no checkerboard artefacts from the start.

    Args:
        weight: conv weight ``(C·r³, C_in, k, k, k)``.
        scale: the shuffle factor r.

    Shape:
        - weight: ``(C·r³, C_in, k, k, k)``, returned after filling.

    Example:
        >>> icnr_(torch.empty(16, 4, 1, 1, 1), 2).shape
        torch.Size([16, 4, 1, 1, 1])

    Explained in notebooks/04_model.ipynb.
    """
    _check_scale(scale)
    groups = scale**3
    assert weight.shape[0] % groups == 0, "icnr_ needs C·r³ output channels"
    base = torch.empty((weight.shape[0] // groups, *weight.shape[1:]), dtype=weight.dtype, device=weight.device)
    nn.init.kaiming_normal_(base, nonlinearity="leaky_relu")
    weight.copy_(repeat(base, "c i kd kh kw -> (c r) i kd kh kw", r=groups))  # channel c·r³ + sub-voxel index
    return weight


class SuperResolutionBlock(nn.Module):
    """SRB: learned ×r upsampling by sub-voxel convolution and a 3D pixel shuffle (ESPCN, Shi et al. 2016, in 3D).

    H3DE-Net's decoder restores resolution with SRBs instead of interpolation: a convolution at the *low* resolution
    predicts ``r³`` sub-voxel values per output channel, and the pixel shuffle places them on the fine grid, so the
    upsampling filter is learned and costs low-resolution FLOPs.

    STEP 1 spatial context: a k×k×k conv on the coarse grid (depthwise when ``separable``).
    STEP 2 sub-voxel channels: a 1×1×1 conv ``C_in → C_out·r³`` (ICNR-initialised).
    STEP 3 pixel shuffle ``(B, C_out·r³, D, H, W) → (B, C_out, D·r, H·r, W·r)``.
    STEP 4 norm + activation on the fine grid.

    The paper does not give the SRB's layer sizes; the authors' code (unused there) has a dense 3×3×3 conv to
    ``C·r³`` channels. A dense conv to ``C_out·8`` channels costs ``27·8·C_in·C_out`` weights (28 M at the
    512 → 256 bottleneck), so by default STEP 1 is depthwise and STEP 2 pointwise (``27·C_in + 8·C_in·C_out``);
    ``separable=False`` fuses them into one dense k×k×k conv.

    Args:
        in_channels: input channels C_in.
        out_channels: output channels C_out.
        scale: upsampling factor r per axis.
        kernel_size: odd cubic kernel of STEP 1.
        separable: depthwise + pointwise (True) or one dense conv (False).
        norm_layer: builds the norm from a channel count; ``None`` for none.
        act_layer: activation class; ``None`` for none.

    Shape:
        - Input: ``(B, C_in, D, H, W)``.
        - Output: ``(B, C_out, D·r, H·r, W·r)``.

    Example:
        >>> SuperResolutionBlock(in_channels=16, out_channels=8)(torch.randn(1, 16, 4, 4, 2)).shape
        torch.Size([1, 8, 8, 8, 4])

    Explained in notebooks/04_model.ipynb.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        scale: int = 2,
        kernel_size: int = 3,
        separable: bool = True,
        norm_layer: NormFactory | None = instance_norm,
        act_layer: type[nn.Module] | None = nn.LeakyReLU,
    ) -> None:
        super().__init__()
        _check_scale(scale)
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd so that padding keeps the size, got {kernel_size}")
        self.scale = scale
        sub_channels = out_channels * scale**3
        if separable:
            self.context: nn.Module = Conv3d(
                in_channels, in_channels, kernel_size, padding=kernel_size // 2, groups=in_channels, bias=False
            )
            self.expand = Conv3d(in_channels, sub_channels, 1, bias=False)
        else:
            self.context = nn.Identity()
            self.expand = Conv3d(in_channels, sub_channels, kernel_size, padding=kernel_size // 2, bias=False)
        icnr_(self.expand.weight, scale)
        self.norm = norm_layer(out_channels) if norm_layer is not None else nn.Identity()
        self.act = act_layer() if act_layer is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """Upsample: ``(B, C_in, D, H, W) -> (B, C_out, D·r, H·r, W·r)``."""
        x = self.expand(self.context(x))  # STEP 1–2: (B, C_out·r³, D, H, W)
        x = pixel_shuffle_3d(x, self.scale)  # STEP 3: (B, C_out, D·r, H·r, W·r)
        return self.act(self.norm(x))  # STEP 4


class TrilinearUpsample(nn.Module):
    """Fixed trilinear ×r interpolation with a 1×1×1 conv, norm and activation: the ``use_srb=False`` ablation.

    The 1×1×1 conv runs on the coarse grid, before the interpolation: both are linear per channel, so they commute,
    and the channel change then costs coarse-grid FLOPs (the result equals interpolating first).

    Args:
        in_channels: input channels.
        out_channels: output channels.
        scale: upsampling factor r per axis.
        norm_layer: builds the norm from a channel count; ``None`` for none.
        act_layer: activation class; ``None`` for none.

    Shape:
        - Input: ``(B, C_in, D, H, W)``.
        - Output: ``(B, C_out, D·r, H·r, W·r)``.

    Example:
        >>> TrilinearUpsample(in_channels=16, out_channels=8)(torch.randn(1, 16, 4, 4, 2)).shape
        torch.Size([1, 8, 8, 8, 4])

    Explained in notebooks/04_model.ipynb.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        scale: int = 2,
        norm_layer: NormFactory | None = instance_norm,
        act_layer: type[nn.Module] | None = nn.LeakyReLU,
    ) -> None:
        super().__init__()
        _check_scale(scale)
        self.project = Conv3d(in_channels, out_channels, 1, bias=norm_layer is None)
        self.upsample = nn.Upsample(scale_factor=scale, mode="trilinear", align_corners=False)
        self.norm = norm_layer(out_channels) if norm_layer is not None else nn.Identity()
        self.act = act_layer() if act_layer is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """Upsample: ``(B, C_in, D, H, W) -> (B, C_out, D·r, H·r, W·r)``."""
        return self.act(self.norm(self.upsample(self.project(x))))
