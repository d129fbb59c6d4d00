"""h3de-lite: H3DE-Net (Huang et al., IEEE BIBM 2025) for 3D anatomical landmark detection in CT.

The most used names are re-exported here; everything else lives in its submodule (``h3de_lite.data``,
``h3de_lite.layers``, ``h3de_lite.models``, ...).
"""

from h3de_lite.anchors import AnchorGrid
from h3de_lite.decoding import predict_landmarks
from h3de_lite.heatmaps import decode, gaussian_heatmaps
from h3de_lite.inference import predict_case, predict_volume, prepare_input
from h3de_lite.metrics import existence_scores, radial_errors, summarize
from h3de_lite.models import H3DENet, build_baseline

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "AnchorGrid",
    "H3DENet",
    "build_baseline",
    "decode",
    "existence_scores",
    "gaussian_heatmaps",
    "predict_case",
    "predict_landmarks",
    "predict_volume",
    "prepare_input",
    "radial_errors",
    "summarize",
]
