"""Training engine: config, schedules, losses on targets built on the fly, run folder, checkpoints, exact resume."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from _training_helpers import BlobDataset, TinyAnchorNet, TinyHeatmapNet

from h3de_lite.training import (
    CHECKPOINT_KEYS,
    TrainConfig,
    build_model_from_config,
    fit,
    load_checkpoint,
    load_trained_model,
    lr_factor,
    training_losses,
)

NAN = float("nan")
FAST = dict(schedule="constant", lr=1e-2, patience=None, batch_size=2)  # short runs: no decay, no early stop


class Interrupt(Exception):
    pass


def _stop_at(step_to_stop: int):
    def on_step(step: int, losses: dict) -> None:
        if step == step_to_stop:
            raise Interrupt(f"stopped after step {step}")

    return on_step


# ------------------------------------------------------------------------------------------------ config
def test_config_json_roundtrip():
    cfg = TrainConfig(
        optimizer="adamw",
        lr=3e-4,
        betas=(0.8, 0.9),
        schedule="cosine",
        warmup_steps=5,
        heatmap_loss="softmax_ce",
        sigma=1.5,
        sigma_units="mm",
        grad_clip=1.0,
        patience=None,
        val_roi_size=(64, 64, 32),
        amp=True,
    )
    text = json.dumps(cfg.to_dict())
    back = TrainConfig.from_dict(json.loads(text))
    assert back == cfg
    assert back.betas == (0.8, 0.9) and back.val_roi_size == (64, 64, 32)  # lists come back as tuples
    assert TrainConfig().optimizer == "adam" and TrainConfig().heatmap_loss == "mse"  # the paper's defaults


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"optimizer": "sgd"}, "optimizer must be one of"),
        ({"heatmap_loss": "l1"}, "heatmap_loss must be one of"),
        ({"lr": 0.0}, "lr must be a positive number"),
        ({"epochs": 0}, "epochs must be a positive integer"),
        ({"batch_size": 2.0}, "batch_size must be a positive integer"),
        ({"gamma": 1.5}, r"gamma must lie in \(0, 1\]"),
        ({"betas": (0.9, 1.0)}, "betas must be two numbers"),
        ({"grad_clip": -1.0}, "grad_clip must be a positive number or None"),
        ({"patience": 0}, "patience must be a positive integer or None"),
        ({"val_roi_size": (64, 64)}, "val_roi_size must be three positive integers"),
        ({"amp": 1}, "amp must be True or False"),
        ({"lambda_heatmap": 0.0, "lambda_reg": 0.0, "lambda_cls": 0.0}, "every loss weight is 0"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


def test_config_rejects_unknown_keys_and_positional_use():
    with pytest.raises(ValueError, match=r"unknown TrainConfig field\(s\) \['learning_rate'\]"):
        TrainConfig.from_dict({"learning_rate": 0.1})
    with pytest.raises(TypeError, match="positional"):
        TrainConfig("adam")  # keyword-only


def test_lr_schedules_hand_values():
    cfg = TrainConfig(schedule="cosine", epochs=2, warmup_steps=2, min_lr_ratio=0.0)
    # 5 steps per epoch → 10 steps; warm-up over 2 steps then cosine over the remaining 8.
    factors = [lr_factor(s, config=cfg, steps_per_epoch=5) for s in range(11)]
    assert factors[0] == pytest.approx(0.5) and factors[1] == pytest.approx(1.0)
    assert factors[2] == pytest.approx(1.0)  # cosine starts at 1
    assert factors[6] == pytest.approx(0.5)  # half-way: (1 + cos(π/2)) / 2
    assert factors[10] == pytest.approx(0.0, abs=1e-12)
    ref = TrainConfig()  # the authors' decay: ×0.98 per epoch, floored at 3 %
    assert lr_factor(3 * 7, config=ref, steps_per_epoch=7) == pytest.approx(0.98**3)
    assert lr_factor(1000 * 7, config=ref, steps_per_epoch=7) == pytest.approx(0.03)
    assert lr_factor(123, config=TrainConfig(schedule="constant"), steps_per_epoch=7) == 1.0


# ------------------------------------------------------------------------------------------------ losses
def _gaussian(g, shape, sigma, spacing=(1.0, 1.0, 1.0)):
    """Independent reference: exp(-‖(v - g)·s‖² / 2σ²) on the voxel grid, float64 NumPy."""
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)  # (D, H, W, 3)
    d2 = (((grid - np.asarray(g)) * np.asarray(spacing)) ** 2).sum(-1)
    return d2, np.exp(-d2 / (2 * sigma**2))


def test_training_losses_mse_targets_built_from_landmarks():
    shape = (12, 10, 8)
    g = torch.tensor([[[4.0, 5.0, 3.5], [NAN, NAN, NAN], [30.0, 1.0, 1.0]]])  # present, missing, outside
    out = torch.zeros(1, 3, *shape)
    loss = training_losses(out, g, config=TrainConfig(sigma=2.0))
    _, t0 = _gaussian([4.0, 5.0, 3.5], shape, 2.0)
    expected = (t0**2).sum() / (3 * np.prod(shape))  # the missing and outside channels have zero targets
    assert set(loss) == {"heatmap", "total"}
    assert loss["heatmap"].item() == pytest.approx(expected, rel=1e-5)
    # sigma in mm follows the spacing; λ scales the total.
    spacing = torch.tensor([[1.0, 1.0, 2.0]])
    cfg = TrainConfig(sigma=2.0, sigma_units="mm", lambda_heatmap=3.0)
    loss = training_losses(out, g, config=cfg, spacing=spacing)
    _, t0 = _gaussian([4.0, 5.0, 3.5], shape, 2.0, spacing=(1.0, 1.0, 2.0))
    expected = (t0**2).sum() / (3 * np.prod(shape))
    assert loss["heatmap"].item() == pytest.approx(expected, rel=1e-5)
    assert loss["total"].item() == pytest.approx(3 * expected, rel=1e-5)


def test_training_losses_softmax_ce_minimum_is_target_entropy():
    shape = (12, 10, 8)
    g = torch.tensor([[[4.0, 5.0, 3.5], [NAN, NAN, NAN]]])
    d2, t0 = _gaussian([4.0, 5.0, 3.5], shape, 1.5)
    q = t0 / t0.sum()
    entropy = -(q * np.log(q)).sum()
    # Ideal logits: the log-Gaussian (plus any constant); the missing channel does not count whatever it holds.
    logits = torch.stack([torch.as_tensor(-d2 / (2 * 1.5**2) + 4.0), torch.randn(shape, dtype=torch.float64)])[None]
    loss = training_losses(logits.float(), g, config=TrainConfig(sigma=1.5, heatmap_loss="softmax_ce"))
    assert loss["heatmap"].item() == pytest.approx(entropy, rel=1e-4)


def test_training_losses_anchor_outputs_have_every_term():
    from h3de_lite.anchors import AnchorGrid

    shape = (16, 16, 8)
    g = torch.tensor([[[5.0, 6.0, 3.0], [NAN, NAN, NAN]]])
    grid = AnchorGrid(shape, config="multi")
    t = grid.encode(g)
    _, t0 = _gaussian([5.0, 6.0, 3.0], shape, 2.0)
    heatmaps = torch.zeros(1, 2, *shape)
    heatmaps[0, 0] = torch.as_tensor(t0)
    perfect = {"heatmaps": heatmaps, "offsets": t["offsets"].clone(), "logits": torch.where(t["positive"], 30.0, -30.0)}
    losses = training_losses(perfect, g, config=TrainConfig())
    assert set(losses) == {"offset", "existence", "heatmap", "total"}
    assert losses["offset"].item() == 0.0 and losses["heatmap"].item() == pytest.approx(0.0, abs=1e-12)
    assert losses["total"].item() < 1e-10
    wrong = dict(perfect, offsets=perfect["offsets"] + 0.5 * t["positive"][..., None])  # every positive off by 0.5
    losses = training_losses(wrong, g, config=TrainConfig(lambda_reg=2.0))
    assert losses["offset"].item() == pytest.approx(3 * 0.25)  # ‖(0.5, 0.5, 0.5)‖²
    assert losses["total"].item() == pytest.approx(2 * 3 * 0.25, rel=1e-6)


def test_hard_negative_ratio_reaches_the_existence_term():
    # Three confident look-alikes (logit +5 on negatives) among the easy negatives (logit -30): averaged over
    # every negative they vanish; over the ceil(ratio * N_pos) hardest negatives they count (BCE = log(1 + e^5)).
    from h3de_lite.anchors import AnchorGrid

    shape = (16, 16, 8)
    g = torch.tensor([[[5.0, 6.0, 3.0], [NAN, NAN, NAN]]])
    t = AnchorGrid(shape, config="multi").encode(g)
    logits = torch.where(t["positive"], 30.0, -30.0)
    negatives = (~t["positive"]).nonzero()
    for b, a, lm in negatives[[0, 50, 100]].tolist():
        logits[b, a, lm] = 5.0
    outputs = {"heatmaps": torch.zeros(1, 2, *shape), "offsets": t["offsets"].clone(), "logits": logits}
    n_pos, n_neg = int(t["positive"].sum()), negatives.shape[0]
    look_alikes = 3 * math.log1p(math.exp(5.0))
    plain = training_losses(outputs, g, config=TrainConfig(lambda_heatmap=0.0))
    assert plain["existence"].item() == pytest.approx(look_alikes / n_neg, rel=1e-5)
    mined = training_losses(outputs, g, config=TrainConfig(lambda_heatmap=0.0, hard_negative_ratio=2.0))
    assert mined["existence"].item() == pytest.approx(look_alikes / math.ceil(2.0 * n_pos), rel=1e-5)
    with pytest.raises(ValueError, match="hard_negative_ratio must be a positive number or None"):
        TrainConfig(hard_negative_ratio=0)


# ------------------------------------------------------------------------------------------------ fit
def test_loss_falls_when_overfitting_one_item(tmp_path):
    torch.manual_seed(0)
    losses = []
    cfg = TrainConfig(epochs=1, batch_size=1, schedule="constant", lr=1e-2, patience=None)
    fit(
        TinyHeatmapNet(),
        BlobDataset(30, same=True),
        None,
        cfg,
        run_dir=tmp_path,
        progress=False,
        on_step=lambda step, values: losses.append(values["total"]),
    )
    assert len(losses) == 30
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3]), losses


def test_history_and_checkpoint_contents(tmp_path):
    torch.manual_seed(0)
    model = TinyHeatmapNet()
    cfg = TrainConfig(epochs=2, **FAST)
    history = fit(
        model,
        BlobDataset(4),
        BlobDataset(2, seed=1, missing=True),
        cfg,
        run_dir=tmp_path,
        progress=False,
        model_config={"kind": "custom"},
    )
    on_disk = json.loads((tmp_path / "history.json").read_text())
    assert on_disk == json.loads(json.dumps(history))
    assert set(on_disk) == {"epochs", "best_epoch", "best_val_mre", "stopped_early", "finished"}
    assert [e["epoch"] for e in on_disk["epochs"]] == [1, 2] and on_disk["finished"] is True
    for record in on_disk["epochs"]:
        assert set(record) == {
            "epoch",
            "step",
            "lr",
            "seconds",
            "loss",
            "val_mre",
            "val_sdr_2mm",
            "val_missed",
            "val_n",
        }
        assert set(record["loss"]) == {"heatmap", "total"}
        assert record["lr"] == pytest.approx(1e-2)
        assert record["val_n"] + record["val_missed"] == 3  # 4 landmarks, one missing; a negative peak is "missed"
        assert record["val_mre"] > 0 and 0 <= record["val_sdr_2mm"] <= 100
    assert on_disk["best_val_mre"] == min(e["val_mre"] for e in on_disk["epochs"])

    config = json.loads((tmp_path / "config.json").read_text())
    assert config["train"] == cfg.to_dict() and config["model"] == {"kind": "custom"} and config["world_size"] == 1
    last = load_checkpoint(tmp_path / "last.pt")  # weights_only=True: plain tensors and Python values only
    assert set(CHECKPOINT_KEYS) <= set(last)
    assert last["epoch"] == 2 and last["step"] == 4 and last["epoch_step"] == 0 and last["finished"]
    for name, value in model.state_dict().items():
        assert torch.equal(last["model"][name], value)
    assert {"torch", "cuda", "numpy", "python"} <= set(last["rng"][0])
    assert last["sampler"]["seed"] == cfg.seed and last["scheduler"]["last_epoch"] == 4
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["epoch"] == on_disk["best_epoch"] and best["best_metric"] == pytest.approx(on_disk["best_val_mre"])
    assert not list(tmp_path.glob(".tmp-*"))  # atomic writes leave no temporary files


def test_run_dir_refusal_overwrite_and_resume_errors(tmp_path):
    cfg = TrainConfig(epochs=1, **FAST)
    fit(TinyHeatmapNet(), BlobDataset(2), None, cfg, run_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"already holds a run .*resume=True.*overwrite=True"):
        fit(TinyHeatmapNet(), BlobDataset(2), None, cfg, run_dir=tmp_path, progress=False)
    history = fit(TinyHeatmapNet(), BlobDataset(2), None, cfg, run_dir=tmp_path, progress=False, overwrite=True)
    assert len(history["epochs"]) == 1
    with pytest.raises(FileNotFoundError, match="cannot resume"):
        fit(TinyHeatmapNet(), BlobDataset(2), None, cfg, run_dir=tmp_path / "new", progress=False, resume=True)
    with pytest.raises(ValueError, match=r"different config \(lr: 0.01 → 0.02\)"):
        fit(TinyHeatmapNet(), BlobDataset(2), None, cfg.replace(lr=2e-2), run_dir=tmp_path, resume=True)
    # A finished run resumes to its history without training; more epochs continue it.
    again = fit(TinyHeatmapNet(), BlobDataset(2), None, cfg, run_dir=tmp_path, progress=False, resume=True)
    assert again == history
    more = fit(
        TinyHeatmapNet(), BlobDataset(2), None, cfg.replace(epochs=2), run_dir=tmp_path, progress=False, resume=True
    )
    assert [e["epoch"] for e in more["epochs"]] == [1, 2]


def test_resume_a_run_written_before_a_config_field_existed():
    # Runs written before TrainConfig.lambda_landmark existed have no such key: they ran with the default (0, off),
    # so resuming them with the default is no change; a different value is.
    from h3de_lite.training.engine import _check_resume_config

    old = TrainConfig().to_dict()
    del old["lambda_landmark"]
    _check_resume_config(old, TrainConfig())
    with pytest.raises(ValueError, match=r"different config \(lambda_landmark: 0.0 → 1.0\)"):
        _check_resume_config(old, TrainConfig(lambda_landmark=1.0))


def test_resume_mid_epoch_is_bit_exact(tmp_path):
    # 6 items, batch 2 → 3 steps per epoch; dropout makes the model consume the torch RNG, the dataset moves its
    # landmarks every epoch, and Adam carries state: all of it must come back from the checkpoint.
    def run(run_dir, **kwargs):
        torch.manual_seed(0)
        model = TinyHeatmapNet(dropout=0.2)
        cfg = TrainConfig(epochs=2, checkpoint_every=2, **FAST)
        return model, fit(model, BlobDataset(6), BlobDataset(2, seed=1), cfg, run_dir=run_dir, progress=False, **kwargs)

    reference, ref_history = run(tmp_path / "straight")
    with pytest.raises(Interrupt):  # dies after step 5; the last checkpoint is from step 4 (epoch 2, batch 1)
        run(tmp_path / "cut", on_step=_stop_at(5))
    saved = load_checkpoint(tmp_path / "cut" / "last.pt")
    assert (saved["epoch"], saved["epoch_step"], saved["step"]) == (1, 1, 4)
    resumed, history = run(tmp_path / "cut", resume=True)
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    strip = [{k: v for k, v in e.items() if k != "seconds"} for e in history["epochs"]]
    assert strip == [{k: v for k, v in e.items() if k != "seconds"} for e in ref_history["epochs"]]


def test_early_stopping_on_validation_mre(tmp_path):
    # A vanishing learning rate leaves the arg-max predictions, hence the MRE, unchanged: no improvement after the
    # first validation, so patience=2 stops after epoch 3.
    cfg = TrainConfig(epochs=10, batch_size=2, schedule="constant", lr=1e-12, patience=2, val_method="argmax")
    history = fit(TinyHeatmapNet(), BlobDataset(2), BlobDataset(2, seed=1), cfg, run_dir=tmp_path, progress=False)
    assert [e["epoch"] for e in history["epochs"]] == [1, 2, 3]
    assert history["stopped_early"] and history["finished"] and history["best_epoch"] == 1


def test_build_model_from_config_and_load_trained_model(tmp_path):
    spec = {
        "kind": "h3de",
        "preset": "tiny",
        "num_landmarks": 3,
        "overrides": {"channels": [8, 8, 8, 8, 8], "stem_channels": 4, "num_heads": [1, 1, 1, 1, 1]},
    }
    model = build_model_from_config(json.loads(json.dumps(spec)))  # JSON lists become the tuples the config wants
    assert model.num_landmarks == 3 and model.encoder_channels == (4, 8, 8, 8, 8, 8)
    baseline = build_model_from_config({"kind": "baseline", "name": "resunet3d", "num_landmarks": 2})
    assert baseline(torch.zeros(1, 1, 32, 32, 16)).shape == (1, 2, 32, 32, 16)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['depth'\]"):
        build_model_from_config({"kind": "baseline", "name": "unet3d", "depth": 3})
    with pytest.raises(ValueError, match="kind must be 'h3de' or 'baseline'"):
        build_model_from_config({"kind": "transformer"})

    torch.manual_seed(0)
    trained = build_model_from_config({"kind": "baseline", "name": "resunet3d", "num_landmarks": 2})
    cfg = TrainConfig(epochs=1, **FAST)
    data = BlobDataset(2, shape=(32, 32, 16))  # four stride-2 levels: 2×2×1 voxels at the bottom
    fit(
        trained,
        data,
        BlobDataset(1, seed=1),
        cfg,
        run_dir=tmp_path,
        progress=False,
        model_config={"kind": "baseline", "name": "resunet3d", "num_landmarks": 2},
    )
    loaded, checkpoint = load_trained_model(tmp_path, which="best")
    assert not loaded.training and checkpoint["epoch"] == 1
    for (name, a), b in zip(trained.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a.cpu(), b), name


@pytest.mark.parametrize("heatmap_loss", ["mse", "softmax_ce"])
def test_anchor_outputs_train_through_the_engine(tmp_path, heatmap_loss):
    torch.manual_seed(0)
    model = TinyAnchorNet(num_anchors=3)
    cfg = TrainConfig(epochs=2, heatmap_loss=heatmap_loss, **FAST)
    history = fit(model, BlobDataset(4, missing=True), BlobDataset(2, seed=1), cfg, run_dir=tmp_path, progress=False)
    for record in history["epochs"]:
        assert set(record["loss"]) == {"offset", "existence", "heatmap", "total"}
        assert all(math.isfinite(v) for v in record["loss"].values())
        assert record["val_n"] == 4 and record["val_missed"] == 0  # threshold 0: every landmark gets a position
    first, last = (history["epochs"][i]["loss"]["total"] for i in (0, 1))
    assert last < first


def test_anchor_h3denet_trains_through_the_engine(tmp_path):
    # The smallest H3DE-Net (64×32×32 is the least input it takes) with the anchor head: one step and a validation.
    spec = {
        "kind": "h3de",
        "preset": "tiny",
        "num_landmarks": 2,
        "overrides": {
            "channels": [4, 4, 4, 4, 4],
            "stem_channels": 4,
            "num_heads": [1, 1, 1, 1, 1],
            "head": "anchor",
            "anchors": "multi",
        },
    }
    torch.manual_seed(0)
    model = build_model_from_config(spec)
    cfg = TrainConfig(epochs=1, batch_size=1, schedule="constant", patience=None)
    history = fit(
        model,
        BlobDataset(1, shape=(64, 32, 32)),
        BlobDataset(1, shape=(48, 32, 24), seed=1),
        cfg,
        run_dir=tmp_path,
        progress=False,
        model_config=spec,
    )
    record = history["epochs"][0]
    assert set(record["loss"]) == {"offset", "existence", "heatmap", "total"}
    assert all(math.isfinite(v) for v in record["loss"].values())
    assert record["val_n"] == 2 and record["val_missed"] == 0  # threshold 0: every landmark gets a position


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_amp_trains_and_resumes(tmp_path):
    cfg = TrainConfig(epochs=2, device="cuda", amp=True, deterministic=True, checkpoint_every=2, **FAST)

    def run(run_dir, **kwargs):
        torch.manual_seed(0)
        model = TinyHeatmapNet(dropout=0.2)
        history = fit(model, BlobDataset(6), BlobDataset(2, seed=1), cfg, run_dir=run_dir, progress=False, **kwargs)
        return model, history

    model, history = run(tmp_path / "a")
    assert next(model.parameters()).is_cuda
    assert history["epochs"][-1]["loss"]["total"] < history["epochs"][0]["loss"]["total"]
    checkpoint = load_checkpoint(tmp_path / "a" / "last.pt")
    assert checkpoint["rng"][0]["cuda"] is not None
    if not torch.cuda.is_bf16_supported(including_emulation=False):
        assert checkpoint["scaler"]["scale"] > 0  # float16 runs with a gradient scaler
    with pytest.raises(Interrupt):
        run(tmp_path / "b", on_step=_stop_at(5))
    resumed, _ = run(tmp_path / "b", resume=True)
    for a, b in zip(model.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_worker_processes_do_not_change_the_result(tmp_path):
    # Items depend on (seed, epoch, index) only and the engine tells every epoch's workers the epoch: two worker
    # processes give the weights of the main-process loader exactly.
    def run(run_dir, workers):
        torch.manual_seed(0)
        model = TinyHeatmapNet()
        cfg = TrainConfig(epochs=2, num_workers=workers, **FAST)
        fit(model, BlobDataset(4), None, cfg, run_dir=run_dir, progress=False)
        return model

    a, b = run(tmp_path / "a", 0), run(tmp_path / "b", 2)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name


def test_cpu_bfloat16_autocast_trains(tmp_path):
    torch.manual_seed(0)
    cfg = TrainConfig(epochs=1, amp=True, device="cpu", **FAST)
    history = fit(TinyHeatmapNet(), BlobDataset(4), None, cfg, run_dir=tmp_path, progress=False)
    assert math.isfinite(history["epochs"][0]["loss"]["total"])


def test_amp_on_a_gpu_without_native_bf16_uses_float16_with_a_scaler(monkeypatch):
    # torch reports a T4 as bf16-capable "including emulation"; emulated bf16 is far slower than fp16 + GradScaler.
    from h3de_lite.training.engine import _amp_settings

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert _amp_settings(torch.device("cuda"), True) == (True, torch.float16, True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # Ampere and later
    assert _amp_settings(torch.device("cuda"), True) == (True, torch.bfloat16, False)
    assert _amp_settings(torch.device("cuda"), False) == (False, torch.float32, False)
