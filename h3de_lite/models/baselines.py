"""The CNN baselines of the paper's Table I (3D U-Net, V-Net, residual 3D U-Net), built from MONAI's networks.

Every baseline has H3DENet's heatmap contract: ``(B, in_channels, D, H, W) → (B, L, D, H, W)``, raw heatmaps
regressed with the same loss. Two sizes: ``"paper"`` (the usual widths of each architecture, for 128×128×64 GPU
training) and ``"tiny"`` (a quarter of the width, to train on CPU next to ``H3DENet.from_preset("tiny")``).

Explained in notebooks/04_model.ipynb.
"""

from __future__ import annotations

from collections.abc import Callable

import torch  # noqa: F401  (the docstring examples run with the module's globals)
from monai.networks.nets import UNet, VNet
from monai.networks.nets.basic_unet import BasicUNet
from monai.networks.nets.vnet import DownTransition, InputTransition, OutputTransition, UpTransition
from torch import nn

__all__ = ["BASELINES", "SIZES", "ScaledVNet", "build_baseline"]

SIZES = ("tiny", "paper")


class ScaledVNet(VNet):
    """MONAI's V-Net (Milletari et al., 2016) with a configurable base width (MONAI fixes it at 16).

    Same blocks and forward as :class:`monai.networks.nets.VNet` (5×5×5 convs, residual stages of 1/2/3/2 convs,
    PReLU/ELU, batch norm, transposed-conv upsampling); stage widths are ``w, 2w, 4w, 8w, 16w``. ``base_channels=16``
    is MONAI's VNet exactly (same parameter names and shapes).

    Args:
        in_channels: image channels (must divide ``base_channels``).
        out_channels: output channels (L heatmaps).
        base_channels: width w of the first stage.
        act: activation as MONAI names it.
        dropout_prob_down: dropout of the two deepest down stages.
        dropout_prob_up: dropout of the two deepest up stages.

    Shape:
        - Input: ``(B, in_channels, D, H, W)`` with D, H, W multiples of 16.
        - Output: ``(B, out_channels, D, H, W)``.

    Example:
        >>> ScaledVNet(in_channels=1, out_channels=14, base_channels=4)(torch.randn(1, 1, 32, 32, 16)).shape
        torch.Size([1, 14, 32, 32, 16])

    Explained in notebooks/04_model.ipynb.
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        out_channels: int = 14,
        base_channels: int = 16,
        act: tuple[str, dict] | str = ("elu", {"inplace": True}),
        dropout_prob_down: float | None = 0.5,
        dropout_prob_up: tuple[float | None, float] = (0.5, 0.5),
    ) -> None:
        if base_channels < 1 or base_channels % in_channels:
            raise ValueError(
                f"base_channels must be a positive multiple of in_channels={in_channels}, got {base_channels}"
            )
        nn.Module.__init__(self)  # VNet.__init__ hard-codes the width; build the same blocks with width w
        w = base_channels
        self.in_tr = InputTransition(3, in_channels, w, act)
        self.down_tr32 = DownTransition(3, w, 1, act)
        self.down_tr64 = DownTransition(3, 2 * w, 2, act)
        self.down_tr128 = DownTransition(3, 4 * w, 3, act, dropout_prob=dropout_prob_down)
        self.down_tr256 = DownTransition(3, 8 * w, 2, act, dropout_prob=dropout_prob_down)
        self.up_tr256 = UpTransition(3, 16 * w, 16 * w, 2, act, dropout_prob=dropout_prob_up)
        self.up_tr128 = UpTransition(3, 16 * w, 8 * w, 2, act, dropout_prob=dropout_prob_up)
        self.up_tr64 = UpTransition(3, 8 * w, 4 * w, 1, act)
        self.up_tr32 = UpTransition(3, 4 * w, 2 * w, 1, act)
        self.out_tr = OutputTransition(3, 2 * w, out_channels, act)


def _unet3d(in_channels: int, num_landmarks: int, size: str) -> nn.Module:
    # 3D U-Net (Çiçek et al., 2016): two 3×3×3 conv-norm-act per level, max-pool down, transposed-conv up.
    features = (32, 32, 64, 128, 256, 32) if size == "paper" else (8, 8, 16, 32, 64, 8)
    return BasicUNet(spatial_dims=3, in_channels=in_channels, out_channels=num_landmarks, features=features)


def _resunet3d(in_channels: int, num_landmarks: int, size: str) -> nn.Module:
    # Residual 3D U-Net (Kerfoot et al., 2018; MONAI UNet): strided-conv residual units, 2 per level.
    channels = (16, 32, 64, 128, 256) if size == "paper" else (4, 8, 16, 32, 64)
    return UNet(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=num_landmarks,
        channels=channels,
        strides=(2,) * (len(channels) - 1),
        num_res_units=2,
    )


def _vnet(in_channels: int, num_landmarks: int, size: str) -> nn.Module:
    # V-Net (Milletari et al., 2016): MONAI's VNet at width 16; a quarter of the width for "tiny".
    if size == "paper":
        return VNet(spatial_dims=3, in_channels=in_channels, out_channels=num_landmarks)
    return ScaledVNet(in_channels=in_channels, out_channels=num_landmarks, base_channels=4)


BASELINES: dict[str, Callable[[int, int, str], nn.Module]] = {
    "unet3d": _unet3d,
    "vnet": _vnet,
    "resunet3d": _resunet3d,
}


def build_baseline(name: str, *, num_landmarks: int = 14, in_channels: int = 1, size: str = "tiny") -> nn.Module:
    """Build a Table I baseline with H3DENet's heatmap contract.

    Args:
        name: ``"unet3d"`` (MONAI ``BasicUNet``), ``"vnet"`` (MONAI ``VNet``), ``"resunet3d"`` (MONAI ``UNet`` with
            two residual units per level).
        num_landmarks: L, output channels.
        in_channels: image channels (V-Net needs it to divide its base width: 1, 2 or 4).
        size: ``"tiny"`` (CPU) or ``"paper"`` (128×128×64 on a GPU).

    Shape:
        - Input: ``(B, in_channels, D, H, W)`` with D, H, W multiples of 16 (32 fits every model).
        - Output: ``(B, L, D, H, W)``.

    Example:
        >>> build_baseline("unet3d", size="tiny")(torch.randn(1, 1, 32, 32, 16)).shape
        torch.Size([1, 14, 32, 32, 16])

    Explained in notebooks/04_model.ipynb.
    """
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; choose one of {list(BASELINES)}")
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    for arg, value in (("num_landmarks", num_landmarks), ("in_channels", in_channels)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{arg} must be a positive integer, got {value!r}")
    return BASELINES[name](in_channels, num_landmarks, size)
