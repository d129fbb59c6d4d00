"""Evaluation on whole volumes (paper Sec. III): radial errors in mm, MRE ± SD, SDR, existence precision/recall/F1.

One object, :class:`Predictor`, holds a trained model in eval mode and the preprocessing it was trained with (target
voxel size, HU window, sliding-window size, how its heatmaps decode). :func:`load_predictor` builds it from a run
folder or a packaged model (:mod:`h3de_lite.pretrained`); :func:`evaluate` (``h3de-lite evaluate``) and
:func:`predict_files` (``h3de-lite predict``) both call :meth:`Predictor.predict`, so the two give the same
coordinates for the same image. Per image:

1. read the stored volume (HU) and its voxel → world affine; the labels, when evaluating, are read separately and
   never reach the predictor;
2. resample to the run's voxel size (if it had one) and window to [0, 255], as in training;
3. :func:`h3de_lite.inference.predict_volume` on the whole volume (never a crop chosen from the ground truth);
4. map the coordinates back to the stored volume's voxels (:func:`~h3de_lite.data.transforms.to_source_voxels`)
   and to world mm through its affine.

Errors are measured in the stored volume's spacing. Scoring, per (case, landmark): a present landmark predicted
present gets a radial error (MRE, SDR); a landmark predicted on a missing tooth is an existence false positive (no
error: nothing to measure against); a present landmark predicted missing is a false negative, gets no radial error and
is counted (``n_missed``, and in the recall). Cases are grouped like the paper's Table I: ``complete`` (every
landmark present), ``incomplete`` (some missing) and ``all``.

Explained in notebooks/07_evaluation.ipynb.
"""

from __future__ import annotations

import csv
import io
import json
import math
import pickle
import re
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from h3de_lite.data.case import Case
from h3de_lite.data.images import read_image, strip_image_suffix
from h3de_lite.data.landmarks import LANDMARK_NAMES
from h3de_lite.data.markups import MARKUPS_SCHEMA, read_markups
from h3de_lite.data.mml import list_mml_cases, read_mml_case
from h3de_lite.data.nifti import reorient_to_ras, spacing_from_affine, voxel_to_world, world_to_voxel
from h3de_lite.data.transforms import (
    DEFAULT_WINDOW,
    normalize_intensity,
    percentile_normalize,
    resample,
    spacing3,
    to_source_voxels,
)
from h3de_lite.files import atomic_output
from h3de_lite.metrics import DEFAULT_THRESHOLDS_MM, existence_scores, radial_errors, summarize
from h3de_lite.tta import TTA_MODES, with_tta

__all__ = [
    "LABEL_SUFFIXES",
    "PAPER_TABLE_I",
    "SUBSETS",
    "CaseFiles",
    "CaseResult",
    "EvaluationResult",
    "FilePrediction",
    "Predictor",
    "evaluate",
    "find_cases",
    "format_paper_table",
    "format_table",
    "load_labeled_case",
    "load_predictor",
    "predict_files",
    "summarize_cases",
    "write_prediction",
]

SUBSETS: tuple[str, str, str] = ("complete", "incomplete", "all")
"""The case groups of the paper's Table I: every landmark present, some missing, and both together."""

LABEL_SUFFIXES: tuple[str, ...] = (".mrk.json", ".fcsv", ".csv")
"""Landmark files looked for beside ``<id>.nii.gz`` / ``<id>.nrrd``, in this order (:func:`read_markups` formats)."""


# TODO(lead): fill in from Table I of Huang et al., "H3DE-Net: Efficient and Accurate 3D Landmark Detection in Medical
# Imaging", IEEE BIBM 2025 (arXiv:2502.14221), copying the printed values exactly and nothing else. Form:
#   {"citation": "Huang et al., IEEE BIBM 2025, Table I",
#    "rows": {"H3DE-Net (anchor-based)": {"complete": {"mre": ..., "std": ..., "sdr": {"2.0": ..., "2.5": ...,
#             "3.0": ..., "4.0": ...}}, "incomplete": {...}, "all": {...}}, ...}}
# A value the table does not report (e.g. existence precision/recall/F1) is left out and prints as "n/a". The paper
# could not be read when this module was written, so no number is given here: never type one from memory.
PAPER_TABLE_I: dict[str, Any] | None = None
"""The paper's Table I numbers for printing beside ours (``h3de-lite evaluate --paper``); ``None`` until copied from
the paper with its citation (see the TODO above). They are only ever shown in their own, labelled table."""


# ---------------------------------------------------------------------------------------------------- predictor
def _decoding_network(model: nn.Module, heatmap_loss: str) -> nn.Module:
    """The module whose outputs are decoded: the model, or ``exp(logits)`` of a ``softmax_ce`` model, exactly as the
    training engine's validation decodes it (:class:`h3de_lite.training.engine.ExpHeatmaps`)."""
    if heatmap_loss == "softmax_ce":
        from h3de_lite.training.engine import ExpHeatmaps

        return ExpHeatmaps(model)
    return model


@dataclass(frozen=True, kw_only=True)
class Predictor:
    """A trained model in eval mode plus the preprocessing of its training run: one image in, landmarks out.

    :meth:`predict` resamples the stored volume to ``spacing`` (if set), maps it to [0, 255] (the HU ``window``, or
    the volume's own ``percentiles`` for MRI), runs :func:`h3de_lite.inference.predict_volume` on the whole volume and
    maps the result back to the stored volume's voxel grid. It sees the image and its voxel size only, never
    landmarks.

    Args:
        model: heatmap model or anchor model (the engine's output contract), on its device, in eval mode.
        spacing: voxel size in mm the run trained at (``--spacing``), ``(3,)``; ``None``: the stored grid.
        window: HU window mapped to [0, 255] (:func:`~h3de_lite.data.transforms.normalize_intensity`); ``None``:
            the stored intensities already are in [0, 255].
        percentiles: instead of ``window``, the volume's own ``(p0, p1)`` percentiles go to 0 and 255
            (:func:`~h3de_lite.data.transforms.percentile_normalize`; images without a physical scale, e.g. T1w MRI,
            as :class:`~h3de_lite.data.atlas.AtlasDataset` trains); ``None``: use ``window``.
        roi_size: sliding-window size ``(D, H, W)``; ``None``: the model's ``input_size``.
        heatmap_loss: the run's ``TrainConfig.heatmap_loss``; ``"softmax_ce"`` models decode ``exp(logits)``.
        method: heatmap decoding, ``"subvoxel"`` or ``"argmax"`` (eq. 2).
        threshold: presence threshold of the decoder; ``None``: its default (heatmaps: every landmark present, eq. 2;
            anchor head: existence probability ≥ 0.5, eq. 8).
        overlap: sliding-window overlap.
        strategy: whole-volume inference, ``"sliding"`` (Gaussian-blended windows) or ``"coarse_to_fine"``
            (:func:`h3de_lite.inference.predict_volume`).
        amp: mixed precision on CUDA.
        names: landmark names, one per output channel.
        source: where the model came from (shown in tables).
        tta: test-time augmentation (:mod:`h3de_lite.tta`): ``"none"``, or ``"flip"`` (every window averaged with
            its left–right mirror image, L/R landmark channels swapped; twice the time).
        orientation: ``"RAS"``: before anything else, permute and flip the stored array to the closest RAS axis order
            (:func:`~h3de_lite.data.nifti.reorient_to_ras`, exact), as the model was trained (MRI stored LPS, LAS or
            with permuted axes); :meth:`predict` then needs the image ``affine``. ``None``: the array as stored.

    Shape:
        :meth:`predict`: volume ``(D, H, W)`` → coords ``(L, 3)``, present ``(L,)``, score ``(L,)``.

    Example:
        >>> predictor = Predictor(model=nn.Conv3d(1, 2, 1), names=("a", "b"), window=None, roi_size=(64, 64, 32))
        >>> coords, present, score = predictor.predict(np.zeros((40, 40, 24), np.float32), spacing=(1.0, 1.0, 2.0))
        >>> coords.shape
        (2, 3)
    """

    model: nn.Module
    spacing: tuple[float, float, float] | None = None
    window: tuple[float, float] | None = DEFAULT_WINDOW
    percentiles: tuple[float, float] | None = None
    roi_size: tuple[int, int, int] | None = None
    heatmap_loss: str = "mse"
    method: str = "subvoxel"
    threshold: float | None = None
    overlap: float = 0.25
    strategy: str = "sliding"
    amp: bool = False
    names: tuple[str, ...] = LANDMARK_NAMES
    source: str = "model"
    orientation: str | None = None
    tta: str = "none"

    def __post_init__(self) -> None:
        if self.orientation not in (None, "RAS"):
            raise ValueError(f"orientation must be None or 'RAS', got {self.orientation!r}")
        if self.tta not in TTA_MODES:
            raise ValueError(f"tta must be one of {TTA_MODES}, got {self.tta!r}")
        if self.spacing is not None:
            object.__setattr__(self, "spacing", tuple(float(s) for s in spacing3(self.spacing, what="spacing")))
        if self.window is not None:
            window = tuple(float(w) for w in self.window)
            normalize_intensity(np.zeros(1), window=window)  # validates (low < high, finite)
            object.__setattr__(self, "window", window)
        if self.percentiles is not None:
            percentiles = tuple(float(p) for p in self.percentiles)
            percentile_normalize(np.zeros(2), percentiles=percentiles)  # validates (0 <= p0 < p1 <= 100)
            object.__setattr__(self, "percentiles", percentiles)
        if self.roi_size is not None:
            object.__setattr__(self, "roi_size", tuple(int(s) for s in self.roi_size))
        if self.heatmap_loss not in ("mse", "softmax_ce"):
            raise ValueError(f"heatmap_loss must be 'mse' or 'softmax_ce', got {self.heatmap_loss!r}")
        if self.method not in ("subvoxel", "argmax"):
            raise ValueError(f"method must be 'subvoxel' or 'argmax', got {self.method!r}")
        object.__setattr__(self, "names", tuple(self.names))

    @property
    def network(self) -> nn.Module:
        """The module given to ``predict_volume``: the model, mirror-averaged when ``tta="flip"`` (on the logits of a
        ``softmax_ce`` model), then ``exp`` of the logits for ``softmax_ce`` models."""
        return _decoding_network(with_tta(self.model, self.tta, names=self.names), self.heatmap_loss)

    def predict(
        self,
        volume: np.ndarray,
        spacing: Sequence[float],
        *,
        affine: np.ndarray | None = None,
        progress: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Landmarks of one stored volume, in that volume's voxel coordinates.

        Args:
            volume: ``(D, H, W)`` intensities as stored (HU for CT).
            spacing: its voxel size in mm, ``(3,)``.
            affine: its voxel → world matrix; needed (and only used) with ``orientation="RAS"``, where the voxel
                size is then read from it (the reoriented array's).
            progress: progress bar over the sliding windows.

        Returns:
            ``(coords (L, 3) float64 voxel coordinates of volume, NaN rows where absent; present (L,) bool;
            score (L,) float64)``.

        Shape:
            volume ``(D, H, W)`` → coords ``(L, 3)``, present ``(L,)``, score ``(L,)``.
        """
        from h3de_lite.inference import predict_volume

        if self.orientation == "RAS":  # STEP 0: the array in the axis order the model was trained on
            if affine is None:
                raise ValueError(f"{self.source} was trained on RAS-ordered arrays and needs the image affine to "
                                 "reorient the scan; pass affine= (evaluate and predict_files do)")  # fmt: skip
            stored_affine = np.asarray(affine, dtype=np.float64)
            volume, ras_affine = reorient_to_ras(volume, stored_affine)
            coords, present, score = replace(self, orientation=None).predict(
                volume, spacing_from_affine(ras_affine), progress=progress
            )
            return world_to_voxel(voxel_to_world(coords, ras_affine), stored_affine), present, score
        # STEP 1: the image alone (a Case without landmarks), resampled to the run's voxel size
        image_only = Case(volume=volume, landmarks=np.full((0, 3), np.nan), spacing=spacing, names=())
        grid = resample(image_only, spacing=self.spacing, order=1)
        # STEP 2: intensities as in training: HU window (or the volume's percentiles) → [0, 255]
        if self.percentiles is not None:
            image = percentile_normalize(grid.volume, percentiles=self.percentiles)
        elif self.window is None:
            image = np.asarray(grid.volume, dtype=np.float32)
        else:
            image = normalize_intensity(grid.volume, window=self.window)
        # STEP 3: whole-volume inference
        coords, present, score = predict_volume(
            self.network,
            torch.from_numpy(np.ascontiguousarray(image))[None],  # (1, D, H, W) in [0, 255]
            roi_size=self.roi_size,
            overlap=self.overlap,
            strategy=self.strategy,
            method=self.method,
            threshold=self.threshold,
            amp=self.amp,
            progress=progress,
        )
        coords = coords.detach().cpu().to(torch.float64).numpy()
        if coords.shape != (len(self.names), 3):
            raise ValueError(
                f"the model predicts {coords.shape[0]} landmarks but the predictor names {len(self.names)} "
                f"({', '.join(self.names)}); pass names= with one name per output channel"
            )
        # STEP 4: back to the stored volume's voxels
        if self.spacing is not None:
            coords = to_source_voxels(
                coords, origin=np.zeros(3), spacing=grid.spacing, source_spacing=image_only.spacing
            )
        present_np = present.detach().cpu().numpy().astype(bool)
        score_np = score.detach().cpu().to(torch.float64).numpy()
        return coords, present_np, score_np


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"could not read {str(path)!r}: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{str(path)!r} must hold a JSON object, got {type(data).__name__}")
    return data


def _resolve_source(source: str | Path) -> tuple[Path, str]:
    """A run folder (a ``Path``, or a string naming an existing path or holding a separator) or a pretrained name."""
    from h3de_lite import pretrained

    text = str(source)
    if isinstance(source, Path) or Path(text).exists() or "/" in text or "\\" in text:
        path = Path(source)
        packaged = path.resolve().parent == pretrained.WEIGHTS_DIR.resolve()
        return path, f"pretrained {path.name}" if packaged else f"run {text}"
    return pretrained.weights_path(text), f"pretrained {text}"


def load_predictor(
    source: str | Path,
    *,
    which: str = "best",
    device: str | torch.device = "auto",
    threshold: float | None = None,
    method: str | None = None,
    roi_size: Sequence[int] | None = None,
    overlap: float = 0.5,
    strategy: str | None = None,
    amp: bool = False,
    tta: str | None = None,
) -> Predictor:
    """The :class:`Predictor` of a run folder or of a packaged pretrained model, with the run's preprocessing.

    ``source`` is a run folder when it is a ``Path``, an existing path or a string with a path separator; otherwise a
    name of :func:`h3de_lite.pretrained.available`. From the run's ``config.json``:

    - ``"data"`` (written by ``h3de-lite train``): ``spacing`` (mm, a number or three, or ``null``), ``window`` (HU
      pair, or ``null`` for data already in [0, 255]), ``crop`` (training crop); optionally ``percentiles`` (the
      intensity normalisation of MRI runs, replacing ``window``), ``names`` (one landmark name per output channel,
      e.g. the 32 AFIDs; default: the 14 MML names, or ``P0 …`` for another count) and ``orientation`` (``"RAS"``:
      reorient every scan first, see :class:`Predictor`). Runs without the block (older runs,
      ``fit`` called directly) fall back to no resampling and :data:`~h3de_lite.data.transforms.DEFAULT_WINDOW`, the
      defaults of :class:`~h3de_lite.data.LandmarkDataset`.
    - ``"train"``: ``heatmap_loss`` (``softmax_ce`` models decode ``exp(logits)``, as validation does),
      ``val_method``, ``val_strategy``, ``val_roi_size`` (the sliding window; else the model's ``input_size``, else
      the crop rounded up to a multiple of 32).
    - ``"inference"`` (optional): ``tta``, the run's test-time augmentation (``h3de-lite train`` writes the recipe's,
      ``"flip"`` for the ``tiny`` recipe); ``"none"`` when absent.

    Args:
        source: run folder or pretrained name.
        which: checkpoint, ``"best"`` (lowest validation MRE) or ``"last"``.
        device: ``"auto"`` (CUDA, else MPS, else CPU), ``"cpu"``, ``"cuda"``, ``"mps"`` or a ``torch.device``.
        threshold: presence threshold (``None``: the decoder's default).
        method: heatmap decoding (``None``: the run's ``val_method``).
        roi_size: sliding-window size (``None``: see above).
        overlap: sliding-window overlap; 0.5 by default, which on phantom v2 test volumes was clearly more accurate
            than 0.25 (training validation's, cheaper) at 2.4× the time (book/benchmark_training.md).
        strategy: ``"sliding"`` or ``"coarse_to_fine"`` whole-volume inference (``None``: the run's
            ``val_strategy``, else ``"sliding"``).
        amp: mixed precision on CUDA.
        tta: ``"none"`` or ``"flip"`` (:class:`Predictor`; ``None``: the run's ``inference.tta``, else ``"none"``).

    Raises:
        FileNotFoundError: the run folder, its ``config.json`` or the checkpoint is missing.
        ValueError: unknown pretrained name, unreadable config or checkpoint.

    Shape:
        not a tensor function.

    Example:
        >>> predictor = load_predictor("runs/tiny")  # doctest: +SKIP
        >>> predictor.predict(case.volume, case.spacing)[0].shape  # doctest: +SKIP
        (14, 3)
    """
    from h3de_lite.training.checkpoint import load_trained_model
    from h3de_lite.training.engine import resolve_device

    run_dir, label = _resolve_source(source)
    if not run_dir.is_dir():
        raise FileNotFoundError(
            f"run folder {str(run_dir)!r} does not exist; pass the folder `h3de-lite train --out` wrote"
        )
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"no run in {str(run_dir)!r} (config.json is missing); pass the folder fit wrote")
    config = _read_json(config_path)
    train = config.get("train") or {}
    data = config.get("data") or {}
    try:
        model, _ = load_trained_model(run_dir, which=which, map_location="cpu")
    except (RuntimeError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise ValueError(f"could not load the {which} checkpoint of {str(run_dir)!r}: {exc}") from exc
    target = device if isinstance(device, torch.device) else resolve_device(str(device))
    model = model.to(target).eval()

    crop = data.get("crop")
    if roi_size is None:
        roi_size = train.get("val_roi_size")
    if roi_size is None and getattr(model, "input_size", None) is None and crop is not None:
        roi_size = [max(32, math.ceil(int(c) / 32) * 32) for c in crop]
    names = LANDMARK_NAMES
    num = (config.get("model") or {}).get("num_landmarks", len(LANDMARK_NAMES))
    if num != len(LANDMARK_NAMES):
        names = tuple(f"P{i}" for i in range(int(num)))
    if data.get("names") is not None:  # runs on other landmark sets (e.g. the 32 AFIDs) record their names
        names = tuple(str(n) for n in data["names"])
        if len(names) != int(num) or len(set(names)) != len(names):
            raise ValueError(f"{str(config_path)!r}: data.names holds {len(names)} names (unique: "
                             f"{len(set(names))}) for a model of {num} landmarks; give one unique name per output "
                             "channel")  # fmt: skip
    return Predictor(
        model=model,
        spacing=data.get("spacing"),
        window=data["window"] if "window" in data else DEFAULT_WINDOW,
        percentiles=data.get("percentiles"),
        orientation=data.get("orientation"),
        roi_size=roi_size,
        heatmap_loss=train.get("heatmap_loss", "mse"),
        method=method or train.get("val_method", "subvoxel"),
        threshold=threshold,
        overlap=overlap,
        strategy=strategy or train.get("val_strategy", "sliding"),
        amp=amp and target.type == "cuda",
        names=names,
        source=f"{label} ({which}.pt)",
        tta=tta or (config.get("inference") or {}).get("tta", "none"),
    )


# ---------------------------------------------------------------------------------------------------- reading cases
def load_labeled_case(
    image_path: str | Path, label_path: str | Path, *, names: Sequence[str] = LANDMARK_NAMES
) -> Case:
    """An image (:func:`read_image`) and its landmarks (``.mrk.json``, ``.fcsv`` or ``.csv``, world mm) as a Case.

    Landmarks go through the inverse affine to voxel coordinates; a name absent from the file, or not defined in it
    (e.g. ``positionStatus: "missing"``), is a missing landmark (``NaN`` row).

    Args:
        image_path: NIfTI or NRRD image.
        label_path: landmark file, read with :func:`~h3de_lite.data.markups.read_markups`.
        names: landmark names giving the row order.

    Raises:
        ValueError: labels that are not in ``names``, or landmarks outside the volume.

    Shape:
        output ``Case`` with landmarks ``(L, 3)``.

    Example:
        >>> import tempfile
        >>> from h3de_lite.data import write_markups, write_nifti
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     write_nifti(f"{folder}/0001.nii.gz", np.zeros((16, 16, 8), np.int16), np.eye(4))
        ...     write_markups(f"{folder}/0001.csv", {"La": np.array([4.0, 5.0, 6.0])})
        ...     load_labeled_case(f"{folder}/0001.nii.gz", f"{folder}/0001.csv").landmarks.shape
        (14, 3)
    """
    image = read_image(image_path)
    label_path = Path(label_path)
    points = read_markups(label_path)
    names = tuple(names)
    unknown = sorted(set(points) - set(names))
    if unknown:
        raise ValueError(f"landmark file {str(label_path)!r} has unknown labels {unknown}; expected labels among "
                         f"{', '.join(names)}")  # fmt: skip
    world = np.full((len(names), 3), np.nan)
    for row, name in enumerate(names):
        if name in points:
            world[row] = points[name]
    try:
        return Case(volume=image.volume, landmarks=world_to_voxel(world, image.affine), spacing=image.spacing,
                    case_id=image.case_id, affine=image.affine, names=names)  # fmt: skip
    except ValueError as exc:
        raise ValueError(f"landmarks of {str(label_path)!r} do not fit image {str(image_path)!r}: {exc}") from exc


@dataclass(frozen=True)
class CaseFiles:
    """Where one evaluation case lives: ``layout`` ``"mml"`` (``folder/<id>_volume.nrrd`` + label + spacing) or
    ``"files"`` (an image and a landmark file)."""

    case_id: str
    layout: str
    folder: Path
    image: Path | None = None
    labels: Path | None = None

    def load(self, names: Sequence[str] = LANDMARK_NAMES) -> Case:
        """Read the case (volume, spacing, affine and landmarks)."""
        if self.layout == "mml":
            return read_mml_case(self.folder, self.case_id)
        assert self.image is not None and self.labels is not None
        return load_labeled_case(self.image, self.labels, names=names)


def find_cases(root: str | Path, split: str = "test") -> list[CaseFiles]:
    """The evaluation cases of ``root / split``, in either accepted layout.

    - MML layout (the folder holds ``<id>_label.npy`` files): ``<id>_volume.nrrd`` + ``<id>_label.npy`` +
      ``<id>_spacing.npy`` (:func:`~h3de_lite.data.mml.list_mml_cases`).
    - Image files: every ``<id>.nii.gz`` / ``<id>.nii`` / ``<id>.nrrd`` with landmarks in ``<id>.mrk.json``,
      ``<id>.fcsv`` or ``<id>.csv`` (world mm; :data:`LABEL_SUFFIXES`, first found wins).

    ``split="."`` evaluates ``root`` itself.

    Raises:
        FileNotFoundError: no such folder, or an image without a landmark file.
        ValueError: a folder without cases.

    Shape:
        not a tensor function.

    Example:
        >>> find_cases("data", "test")[0].case_id  # doctest: +SKIP
        '0000'
    """
    root = Path(root)
    folder = root / split
    if not folder.is_dir():
        found = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        where = f"found sub-folders: {found}" if root.is_dir() else f"{str(root)!r} does not exist"
        raise FileNotFoundError(f"evaluation folder {str(folder)!r} does not exist ({where}); pass --data DIR with a "
                                f"{split}/ folder, or --split . for a flat folder of images")  # fmt: skip
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".tmp-"))
    if any(p.name.endswith("_label.npy") for p in files):
        cases = [CaseFiles(case_id=c, layout="mml", folder=folder) for c in list_mml_cases(root, split)]
    else:
        cases = []
        for image in files:
            stem = strip_image_suffix(image.name)
            if stem is None:
                continue
            labels = next((folder / f"{stem}{s}" for s in LABEL_SUFFIXES if (folder / f"{stem}{s}").is_file()), None)
            if labels is None:
                raise FileNotFoundError(
                    f"image {str(image)!r} has no landmark file; put {stem}.mrk.json, {stem}.fcsv or {stem}.csv "
                    "(world coordinates in mm) beside it"
                )
            cases.append(CaseFiles(case_id=stem, layout="files", folder=folder, image=image, labels=labels))
    if not cases:
        raise ValueError(
            f"no evaluation cases in {str(folder)!r}: expected MML files (<id>_volume.nrrd, <id>_label.npy, "
            "<id>_spacing.npy) or images (<id>.nii.gz, <id>.nrrd) with landmark files (<id>.mrk.json, .fcsv, .csv)"
        )
    ids = [c.case_id for c in cases]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"{str(folder)!r} holds several images for case(s) {dup}; keep one image per case")
    return cases


# ---------------------------------------------------------------------------------------------------- scoring
@dataclass(frozen=True)
class CaseResult:
    """One evaluated case: prediction, ground truth and errors, in the stored volume's voxels and mm.

    Shape:
        coords, world, truth ``(L, 3)``; present, true_present, score, errors ``(L,)``; spacing ``(3,)``.
    """

    case_id: str
    coords: np.ndarray  # predicted voxel coordinates of the stored volume, NaN rows where predicted absent
    world: np.ndarray  # the same in world RAS mm (through the image affine)
    present: np.ndarray  # predicted existence
    score: np.ndarray
    truth: np.ndarray  # true voxel coordinates, NaN rows for missing landmarks
    true_present: np.ndarray
    errors: np.ndarray  # radial errors in mm; NaN unless both true and predicted present
    spacing: np.ndarray

    @property
    def subset(self) -> str:
        """``"complete"`` when every landmark is present in the labels, else ``"incomplete"``."""
        return "complete" if bool(self.true_present.all()) else "incomplete"


def _score_case(case: Case, predictor: Predictor, *, progress: bool = False) -> CaseResult:
    coords, present, score = predictor.predict(case.volume, case.spacing, affine=case.affine,
                                               progress=progress)  # labels never passed
    if coords.shape != case.landmarks.shape:
        raise ValueError(f"case {case.case_id!r}: the model predicts {coords.shape[0]} landmarks but the labels hold "
                         f"{case.landmarks.shape[0]}")  # fmt: skip
    coords = np.where(present[:, None], coords, np.nan)  # a landmark called absent has no position
    errors = np.asarray(radial_errors(coords, case.landmarks, case.spacing), dtype=np.float64)
    return CaseResult(
        case_id=case.case_id, coords=coords, world=voxel_to_world(coords, case.affine), present=present, score=score,
        truth=case.landmarks.copy(), true_present=case.present, errors=errors, spacing=case.spacing.copy(),
    )  # fmt: skip


def _none(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def _sdr_dict(sdr: dict[float, float], thresholds: Sequence[float]) -> dict[str, float | None]:
    return {str(float(t)): _none(sdr[float(t)]) for t in thresholds}


def _subset_summary(cases: Sequence[CaseResult], names: Sequence[str], thresholds: Sequence[float]) -> dict[str, Any]:
    keys = [str(float(t)) for t in thresholds]
    if not cases:
        return {
            "n_cases": 0, "mre": None, "std": None, "sdr": dict.fromkeys(keys), "n_errors": 0, "n_missed": 0,
            "existence": {"precision": None, "recall": None, "f1": None, "tp": 0, "fp": 0, "fn": 0, "tn": 0},
            "per_landmark": {},
        }  # fmt: skip
    errors = np.stack([c.errors for c in cases])  # (B, L)
    stats = summarize(errors, thresholds=thresholds, names=names)
    exist = existence_scores(np.stack([c.present for c in cases]), np.stack([c.true_present for c in cases]))
    return {
        "n_cases": len(cases),
        "mre": _none(stats["mre"]),
        "std": _none(stats["std"]),
        "sdr": _sdr_dict(stats["sdr"], thresholds),
        "n_errors": int(stats["n"]),
        "n_missed": int(exist["fn"]),
        "existence": {
            "precision": _none(exist["precision"]),
            "recall": _none(exist["recall"]),
            "f1": _none(exist["f1"]),
            **{k: int(exist[k]) for k in ("tp", "fp", "fn", "tn")},
        },
        "per_landmark": {
            name: {"n": int(s["n"]), "mre": _none(s["mre"]), "std": _none(s["std"]),
                   "sdr": _sdr_dict(s["sdr"], thresholds)}  # fmt: skip
            for name, s in stats["per_landmark"].items()
        },
    }


def summarize_cases(
    cases: Sequence[CaseResult],
    *,
    names: Sequence[str] = LANDMARK_NAMES,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS_MM,
) -> dict[str, dict[str, Any]]:
    """Table I statistics of evaluated cases for the ``complete``, ``incomplete`` and ``all`` subsets.

    Per subset: ``n_cases``; ``mre`` and ``std`` (mm, population SD over every radial error of the subset, as
    :func:`~h3de_lite.metrics.summarize`); ``sdr`` (``{"2.0": percent, ...}``, the radius in mm as a string key);
    ``existence`` (``precision``, ``recall``, ``f1`` of "present", plus the counts ``tp, fp, fn, tn``); ``n_errors``
    (radial errors counted), ``n_missed`` (present landmarks predicted absent: no error, counted as false negatives)
    and ``per_landmark`` (``{name: {"n", "mre", "std", "sdr"}}``). A subset without cases holds ``n_cases: 0`` and
    ``None`` (JSON ``null``) for every statistic; an undefined ratio (e.g. precision with no predicted landmark) is
    ``None`` too.

    Args:
        cases: results of :func:`evaluate`.
        names: landmark names (per-landmark keys).
        thresholds: SDR radii in mm.

    Shape:
        not a tensor function.

    Example:
        >>> summarize_cases([])["all"]["n_cases"]
        0
    """
    groups = {"complete": [c for c in cases if c.subset == "complete"],
              "incomplete": [c for c in cases if c.subset == "incomplete"], "all": list(cases)}  # fmt: skip
    return {subset: _subset_summary(groups[subset], names, thresholds) for subset in SUBSETS}


# ---------------------------------------------------------------------------------------------------- tables
def _fmt(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _table_rows(label: str, summary: dict[str, Any], thresholds: Sequence[float]) -> list[str]:
    rows = []
    for subset in SUBSETS:
        s = summary.get(subset) or {}
        mre, std = s.get("mre"), s.get("std")
        mre_text = "n/a" if mre is None else f"{mre:.2f} ± {_fmt(std, 2)}"
        sdr = s.get("sdr") or {}
        exist = s.get("existence") or {}
        cells = [label, subset, str(s.get("n_cases", "n/a")), mre_text,
                 *(_fmt(sdr.get(str(float(t))), 1) for t in thresholds),
                 *(_fmt(exist.get(k), 3) for k in ("precision", "recall", "f1"))]  # fmt: skip
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def _table_header(thresholds: Sequence[float]) -> list[str]:
    cols = ["Model", "Subset", "Cases", "MRE ± SD (mm)", *(f"SDR {float(t):g} mm (%)" for t in thresholds),
            "Precision", "Recall", "F1"]  # fmt: skip
    align = ["---", "---", "---:", "---:", *("---:" for _ in thresholds), "---:", "---:", "---:"]
    return ["| " + " | ".join(cols) + " |", "| " + " | ".join(align) + " |"]


def format_table(
    summary: dict[str, Any], *, label: str = "ours", thresholds: Sequence[float] = DEFAULT_THRESHOLDS_MM
) -> str:
    """Our results as a Markdown table laid out like the paper's Table I: one row per subset.

    Columns: cases, MRE ± SD (mm), SDR at each radius (%), existence precision, recall and F1; ``n/a`` for ``None``.

    Args:
        summary: :func:`summarize_cases` output (or the JSON ``evaluate`` writes).
        label: the model column (e.g. the run folder).
        thresholds: SDR radii in mm (columns).

    Shape:
        not a tensor function.

    Example:
        >>> print(format_table(summarize_cases([])).splitlines()[2])
        | ours | complete | 0 | n/a | n/a | n/a | n/a | n/a | n/a | n/a | n/a |
    """
    return "\n".join([*_table_header(thresholds), *_table_rows(label, summary, thresholds)])


def format_paper_table(
    paper: dict[str, Any] | None = None, *, thresholds: Sequence[float] = DEFAULT_THRESHOLDS_MM
) -> str:
    """The paper's Table I numbers as their own, labelled Markdown table (never merged with ours).

    Args:
        paper: ``{"citation": str, "rows": {method: {subset: {"mre", "std", "sdr", "existence"}}}}``;
            default :data:`PAPER_TABLE_I`. ``None`` gives a one-line "not available" note.
        thresholds: SDR radii in mm (columns).

    Shape:
        not a tensor function.

    Example:
        >>> format_paper_table(None).startswith("Paper's Table I: not available")
        True
    """
    paper = PAPER_TABLE_I if paper is None else paper
    if paper is None:
        return ("Paper's Table I: not available (h3de_lite.evaluation.PAPER_TABLE_I has not been filled in from the "
                "paper yet)")  # fmt: skip
    citation = paper.get("citation", "the paper")
    lines = [f"Reported in the paper ({citation}); not computed here:", "", *_table_header(thresholds)]
    for method, subsets in paper.get("rows", {}).items():
        filled = {s: {"n_cases": "—", **(subsets.get(s) or {})} for s in SUBSETS}
        lines += _table_rows(f"{method} (paper)", filled, thresholds)
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- results
@dataclass
class EvaluationResult:
    """What :func:`evaluate` returns: every case's result and the Table I summary.

    Shape:
        not a tensor class; each :class:`CaseResult` holds ``(L, 3)`` / ``(L,)`` arrays.
    """

    cases: list[CaseResult]
    summary: dict[str, dict[str, Any]]
    names: tuple[str, ...] = LANDMARK_NAMES
    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS_MM
    source: str = "ours"

    def table(self, *, paper: bool = False) -> str:
        """Our Markdown table; with ``paper=True`` the paper's Table I follows as its own labelled table."""
        text = format_table(self.summary, label=self.source, thresholds=self.thresholds)
        if paper:
            text += "\n\n" + format_paper_table(thresholds=self.thresholds)
        return text

    def per_case_csv(self) -> str:
        """One row per case: subset, counts, MRE and the radial error of every landmark (mm, empty if none)."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["case_id", "subset", "n_true_present", "n_pred_present", "tp", "fp", "fn", "tn", "mre_mm",
                         *(f"error_{n}_mm" for n in self.names)])  # fmt: skip
        for c in self.cases:
            tp = int((c.present & c.true_present).sum())
            fp = int((c.present & ~c.true_present).sum())
            fn = int((~c.present & c.true_present).sum())
            tn = int((~c.present & ~c.true_present).sum())
            valid = c.errors[~np.isnan(c.errors)]
            mre = repr(float(valid.mean())) if valid.size else ""
            errors = ["" if np.isnan(e) else repr(float(e)) for e in c.errors]
            writer.writerow([c.case_id, c.subset, int(c.true_present.sum()), int(c.present.sum()), tp, fp, fn, tn,
                             mre, *errors])  # fmt: skip
        return buffer.getvalue()

    def write(self, out_dir: str | Path, *, stem: str = "eval_test", paper: bool = False) -> dict[str, Path]:
        """Write ``<stem>.json`` (the summary), ``<stem>.csv`` (per case) and ``<stem>.md`` (the table), atomically.

        Returns:
            ``{"json": path, "csv": path, "md": path}``.
        """
        from h3de_lite.training.checkpoint import write_json

        out_dir = Path(out_dir)
        if out_dir.exists() and not out_dir.is_dir():
            raise ValueError(f"output folder {str(out_dir)!r} is a file; pass a folder")
        paths = {kind: out_dir / f"{stem}.{kind}" for kind in ("json", "csv", "md")}
        write_json(paths["json"], self.summary)
        for kind, text in (("csv", self.per_case_csv()), ("md", self.table(paper=paper) + "\n")):
            with atomic_output(paths[kind]) as tmp:
                tmp.write_text(text, encoding="utf-8")
        return paths


def evaluate(
    predictor: Predictor,
    data: str | Path | Sequence[Case],
    *,
    split: str = "test",
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS_MM,
    progress: bool = False,
) -> EvaluationResult:
    """Evaluate a predictor on whole volumes: radial errors (mm), MRE ± SD, SDR and existence P/R/F1 (paper Sec. III).

    Every case goes through :meth:`Predictor.predict` on the whole stored volume (the labels are read, but never
    given to the predictor), the prediction is compared in the stored volume's voxels with the labels and errors are
    measured in its spacing (:func:`~h3de_lite.metrics.radial_errors`). See the module docstring for how missing
    landmarks count and :func:`summarize_cases` for the statistics.

    Args:
        predictor: from :func:`load_predictor` (or built by hand).
        data: dataset folder (``data / split`` in the MML layout or images with landmark files, :func:`find_cases`),
            or a sequence of :class:`~h3de_lite.data.case.Case`.
        split: sub-folder of ``data`` (``"."`` for ``data`` itself).
        thresholds: SDR radii in mm.
        progress: progress bar over the cases.

    Returns:
        :class:`EvaluationResult` (``.cases``, ``.summary``, ``.table()``, ``.write(out_dir)``).

    Shape:
        not a tensor function.

    Example:
        >>> result = evaluate(load_predictor("runs/tiny"), "data", split="test")  # doctest: +SKIP
        >>> result.summary["all"]["mre"]  # doctest: +SKIP
        2.4
    """
    thresholds = tuple(float(t) for t in thresholds)
    if isinstance(data, (str, Path)):
        sources: list[Any] = find_cases(data, split)
    else:
        sources = list(data)
        if not all(isinstance(c, Case) for c in sources):
            raise ValueError("data must be a dataset folder or a sequence of Case objects")
    iterator = sources
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(sources, desc="evaluate", unit="case")
    results = []
    for source in iterator:
        case = source.load(predictor.names) if isinstance(source, CaseFiles) else source
        if len(case.names) != len(predictor.names):
            raise ValueError(f"case {case.case_id!r} has {len(case.names)} landmarks, the predictor "
                             f"{len(predictor.names)}")  # fmt: skip
        results.append(_score_case(case, predictor))
    return EvaluationResult(
        cases=results,
        summary=summarize_cases(results, names=predictor.names, thresholds=thresholds),
        names=predictor.names,
        thresholds=thresholds,
        source=predictor.source,
    )


# ---------------------------------------------------------------------------------------------------- predict
def _mrk_json_document(names: Sequence[str], world: np.ndarray, present: np.ndarray) -> dict[str, Any]:
    """A Slicer markups point list (LPS, mm); absent landmarks are control points with ``positionStatus: missing``."""
    lps = np.array([-1.0, -1.0, 1.0])
    points = []
    for i, (name, position, here) in enumerate(zip(names, world, present)):
        point: dict[str, Any] = {"id": str(i + 1), "label": str(name), "description": "", "associatedNodeID": ""}
        if here:
            point["position"] = [float(v) for v in position * lps]
            point["orientation"] = [-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0]  # identity in RAS, as LPS
        point.update({"selected": True, "locked": False, "visibility": True,
                      "positionStatus": "defined" if here else "missing"})  # fmt: skip
        points.append(point)
    return {
        "@schema": MARKUPS_SCHEMA,
        "markups": [{
            "type": "Fiducial", "coordinateSystem": "LPS", "coordinateUnits": "mm", "locked": False,
            "fixedNumberOfControlPoints": False, "labelFormat": "%N-%d", "lastUsedControlPointNumber": len(points),
            "controlPoints": points,
        }],
    }  # fmt: skip


def write_prediction(
    out_dir: str | Path,
    case_id: str,
    *,
    names: Sequence[str],
    world: np.ndarray,
    present: np.ndarray,
    score: np.ndarray,
) -> tuple[Path, Path]:
    """Write ``<case_id>.mrk.json`` (3D Slicer point list) and ``<case_id>.csv`` for one predicted image, atomically.

    The ``.mrk.json`` stores positions in LPS mm (Slicer's default; :func:`~h3de_lite.data.markups.read_markups`
    reads them back as RAS), one control point per landmark in ``names`` order, with ``positionStatus`` ``"defined"``,
    or ``"missing"`` (no position) for an absent landmark, as Slicer writes skipped points. The CSV has the columns
    ``name, x, y, z, present, score`` with RAS mm (``nan`` for absent landmarks); ``read_markups`` reads it too.
    Numbers are written with Python's round-trip ``repr``, so they read back exactly.

    Args:
        out_dir: output folder (created).
        case_id: file name stem.
        names: landmark names.
        world: ``(L, 3)`` RAS mm, NaN rows where absent.
        present: ``(L,)`` bool.
        score: ``(L,)`` decoder score (peak heatmap value, or highest existence probability for the anchor head).

    Shape:
        world ``(L, 3)``; present, score ``(L,)``.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     world = np.array([[1.0, 2.0, 3.0], [np.nan] * 3])
        ...     paths = write_prediction(folder, "0001", names=["La", "Lb"], world=world,
        ...                              present=np.array([True, False]), score=np.array([0.9, 0.1]))
        ...     read_markups(paths[0])["La"].shape
        (3,)
    """
    world = np.asarray(world, dtype=np.float64)
    present = np.asarray(present, dtype=bool)
    score = np.asarray(score, dtype=np.float64)
    if world.shape != (len(names), 3) or present.shape != (len(names),) or score.shape != (len(names),):
        raise ValueError(f"expected world (L, 3), present (L,), score (L,) with L = {len(names)} names, got "
                         f"{world.shape}, {present.shape}, {score.shape}")  # fmt: skip
    if np.isnan(world[present]).any():
        raise ValueError("a landmark marked present has NaN world coordinates")
    out_dir = Path(out_dir)
    mrk, table = out_dir / f"{case_id}.mrk.json", out_dir / f"{case_id}.csv"
    with atomic_output(mrk) as tmp:
        tmp.write_text(json.dumps(_mrk_json_document(names, world, present), indent=4) + "\n", encoding="utf-8")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["name", "x", "y", "z", "present", "score"])
    for name, position, here, s in zip(names, world, present, score):
        xyz = [repr(float(v)) for v in position] if here else ["nan", "nan", "nan"]
        writer.writerow([name, *xyz, "true" if here else "false", repr(float(s))])
    with atomic_output(table) as tmp:
        tmp.write_text(buffer.getvalue(), encoding="utf-8")
    return mrk, table


@dataclass(frozen=True)
class FilePrediction:
    """Result of :func:`predict_files` for one image: coordinates in its voxels and world RAS mm, and the files."""

    case_id: str
    image: Path
    coords: np.ndarray
    world: np.ndarray
    present: np.ndarray
    score: np.ndarray
    markups: Path
    table: Path


def _safe_stem(text: str) -> str:
    return re.sub(r"[^\w.-]", "_", text) or "image"


def predict_files(
    predictor: Predictor,
    images: Sequence[str | Path],
    out_dir: str | Path,
    *,
    progress: bool = False,
) -> list[FilePrediction]:
    """Predict the landmarks of NIfTI / NRRD images of any size and spacing and write them for 3D Slicer.

    Each image is read with :func:`read_image`, predicted with :meth:`Predictor.predict` (the same call
    :func:`evaluate` makes) and written by :func:`write_prediction` as ``out_dir/<id>.mrk.json`` and
    ``out_dir/<id>.csv`` (``<id>``: the file name without ``.nii.gz``/``.nii``/``.nrrd`` and an MML ``_volume``).

    Args:
        predictor: from :func:`load_predictor`.
        images: image paths; checked (exist, supported, distinct ids) before any prediction.
        out_dir: output folder (created).
        progress: progress bar over the images.

    Raises:
        FileNotFoundError: an image is missing.
        ValueError: unsupported or unreadable image, two images with the same id, ``out_dir`` is a file.

    Shape:
        not a tensor function.

    Example:
        >>> predict_files(load_predictor("runs/tiny"), ["scan.nii.gz"], "out")[0].world.shape  # doctest: +SKIP
        (14, 3)
    """
    paths = [Path(p) for p in images]
    if not paths:
        raise ValueError("no images given; pass one or more NIfTI (.nii.gz) or NRRD (.nrrd) files")
    ids = []
    for path in paths:
        stem = strip_image_suffix(path.name)
        if stem is None:
            raise ValueError(f"{str(path)!r} is not a NIfTI (.nii, .nii.gz) or NRRD (.nrrd) image; pass one of those")
        if not path.is_file():
            raise FileNotFoundError(f"image {str(path)!r} does not exist; check the path")
        ids.append(_safe_stem(stem[: -len("_volume")] if stem.endswith("_volume") else stem))
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"several images would write the same output files {dup}; predict them into different --out "
                         "folders")  # fmt: skip
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"output folder {str(out_dir)!r} is a file; pass a folder")
    iterator: Any = list(zip(paths, ids))
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="predict", unit="image")
    results = []
    for path, case_id in iterator:
        image = read_image(path)
        coords, present, score = predictor.predict(image.volume, image.spacing, affine=image.affine)
        coords = np.where(present[:, None], coords, np.nan)
        world = voxel_to_world(coords, image.affine)
        mrk, table = write_prediction(out_dir, case_id, names=predictor.names, world=world, present=present,
                                      score=score)  # fmt: skip
        results.append(FilePrediction(case_id=case_id, image=path, coords=coords, world=world, present=present,
                                      score=score, markups=mrk, table=table))  # fmt: skip
    return results
