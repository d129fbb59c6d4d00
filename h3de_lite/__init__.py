"""h3de-lite: H3DE-Net (Huang et al., IEEE BIBM 2025) for 3D anatomical landmark detection in CT."""

__version__ = "0.1.0"
