"""Run folders, checkpoints and random-number states: what :func:`~h3de_lite.training.fit` writes and reads back.

A run folder holds ``config.json`` (the :class:`~h3de_lite.training.TrainConfig` and the model description that
:func:`build_model_from_config` turns back into a network), ``history.json``, ``last.pt`` and ``best.pt``. Every file
is written atomically (:func:`h3de_lite.files.atomic_output`). Checkpoints hold only tensors and plain Python values,
so they load with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from h3de_lite.files import atomic_output

__all__ = [
    "CHECKPOINT_KEYS",
    "RUN_FILES",
    "build_model_from_config",
    "capture_rng",
    "load_checkpoint",
    "load_trained_model",
    "prepare_run_dir",
    "restore_rng",
    "save_checkpoint",
    "write_json",
]

#: The files of a run folder; a folder holding any of them holds a run.
RUN_FILES = ("config.json", "history.json", "last.pt", "best.pt")

#: Keys of every checkpoint (``last.pt``, ``best.pt``).
CHECKPOINT_KEYS = (
    "model",
    "optimizer",
    "scaler",
    "scheduler",
    "epoch",
    "epoch_step",
    "step",
    "rng",
    "sampler",
    "best_metric",
    "best_epoch",
    "bad_validations",
    "loss_sums",
    "epoch_seconds",
    "history",
    "finished",
    "stopped_early",
    "config",
)


# ---------------------------------------------------------------------------------------------------- JSON files
def _jsonable(value: Any) -> Any:
    """NaN/inf → None (JSON has no NaN), tuples → lists, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as indented, strict JSON (NaN becomes ``null``), atomically."""
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(_jsonable(data), indent=2, allow_nan=False) + "\n")


# ---------------------------------------------------------------------------------------------------- RNG states
def capture_rng() -> dict[str, Any]:
    """The global random states of torch (CPU and CUDA), NumPy and Python, as tensors and plain values.

    Returns:
        ``{"torch": ByteTensor, "cuda": [ByteTensor, ...] or None, "numpy": {...}, "python": {...}}``.
    """
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, state, gauss_next = random.getstate()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return {
        "torch": torch.get_rng_state(),
        "cuda": cuda,
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": int(version), "state": [int(s) for s in state], "gauss_next": gauss_next},
    }


def restore_rng(state: dict[str, Any]) -> None:
    """Set the global random states from :func:`capture_rng`'s output."""
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))


# ---------------------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: str | Path, checkpoint: dict[str, Any]) -> None:
    """``torch.save`` a checkpoint atomically (a reader never sees half a file); it holds :data:`CHECKPOINT_KEYS`."""
    missing = [k for k in CHECKPOINT_KEYS if k not in checkpoint]
    assert not missing, f"checkpoint lacks {missing}"
    with atomic_output(path) as tmp:
        torch.save(checkpoint, tmp)


def load_checkpoint(path: str | Path, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (``weights_only=True``: no code runs on load).

    Raises:
        FileNotFoundError: naming the path when it does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no checkpoint at {str(path)!r}; train first (h3de-lite train) or check the run folder"
        )
    return torch.load(path, map_location=map_location, weights_only=True)


def prepare_run_dir(run_dir: str | Path, *, resume: bool, overwrite: bool, clean: bool = True) -> Path:
    """Check (and create) a run folder: refuse one that holds another run unless resuming or overwriting.

    Args:
        run_dir: the folder.
        resume: continue the run in it (needs its ``last.pt``).
        overwrite: delete the run files in it (:data:`RUN_FILES`, nothing else) and start over.
        clean: whether this process deletes the files (``overwrite``) and creates the folder (rank 0 only).

    Returns:
        The folder as a ``Path``, created if needed.
    """
    if resume and overwrite:
        raise ValueError("resume=True and overwrite=True contradict each other; pass one of them")
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"run_dir {str(run_dir)!r} is a file; pass a folder")
    existing = [name for name in RUN_FILES if (run_dir / name).exists()]
    if resume:
        if not (run_dir / "last.pt").is_file():
            raise FileNotFoundError(
                f"cannot resume: {str(run_dir / 'last.pt')!r} does not exist; start the run without resume"
            )
    elif existing and not overwrite:
        raise ValueError(
            f"run_dir {str(run_dir)!r} already holds a run ({', '.join(existing)}); pass resume=True "
            "(h3de-lite train --resume) to continue it, overwrite=True (--overwrite) to replace it, or choose another "
            "run_dir"
        )
    elif existing and clean:
        for name in existing:
            (run_dir / name).unlink(missing_ok=True)
    if clean:
        run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


# ---------------------------------------------------------------------------------------------------- models
def _tuples(value: Any) -> Any:
    """JSON lists back to the tuples the model configs use, recursively."""
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return value


def build_model_from_config(model_config: dict[str, Any]) -> nn.Module:
    """Build the network a run's ``config.json`` describes (the ``model_config`` given to ``fit``).

    Two kinds:

    - ``{"kind": "h3de", "preset": "tiny", "num_landmarks": 14, "overrides": {"head": "anchor", ...}}``:
      :meth:`H3DENet.from_preset <h3de_lite.models.H3DENet.from_preset>` (``num_landmarks`` and ``overrides``
      optional).
    - ``{"kind": "baseline", "name": "unet3d", "size": "tiny", "num_landmarks": 14, "in_channels": 1}``:
      :func:`~h3de_lite.models.build_baseline` (all but ``name`` optional).

    Args:
        model_config: the description (JSON types: lists are turned back into tuples).

    Returns:
        A freshly initialised model; load weights with :func:`load_trained_model` or ``load_state_dict``.

    Shape:
        not a tensor function.

    Example:
        >>> build_model_from_config({"kind": "baseline", "name": "unet3d"})(torch.zeros(1, 1, 32, 32, 16)).shape
        torch.Size([1, 14, 32, 32, 16])
    """
    from h3de_lite.models import H3DENet, build_baseline

    if not isinstance(model_config, dict) or "kind" not in model_config:
        raise ValueError(
            f"model_config must be a dict with a 'kind' ('h3de' or 'baseline'), got {model_config!r}; e.g. "
            "{'kind': 'h3de', 'preset': 'tiny'}"
        )
    kind = model_config["kind"]
    allowed = {
        "h3de": {"kind", "preset", "num_landmarks", "overrides"},
        "baseline": {"kind", "name", "size", "num_landmarks", "in_channels"},
    }
    if kind not in allowed:
        raise ValueError(f"model_config kind must be 'h3de' or 'baseline', got {kind!r}")
    unknown = sorted(set(model_config) - allowed[kind])
    if unknown:
        raise ValueError(f"model_config of kind {kind!r} has unknown key(s) {unknown}; valid: {sorted(allowed[kind])}")
    if kind == "h3de":
        overrides = _tuples(dict(model_config.get("overrides") or {}))
        return H3DENet.from_preset(
            model_config.get("preset", "tiny"), num_landmarks=model_config.get("num_landmarks", 14), **overrides
        )
    if "name" not in model_config:
        raise ValueError("model_config of kind 'baseline' needs a 'name' ('unet3d', 'vnet' or 'resunet3d')")
    return build_baseline(
        model_config["name"],
        num_landmarks=model_config.get("num_landmarks", 14),
        in_channels=model_config.get("in_channels", 1),
        size=model_config.get("size", "tiny"),
    )


def load_trained_model(
    run_dir: str | Path, *, which: str = "best", map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a run's model from ``config.json`` and load the weights of ``best.pt`` or ``last.pt``.

    Args:
        run_dir: the run folder ``fit`` wrote.
        which: ``"best"`` (lowest validation MRE) or ``"last"``.
        map_location: where the checkpoint tensors go.

    Returns:
        ``(model in eval mode, checkpoint dict)``.
    """
    if which not in ("best", "last"):
        raise ValueError(f"which must be 'best' or 'last', got {which!r}")
    run_dir = Path(run_dir)
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"no run in {str(run_dir)!r} (config.json is missing); pass the folder fit wrote")
    config = json.loads(config_path.read_text())
    if config.get("model") is None:
        raise ValueError(
            f"{str(config_path)!r} has no model description (fit was called without model_config); build the model "
            "yourself and load the checkpoint's 'model' state dict"
        )
    path = run_dir / f"{which}.pt"
    if which == "best" and not path.is_file():
        raise FileNotFoundError(
            f"no {str(path)!r}: best.pt is written only by runs with validation data; use which='last'"
        )
    checkpoint = load_checkpoint(path, map_location=map_location)
    model = build_model_from_config(config["model"])
    model.load_state_dict(checkpoint["model"])
    return model.eval(), checkpoint
