"""Training: :class:`TrainConfig`, the :func:`fit` engine (losses eq. 13–17, whole-volume validation, resumable
checkpoints, ``torchrun`` scale-out) and the run-folder helpers.

Typical use::

    model = build_model_from_config({"kind": "h3de", "preset": "tiny"})
    history = fit(model, train_ds, val_ds, TrainConfig(epochs=50), run_dir="runs/tiny",
                  model_config={"kind": "h3de", "preset": "tiny"})
    model, checkpoint = load_trained_model("runs/tiny", which="best")
"""

from h3de_lite.training.checkpoint import (
    CHECKPOINT_KEYS,
    RUN_FILES,
    build_model_from_config,
    load_checkpoint,
    load_trained_model,
)
from h3de_lite.training.config import RESUMABLE_CHANGES, TrainConfig
from h3de_lite.training.recipes import RECIPES, Recipe, recipe_for
from h3de_lite.training.engine import fit, lr_factor, training_losses, validate

__all__ = [
    "CHECKPOINT_KEYS",
    "RECIPES",
    "RESUMABLE_CHANGES",
    "Recipe",
    "RUN_FILES",
    "TrainConfig",
    "build_model_from_config",
    "fit",
    "load_checkpoint",
    "load_trained_model",
    "lr_factor",
    "recipe_for",
    "training_losses",
    "validate",
]
