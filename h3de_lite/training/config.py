"""``TrainConfig``: every knob of a training run, validated on construction, saved as JSON in the run folder.

Defaults follow the paper where it says something (Adam, the heatmap MSE of eq. 13, the losses of eq. 16–17) and the
authors' code (ECNUACRush/H3DE-Net, ``main_baseline.py``) where the paper is silent: learning rate 1e-3, Adam betas
(0.9, 0.98), weight decay 5e-4, batch size 4, 200 epochs, the learning rate multiplied by 0.98 after every epoch
until it reaches 3 % of its start value, early stopping after 20 epochs without improvement.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from h3de_lite.inference import STRATEGIES

__all__ = ["TrainConfig", "OPTIMIZERS", "SCHEDULES", "HEATMAP_LOSSES", "DEVICES", "RESUMABLE_CHANGES"]

OPTIMIZERS = ("adam", "adamw")
SCHEDULES = ("constant", "cosine", "step")
HEATMAP_LOSSES = ("mse", "softmax_ce")
DEVICES = ("auto", "cpu", "cuda", "mps")
SIGMA_UNITS = ("voxels", "mm")
DECODE_METHODS = ("argmax", "subvoxel")

#: Fields that may differ between a run and its resumption: they change where and how fast it runs, or when it ends,
#: not the arithmetic of the steps already taken. Any other change is refused on resume.
RESUMABLE_CHANGES = ("epochs", "patience", "device", "num_workers", "compile", "checkpoint_every", "val_every")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Hyper-parameters and run options of :func:`~h3de_lite.training.fit`.

    Loss (Sec. II-D): the anchor-free net minimises ``λ_heatmap · L_heatmap`` (eq. 16), the anchor-based one
    ``λ_reg · L_reg + λ_cls · L_cls + λ_heatmap · L_heatmap`` (eq. 17). ``heatmap_loss="mse"`` is the paper's eq. 13;
    ``"softmax_ce"`` is :func:`~h3de_lite.losses.heatmap_softmax_ce_loss`, a spatial-softmax cross-entropy on the
    same Gaussian targets that converges much faster on CPU (not the paper's; see its docstring). Targets are the
    Gaussians of eq. 1 with standard deviation ``sigma``.

    Learning rate: ``lr · warmup(step) · schedule(step)``. Warm-up rises linearly over ``warmup_steps`` optimizer
    steps; ``"constant"`` keeps ``lr``; ``"cosine"`` decays from ``lr`` to ``min_lr_ratio · lr`` over the remaining
    steps of ``epochs``; ``"step"`` multiplies by ``gamma`` every ``step_epochs`` epochs, never below
    ``min_lr_ratio · lr`` (the default, ``gamma=0.98`` each epoch down to 3 %, is the authors' code).

    Args:
        optimizer: ``"adam"`` (the paper; ``weight_decay`` is L2 added to the gradient) or ``"adamw"`` (decoupled).
        lr: peak learning rate.
        weight_decay: weight decay (see ``optimizer``).
        betas: Adam's ``(β1, β2)``.
        schedule: ``"constant"``, ``"cosine"`` or ``"step"``.
        warmup_steps: optimizer steps of linear warm-up (0 = none).
        step_epochs: epochs between two decays of the ``"step"`` schedule.
        gamma: factor of each ``"step"`` decay, in (0, 1].
        min_lr_ratio: floor of ``"step"`` and end value of ``"cosine"``, as a fraction of ``lr``.
        epochs: passes over the training data.
        batch_size: items per optimizer step (per process under ``torchrun``: the global batch is
            ``batch_size · world_size``).
        lambda_heatmap: λ of the heatmap term (eq. 16, 17).
        lambda_reg: λ of the anchor offset term (eq. 14, 17); anchor head only.
        lambda_cls: λ of the anchor existence term (eq. 15, 17); anchor head only.
        hard_negative_ratio: anchor head only: keep only the ``ratio · N_pos`` hardest negative anchor–landmark pairs
            in the existence term (:func:`~h3de_lite.losses.existence_loss`; not in the paper); ``None``: all.
        lambda_landmark: anchor head only: weight of the per-landmark existence term
            (:func:`~h3de_lite.losses.landmark_existence_loss`; not in the paper); 0: off.
        heatmap_loss: ``"mse"`` (eq. 13, the paper) or ``"softmax_ce"`` (faster CPU recipe, not the paper's).
        absent_class: ``softmax_ce`` only: give every channel an "absent" outcome with logit 0, trained on landmarks
            outside the crop or missing (:func:`~h3de_lite.losses.heatmap_softmax_ce_loss`); what makes the logits of
            different sliding windows comparable. Ignored by ``mse``.
        sigma: standard deviation of the Gaussian targets (eq. 1), in ``sigma_units``.
        sigma_units: ``"voxels"`` or ``"mm"`` (round in millimetres, elliptical in voxels on anisotropic data).
        seed: seeds model-side randomness, the data order and the dataset's augmentation epochs.
        device: ``"auto"`` (CUDA, else MPS, else CPU), ``"cpu"``, ``"cuda"`` or ``"mps"``.
        amp: mixed precision: bfloat16 on CUDA where supported, else float16 with a gradient scaler; bfloat16 on CPU;
            not available on MPS.
        compile: ``torch.compile`` the model for training (the checkpoints hold the plain model's weights).
        deterministic: ask for deterministic kernels, needed for bit-exact resumption on a GPU (process-wide:
            cuDNN deterministic without benchmarking, ``torch.use_deterministic_algorithms(warn_only=True)``,
            ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` unless set).
        grad_clip: clip the global gradient norm to this value (``None`` = no clipping).
        patience: stop after this many validations without a lower validation MRE (``None`` = never).
        num_workers: ``DataLoader`` worker processes.
        checkpoint_every: also write ``last.pt`` every this many optimizer steps (0 = only at epoch ends).
        val_every: validate every this many epochs (and after the last one).
        val_roi_size: sliding-window size for whole-volume validation (``None`` = the whole volume at once).
        val_method: heatmap decoding for validation, ``"subvoxel"`` or ``"argmax"`` (eq. 2).
        val_strategy: whole-volume inference of validation (:func:`h3de_lite.inference.predict_volume`),
            ``"sliding"`` or ``"coarse_to_fine"``; also the default of ``h3de-lite evaluate`` and ``predict`` for the
            run.

    Shape:
        not a tensor class.

    Example:
        >>> cfg = TrainConfig(epochs=2, heatmap_loss="softmax_ce")
        >>> TrainConfig.from_dict(cfg.to_dict()) == cfg
        True
    """

    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.98)
    schedule: str = "step"
    warmup_steps: int = 0
    step_epochs: int = 1
    gamma: float = 0.98
    min_lr_ratio: float = 0.03
    epochs: int = 200
    batch_size: int = 4
    lambda_heatmap: float = 1.0
    lambda_reg: float = 1.0
    lambda_cls: float = 1.0
    hard_negative_ratio: float | None = None
    lambda_landmark: float = 0.0
    heatmap_loss: str = "mse"
    absent_class: bool = False
    sigma: float = 2.0
    sigma_units: str = "voxels"
    seed: int = 0
    device: str = "auto"
    amp: bool = False
    compile: bool = False
    deterministic: bool = False
    grad_clip: float | None = None
    patience: int | None = 20
    num_workers: int = 0
    checkpoint_every: int = 0
    val_every: int = 1
    val_roi_size: tuple[int, int, int] | None = None
    val_method: str = "subvoxel"
    val_strategy: str = "sliding"

    def __post_init__(self) -> None:
        # Normalise JSON lists to tuples (frozen dataclass: through object.__setattr__).
        if isinstance(self.betas, list):
            object.__setattr__(self, "betas", tuple(self.betas))
        if isinstance(self.val_roi_size, list):
            object.__setattr__(self, "val_roi_size", tuple(self.val_roi_size))
        choices = {
            "optimizer": OPTIMIZERS,
            "schedule": SCHEDULES,
            "heatmap_loss": HEATMAP_LOSSES,
            "sigma_units": SIGMA_UNITS,
            "device": DEVICES,
            "val_method": DECODE_METHODS,
            "val_strategy": STRATEGIES,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"TrainConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        positive = ("lr", "sigma", "gamma")
        for name in positive:
            if not _is_number(getattr(self, name)) or getattr(self, name) <= 0:
                raise ValueError(f"TrainConfig.{name} must be a positive number, got {getattr(self, name)!r}")
        if self.gamma > 1:
            raise ValueError(f"TrainConfig.gamma must lie in (0, 1], got {self.gamma!r}")
        for name in ("weight_decay", "lambda_heatmap", "lambda_reg", "lambda_cls", "lambda_landmark"):
            if not _is_number(getattr(self, name)) or getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be a number >= 0, got {getattr(self, name)!r}")
        if not _is_number(self.min_lr_ratio) or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"TrainConfig.min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio!r}")
        if (
            not isinstance(self.betas, tuple)
            or len(self.betas) != 2
            or not all(_is_number(b) and 0 <= b < 1 for b in self.betas)
        ):
            raise ValueError(f"TrainConfig.betas must be two numbers in [0, 1), got {self.betas!r}")
        for name in ("epochs", "batch_size", "step_epochs", "val_every"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("warmup_steps", "seed", "num_workers", "checkpoint_every"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be an integer >= 0, got {getattr(self, name)!r}")
        for name in ("amp", "compile", "deterministic"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"TrainConfig.{name} must be True or False, got {getattr(self, name)!r}")
        if self.hard_negative_ratio is not None and (
            not _is_number(self.hard_negative_ratio) or self.hard_negative_ratio <= 0
        ):
            raise ValueError(
                f"TrainConfig.hard_negative_ratio must be a positive number or None, got {self.hard_negative_ratio!r}"
            )
        if self.grad_clip is not None and (not _is_number(self.grad_clip) or self.grad_clip <= 0):
            raise ValueError(f"TrainConfig.grad_clip must be a positive number or None, got {self.grad_clip!r}")
        if self.patience is not None and (not _is_int(self.patience) or self.patience < 1):
            raise ValueError(f"TrainConfig.patience must be a positive integer or None, got {self.patience!r}")
        if self.val_roi_size is not None and (
            not isinstance(self.val_roi_size, tuple)
            or len(self.val_roi_size) != 3
            or not all(_is_int(s) and s > 0 for s in self.val_roi_size)
        ):
            raise ValueError(
                f"TrainConfig.val_roi_size must be three positive integers (D, H, W) or None, got {self.val_roi_size!r}"
            )
        if self.lambda_heatmap == 0 and self.lambda_reg == 0 and self.lambda_cls == 0:
            raise ValueError("TrainConfig: every loss weight is 0; give lambda_heatmap (or lambda_reg/cls) a value > 0")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists)."""
        out = dataclasses.asdict(self)
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = list(value)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError`` naming them and the valid ones."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s) {unknown}; valid fields are {sorted(names)}")
        return cls(**data)

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with some fields changed (validated again); unknown names raise ``ValueError``."""
        return TrainConfig.from_dict({**self.to_dict(), **changes})
