"""A small in-memory landmark dataset and a tiny heatmap network for the training-engine tests.

Importable by name (not a test module) so that ``torch.multiprocessing.spawn`` children can unpickle them.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from h3de_lite.heatmaps import gaussian_heatmaps


class BlobDataset(Dataset):
    """Items whose image has a bright blob at each landmark; landmarks move with ``(seed, epoch, index)``.

    The randomness of an item comes from ``np.random.default_rng([seed, epoch, index])`` alone, the contract a
    dataset needs for bit-exact resumption (a random crop would be drawn the same way).
    """

    def __init__(
        self,
        n: int,
        *,
        shape=(16, 16, 16),
        num_landmarks: int = 2,
        seed: int = 0,
        missing: bool = False,
        same: bool = False,
    ):
        self.n, self.shape, self.num_landmarks, self.seed = n, tuple(shape), num_landmarks, seed
        self.missing, self.same = missing, same  # same: every item is item 0 of epoch 0
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict:
        if self.same:
            index, epoch = 0, 0
        else:
            epoch = self.epoch
        rng = np.random.default_rng([self.seed, epoch, index])
        size = np.asarray(self.shape, dtype=np.float64)
        landmarks = rng.uniform(3.0, size - 4.0, size=(self.num_landmarks, 3))
        if self.missing and index % 2:
            landmarks[-1] = np.nan
        g = torch.as_tensor(landmarks, dtype=torch.float32)
        blobs = gaussian_heatmaps(g, self.shape, sigma=1.5)[0].sum(0)  # (D, H, W)
        noise = torch.as_tensor(rng.uniform(0.0, 20.0, size=self.shape), dtype=torch.float32)
        image = (noise + 200.0 * blobs.clamp(max=1.0))[None]  # (1, D, H, W) in [0, 255]
        return {
            "image": image,
            "landmarks": g,
            "present": ~torch.isnan(g).any(-1),
            "spacing": torch.tensor([1.0, 1.0, 2.0]),
            "case_id": f"case{index:02d}",
        }


class TinyHeatmapNet(nn.Module):
    """Conv → instance norm → ReLU → (dropout) → conv: a heatmap model without batch norm, any input size.

    The first conv has no bias: the norm after it would cancel it, leaving it a gradient of rounding noise that Adam
    (which divides by the gradient's size) turns into full-size steps, different in every summation order.
    """

    def __init__(self, num_landmarks: int = 2, width: int = 4, dropout: float = 0.0):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv3d(1, width, 3, padding=1, bias=False),
            nn.InstanceNorm3d(width, affine=True),
            nn.ReLU(),
            nn.Dropout3d(dropout) if dropout else nn.Identity(),
            nn.Conv3d(width, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv3d(width, num_landmarks, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def free_port() -> int:
    """A TCP port nobody listens on right now (for MASTER_PORT)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ddp_worker(rank: int, world_size: int, port: int, run_dir: str, out_dir: str, config: dict) -> None:
    """One ``torchrun``-like process: the env variables torchrun sets, then ``fit``; saves its weights and history."""
    import os
    from pathlib import Path

    from h3de_lite.training import TrainConfig, fit

    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = TinyHeatmapNet()
    history = fit(
        model, BlobDataset(4), BlobDataset(1, seed=1), TrainConfig.from_dict(config), run_dir=run_dir, progress=False
    )
    torch.save({"state": model.state_dict(), "history": history}, Path(out_dir) / f"rank{rank}.pt")


class TinyAnchorNet(nn.Module):
    """The anchor head's contract in a few convs: full-size heatmaps, offsets and logits on the stride-4 grid."""

    def __init__(self, num_landmarks: int = 2, num_anchors: int = 1, width: int = 4):
        super().__init__()
        self.l, self.n = num_landmarks, num_anchors
        self.body = nn.Sequential(nn.Conv3d(1, width, 3, padding=1, bias=False), nn.GroupNorm(1, width), nn.ReLU())
        self.heatmap = nn.Conv3d(width, num_landmarks, 1)
        self.pool = nn.AvgPool3d(4)
        self.offsets = nn.Conv3d(width, num_anchors * num_landmarks * 3, 1)
        self.logits = nn.Conv3d(width, num_anchors * num_landmarks, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.body(x)
        g = self.pool(f)
        b = x.shape[0]
        offsets = self.offsets(g).permute(0, 2, 3, 4, 1).reshape(b, -1, self.n, self.l, 3).flatten(1, 2)
        logits = self.logits(g).permute(0, 2, 3, 4, 1).reshape(b, -1, self.n, self.l).flatten(1, 2)
        return {"heatmaps": self.heatmap(f), "offsets": offsets, "logits": logits}
