"""Layers: V-BRA (routing functions and module), the transformer block, conv blocks, FFM and SRB.

Explained in notebooks/03_attention.ipynb and notebooks/04_model.ipynb.
"""

from h3de_lite.layers.attention import BiLevelRoutingAttention3d, DenseAttention3d, Routing
from h3de_lite.layers.block import DropPath, VBRABlock
from h3de_lite.layers.conv import ConvNormAct, Downsample, ResidualConvBlock
from h3de_lite.layers.fusion import ConcatFusion, FeatureFusionModule
from h3de_lite.layers.super_resolution import (
    SuperResolutionBlock,
    TrilinearUpsample,
    pixel_shuffle_3d,
    pixel_unshuffle_3d,
)

__all__ = [
    "BiLevelRoutingAttention3d",
    "DenseAttention3d",
    "Routing",
    "VBRABlock",
    "DropPath",
    "ConvNormAct",
    "Downsample",
    "ResidualConvBlock",
    "ConcatFusion",
    "FeatureFusionModule",
    "SuperResolutionBlock",
    "TrilinearUpsample",
    "pixel_shuffle_3d",
    "pixel_unshuffle_3d",
]
