"""Evaluation metrics of the paper (Sec. III): radial errors in mm, mean radial error (MRE), successful detection rate
(SDR), and precision / recall / F1 of the predicted existence of landmarks.

Every function accepts torch tensors and NumPy arrays alike. Errors are computed in millimetres with the (possibly
anisotropic) voxel spacing, so a 1-voxel error along a 1.25 mm slice axis counts 1.25 mm.

Explained in notebooks/06_anchors.ipynb (radial errors, MRE, SDR, existence F1).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from h3de_lite.data.case import validate_spacing

__all__ = ["radial_errors", "summarize", "existence_scores", "DEFAULT_THRESHOLDS_MM"]

DEFAULT_THRESHOLDS_MM: tuple[float, ...] = (2.0, 2.5, 3.0, 4.0)
"""SDR radii used in the paper's tables, in mm."""


def _to_numpy(x: Any, *, name: str) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().cpu().to(torch.float64).numpy()
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a numeric array or tensor ({err})") from None


def radial_errors(pred: Any, target: Any, spacing: Any) -> Any:
    """Euclidean distance in mm between predicted and true landmarks, per landmark.

    ``e = sqrt(Σ_a ((p_a - t_a) · s_a)²)`` with ``s`` the voxel spacing. The error is ``NaN`` where the target is
    missing (nothing to measure) and also where the prediction is missing (``NaN`` row: the model said "absent"); the
    latter is scored by :func:`existence_scores`, not by the MRE.

    Args:
        pred: predicted voxel coordinates ``(..., L, 3)``.
        target: true voxel coordinates ``(..., L, 3)``, ``NaN`` rows for missing landmarks.
        spacing: voxel size in mm, ``(3,)`` or one per case ``(B, 3)``.

    Shape:
        - pred, target: ``(B, L, 3)`` or ``(L, 3)``
        - output: ``(B, L)`` or ``(L,)``, same type (tensor or array) as ``pred``

    Example:
        >>> radial_errors(np.zeros((1, 2, 3)), np.ones((1, 2, 3)), [1.0, 1.0, 2.0]).shape
        (1, 2)
    """
    p, t, s = _to_numpy(pred, name="pred"), _to_numpy(target, name="target"), _to_numpy(spacing, name="spacing")
    if p.shape != t.shape or p.ndim < 2 or p.shape[-1] != 3:
        raise ValueError(f"pred and target must both have shape (B, L, 3) or (L, 3), got {p.shape} and {t.shape}")
    s = validate_spacing(s, per_case=True)
    if s.ndim == 2:
        if p.ndim != 3 or s.shape[0] != p.shape[0]:
            raise ValueError(f"per-case spacing {s.shape} needs pred of shape (B, L, 3) with B = {s.shape[0]}")
        s = s[:, None, :]
    err = np.sqrt((((p - t) * s) ** 2).sum(axis=-1))
    if isinstance(pred, Tensor):
        return torch.as_tensor(err, dtype=pred.dtype if pred.is_floating_point() else torch.float64, device=pred.device)
    return err


def _stats(errors: np.ndarray, thresholds: Sequence[float]) -> dict[str, Any]:
    valid = errors[~np.isnan(errors)]
    n = int(valid.size)
    return {
        "mre": float(valid.mean()) if n else float("nan"),
        "std": float(valid.std()) if n else float("nan"),
        "sdr": {float(r): (100.0 * float((valid <= r).mean()) if n else float("nan")) for r in thresholds},
        "n": n,
    }


def summarize(
    errors: Any,
    *,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS_MM,
    names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """MRE ± SD (mm) and SDR (%) over all valid errors, and the same per landmark.

    ``MRE = mean(e)``, ``std`` = population standard deviation (``ddof=0``), ``SDR_r = 100 · #{e ≤ r} / #e``. ``NaN``
    errors (missing target or missing prediction) are left out of every statistic; ``n`` counts the errors used.

    Args:
        errors: radial errors in mm, ``(B, L)`` or ``(L,)`` (e.g. from :func:`radial_errors`).
        thresholds: SDR radii in mm (default 2, 2.5, 3, 4 as in the paper).
        names: landmark names for the per-landmark table (default ``"0"``, ``"1"``, …).

    Returns:
        ``{"mre", "std", "sdr": {radius: percent}, "n", "per_landmark": {name: {"mre", "std", "sdr", "n"}}}``.

    Example:
        >>> summarize(np.array([[1.0, 3.0]]))["sdr"][2.0]
        50.0
    """
    e = _to_numpy(errors, name="errors")
    if e.ndim == 1:
        e = e[None]
    if e.ndim != 2:
        raise ValueError(f"errors must have shape (B, L) or (L,), got {e.shape}")
    if np.any(e[~np.isnan(e)] < 0):
        raise ValueError("errors must be non-negative distances in mm")
    if any(not np.isfinite(r) or r <= 0 for r in thresholds):
        raise ValueError(f"thresholds must be positive radii in mm, got {list(thresholds)}")
    if names is None:
        names = [str(i) for i in range(e.shape[1])]
    if len(names) != e.shape[1]:
        raise ValueError(f"got {len(names)} names for {e.shape[1]} landmarks")
    out = _stats(e.ravel(), thresholds)
    out["per_landmark"] = {name: _stats(e[:, i], thresholds) for i, name in enumerate(names)}
    return out


def _as_bool(x: Any, *, name: str) -> np.ndarray:
    """Booleans as a bool array; 0/1 numbers are accepted, anything else (probabilities, NaN) is refused."""
    a = np.asarray(x.detach().cpu() if isinstance(x, Tensor) else x)
    if a.dtype == np.bool_:
        return a
    if np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating):
        bad = a[(a != 0) & (a != 1)]  # NaN compares unequal to both
        if bad.size == 0:
            return a.astype(bool)
        found = f"values such as {bad.ravel()[:3].tolist()}"
    else:
        found = f"dtype {a.dtype}"
    raise ValueError(
        f"{name} must be booleans (or 0/1), got {found}; threshold probabilities first, e.g. `probabilities >= 0.5`"
    )


def existence_scores(pred_present: Any, true_present: Any) -> dict[str, float]:
    """Precision, recall and F1 of predicted landmark existence, with "present" as the positive class.

    ``precision = TP / (TP + FP)``, ``recall = TP / (TP + FN)``, ``F1 = 2PR / (P + R)``; also ``accuracy`` and the
    counts. A ratio with an empty denominator is ``NaN``.

    Args:
        pred_present: predicted existence, booleans (or 0/1 numbers). Threshold probabilities first
            (``probabilities >= 0.5``): a probability or ``NaN`` raises ``ValueError`` instead of counting as present.
        true_present: true existence, booleans (or 0/1 numbers).

    Shape:
        - pred_present, true_present: boolean, same shape (e.g. ``(B, L)``)

    Example:
        >>> existence_scores([[True, False]], [[True, True]])["recall"]
        0.5
    """
    p, t = _as_bool(pred_present, name="pred_present"), _as_bool(true_present, name="true_present")
    if p.shape != t.shape:
        raise ValueError(f"pred_present and true_present must have the same shape, got {p.shape} and {t.shape}")
    tp, fp = int((p & t).sum()), int((p & ~t).sum())
    fn, tn = int((~p & t).sum()), int((~p & ~t).sum())

    def ratio(a: int, b: int) -> float:
        return a / b if b else float("nan")

    precision, recall = ratio(tp, tp + fp), ratio(tp, tp + fn)
    f1 = 2 * precision * recall / (precision + recall) if (precision + recall) > 0 else float("nan")
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "accuracy": ratio(tp + tn, tp + fp + fn + tn),
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
    }
