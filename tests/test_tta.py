"""Test-time mirror averaging (h3de_lite.tta): known values, equivariance, and where it is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from h3de_lite.data.augment import mirror_rows
from h3de_lite.evaluation import Predictor, load_predictor
from h3de_lite.training import TrainConfig, build_model_from_config
from h3de_lite.tta import MirrorAverage, with_tta


class Scaled(nn.Module):
    """``(B, 1, D, H, W)`` → ``(B, 2, D, H, W)`` = ``[x, 2x]``: channel 0 named ``La``, channel 1 ``Ra``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, 2 * x], dim=1)


class Named(nn.Module):
    """Returns a dict that is not the anchor head's."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"volume": x}


def test_mirror_average_known_value() -> None:
    # direct [x, 2x]; mirrored input gives [x', 2x'], flipped back [x, 2x], swapped [2x, x]; mean [1.5x, 1.5x]
    x = torch.arange(2 * 4 * 3 * 2, dtype=torch.float64).reshape(2, 1, 4, 3, 2)
    out = MirrorAverage(Scaled(), names=("La", "Ra"))(x)
    torch.testing.assert_close(out, torch.cat([1.5 * x, 1.5 * x], dim=1), rtol=0, atol=0)
    # without an L/R pair nothing is swapped: the mean of [x, 2x] with itself
    same = MirrorAverage(Scaled(), names=("A", "B"))(x)
    torch.testing.assert_close(same, torch.cat([x, 2 * x], dim=1), rtol=0, atol=0)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_mirror_average_is_equivariant(axis: int) -> None:
    # A network with no symmetry of its own: mirroring the input mirrors the averaged output and swaps L/R channels.
    torch.manual_seed(0)
    net = nn.Conv3d(1, 4, kernel_size=3, padding=1).double()
    names = ("La", "Lb", "Ra", "Rb")
    tta = MirrorAverage(net, names=names, axis=axis)
    x = torch.rand(1, 1, 6, 5, 4, dtype=torch.float64)
    dim = 2 + axis
    mirrored = tta(torch.flip(x, dims=[dim]))
    expected = torch.flip(tta(x), dims=[dim])[:, [2, 3, 0, 1]]
    torch.testing.assert_close(mirrored, expected, rtol=0, atol=1e-12)
    assert not torch.allclose(net(x), tta(x))  # the average is not the network itself


def test_mirror_average_refuses_what_it_cannot_average() -> None:
    with pytest.raises(ValueError, match="tta must be one of"):
        with_tta(nn.Identity(), "rotate", names=())
    with pytest.raises(ValueError, match="axis must be 0, 1 or 2"):
        MirrorAverage(nn.Identity(), names=(), axis=3)
    with pytest.raises(ValueError, match="one channel per landmark name"):
        MirrorAverage(Scaled(), names=("La", "Ra", "X"))(torch.rand(1, 1, 4, 4, 4))
    with pytest.raises(ValueError, match="needs heatmaps"):
        MirrorAverage(Named(), names=())(torch.rand(1, 1, 4, 4, 4))  # neither heatmaps nor anchors
    with pytest.raises(ValueError, match="multiple of the anchor stride"):
        MirrorAverage(Anchors(), names=("La", "Ra"))(torch.rand(1, 1, 8, 8, 6))
    with pytest.raises(ValueError, match="tta must be one of"):
        Predictor(model=nn.Identity(), names=("La", "Ra"), tta="mirror")


class Anchors(nn.Module):
    """A stand-in anchor head: per cell of stride 4, two anchors (n_a = 2), landmarks ``La, Lb, Ra``.

    Logits and offsets are fixed functions of the cell's mean intensity, different per anchor, landmark and axis, so
    that nothing is symmetric by accident.
    """

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        b = x.shape[0]
        cells = torch.nn.functional.avg_pool3d(x, 4)[:, 0]  # (B, d, h, w)
        feat = cells.reshape(b, -1, 1, 1)  # (B, d·h·w, 1, 1)
        weights = torch.arange(1, 2 * 3 * 3 + 1, dtype=x.dtype).reshape(1, 1, 2, 3, 3)  # (n_a, L, xyz)
        offsets = (feat[..., None] * weights).reshape(b, -1, 3, 3)  # (B, A = d·h·w·n_a, L, 3)
        logits = offsets.sum(-1) + torch.linspace(-1, 1, 3, dtype=x.dtype)  # (B, A, L)
        return {"offsets": offsets, "logits": logits}


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_anchor_mirror_average_is_equivariant_and_maps_anchors_to_their_mirrors(axis: int) -> None:
    from h3de_lite.anchors import AnchorGrid

    names = ("La", "Lb", "Ra")  # Lb has no partner: it keeps its row
    tta = MirrorAverage(Anchors(), names=names, axis=axis)
    x = torch.rand(1, 1, 16, 12, 8, dtype=torch.float64)
    out, mirrored = tta(x), tta(torch.flip(x, dims=[2 + axis]))
    # Independent check through the anchor centres: the anchor at f in one frame is the anchor at mirror(f) in the
    # other (same radius), its offsets negated along the axis and its landmark names swapped.
    grid = AnchorGrid(tuple(x.shape[2:]), config="multi")
    centres, radii = grid.centers.double(), grid.radii.double()
    n_a = 3  # AnchorGrid "multi"; the stand-in has 2 anchors per cell: compare per (cell, anchor) instead
    cell_centres = centres[::n_a]  # (d·h·w, 3)
    mirror_centres = cell_centres.clone()
    mirror_centres[:, axis] = x.shape[2 + axis] - 1 - cell_centres[:, axis]
    match = (cell_centres[None] - mirror_centres[:, None]).abs().sum(-1).argmin(-1)  # cell -> its mirror cell
    assert torch.equal(match[match], torch.arange(len(match)))  # an involution
    assert radii.numel() == n_a * len(match)
    anchor_map = (match[:, None] * 2 + torch.arange(2)).reshape(-1)  # (d·h·w·2,) anchor -> mirrored anchor
    swap = [2, 1, 0]
    sign = torch.ones(3, dtype=torch.float64)
    sign[axis] = -1
    torch.testing.assert_close(mirrored["logits"], out["logits"][:, anchor_map][:, :, swap], rtol=0, atol=1e-12)
    torch.testing.assert_close(
        mirrored["offsets"], out["offsets"][:, anchor_map][:, :, swap] * sign, rtol=0, atol=1e-12
    )
    assert not torch.allclose(out["logits"], Anchors()(x)["logits"])  # averaging changed something


def _run(run: Path, inference: dict | None) -> Path:
    torch.manual_seed(0)
    spec = {"kind": "baseline", "name": "unet3d"}
    run.mkdir(parents=True)
    config = {"train": TrainConfig(heatmap_loss="softmax_ce", val_roi_size=(64, 64, 32)).to_dict(), "model": spec,
              "world_size": 1}  # fmt: skip
    if inference is not None:
        config["inference"] = inference
    (run / "config.json").write_text(json.dumps(config))
    torch.save({"model": build_model_from_config(spec).state_dict()}, run / "best.pt")
    return run


def test_the_runs_tta_is_its_default_and_averages_the_logits(tmp_path: Path) -> None:
    assert load_predictor(_run(tmp_path / "old", None), device="cpu").tta == "none"  # runs without the block
    run = _run(tmp_path / "flip", {"tta": "flip"})
    flip = load_predictor(run, device="cpu", method="argmax")
    assert flip.tta == "flip" and load_predictor(run, device="cpu", tta="none").tta == "none"  # explicit wins
    rows = mirror_rows(flip.names)  # the 14 MML names: L0..Lf <-> R0..Rf
    assert rows.tolist() == [*range(7, 14), *range(7)]
    z = torch.rand(1, 1, 64, 64, 32)  # a window as the network sees it (prepare_input: [0, 1])
    with torch.no_grad():
        logits = flip.model(z)
        mirror = torch.flip(flip.model(torch.flip(z, dims=[2])), dims=[2])[:, rows]
        torch.testing.assert_close(flip.network(z), torch.exp((logits + mirror) / 2), rtol=1e-5, atol=1e-6)
