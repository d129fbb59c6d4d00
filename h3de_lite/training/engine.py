"""The training loop: targets built on the fly, the losses of eq. 13–17, validation MRE, resumable checkpoints, DDP.

:func:`fit` trains any model with H3DE-Net's output contract: a heatmap tensor ``(B, L, D, H, W)`` (the anchor-free
H3DENet and the MONAI baselines) or the anchor head's dict ``{"heatmaps", "offsets", "logits"}``. Items come from a
map-style dataset in :class:`~h3de_lite.data.LandmarkDataset`'s format; the engine scales images from [0, 255] to
[0, 1] (:func:`h3de_lite.inference.prepare_input`) and builds the Gaussian targets (eq. 1) and anchor targets
(eq. 5) per batch.

Reproducibility: the data order of epoch ``e`` is a pure function of ``(seed, e)`` (a seeded
:class:`~torch.utils.data.DistributedSampler`, also in a single process), datasets with a ``set_epoch(e)`` method are
told the epoch, and every checkpoint holds the random states of every rank and how many batches of the epoch are done.
Resuming from any checkpoint therefore continues bit for bit, provided the dataset derives its randomness from
``(seed, epoch, index)`` (not from call counters or worker seeds) and the kernels are deterministic (always on CPU;
``deterministic=True`` on CUDA).
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from h3de_lite.anchors import ANCHOR_CONFIGS, AnchorGrid
from h3de_lite.heatmaps import gaussian_heatmaps
from h3de_lite.inference import predict_volume, prepare_input
from h3de_lite.losses import anchor_based_loss, anchor_free_loss, heatmap_softmax_ce_loss
from h3de_lite.training import distributed as D
from h3de_lite.training.checkpoint import (
    capture_rng,
    load_checkpoint,
    prepare_run_dir,
    restore_rng,
    save_checkpoint,
    write_json,
)
from h3de_lite.training.config import RESUMABLE_CHANGES, TrainConfig

__all__ = ["ExpHeatmaps", "fit", "lr_factor", "resolve_device", "training_losses", "validate"]

ANCHOR_STRIDE = 4  # the anchor head reads the H/4 decoder map (Sec. II-C-1)


# ---------------------------------------------------------------------------------------------------- small pieces
def resolve_device(name: str) -> torch.device:
    """``"auto"`` → CUDA if available, else MPS, else CPU; a named device must be available.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but no CUDA device is available; use device='auto' or 'cpu'")
    if name == "mps" and not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
        raise ValueError("device='mps' but MPS is not available; use device='auto' or 'cpu'")
    return torch.device(name)


def _amp_settings(device: torch.device, amp: bool) -> tuple[bool, torch.dtype, bool]:
    """``(autocast on, autocast dtype, gradient scaler on)`` for a device."""
    if not amp:
        return False, torch.float32, False
    if device.type == "cuda":
        # bf16 only where the GPU computes in it natively (Ampere+): including_emulation would report a T4 as
        # bf16-capable and run every matmul emulated, far slower than fp16 with a gradient scaler.
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return True, torch.bfloat16, False
        return True, torch.float16, True
    if device.type == "cpu":
        return True, torch.bfloat16, False
    raise ValueError(f"amp=True is not supported on {device.type!r} here; set amp=False")


def lr_factor(step: int, *, config: TrainConfig, steps_per_epoch: int) -> float:
    """Multiplier of ``config.lr`` at optimizer step ``step`` (0-based): warm-up times the schedule.

    Args:
        step: optimizer steps taken before this one.
        config: the schedule settings (``schedule``, ``warmup_steps``, ``step_epochs``, ``gamma``, ``min_lr_ratio``,
            ``epochs``).
        steps_per_epoch: optimizer steps in one epoch.

    Example:
        >>> cfg = TrainConfig(schedule="step", gamma=0.5, step_epochs=1, min_lr_ratio=0.0)
        >>> [lr_factor(s, config=cfg, steps_per_epoch=2) for s in range(5)]
        [1.0, 1.0, 0.5, 0.5, 0.25]
    """
    warm = 1.0
    if config.warmup_steps and step < config.warmup_steps:
        warm = (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        factor = 1.0
    elif config.schedule == "cosine":
        total = config.epochs * steps_per_epoch - config.warmup_steps
        t = min(max((step - config.warmup_steps) / max(total, 1), 0.0), 1.0)
        factor = config.min_lr_ratio + (1.0 - config.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))
    else:  # "step"
        decays = (step // steps_per_epoch) // config.step_epochs
        factor = max(config.gamma**decays, config.min_lr_ratio)
    return warm * factor


def _build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    cls = torch.optim.Adam if config.optimizer == "adam" else torch.optim.AdamW
    params = [p for p in model.parameters() if p.requires_grad]
    return cls(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0] % 2**63)


def _seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: NumPy and Python ``random`` seeded from the worker's torch seed."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _mask_outside(landmarks: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """Landmarks outside the volume (evaluation-style items keep them) become NaN: no target can be built for them."""
    size = torch.tensor(shape, dtype=landmarks.dtype, device=landmarks.device)
    inside = ((landmarks >= -0.5) & (landmarks <= size - 0.5)).all(dim=-1)  # NaN rows compare False
    return torch.where(inside[..., None], landmarks, torch.full_like(landmarks, float("nan")))


def _anchor_grid(shape: tuple[int, int, int], num_anchors: int, cache: dict) -> AnchorGrid:
    key = (shape, num_anchors)
    if key not in cache:
        for config in ANCHOR_CONFIGS:
            grid = AnchorGrid(shape, stride=ANCHOR_STRIDE, config=config)
            if grid.num_anchors == num_anchors:
                cache[key] = grid
                break
        else:
            raise ValueError(
                f"the model's anchor output has {num_anchors} anchors, which matches no anchor config "
                f"{sorted(ANCHOR_CONFIGS)} on a {shape} volume at stride {ANCHOR_STRIDE}"
            )
    return cache[key]


# ---------------------------------------------------------------------------------------------------- losses
def training_losses(
    outputs: torch.Tensor | Mapping[str, torch.Tensor],
    landmarks: torch.Tensor,
    *,
    config: TrainConfig,
    spacing: torch.Tensor | None = None,
    grid_cache: dict | None = None,
) -> dict[str, torch.Tensor]:
    """The loss of one batch (eq. 16 or 17), with the targets built from the landmarks.

    Heatmap targets are the Gaussians of eq. 1 (``config.sigma``, in voxels or mm). ``heatmap_loss="mse"`` is eq. 13
    over every channel, so a missing landmark's channel is trained towards zero; ``"softmax_ce"`` counts only present
    landmarks (:func:`~h3de_lite.losses.heatmap_softmax_ce_loss`). Anchor outputs add eq. 14–15 with the targets of
    :meth:`~h3de_lite.anchors.AnchorGrid.encode` (stride 4, the anchor config found from the anchor count). Present
    landmarks outside the volume count as missing. Every term is a mean, over the batch too.

    Args:
        outputs: heatmaps ``(B, L, D, H, W)`` or the anchor dict ``{"heatmaps", "offsets", "logits"}``.
        landmarks: ``(B, L, 3)`` voxel coordinates, NaN rows for missing landmarks.
        config: loss weights λ, ``heatmap_loss``, ``sigma``, ``sigma_units``.
        spacing: ``(B, 3)`` or ``(3,)`` mm, needed when ``config.sigma_units == "mm"``.
        grid_cache: a dict reused between calls to keep the anchor grids.

    Returns:
        ``{"total", "heatmap"}`` plus ``"offset"`` and ``"existence"`` for anchor outputs (float32 scalars).

    Shape:
        outputs ``(B, L, D, H, W)`` (or the dict), landmarks ``(B, L, 3)`` → scalars.

    Example:
        >>> out = torch.zeros(2, 3, 8, 8, 8)
        >>> g = torch.tensor([[[2.0, 3.0, 4.0]] * 3] * 2)
        >>> training_losses(out, g, config=TrainConfig())["total"].shape
        torch.Size([])
    """
    heatmaps = outputs["heatmaps"] if isinstance(outputs, Mapping) and "heatmaps" in outputs else outputs
    if isinstance(outputs, Mapping):
        if "logits" not in outputs or "offsets" not in outputs:
            raise ValueError(
                f"a dict output needs 'offsets' and 'logits' (the anchor head), got keys {sorted(outputs)}"
            )
        shape = tuple(int(s) for s in heatmaps.shape[-3:]) if "heatmaps" in outputs else None
    else:
        shape = tuple(int(s) for s in outputs.shape[-3:])
    if shape is None:
        raise ValueError("anchor outputs without 'heatmaps' are not supported: the engine needs the volume shape")
    if landmarks.ndim != 3 or landmarks.shape[-1] != 3:
        raise ValueError(f"landmarks must have shape (B, L, 3), got {tuple(landmarks.shape)}")
    g = _mask_outside(landmarks.float(), shape)
    present = ~torch.isnan(g).any(dim=-1)  # (B, L)
    needs_heatmaps = config.lambda_heatmap != 0 and isinstance(heatmaps, torch.Tensor)
    target = None
    if needs_heatmaps:
        sp = spacing if config.sigma_units == "mm" else None
        if config.sigma_units == "mm" and spacing is None:
            raise ValueError("sigma_units='mm' needs the batch spacing; pass spacing=batch['spacing']")
        target = gaussian_heatmaps(g, shape, config.sigma, sp, dtype=torch.float32).to(heatmaps.device)

    def heatmap_term(pred: torch.Tensor) -> torch.Tensor:
        if config.heatmap_loss == "mse":
            return anchor_free_loss(pred.float(), target)["heatmap"]
        return heatmap_softmax_ce_loss(pred.float(), target, present=present, absent_class=config.absent_class)

    if not isinstance(outputs, Mapping):
        term = heatmap_term(outputs) if needs_heatmaps else outputs.float().sum() * 0.0
        return {"heatmap": term, "total": config.lambda_heatmap * term}

    cache = {} if grid_cache is None else grid_cache
    grid = _anchor_grid(shape, int(outputs["logits"].shape[1]), cache)
    anchor_targets = {k: v.to(outputs["logits"].device) for k, v in grid.encode(g).items()}
    floats = {k: v.float() for k, v in outputs.items() if k in ("offsets", "logits")}
    losses = anchor_based_loss(
        floats, anchor_targets, lambda_reg=config.lambda_reg, lambda_cls=config.lambda_cls, lambda_heatmap=0.0,
        hard_negative_ratio=config.hard_negative_ratio, lambda_landmark=config.lambda_landmark,
    )
    hm = heatmap_term(outputs["heatmaps"]) if needs_heatmaps else losses["heatmap"]
    losses["heatmap"] = hm
    losses["total"] = losses["total"] + config.lambda_heatmap * hm
    return losses


# ---------------------------------------------------------------------------------------------------- validation
class ExpHeatmaps(nn.Module):
    """Decode softmax-CE logits as ``exp(logits)``: same arg-max, a log that is quadratic at the peak (exact sub-voxel
    fit), scores > 0 (no landmark dropped at threshold 0), and no per-window normalisation under sliding windows."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        if hasattr(model, "input_size"):
            self.input_size = model.input_size

    def forward(self, x: torch.Tensor) -> Any:
        out = self.model(x)
        if isinstance(out, torch.Tensor):
            return torch.exp(out.float().clamp(max=80.0))  # e^80 < float32 max
        return out


@torch.no_grad()
def _validation_errors(
    model: nn.Module,
    dataset: Dataset,
    indices: Sequence[int],
    *,
    config: TrainConfig,
    device: torch.device,
    roi_size: tuple[int, int, int] | None,
) -> tuple[list[np.ndarray], int]:
    """Radial errors ``(L,)`` in mm of the listed items, and how many truly present landmarks had no prediction."""
    from h3de_lite.metrics import radial_errors

    was_training = model.training
    model.eval()
    net = ExpHeatmaps(model) if config.heatmap_loss == "softmax_ce" else model
    errors, missed = [], 0
    for index in indices:
        item = dataset[index]
        coords, found, _ = predict_volume(
            net,
            item["image"],
            roi_size=roi_size,
            overlap=0.25,  # cheaper than evaluation's default 0.5 (validation runs every epoch)
            method=config.val_method,
            threshold=0.0,
            device=device,
            amp=config.amp and device.type == "cuda",
            strategy=config.val_strategy,
        )
        truth = torch.as_tensor(item["landmarks"], dtype=torch.float64)
        errors.append(np.asarray(radial_errors(coords.detach().cpu().double().numpy(), truth.numpy(), item["spacing"])))
        true_present = torch.as_tensor(item["present"], dtype=torch.bool)
        missed += int((true_present & ~found.detach().cpu().bool()).sum())
    model.train(was_training)
    return errors, missed


def _summarize_validation(errors: list[np.ndarray], missed: int) -> dict[str, Any]:
    from h3de_lite.metrics import summarize

    if not errors:
        return {"mre": float("nan"), "sdr_2mm": float("nan"), "missed": missed, "n": 0}
    summary = summarize(np.stack(errors))
    return {"mre": summary["mre"], "sdr_2mm": summary["sdr"][2.0], "missed": missed, "n": summary["n"]}


def _validation_roi(
    config: TrainConfig, model: nn.Module, train_shape: tuple[int, ...] | None
) -> tuple[int, int, int] | None:
    """Sliding-window size: ``config.val_roi_size``, else the model's ``input_size``, else the training crop (rounded
    up to multiples of 32, the networks' divisor)."""
    if config.val_roi_size is not None:
        return config.val_roi_size
    own = getattr(model, "input_size", None)
    if own is not None:
        return tuple(int(s) for s in own)
    if train_shape is None:
        return None
    return tuple(max(32, math.ceil(int(s) / 32) * 32) for s in train_shape)


def validate(
    model: nn.Module,
    dataset: Dataset,
    *,
    config: TrainConfig,
    device: torch.device,
    roi_size: tuple[int, int, int] | None = None,
) -> dict[str, Any]:
    """Validation MRE (mm) and SDR@2 mm on whole volumes, scored on the landmarks that are truly present.

    Each item goes through :func:`h3de_lite.inference.predict_volume` (dataset image in [0, 255]; threshold 0, so a
    heatmap model places every landmark and an anchor model too), then :func:`h3de_lite.metrics.radial_errors` and
    :func:`~h3de_lite.metrics.summarize`. A landmark the model still leaves out (a negative heatmap peak) is counted
    in ``"missed"`` and has no error. Models trained with ``heatmap_loss="softmax_ce"`` are decoded from
    ``exp(logits)``: the same arg-max, and a log-quadratic peak for the sub-voxel fit.

    Args:
        model: the plain model (not DDP-wrapped).
        dataset: items with ``image``, ``landmarks``, ``present``, ``spacing``.
        config: ``val_roi_size``, ``val_method``, ``val_strategy``, ``heatmap_loss``, ``amp``.
        device: where the model runs.
        roi_size: sliding-window size; default ``config.val_roi_size``, else the model's ``input_size`` attribute
            (:func:`fit` falls back to the training crop size, rounded up to multiples of 32).

    Returns:
        ``{"mre": mm, "sdr_2mm": percent, "missed": int, "n": errors counted}`` (NaN MRE/SDR when ``n == 0``).

    Shape:
        not a tensor function; items as in :func:`fit`.
    """
    roi = roi_size if roi_size is not None else _validation_roi(config, model, None)
    errors, missed = _validation_errors(model, dataset, range(len(dataset)), config=config, device=device, roi_size=roi)
    return _summarize_validation(errors, missed)


# ---------------------------------------------------------------------------------------------------- fit
def _check_resume_config(saved: dict[str, Any], config: TrainConfig) -> None:
    current = config.to_dict()
    defaults = TrainConfig().to_dict()  # a field added after the run was written: it ran with the default
    saved = {**{k: v for k, v in defaults.items() if k not in saved}, **saved}
    keys = (set(saved) | set(current)) - set(RESUMABLE_CHANGES)
    changed = sorted(k for k in keys if saved.get(k) != current.get(k))
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} → {current.get(k)!r}" for k in changed)
        raise ValueError(
            f"resume=True with a different config ({details}); resume with the run's own config "
            f"(only {list(RESUMABLE_CHANGES)} may change) or start a new run"
        )


def _nan_to_none(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def fit(
    model: nn.Module,
    train_data: Dataset,
    val_data: Dataset | None,
    config: TrainConfig,
    *,
    run_dir: str | Path,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    model_config: dict[str, Any] | None = None,
    data_config: dict[str, Any] | None = None,
    inference_config: dict[str, Any] | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Train a landmark model (loss eq. 16 or 17), validate on whole volumes, checkpoint, resume, scale out.

    Per optimizer step: a batch of items → images scaled to [0, 1] (:func:`h3de_lite.inference.prepare_input`) →
    forward (autocast with ``config.amp``) → :func:`training_losses` (targets built from the batch's landmarks) →
    backward, optional gradient clipping, optimizer and learning-rate step. Per epoch: the mean of every loss term,
    validation (:func:`validate`: MRE and SDR@2 mm) every ``val_every`` epochs, ``history.json``, ``last.pt``;
    ``best.pt`` when the validation MRE improves; early stopping after ``patience`` validations without improvement.

    Under ``torchrun`` (env ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``) every process calls ``fit`` alike: the process
    group starts (NCCL on CUDA, gloo on CPU) unless it already runs, the model is wrapped in
    ``DistributedDataParallel``, each rank reads its shard of a seeded ``DistributedSampler`` (global batch
    ``batch_size · world_size``; DDP averages the gradients: for the MSE heatmap loss, a plain mean over the batch,
    that equals one process on the global batch, for models without batch norm; the masked means of
    ``softmax_ce`` and of the anchor terms differ slightly when the ranks count different numbers of landmarks),
    the ranks share the validation volumes, and only rank 0 writes files.

    Run folder ``run_dir``: ``config.json`` (``{"train": TrainConfig, "model": model_config, "data": data_config,
    "world_size"}``, plus ``"inference": inference_config`` when given),
    ``history.json``, ``last.pt`` and ``best.pt`` (keys :data:`~h3de_lite.training.checkpoint.CHECKPOINT_KEYS`). A
    folder that holds another run is refused unless ``resume`` or ``overwrite``. ``resume=True`` continues from
    ``last.pt``, mid-epoch included, bit for bit (see the module docstring for the dataset's part); a checkpoint
    written at an epoch end may also resume on a different number of processes (the global batch changes with it).

    Args:
        model: heatmap model ``(B, C, D, H, W) → (B, L, D, H, W)`` or anchor model returning the dict; moved to the
            device and trained in place (it ends with the last weights; the best ones are in ``best.pt``).
        train_data: map-style dataset of items ``image (1, D, H, W)`` in [0, 255], ``landmarks (L, 3)`` (NaN rows
            missing), ``present (L,)``, ``spacing (3,)``; equal shapes within a batch. ``set_epoch(epoch)`` is
            called on it, when it has one, before every epoch.
        val_data: dataset of whole-volume items (same keys) or ``None`` (no validation, no ``best.pt``). Volumes go
            through sliding windows of ``config.val_roi_size``, else the model's ``input_size``, else the training
            crop size rounded up to multiples of 32.
        config: the :class:`~h3de_lite.training.TrainConfig`.
        run_dir: the run folder (created).
        resume: continue the run in ``run_dir`` from its ``last.pt``.
        overwrite: delete the run files in ``run_dir`` and start over.
        progress: show a progress bar (rank 0) with the loss and learning rate.
        model_config: how to rebuild the model (:func:`~h3de_lite.training.build_model_from_config`); saved in
            ``config.json`` and the checkpoints.
        data_config: the preprocessing the model was trained with (JSON types), e.g. ``{"spacing": 1.5,
            "window": [-1000, 3000], "crop": [64, 64, 32]}``, saved in ``config.json`` so that inference can repeat it.
        inference_config: the run's inference defaults (JSON types), e.g. ``{"tta": "flip"}``
            (:func:`h3de_lite.evaluation.load_predictor` reads them); not used in training.
        on_step: called on every rank after every optimizer step (and its checkpoint, if one is due) with the global
            step and the step's losses; raising from it stops training (the last checkpoint stays valid).

    Returns:
        The history (the content of ``history.json``): ``{"epochs": [{"epoch", "step", "lr", "seconds",
        "loss": {term: mean}, "val_mre", "val_sdr_2mm", "val_missed", "val_n"}, ...], "best_epoch", "best_val_mre",
        "stopped_early", "finished"}``; validation values are ``None`` in epochs without validation.

    Shape:
        not a tensor function; see ``train_data`` for the item shapes.

    Example:
        >>> history = fit(model, train_ds, val_ds, TrainConfig(epochs=2), run_dir="runs/a")  # doctest: +SKIP
        >>> history["epochs"][-1]["val_mre"]  # doctest: +SKIP
        3.1
    """
    if not isinstance(config, TrainConfig):
        raise ValueError(f"config must be a TrainConfig, got {type(config).__name__}")
    device = resolve_device(config.device)
    info = D.setup(device.type)
    try:
        if device.type == "cuda" and info.distributed:
            device = torch.device("cuda", info.local_rank)
        return _fit(
            model,
            train_data,
            val_data,
            config,
            device=device,
            info=info,
            run_dir=Path(run_dir),
            resume=resume,
            overwrite=overwrite,
            progress=progress,
            model_config=model_config,
            data_config=data_config,
            inference_config=inference_config,
            on_step=on_step,
        )
    finally:
        D.teardown(info)


def _fit(
    model: nn.Module,
    train_data: Dataset,
    val_data: Dataset | None,
    config: TrainConfig,
    *,
    device: torch.device,
    info: D.DistInfo,
    run_dir: Path,
    resume: bool,
    overwrite: bool,
    progress: bool,
    model_config: dict[str, Any] | None,
    data_config: dict[str, Any] | None,
    inference_config: dict[str, Any] | None,
    on_step: Callable[[int, dict[str, float]], None] | None,
) -> dict[str, Any]:
    if len(train_data) == 0:
        raise ValueError("train_data is empty; give fit at least one training item")
    # Every rank checks the folder (the same answer everywhere); only rank 0 deletes old files.
    prepare_run_dir(run_dir, resume=resume, overwrite=overwrite, clean=info.is_main)
    D.barrier(info)
    autocast_on, autocast_dtype, scaler_on = _amp_settings(device, config.amp)
    if config.deterministic:  # process-wide settings, left in place after fit
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS (before its first use)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)
    _seed_everything(config.seed + info.rank)

    model.to(device)
    model.train()
    optimizer = _build_optimizer(model, config)
    sampler = DistributedSampler(
        train_data, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=config.seed, drop_last=False
    )
    steps_per_epoch = math.ceil(len(sampler) / config.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, config=config, steps_per_epoch=steps_per_epoch)
    )
    scaler = torch.amp.GradScaler(device.type if device.type == "cuda" else "cpu", enabled=scaler_on)
    run_config = {"train": config.to_dict(), "model": model_config, "data": data_config, "world_size": info.world_size}
    if inference_config is not None:
        run_config["inference"] = inference_config

    # State that a checkpoint restores.
    epoch, epoch_step, step = 0, 0, 0
    best_metric, best_epoch, bad_validations = float("inf"), None, 0
    history: list[dict[str, Any]] = []
    loss_sums: dict[str, float] = {}
    epoch_seconds, finished, stopped_early = 0.0, False, False
    if resume:
        ckpt = load_checkpoint(run_dir / "last.pt", map_location="cpu")
        _check_resume_config(ckpt["config"]["train"], config)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt["scaler"]:
            scaler.load_state_dict(ckpt["scaler"])
        epoch, epoch_step, step = ckpt["epoch"], ckpt["epoch_step"], ckpt["step"]
        best_metric = float("inf") if ckpt["best_metric"] is None else ckpt["best_metric"]
        best_epoch, bad_validations = ckpt["best_epoch"], ckpt["bad_validations"]
        history = list(ckpt["history"])
        saved_world = len(ckpt["rng"])
        if saved_world != info.world_size and epoch_step:
            raise ValueError(
                f"{str(run_dir / 'last.pt')!r} was written mid-epoch by {saved_world} process(es); resume it with "
                f"the same number of processes (now {info.world_size})"
            )
        restore_rng(ckpt["rng"][info.rank % saved_world])
        loss_sums = dict(ckpt["loss_sums"][info.rank % saved_world])
        epoch_seconds = ckpt["epoch_seconds"]
        finished, stopped_early = ckpt["finished"], ckpt["stopped_early"]
        if epoch < config.epochs and not stopped_early:
            finished = False  # more epochs asked for than the run had
        del ckpt
    elif info.is_main:
        write_json(run_dir / "config.json", run_config)

    net: nn.Module = model
    if info.distributed:
        ids = [device.index] if device.type == "cuda" else None
        unused = 0.0 in (config.lambda_heatmap, config.lambda_reg, config.lambda_cls)
        net = nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=unused)
    if config.compile:
        net = torch.compile(net)
    grid_cache: dict = {}
    train_shape: tuple[int, ...] | None = None  # training crop size: the default validation window

    def summary() -> dict[str, Any]:
        return {
            "epochs": history,
            "best_epoch": best_epoch,
            "best_val_mre": _nan_to_none(best_metric),
            "stopped_early": stopped_early,
            "finished": finished,
        }

    def checkpoint(path_names: tuple[str, ...]) -> None:
        # Every rank contributes its random state and running sums; rank 0 writes.
        states = D.all_gather_objects(info, {"rng": capture_rng(), "loss_sums": dict(loss_sums)})
        if info.is_main:
            payload = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                "scheduler": scheduler.state_dict(),
                "epoch": epoch,
                "epoch_step": epoch_step,
                "step": step,
                "rng": [s["rng"] for s in states],
                "sampler": {
                    "seed": config.seed,
                    "epoch": epoch,
                    "epoch_step": epoch_step,
                    "batch_size": config.batch_size,
                    "world_size": info.world_size,
                },
                "best_metric": _nan_to_none(best_metric),
                "best_epoch": best_epoch,
                "bad_validations": bad_validations,
                "loss_sums": [s["loss_sums"] for s in states],
                "epoch_seconds": epoch_seconds,
                "history": history,
                "finished": finished,
                "stopped_early": stopped_early,
                "config": run_config,
            }
            for name in path_names:
                save_checkpoint(run_dir / name, payload)
        D.barrier(info)

    if info.is_main:
        write_json(run_dir / "history.json", summary())

    while epoch < config.epochs and not finished:
        if hasattr(train_data, "set_epoch"):
            train_data.set_epoch(epoch)
        sampler.set_epoch(epoch)
        indices = list(sampler)[epoch_step * config.batch_size :]  # skip the batches a resumed epoch already did
        generator = torch.Generator()
        generator.manual_seed(_epoch_seed(config.seed, epoch))
        loader = DataLoader(
            train_data,
            batch_size=config.batch_size,
            sampler=indices,
            num_workers=config.num_workers,
            worker_init_fn=_seed_worker,
            generator=generator,
            pin_memory=device.type == "cuda",
        )
        bar = None
        if progress and info.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=steps_per_epoch,
                initial=epoch_step,
                desc=f"epoch {epoch + 1}/{config.epochs}",
                unit="step",
                leave=False,
            )
        started = time.perf_counter() - epoch_seconds
        lr = optimizer.param_groups[0]["lr"]
        for batch in loader:
            x = prepare_input(batch["image"].to(device, non_blocking=True))
            train_shape = tuple(x.shape[-3:])
            landmarks = batch["landmarks"].to(device)
            with torch.autocast(device_type=device.type, dtype=autocast_dtype) if autocast_on else nullcontext():
                outputs = net(x)
            losses = training_losses(
                outputs, landmarks, config=config, spacing=batch.get("spacing"), grid_cache=grid_cache
            )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(losses["total"]).backward()
            if config.grad_clip is not None:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            lr = optimizer.param_groups[0]["lr"]
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            step += 1
            epoch_step += 1
            values = {k: float(v.detach()) for k, v in losses.items()}
            for k, v in values.items():
                loss_sums[k] = loss_sums.get(k, 0.0) + v
            loss_sums["batches"] = loss_sums.get("batches", 0.0) + 1.0
            epoch_seconds = time.perf_counter() - started
            if bar is not None:
                bar.set_postfix(loss=f"{values['total']:.4g}", lr=f"{lr:.3g}", refresh=False)
                bar.update(1)
            if config.checkpoint_every and step % config.checkpoint_every == 0 and epoch_step < steps_per_epoch:
                checkpoint(("last.pt",))
            if on_step is not None:
                on_step(step, values)
        if bar is not None:
            bar.close()

        # Epoch end: losses averaged over every batch of every rank, validation shared by the ranks.
        totals = D.all_reduce_sum(info, loss_sums)
        batches = max(totals.pop("batches", 0.0), 1.0)
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "step": step,
            "lr": lr,
            "seconds": epoch_seconds,
            "loss": {k: v / batches for k, v in sorted(totals.items())},
            "val_mre": None,
            "val_sdr_2mm": None,
            "val_missed": None,
            "val_n": None,
        }
        improved = False
        if val_data is not None and ((epoch + 1) % config.val_every == 0 or epoch + 1 == config.epochs):
            # Each rank scores its share of the volumes; every rank then holds every error.
            shard = range(info.rank, len(val_data), info.world_size)
            roi = _validation_roi(config, model, train_shape)
            errors, missed = _validation_errors(model, val_data, shard, config=config, device=device, roi_size=roi)
            gathered = D.all_gather_objects(info, (errors, missed))
            result = _summarize_validation([e for g in gathered for e in g[0]], sum(g[1] for g in gathered))
            record.update(
                {
                    "val_mre": _nan_to_none(result["mre"]),
                    "val_sdr_2mm": _nan_to_none(result["sdr_2mm"]),
                    "val_missed": result["missed"],
                    "val_n": result["n"],
                }
            )
            if math.isfinite(result["mre"]) and result["mre"] < best_metric:
                best_metric, best_epoch, bad_validations, improved = result["mre"], epoch + 1, 0, True
            else:
                bad_validations += 1
                stopped_early = config.patience is not None and bad_validations >= config.patience
        record = D.broadcast_object(info, record)  # one history on every rank (rank 0's timing)
        history.append(record)
        epoch += 1
        epoch_step, loss_sums, epoch_seconds = 0, {}, 0.0
        finished = epoch >= config.epochs or stopped_early
        if info.is_main:
            write_json(run_dir / "history.json", summary())
            if progress:
                val = "" if record["val_mre"] is None else f", val MRE {record['val_mre']:.3f} mm"
                print(f"epoch {epoch}/{config.epochs}: loss {record['loss'].get('total', float('nan')):.4g}{val}")
        checkpoint(("last.pt", "best.pt") if improved else ("last.pt",))

    if info.is_main:
        write_json(run_dir / "history.json", summary())
    return summary()
