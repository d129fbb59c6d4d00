"""Data: the Case container, landmark names, readers/writers, the phantom generator, transforms and datasets.

Explained in notebooks/02_data.ipynb.
"""

from h3de_lite.data.augment import (
    Compose,
    IntensityJitter,
    LabeledCase,
    RandomCrop,
    RandomFlipLR,
    RandomRotateScale,
    adjust_intensity,
    flip_lr,
    landmarks_off_tissue,
    rotate_scale,
    rotation_matrix,
    training_augmentation,
    warp,
)
from h3de_lite.data.case import Case, validate_spacing
from h3de_lite.data.dataset import LandmarkDataset
from h3de_lite.data.images import read_image
from h3de_lite.data.landmarks import LANDMARK_NAMES, NUM_LANDMARKS, describe
from h3de_lite.data.markups import read_markups, write_markups
from h3de_lite.data.mml import (
    MISSING_SENTINEL,
    list_mml_cases,
    mml_paths,
    read_mml_case,
    read_mml_landmarks,
    write_mml_case,
)
from h3de_lite.data.nifti import (
    load_nifti_case,
    read_nifti,
    spacing_from_affine,
    voxel_to_world,
    world_to_voxel,
    write_nifti,
)
from h3de_lite.data.phantom import Tissue, generate_phantom, write_phantom_dataset
from h3de_lite.data.transforms import (
    DEFAULT_WINDOW,
    center_crop,
    choose_crop_start,
    crop,
    normalize_intensity,
    random_crop,
    resample,
    to_source_voxels,
    zoom_to_fit,
)

__all__ = [
    "LabeledCase",
    "Compose",
    "RandomCrop",
    "RandomFlipLR",
    "RandomRotateScale",
    "IntensityJitter",
    "flip_lr",
    "rotate_scale",
    "warp",
    "rotation_matrix",
    "training_augmentation",
    "adjust_intensity",
    "landmarks_off_tissue",
    "Case",
    "validate_spacing",
    "LANDMARK_NAMES",
    "NUM_LANDMARKS",
    "describe",
    "LandmarkDataset",
    "read_image",
    "read_markups",
    "write_markups",
    "MISSING_SENTINEL",
    "list_mml_cases",
    "mml_paths",
    "read_mml_case",
    "read_mml_landmarks",
    "write_mml_case",
    "load_nifti_case",
    "read_nifti",
    "spacing_from_affine",
    "voxel_to_world",
    "world_to_voxel",
    "write_nifti",
    "Tissue",
    "generate_phantom",
    "write_phantom_dataset",
    "DEFAULT_WINDOW",
    "center_crop",
    "choose_crop_start",
    "crop",
    "normalize_intensity",
    "random_crop",
    "resample",
    "zoom_to_fit",
    "to_source_voxels",
]
