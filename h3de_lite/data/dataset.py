"""``LandmarkDataset``: MML-layout cases as training/evaluation samples (image, landmarks, presence, spacing).

Per sample: read the case → optionally resample to ``target_spacing`` → crop (random, keeping the landmarks in view,
for training; for evaluation no crop by default, or one centred on the *volume*, never on the landmarks) → window the
intensities to [0, 255]. Ground truth only decides where a *random* (training) crop goes; an evaluation item never looks
at it and keeps every landmark of the file for scoring.

Explained in notebooks/02_data.ipynb.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Literal, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from h3de_lite.data.augment import Compose, RandomCrop, RandomRotateScale, warp, warp_crop, warp_landmarks
from h3de_lite.data.case import Case
from h3de_lite.data.mml import list_mml_cases, read_mml_case, read_mml_landmarks
from h3de_lite.data.transforms import (
    DEFAULT_WINDOW,
    crop,
    normalize_intensity,
    resample,
    spacing3,
    zoom_to_fit,
)

__all__ = ["LandmarkDataset", "TRAIN_CROP_SIZE"]

Subset = Literal["all", "complete", "incomplete"]
Augmentation = Callable[[Case, np.random.Generator], Case]

TRAIN_CROP_SIZE: tuple[int, int, int] = (128, 128, 64)
"""Training crop size of the paper (§III-A), the ``crop_size`` that ``"auto"`` gives the ``"train"`` split."""


class LandmarkDataset(Dataset):
    """Samples from an MML-layout folder (``root/split/<id>_volume.nrrd`` …), paper §III-A preprocessing.

    Two kinds of item, chosen by ``random_crop``:

    - **Training items** (``random_crop=True``, the default for ``split="train"``): a random crop placed so the present
      landmarks stay in view (:func:`~h3de_lite.data.transforms.choose_crop_start`). The ground truth decides where the
      crop goes; a landmark the crop cuts off becomes ``NaN`` / ``present=False`` (what the network cannot see is
      absent from its input, the target the existence branch learns).
    - **Evaluation items** (``random_crop=False``, the default for every other split): the ground truth never touches
      the image. By default (``crop_size="auto"``) the item is the whole volume; a ``crop_size`` given explicitly is
      cut from the *centre of the volume*, padded with the volume minimum (air) along any axis where the volume is
      smaller than the crop. ``landmarks`` / ``present`` hold *every* landmark of the label file, in the item's voxel
      coordinates: a landmark the crop cuts off keeps its true coordinates, outside ``[-0.5, size - 0.5]``, and stays
      present, so a model that cannot see it is scored with an error (MRE) and a missed detection (existence F1),
      never silently dropped. To train a heatmap loss on such an item, mask the landmarks outside the image first.

    ``random_crop=True`` for a split other than ``"train"`` is allowed (it is then asked for explicitly) and gives
    training items.

    The ``subset`` filter reads only the label files and uses presence in the *uncropped* case: ``"complete"`` keeps
    cases with all landmarks (the paper's complete subset), ``"incomplete"`` those missing at least one.

    Random crops and augmentations draw from a generator seeded by ``(seed, epoch, index)`` alone: the same sample
    comes back in any process, worker or resumed run, and samples differ between epochs once the training loop calls
    :meth:`set_epoch` (:func:`h3de_lite.training.fit` does).

    Args:
        root: dataset folder holding the split folders.
        split: split folder name (``"train"``, ``"val"``, ``"test"``).
        subset: ``"all"``, ``"complete"`` or ``"incomplete"``.
        crop_size: crop size ``(D, H, W)``; ``None`` returns whole volumes (batch size 1 then, shapes differ);
            ``"auto"`` (default) means :data:`TRAIN_CROP_SIZE` for ``split="train"`` and ``None`` otherwise.
        random_crop: ``True`` for random training crops that keep the landmarks in view, ``False`` for evaluation
            items (centred crop, every landmark kept); ``None`` (default) means ``split == "train"`` (with a crop).
            ``True`` needs a crop (``crop_size`` not ``None``).
        target_spacing: resample every case to this voxel size in mm first (``(3,)`` or a number); ``None`` keeps it.
        window: HU window mapped to [0, 255] (:data:`DEFAULT_WINDOW`); ``None`` leaves intensities as stored (for
            data already scaled to [0, 255]).
        seed: base seed of the random crops and augmentations.
        augment: training augmentation of the whole (resampled) volume before the crop, e.g.
            ``Compose([RandomFlipLR(), RandomRotateScale()])`` (:mod:`h3de_lite.data.augment`); it keeps the grid, so
            the crop then sees where the landmarks went. A trailing ``RandomRotateScale`` (alone or last in a
            ``Compose``) is resampled only inside the crop (:func:`~h3de_lite.data.augment.warp_crop`): the same
            items, a fraction of the time. Only with random crops (training items).
        intensity_augment: applied to the crop in HU, before the window, e.g. ``IntensityJitter()``; training only.
        p_partial: probability that a random crop holds only part of the landmarks (:class:`RandomCrop`).
        p_background: probability that a random crop holds none of them, so that sliding-window inference has seen
            windows without a landmark (:class:`RandomCrop`).
        p_zoom: probability that a training item is the whole volume zoomed to fit the crop
            (:func:`~h3de_lite.data.transforms.zoom_to_fit`) instead of a crop: the coarse view that
            ``strategy="coarse_to_fine"`` inference starts from, where the whole head is in view. Its ``spacing``
            is the zoomed voxel size and its ``origin`` is 0 (it is no crop of the resampled volume).
        cache: keep each case in memory once read and resampled (the slow part of an item), so later epochs only
            augment and crop; costs the resampled volumes' size in RAM (per DataLoader worker).

    Shape:
        Each item is a dict:

        - ``image``: ``(1, D, H, W)`` float32 in [0, 255]
        - ``landmarks``: ``(L, 3)`` float32 voxel coordinates in ``image``; ``NaN`` rows for missing landmarks and, in
          training items only, for landmarks outside the crop
        - ``present``: ``(L,)`` bool, ``False`` exactly on the ``NaN`` rows
        - ``spacing``: ``(3,)`` float32 mm of ``image``; ``source_spacing``: ``(3,)`` float32 mm of the stored volume
        - ``origin``: ``(3,)`` int64 crop start in the (resampled) volume, negative where the crop pads; map
          predictions back with :func:`h3de_lite.data.transforms.to_source_voxels`
        - ``case_id``: str

    Example:
        >>> ds = LandmarkDataset("data", "train", crop_size=(32, 32, 16))  # doctest: +SKIP
        >>> ds[0]["image"].shape  # doctest: +SKIP
        torch.Size([1, 32, 32, 16])

    Explained in notebooks/02_data.ipynb.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        *,
        subset: Subset = "all",
        crop_size: Sequence[int] | None | Literal["auto"] = "auto",
        random_crop: bool | None = None,
        target_spacing: Sequence[float] | float | None = None,
        window: Sequence[float] | None = DEFAULT_WINDOW,
        seed: int = 0,
        augment: Augmentation | None = None,
        intensity_augment: Augmentation | None = None,
        p_partial: float = 0.0,
        p_background: float = 0.0,
        p_zoom: float = 0.0,
        cache: bool = False,
    ) -> None:
        if subset not in ("all", "complete", "incomplete"):
            raise ValueError(f"subset must be 'all', 'complete' or 'incomplete', got {subset!r}")
        if isinstance(crop_size, str):
            if crop_size != "auto":
                raise ValueError(
                    f"crop_size must be three positive integers (D, H, W), None or 'auto', got {crop_size!r}"
                )
            crop_size = TRAIN_CROP_SIZE if split == "train" else None
        if crop_size is not None:
            size = np.asarray(crop_size)
            if size.shape != (3,) or not np.all(np.mod(size, 1) == 0) or np.any(size < 1):
                raise ValueError(f"crop_size must be three positive integers (D, H, W) or None, got {crop_size!r}")
            crop_size = tuple(int(s) for s in size)
        if random_crop is None:
            random_crop = split == "train" and crop_size is not None
        elif random_crop not in (True, False):
            raise ValueError(f"random_crop must be True, False or None, got {random_crop!r}")
        elif random_crop and crop_size is None:
            raise ValueError("random_crop=True needs a crop; pass crop_size=(D, H, W) or random_crop=False")
        if target_spacing is not None:
            target_spacing = spacing3(target_spacing, what="target_spacing")
        if window is not None:
            window = tuple(float(w) for w in window)
            normalize_intensity(np.zeros(1), window=window)  # validates the window early
        self.root = Path(root)
        self.split = split
        self.directory = self.root / split
        self.subset: Subset = subset
        self.crop_size: tuple[int, int, int] | None = crop_size
        self.random_crop = bool(random_crop)
        self.target_spacing = target_spacing
        self.window = window
        self.seed = int(seed)
        self.epoch = 0
        if not (isinstance(p_zoom, (int, float)) and 0.0 <= p_zoom <= 1.0):
            raise ValueError(f"p_zoom must be a probability in [0, 1], got {p_zoom!r}")
        self.p_zoom = float(p_zoom)
        if (
            augment is not None or intensity_augment is not None or p_partial or p_background or p_zoom
        ) and not random_crop:
            raise ValueError(
                "augment, intensity_augment, p_partial, p_background and p_zoom are for training items: pass "
                "crop_size=(D, H, W) and random_crop=True (the default for split='train'), or drop them"
            )
        self.augment = augment
        self._eager, self._rotation = _split_rotation(augment)  # split once, not per item
        self.cache = bool(cache)
        self._cases: dict[int, tuple[Case, np.ndarray]] = {}
        self.intensity_augment = intensity_augment
        self._crop = (
            RandomCrop(size=crop_size, p_partial=p_partial, p_background=p_background) if random_crop else None
        )

        all_ids = list_mml_cases(self.root, split)
        if not all_ids:
            raise ValueError(f"no cases (<id>_volume.nrrd) in {str(self.directory)!r}; "
                             "create data with `h3de-lite phantom --out DIR ...`")  # fmt: skip
        if subset == "all":
            self.case_ids = all_ids
        else:
            complete = {cid: bool(~np.isnan(read_mml_landmarks(self.directory, cid)).any()) for cid in all_ids}
            self.case_ids = [cid for cid in all_ids if complete[cid] == (subset == "complete")]
        if not self.case_ids:
            raise ValueError(
                f"subset {subset!r} of {str(self.directory)!r} is empty ({len(all_ids)} cases in the split, none "
                f"{subset}); use subset='all' or add {subset} cases"
            )

    def __len__(self) -> int:
        return len(self.case_ids)

    def __repr__(self) -> str:
        return (f"LandmarkDataset(root={str(self.root)!r}, split={self.split!r}, subset={self.subset!r}, "
                f"cases={len(self)}, crop_size={self.crop_size}, random_crop={self.random_crop})")  # fmt: skip

    def set_epoch(self, epoch: int) -> None:
        """Make the random crops and augmentations of the coming epoch those of ``epoch`` (seeded by it)."""
        if not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        self.epoch = int(epoch)

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, index])

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} cases")
        index = index % len(self)
        if index in self._cases:
            case, source_spacing = self._cases[index]
        else:
            case = read_mml_case(self.directory, self.case_ids[index])
            source_spacing = case.spacing.copy()
            if self.target_spacing is not None:
                case = resample(case, spacing=self.target_spacing, order=1)
            if self.cache:  # transforms below never modify a case in place
                self._cases[index] = (case, source_spacing)
        origin = np.zeros(3, dtype=np.int64)
        landmarks = case.landmarks  # whole volume: every landmark of the file
        if self.crop_size is not None and self.random_crop:
            # training: augment the whole volume, then let the (augmented) ground truth place the crop; landmarks it
            # cuts off become NaN (absent); intensity jitter in HU on the crop, before the window
            rng = self._rng(index)
            # A trailing RandomRotateScale is drawn here but resampled only inside the crop (warp_crop): the same
            # sample, a fraction of the work. The draws from rng come in the same order as augment(case, rng).
            eager, rotation = self._eager, self._rotation
            if eager is not None:
                case = eager(case, rng)
            matrix = rotation.draw(case, rng) if rotation is not None else None
            if self.p_zoom and rng.random() < self.p_zoom:  # no draw at p_zoom = 0: the crops stay as they were
                if matrix is not None:
                    case = warp(case, matrix, order=rotation.order)
                case = zoom_to_fit(case, size=self.crop_size)  # the coarse view of the whole volume
            elif matrix is not None:
                origin = self._crop.choose_start(case.volume.shape, warp_landmarks(case, matrix), rng)
                case = warp_crop(case, matrix, origin, self.crop_size, order=rotation.order)
            else:
                origin = self._crop.choose_start(case.volume.shape, case.landmarks, rng)
                case = crop(case, origin, self.crop_size)
            if self.intensity_augment is not None:
                case = self.intensity_augment(case, rng)
            landmarks = case.landmarks
        elif self.crop_size is not None:
            # evaluation: centred on the volume without looking at the ground truth; every landmark is kept, in crop
            # coordinates, even where the crop cuts it off (scored as an error, never as absent)
            origin = (np.asarray(case.volume.shape) - np.asarray(self.crop_size)) // 2
            landmarks = case.landmarks - origin
            case = crop(case, origin, self.crop_size)
        if self.window is None:
            image = np.asarray(case.volume, dtype=np.float32)
        else:
            image = normalize_intensity(case.volume, window=self.window)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image)[None]),
            "landmarks": torch.from_numpy(landmarks.astype(np.float32)),
            "present": torch.from_numpy(~np.isnan(landmarks).any(axis=1)),
            "spacing": torch.from_numpy(case.spacing.astype(np.float32)),
            "source_spacing": torch.from_numpy(source_spacing.astype(np.float32)),
            "origin": torch.from_numpy(np.asarray(origin, dtype=np.int64)),
            "case_id": case.case_id,
        }


def _split_rotation(augment: Augmentation | None) -> tuple[Augmentation | None, RandomRotateScale | None]:
    """``augment`` as (what runs on the whole volume, a trailing :class:`RandomRotateScale` to resample in the crop).

    ``RandomRotateScale`` alone or last in a :class:`Compose` is split off; any other augmentation runs whole.
    """
    if isinstance(augment, RandomRotateScale):
        return None, augment
    if isinstance(augment, Compose) and augment.transforms and isinstance(augment.transforms[-1], RandomRotateScale):
        return Compose(augment.transforms[:-1]), augment.transforms[-1]
    return augment, None
