"""Convolution blocks of H3DE-Net's CNN path: conv-norm-act, the residual block and the stride-2 downsampling.

These are the local-feature parts of the hybrid network (the stem, eq. 9, the CNN encoder stage and the decoder
refinement); the global-context parts are the V-BRA blocks in :mod:`h3de_lite.layers.block`.

Departures from the paper (book/faithfulness.md): the stem is two of these blocks where eq. 9 has one conv, and the
encoder stage E_1 (H/2) is convolutional (:class:`Downsample` + :class:`ResidualConvBlock`) where the paper uses V-BRA
stages. Norm and activation (InstanceNorm with affine, LeakyReLU) are our choice.

Explained in notebooks/04_model.ipynb.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

NormFactory = Callable[[int], nn.Module]
"""Builds a normalisation layer for a given number of channels (e.g. :func:`instance_norm`)."""


def instance_norm(channels: int) -> nn.Module:
    """Instance normalisation with a learnable affine transform, the default norm of every conv block.

    Batches of 3D CT crops are small (1–4 volumes), so batch statistics are noisy; instance norm (as in the
    reference code and MONAI's 3D UNets) normalises each volume and channel on its own.

    Args:
        channels: number of channels C.

    Shape:
        - Input: ``(B, C, D, H, W)`` with more than one voxel (torch refuses instance norm over a single voxel).
        - Output: ``(B, C, D, H, W)``.

    Example:
        >>> instance_norm(8)(torch.randn(2, 8, 4, 4, 4)).shape
        torch.Size([2, 8, 4, 4, 4])

    Explained in notebooks/04_model.ipynb.
    """
    return nn.InstanceNorm3d(channels, affine=True)


#: oneDNN is built in (``torch.backends.mkldnn``): checked once, see :class:`Conv3d`.
_ONEDNN: bool = torch.backends.mkldnn.is_available()


def records_autograd(*tensors: Tensor | None) -> bool:
    """Whether autograd records an operation on ``tensors`` (None entries, e.g. a missing bias, are skipped): the
    condition under which the inference-only oneDNN calls (:class:`Conv3d`, the attention projections) step aside."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class Conv3d(nn.Conv3d):
    """``nn.Conv3d`` (same parameters and state dict) whose single-volume CPU inference runs through oneDNN.

    For a batch of one with ``groups=1`` and kernels of at most 3, PyTorch 2.13 sends a CPU float32 convolution to its
    native ``slow_conv3d`` kernel whenever ``C · D · H ≤ 20480`` (a size rule written for 2D inputs, which ignores W).
    For 3D volumes that kernel is several times slower than oneDNN's: a 3 × 3 × 3 conv with 16 channels on
    32 × 32 × 16 voxels took about 12× as long in ``torch.profiler``, and sliding-window inference (one window at a
    time) spent about half its time there. Here such calls go straight to ``aten::mkldnn_convolution``: same result up
    to float32 rounding (tested against ``nn.Conv3d``). Only while autograd does not record, on float32 CPU tensors with
    zero padding given as numbers; everything else is ``nn.Conv3d``'s own forward.

    Args:
        as :class:`torch.nn.Conv3d`.

    Shape:
        ``(B, C_in, D, H, W)`` → ``(B, C_out, D', H', W')``, as :class:`torch.nn.Conv3d`.

    Example:
        >>> Conv3d(4, 8, 3, padding=1)(torch.randn(1, 4, 6, 6, 6)).shape
        torch.Size([1, 8, 6, 6, 6])
    """

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:  # noqa: A002 (torch's name)
        if (
            _ONEDNN
            and torch.backends.mkldnn.enabled
            and not records_autograd(input, weight, bias)
            and input.ndim == 5
            and input.shape[0] == 1
            and input.device.type == "cpu"
            and input.dtype == torch.float32
            and weight.dtype == torch.float32
            and self.padding_mode == "zeros"
            and not isinstance(self.padding, str)
        ):
            return torch.ops.aten.mkldnn_convolution(
                input, weight, bias, self.padding, self.stride, self.dilation, self.groups
            )
        return super()._conv_forward(input, weight, bias)


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


class ConvNormAct(nn.Sequential):
    """``Conv3d → norm → activation``, the basic unit of the CNN path (the stem conv of eq. 9 is one of these).

    The convolution has no bias because the norm that follows removes it. Pass ``act_layer=None`` for a block that
    ends with the norm (used before a residual sum).

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: cubic kernel size (odd; padding keeps the size at stride 1).
        stride: convolution stride (2 halves every spatial axis).
        norm_layer: builds the norm from a channel count; ``None`` for no norm (the conv then has a bias).
        act_layer: activation class; ``None`` for no activation.

    Shape:
        - Input: ``(B, C_in, D, H, W)``.
        - Output: ``(B, C_out, D / stride, H / stride, W / stride)``.

    Example:
        >>> ConvNormAct(in_channels=1, out_channels=8)(torch.randn(2, 1, 16, 16, 8)).shape
        torch.Size([2, 8, 16, 16, 8])

    Explained in notebooks/04_model.ipynb.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        norm_layer: NormFactory | None = instance_norm,
        act_layer: type[nn.Module] | None = nn.LeakyReLU,
    ) -> None:
        _check_positive(in_channels=in_channels, out_channels=out_channels, kernel_size=kernel_size, stride=stride)
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd so that padding keeps the size, got {kernel_size}")
        super().__init__(
            Conv3d(
                in_channels,
                out_channels,
                kernel_size,
                stride=stride,
                padding=kernel_size // 2,
                bias=norm_layer is None,
            ),
            norm_layer(out_channels) if norm_layer is not None else nn.Identity(),
            act_layer() if act_layer is not None else nn.Identity(),
        )


class ResidualConvBlock(nn.Module):
    """Residual block: two 3×3×3 conv-norm layers plus a shortcut, then the activation (He et al., ResNet).

    ``y = act(norm(conv(act(norm(conv(x))))) + shortcut(x))``; the shortcut is the identity when the shape is kept and
    a 1×1×1 conv + norm otherwise. It is H3DE-Net's CNN encoder stage block (eq. 10 for the stages that are not V-BRA)
    and the ``use_vbra=False`` ablation's stand-in for the V-BRA block.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        stride: stride of the first conv and of the shortcut (2 halves the resolution).
        norm_layer: builds the norm from a channel count.
        act_layer: activation class.

    Shape:
        - Input: ``(B, C_in, D, H, W)``.
        - Output: ``(B, C_out, D / stride, H / stride, W / stride)``.

    Example:
        >>> ResidualConvBlock(in_channels=8, out_channels=16)(torch.randn(1, 8, 8, 8, 8)).shape
        torch.Size([1, 16, 8, 8, 8])

    Explained in notebooks/04_model.ipynb.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        norm_layer: NormFactory = instance_norm,
        act_layer: type[nn.Module] = nn.LeakyReLU,
    ) -> None:
        super().__init__()
        self.conv1 = ConvNormAct(
            in_channels=in_channels,
            out_channels=out_channels,
            stride=stride,
            norm_layer=norm_layer,
            act_layer=act_layer,
        )
        self.conv2 = ConvNormAct(
            in_channels=out_channels, out_channels=out_channels, norm_layer=norm_layer, act_layer=None
        )
        if in_channels == out_channels and stride == 1:
            self.shortcut: nn.Module = nn.Identity()
        else:
            self.shortcut = ConvNormAct(
                in_channels=in_channels,
                out_channels=out_channels,
                kernel_size=1,
                stride=stride,
                norm_layer=norm_layer,
                act_layer=None,
            )
        self.act = act_layer()

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block: ``(B, C_in, D, H, W) -> (B, C_out, D / stride, H / stride, W / stride)``."""
        return self.act(self.conv2(self.conv1(x)) + self.shortcut(x))


class Downsample(ConvNormAct):
    """Stride-2 3×3×3 conv + norm that opens every encoder stage: halves D, H, W and changes the width (eq. 10).

    Overlapping strided convolution is the 3D form of BiFormer's "patch merging" (and what the reference code uses);
    it ends with the norm and no activation, so the stage's residual blocks start from a normalised stream.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        norm_layer: builds the norm from a channel count.

    Shape:
        - Input: ``(B, C_in, D, H, W)`` with even D, H, W.
        - Output: ``(B, C_out, D / 2, H / 2, W / 2)``.

    Example:
        >>> Downsample(in_channels=8, out_channels=16)(torch.randn(1, 8, 16, 16, 8)).shape
        torch.Size([1, 16, 8, 8, 4])

    Explained in notebooks/04_model.ipynb.
    """

    def __init__(self, *, in_channels: int, out_channels: int, norm_layer: NormFactory = instance_norm) -> None:
        super().__init__(
            in_channels=in_channels,
            out_channels=out_channels,
            kernel_size=3,
            stride=2,
            norm_layer=norm_layer,
            act_layer=None,
        )
