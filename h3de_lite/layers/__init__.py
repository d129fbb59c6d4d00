"""Layers: V-BRA (routing functions and module), the transformer block, conv blocks, FFM and SRB.

Explained in notebooks/03_attention.ipynb and notebooks/04_model.ipynb.
"""

from h3de_lite.layers.attention import BiLevelRoutingAttention3d, DenseAttention3d, Routing
from h3de_lite.layers.block import DropPath, VBRABlock

__all__ = ["BiLevelRoutingAttention3d", "DenseAttention3d", "Routing", "VBRABlock", "DropPath"]
