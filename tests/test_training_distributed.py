"""``fit`` under DistributedDataParallel: two gloo processes on CPU equal one process on the same global batch."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp
from _training_helpers import BlobDataset, TinyHeatmapNet, ddp_worker, free_port

from h3de_lite.training import TrainConfig, fit, load_checkpoint


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_two_gloo_ranks_match_one_process_with_the_global_batch(tmp_path, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    # 4 items, 2 epochs: per-rank batch 1 × 2 ranks (DDP averages the gradients) vs batch 2 in one process. The
    # model has instance norm only (per sample), and the loss is a batch mean, so the two are the same computation.
    base = TrainConfig(
        epochs=2, batch_size=1, schedule="constant", lr=1e-2, patience=None, device="cpu", checkpoint_every=1
    )
    mp.spawn(ddp_worker, args=(2, free_port(), str(tmp_path / "ddp"), str(tmp_path), base.to_dict()), nprocs=2)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))

    torch.manual_seed(0)
    single = TinyHeatmapNet()
    history = fit(
        single,
        BlobDataset(4),
        BlobDataset(1, seed=1),
        base.replace(batch_size=2),
        run_dir=tmp_path / "one",
        progress=False,
    )

    for name, value in single.state_dict().items():
        assert torch.equal(rank0["state"][name], rank1["state"][name]), name  # DDP keeps the ranks identical
        torch.testing.assert_close(rank0["state"][name], value, rtol=0, atol=1e-6)
    torch.manual_seed(0)
    start = TinyHeatmapNet().state_dict()["body.0.weight"]
    assert (rank0["state"]["body.0.weight"] - start).abs().max() > 1e-3  # it trained: 1e-6 is a tight tolerance
    for ddp_epoch, one_epoch in zip(rank0["history"]["epochs"], history["epochs"], strict=True):
        assert ddp_epoch["step"] == one_epoch["step"] == 2 * ddp_epoch["epoch"]
        assert ddp_epoch["loss"]["total"] == pytest.approx(one_epoch["loss"]["total"], rel=1e-5)  # mean of both ranks
        assert ddp_epoch["val_mre"] == pytest.approx(one_epoch["val_mre"], abs=1e-4)
    assert rank1["history"] == rank0["history"]  # validation broadcast from rank 0, losses reduced over ranks
    # Rank 0 alone wrote the run folder; the checkpoint holds both ranks' random states.
    checkpoint = load_checkpoint(tmp_path / "ddp" / "last.pt")
    assert checkpoint["config"]["world_size"] == 2 and len(checkpoint["rng"]) == 2
    assert sorted(os.listdir(tmp_path / "ddp")) == ["best.pt", "config.json", "history.json", "last.pt"]
