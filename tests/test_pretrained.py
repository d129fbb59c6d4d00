"""Packaged pretrained models: export a run, load it by name, and reproduce the recorded reference predictions."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from h3de_lite import pretrained
from h3de_lite.training.checkpoint import build_model_from_config, write_json


def _fake_run(run_dir, *, seed: int = 0):
    """A run folder as ``h3de-lite train`` writes it, with an untrained tiny H3DE-Net (weights from ``seed``)."""
    torch.manual_seed(seed)
    model_config = {"kind": "h3de", "preset": "tiny", "overrides": {}}
    model = build_model_from_config(model_config)
    write_json(run_dir / "config.json", {
        "train": {"heatmap_loss": "softmax_ce", "val_method": "subvoxel", "val_roi_size": [64, 64, 32]},
        "model": model_config,
        "data": {"spacing": 3.0, "window": [-1000.0, 3000.0], "crop": [64, 64, 32]},
        "world_size": 1,
    })  # fmt: skip
    write_json(run_dir / "history.json", {"epochs": [], "best_epoch": 0})
    torch.save({"model": model.state_dict(), "optimizer": {"unused": 1}}, run_dir / "best.pt")


@pytest.fixture
def small_reference(monkeypatch):
    """A smaller reference case than the shipped one, so that the test takes a second."""
    monkeypatch.setattr(pretrained, "REFERENCE_CASE", {"seed": 3, "shape": [48, 48, 32], "incomplete": True})


def test_export_writes_weights_only_and_reproduces(tmp_path, monkeypatch, small_reference):
    run = tmp_path / "run"
    run.mkdir()
    _fake_run(run)
    dest = tmp_path / "weights"
    folder = pretrained.export(run, "demo", card={"command": "h3de-lite train ..."}, dest=dest)
    assert sorted(p.name for p in folder.iterdir()) == [
        "best.pt", "card.json", "config.json", "history.json", "reference.json"
    ]  # fmt: skip
    assert list(torch.load(folder / "best.pt", weights_only=True)) == ["model"]  # optimizer dropped
    assert json.loads((folder / "card.json").read_text()) == {"command": "h3de-lite train ..."}
    recorded = json.loads((folder / "reference.json").read_text())
    assert np.array(recorded["coords"], dtype=float).shape == (14, 3)

    monkeypatch.setattr(pretrained, "WEIGHTS_DIR", dest)
    assert pretrained.available() == ["demo"]
    assert pretrained.load("demo", device="cpu").model.training is False
    result = pretrained.reproduce("demo")
    assert result["max_diff"] < 1e-4


def test_reproduce_detects_changed_weights(tmp_path, monkeypatch, small_reference):
    run = tmp_path / "run"
    run.mkdir()
    _fake_run(run, seed=0)
    dest = tmp_path / "weights"
    folder = pretrained.export(run, "demo", card={}, dest=dest)
    _fake_run(run, seed=1)  # other weights under the recorded predictions
    state = torch.load(run / "best.pt", weights_only=True)
    torch.save({"model": state["model"]}, folder / "best.pt")
    monkeypatch.setattr(pretrained, "WEIGHTS_DIR", dest)
    assert pretrained.reproduce("demo")["max_diff"] > 1e-4


def test_export_refuses_bad_name_and_missing_run(tmp_path):
    with pytest.raises(ValueError, match="folder name"):
        pretrained.export(tmp_path, "../up", card={})
    with pytest.raises(FileNotFoundError, match="config.json"):
        pretrained.export(tmp_path, "demo", card={})


def test_export_failure_keeps_previous_package(tmp_path, monkeypatch, small_reference):
    run = tmp_path / "run"
    run.mkdir()
    _fake_run(run)
    dest = tmp_path / "weights"
    pretrained.export(run, "demo", card={"v": 1}, dest=dest)

    def boom(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(pretrained, "_predict_reference", boom)
    with pytest.raises(RuntimeError, match="interrupted"):
        pretrained.export(run, "demo", card={"v": 2}, dest=dest)
    assert json.loads((dest / "demo" / "card.json").read_text()) == {"v": 1}
    assert sorted(p.name for p in dest.iterdir()) == ["demo"]


@pytest.mark.parametrize("name", pretrained.available())
def test_shipped_model_reproduces_recorded_predictions(name):
    """Each packaged model predicts the generated reference case as it did when it was exported (1e-4 voxel)."""
    result = pretrained.reproduce(name)
    assert result["now"]["volume_sha256"] == result["recorded"]["volume_sha256"], "the phantom generator changed"
    assert result["max_diff"] < 1e-4


def test_export_carries_extra_files_and_a_ras_model_reproduces(tmp_path, monkeypatch, small_reference):
    # The afids model reads RAS-ordered arrays (it needs the scan's affine): its reference case must still record.
    run = tmp_path / "run"
    run.mkdir()
    _fake_run(run)
    config = json.loads((run / "config.json").read_text())
    config["data"].update(orientation="RAS", percentiles=[0.5, 99.5])
    write_json(run / "config.json", config)
    card_md = tmp_path / "MODEL_CARD.md"
    card_md.write_text("# demo\n")
    dest = tmp_path / "weights"
    folder = pretrained.export(run, "demo", card={}, dest=dest, extra_files={"MODEL_CARD.md": card_md})
    assert (folder / "MODEL_CARD.md").read_text() == "# demo\n"
    monkeypatch.setattr(pretrained, "WEIGHTS_DIR", dest)
    assert pretrained.load("demo", device="cpu").orientation == "RAS"
    assert pretrained.reproduce("demo")["max_diff"] < 1e-4
    with pytest.raises(ValueError, match="plain file name"):
        pretrained.export(run, "demo", card={}, dest=dest, extra_files={"card.json": card_md})
    with pytest.raises(FileNotFoundError, match="nowhere"):
        pretrained.export(run, "demo", card={}, dest=dest, extra_files={"x.md": tmp_path / "nowhere.md"})
    assert (folder / "MODEL_CARD.md").is_file()  # refused exports leave the package as it was
