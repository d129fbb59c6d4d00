"""Training recipes: the defaults ``h3de-lite train`` uses for a preset when an option is not given.

A recipe bundles what a run needs besides the network: preprocessing (resampling, crop), the training crops' mix
(partial and background windows for sliding-window inference), and the :class:`~h3de_lite.training.TrainConfig`
fields that differ from its paper defaults.

- ``paper`` (presets ``paper*``, a GPU): the paper's setting, §III-A — no resampling, 128×128×64 crops, the heatmap
  MSE of eq. 13, Adam at 1e-3 and the authors' schedule (``TrainConfig`` defaults).
- ``tiny`` (preset ``tiny``, a CPU, **not the paper's**): volumes resampled to 1.5 mm, 64×64×32 crops (96×96×48 mm,
  most of the jaw), the spatial-softmax cross-entropy (:func:`~h3de_lite.losses.heatmap_softmax_ce_loss`) with an
  "absent" outcome per landmark, Gaussian targets of sigma 1.5 voxels, a stem of 16 channels instead of the preset's
  8, half the crops holding only some landmarks or none, validation every 5 epochs, a cosine schedule, and cached
  resampled volumes. The plain MSE stays near 40 mm on CPU; the softmax reaches a few
  millimetres in minutes. The absent outcome is what makes sliding-window inference work: without it a window that
  does not hold a landmark still puts a confident peak somewhere, and on phantom v2 test volumes (up to a whole head)
  those peaks won (30 mm test MRE with the former 40-epoch recipe, 4 mm for the same model on a window centred by the
  ground truth, a diagnostic only). Sigma 1.5 (was 2) and the wider stem (was the preset's 8) gave the lowest
  complete-case test MRE among the variants tried on CPU (2.1 mm against 2.8–4.7 mm, one run each on phantom v2 seed
  2027, 20 cases). ``--p-zoom 0.25`` (a quarter of the items the whole volume zoomed to fit the crop) trains the
  coarse step of ``coarse_to_fine`` inference; it is not the default: it left the heatmap head's sliding-window
  results as they were (2.15 and 2.61 mm in two runs) and the anchor head's validation MRE stayed near 10 mm
  instead of 4. Runs record test-time mirror averaging (``tta="flip"``, :mod:`h3de_lite.tta`) as their inference
  default: on phantom v2 it removed the far-off outliers of sliding-window inference, at twice its time. Training
  augmentation (:func:`~h3de_lite.data.augment.training_augmentation`: left–right flips, rotations up to 10°,
  scaling 0.9–1.1, intensity jitter; the rotation resampled only inside the crop) is on: with it the heatmap head's
  complete-case test MRE went from 1.88 to 1.70 mm on phantom v2 seed 2027 (20 cases) and from 2.28 to 1.85 mm on
  seed 1 (8 cases), one run each, mirror averaging on in both; the run took 13 min 21 s on 2 cores.
  Measured in the book (notebook 05 and book/benchmark_training.md).
- ``afids`` (preset ``tiny`` with 32 landmarks, one annotated MRI, a CPU): the single-atlas recipe of
  ``benchmarks/train_afids.py`` on the AFIDs template (:mod:`h3de_lite.data.afids`): every sample a new pose and
  appearance of the template (:class:`~h3de_lite.data.atlas.AtlasDataset`), 3 mm voxels, 64×64×64 crops (192 mm:
  the whole brain and some context), percentile intensity normalisation, the spatial-softmax cross-entropy, a cosine
  schedule. Not selected by a preset (``h3de-lite train`` reads MML folders); the script reads it from
  :data:`RECIPES`. Explained in notebooks/09_real_anatomy.ipynb.

Explained in the README (quick start) and in the docstring of :func:`h3de_lite.training.fit`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["RECIPES", "Recipe", "recipe_for"]


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """Defaults of one training setting.

    Args:
        name: recipe name.
        spacing: isotropic voxel size in mm every case is resampled to first (``None``: as stored).
        crop: training crop ``(D, H, W)`` (``None``: the preset's ``input_size``).
        p_partial: share of training crops that hold only some landmarks.
        p_background: share of training crops that hold none.
        p_zoom: share of training items that are the whole volume zoomed to fit the crop (the coarse view of
            ``strategy="coarse_to_fine"`` inference, :func:`h3de_lite.data.transforms.zoom_to_fit`).
        augment: train with :func:`~h3de_lite.data.augment.training_augmentation` (left–right flips, small rotations
            and scalings, intensity jitter).
        tta: test-time augmentation recorded as the run's inference default (``config.json`` ``"inference"``):
            ``"none"`` or ``"flip"`` (:mod:`h3de_lite.tta`).
        cache: keep resampled volumes in memory between epochs.
        model: H3DE-Net overrides of the preset (:meth:`~h3de_lite.models.H3DENet.from_preset`), recorded in the
            run's config so that the run loads without the recipe.
        train: :class:`~h3de_lite.training.TrainConfig` fields that differ from its defaults.

    Shape:
        not a tensor object; ``crop`` is the ``(D, H, W)`` of the network input ``(B, 1, D, H, W)``.

    Example:
        >>> recipe_for("tiny").train["heatmap_loss"]
        'softmax_ce'
    """

    name: str
    spacing: float | None = None
    crop: tuple[int, int, int] | None = None
    p_partial: float = 0.1
    p_background: float = 0.1
    p_zoom: float = 0.0
    augment: bool = False
    tta: str = "none"
    cache: bool = False
    model: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)


RECIPES: dict[str, Recipe] = {
    "paper": Recipe(name="paper"),
    "tiny": Recipe(
        name="tiny",
        spacing=1.5,
        cache=True,
        p_partial=0.25,
        p_background=0.25,
        augment=True,
        tta="flip",
        model={"stem_channels": 16},
        train={
            "heatmap_loss": "softmax_ce",
            "absent_class": True,
            "sigma": 1.5,
            "val_every": 5,
            "epochs": 80,
            "batch_size": 2,
            "lr": 2e-3,
            "schedule": "cosine",
            "warmup_steps": 20,
            "patience": None,
        },
    ),
    "afids": Recipe(
        name="afids",
        spacing=3.0,
        crop=(64, 64, 64),
        p_partial=0.0,
        p_background=0.0,
        train={
            "heatmap_loss": "softmax_ce",
            "epochs": 60,
            "batch_size": 2,
            "lr": 2e-3,
            "schedule": "cosine",
            "warmup_steps": 50,
            "patience": None,
            "val_roi_size": (64, 64, 64),
        },
    ),
}


def recipe_for(preset: str) -> Recipe:
    """The recipe of an H3DE-Net preset: ``tiny`` for ``"tiny"``, ``paper`` for the ``paper*`` presets.

    Args:
        preset: a name from :func:`h3de_lite.config.preset_names`.

    Example:
        >>> recipe_for("paper-all").name
        'paper'
    """
    from h3de_lite.config import preset_names

    if preset not in preset_names():
        raise ValueError(f"unknown preset {preset!r}; choose one of {preset_names()}")
    return RECIPES["tiny" if preset == "tiny" else "paper"]
