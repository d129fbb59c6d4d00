"""Models: H3DE-Net (anchor-free and anchor-based heads) and the baselines of the paper's Table I.

Explained in notebooks/04_model.ipynb.
"""

from h3de_lite.models.baselines import BASELINES, build_baseline
from h3de_lite.models.h3de_net import H3DENet, count_parameters, model_flops
from h3de_lite.models.heads import AnchorHead

__all__ = ["H3DENet", "count_parameters", "model_flops", "AnchorHead", "BASELINES", "build_baseline"]
