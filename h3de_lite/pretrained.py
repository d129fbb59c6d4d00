"""Packaged pretrained weights: :func:`available` lists them, :func:`load` gives a ready ``Predictor``.

A packaged model is a stripped run folder under ``h3de_lite/weights/<name>/``: the run's ``config.json`` (model
description, training settings and the ``"data"`` preprocessing block) and its ``best.pt`` (a checkpoint; only its
``"model"`` state dict is read: :func:`export` keeps that alone), its ``history.json``, a ``card.json`` (how the
model was made: commands, data, time, hardware; the book's model cards read it) and a ``reference.json``: the
predictions :func:`export` recorded on a generated phantom case, which :func:`reproduce` repeats (the test suite checks
them to 1e-4 voxel). ``h3de-lite evaluate --pretrained NAME`` and ``h3de-lite predict --pretrained NAME`` go through
:func:`load`.

Explained in notebooks/07_evaluation.ipynb.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # evaluation imports this module lazily; keep the import one-way at run time
    from h3de_lite.evaluation import Predictor

__all__ = [
    "WEIGHTS_DIR", "REFERENCE_CASE", "available", "weights_path", "load", "export", "reference_case", "reproduce",
    "machine_info",
]  # fmt: skip

WEIGHTS_DIR: Path = Path(__file__).resolve().parent / "weights"
"""Folder holding one sub-folder per packaged model (``<name>/config.json`` + ``<name>/best.pt``)."""

REFERENCE_CASE: dict[str, Any] = {"seed": 990_001, "shape": [96, 96, 64], "incomplete": True}
"""The generated phantom v2 case (:func:`~h3de_lite.data.phantom.generate_phantom` arguments) whose predictions
:func:`export` records and :func:`reproduce` repeats: small (a few seconds on a CPU), incomplete (so that absent
landmarks are exercised too), and a seed no training or test set of the book uses."""


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
        ValueError: unknown pretrained model 'no-such-model'; available: ...; pass one of them, ...)
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


def reference_case(spec: dict[str, Any] | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """The volume, spacing and volume SHA-256 of the generated reference case (:data:`REFERENCE_CASE` by default).

    Shape:
        volume ``(D, H, W)`` float32 HU; spacing ``(3,)``.
    """
    spec = dict(REFERENCE_CASE if spec is None else spec)
    shape = tuple(int(s) for s in spec["shape"])
    volume, spacing, digest = _generated(int(spec["seed"]), shape, bool(spec["incomplete"]))
    return volume.copy(), spacing.copy(), digest


@functools.lru_cache(maxsize=2)
def _generated(seed: int, shape: tuple[int, ...], incomplete: bool) -> tuple[np.ndarray, np.ndarray, str]:
    from h3de_lite.data.phantom import generate_phantom

    case = generate_phantom(seed=seed, shape=shape, incomplete=incomplete)  # seconds: kept for the next call
    volume = np.ascontiguousarray(case.volume, dtype=np.float32)
    return volume, np.asarray(case.spacing, dtype=np.float64), hashlib.sha256(volume.tobytes()).hexdigest()


def _predict_reference(source: str | Path, spec: dict[str, Any] | None = None) -> dict[str, Any]:
    from h3de_lite.evaluation import load_predictor

    volume, spacing, digest = reference_case(spec)
    predictor = load_predictor(source, device="cpu")
    affine = np.diag([*spacing, 1.0])  # stored as RAS (a model trained on RAS-ordered arrays needs an affine)
    coords, present, score = predictor.predict(volume, spacing, affine=affine)
    return {
        "case": dict(REFERENCE_CASE if spec is None else spec),
        "volume_sha256": digest,
        "overlap": predictor.overlap,
        "strategy": predictor.strategy,
        "tta": predictor.tta,
        "coords": [[None if np.isnan(v) else float(v) for v in row] for row in coords],
        "present": [bool(p) for p in present],
        "score": [float(v) for v in score],
    }


def machine_info() -> dict[str, str | int]:
    """The machine a model is trained on, as model cards record it: CPU model, usable cores, torch threads, GPU.

    Shape:
        not a tensor function.
    """
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0,
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def export(
    run_dir: str | Path,
    name: str,
    *,
    card: dict[str, Any],
    dest: str | Path | None = None,
    extra_files: dict[str, str | Path] | None = None,
) -> Path:
    """Package a training run as the pretrained model ``name``: weights only, its config, history, card, reference.

    Writes ``<dest>/<name>/`` (default :data:`WEIGHTS_DIR`): ``config.json`` and ``history.json`` copied from the run,
    ``best.pt`` holding only ``{"model": state_dict}`` (the optimizer and random states are dropped), ``card.json``
    (``card``: how the model was made, as the model-card page shows it) and ``reference.json`` (the predictions on
    :data:`REFERENCE_CASE`, recorded here on the CPU). The folder is assembled beside the target and moved into place
    at the end, so an interrupted export leaves the previous package (if any) intact.

    Args:
        run_dir: the run folder ``h3de-lite train`` wrote (``config.json``, ``history.json``, ``best.pt``).
        name: package name (a folder name: letters, digits, ``-``, ``_``).
        card: JSON-able description (commands, data seed and size, training time, hardware, notes).
        dest: parent folder (default :data:`WEIGHTS_DIR`).
        extra_files: ``{file name in the package: source path}`` copied in as well (e.g. a model card in Markdown,
            evaluation tables); part of the same atomic swap.

    Returns:
        The package folder.

    Raises:
        FileNotFoundError: the run has no ``config.json`` or ``best.pt``, or an ``extra_files`` source is missing.
        ValueError: a bad ``name`` or extra file name.

    Shape:
        not a tensor function.
    """
    import torch

    from h3de_lite.training.checkpoint import load_checkpoint, write_json

    if not isinstance(name, str) or not name or not all(c.isalnum() or c in "-_" for c in name):
        raise ValueError(f"name must be a non-empty folder name of letters, digits, '-' and '_', got {name!r}")
    run_dir = Path(run_dir)
    for needed in ("config.json", "best.pt"):
        if not (run_dir / needed).is_file():
            raise FileNotFoundError(f"{str(run_dir / needed)!r} is missing; pass a finished run folder with validation")
    extra = {str(k): Path(v) for k, v in (extra_files or {}).items()}
    for file_name, source in extra.items():
        if Path(file_name).name != file_name or file_name in {"config.json", "history.json", "best.pt", "card.json",
                                                              "reference.json"}:  # fmt: skip
            raise ValueError(f"extra file name {file_name!r} must be a plain file name other than the package's own")
        if not source.is_file():
            raise FileNotFoundError(f"extra file {str(source)!r} for {file_name!r} does not exist")
    parent = Path(WEIGHTS_DIR if dest is None else dest)
    parent.mkdir(parents=True, exist_ok=True)
    staging = parent / f".{name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        shutil.copy2(run_dir / "config.json", staging / "config.json")
        if (run_dir / "history.json").is_file():
            shutil.copy2(run_dir / "history.json", staging / "history.json")
        state = load_checkpoint(run_dir / "best.pt", map_location="cpu")["model"]
        torch.save({"model": {k: v.detach().clone() for k, v in state.items()}}, staging / "best.pt")
        for file_name, source in extra.items():
            shutil.copy2(source, staging / file_name)
        write_json(staging / "card.json", card)
        write_json(staging / "reference.json", _predict_reference(staging))
        final = parent / name
        old = parent / f".{name}.old"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        staging.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def reproduce(name: str) -> dict[str, Any]:
    """Predict the reference case again with the packaged model ``name``; returns what :func:`export` recorded
    (``"recorded"``), the new predictions (``"now"``) and the largest coordinate difference in voxels (``"max_diff"``,
    ``inf`` when presence differs).

    Shape:
        not a tensor function.
    """
    folder = weights_path(name)
    recorded = json.loads((folder / "reference.json").read_text(encoding="utf-8"))
    now = _predict_reference(folder, recorded["case"])
    if now["present"] != recorded["present"]:
        diff = float("inf")
    else:
        a = np.array(recorded["coords"], dtype=np.float64)
        b = np.array(now["coords"], dtype=np.float64)
        diff = float(np.nanmax(np.abs(a - b))) if np.isfinite(a).any() else 0.0
    return {"recorded": recorded, "now": now, "max_diff": diff}
