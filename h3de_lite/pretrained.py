"""Packaged pretrained weights: :func:`available` lists them, :func:`load` gives a ready ``Predictor``.

A packaged model is a stripped run folder under ``h3de_lite/weights/<name>/``: the run's ``config.json`` (model
description, training settings and the ``"data"`` preprocessing block) and its ``best.pt`` (a checkpoint; only its
``"model"`` state dict is read, so the optimizer and random states may be dropped to save space). ``h3de-lite evaluate
--pretrained NAME`` and ``h3de-lite predict --pretrained NAME`` go through :func:`load`. No weights ship yet, so
:func:`available` returns ``[]`` and :func:`load` explains that.

Explained in notebooks/07_evaluation.ipynb.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # evaluation imports this module lazily; keep the import one-way at run time
    from h3de_lite.evaluation import Predictor

__all__ = ["WEIGHTS_DIR", "available", "weights_path", "load"]

WEIGHTS_DIR: Path = Path(__file__).resolve().parent / "weights"
"""Folder holding one sub-folder per packaged model (``<name>/config.json`` + ``<name>/best.pt``)."""


def available() -> list[str]:
    """Names of the packaged pretrained models (sub-folders of :data:`WEIGHTS_DIR` with a ``config.json``), sorted.

    Shape:
        not a tensor function.

    Example:
        >>> isinstance(available(), list)
        True
    """
    if not WEIGHTS_DIR.is_dir():
        return []
    return sorted(p.name for p in WEIGHTS_DIR.iterdir() if p.is_dir() and (p / "config.json").is_file())


def weights_path(name: str) -> Path:
    """The folder of the packaged model ``name``.

    Raises:
        ValueError: ``name`` is not one of :func:`available` (the message lists them).

    Shape:
        not a tensor function.

    Example:
        >>> weights_path("no-such-model")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: unknown pretrained model 'no-such-model'; available: none ...
    """
    names = available()
    if not isinstance(name, str) or name not in names:
        listed = ", ".join(names) if names else "none (no weights are packaged with this version of h3de-lite)"
        raise ValueError(
            f"unknown pretrained model {name!r}; available: {listed}; pass one of them, or train a model "
            "(h3de-lite train) and use its run folder (--run RUN_DIR)"
        )
    return WEIGHTS_DIR / name


def load(name: str, **kwargs: Any) -> Predictor:
    """Load the packaged model ``name`` as a :class:`~h3de_lite.evaluation.Predictor` (eval mode, preprocessing set).

    Args:
        name: one of :func:`available`.
        kwargs: passed to :func:`h3de_lite.evaluation.load_predictor` (``device``, ``threshold``, ``method``, ...).

    Raises:
        ValueError: unknown name (the message lists the available ones).

    Shape:
        not a tensor function.

    Example:
        >>> predictor = load("h3de-tiny-phantom")  # doctest: +SKIP
        >>> predictor.predict(volume, spacing)[0].shape  # doctest: +SKIP
        (14, 3)
    """
    from h3de_lite.evaluation import load_predictor

    return load_predictor(weights_path(name), **kwargs)
