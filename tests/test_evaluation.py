"""Evaluation on whole volumes: hand-computed errors and existence counts, preprocessing, readers, predict files.

Most tests use ``CodedNet``, a pointwise fake model whose heatmap ``l`` peaks exactly at the voxels holding the HU
value ``CODES_HU[l]``: a test writes that value where it wants landmark ``l`` predicted, so every prediction, and
every error, is known by hand. Being pointwise, its output does not depend on how the volume is cut into windows.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import nrrd
import numpy as np
import pytest
import torch
from torch import nn

from h3de_lite import pretrained
from h3de_lite.data import (
    DEFAULT_WINDOW,
    LANDMARK_NAMES,
    Case,
    LandmarkDataset,
    list_mml_cases,
    mml_paths,
    normalize_intensity,
    read_markups,
    read_mml_case,
    to_source_voxels,
    write_markups,
    write_nifti,
)
from h3de_lite.data.mml import MISSING_SENTINEL
from h3de_lite.data.phantom import write_phantom_dataset
from h3de_lite.evaluation import (
    PAPER_TABLE_I,
    Predictor,
    evaluate,
    find_cases,
    format_paper_table,
    load_predictor,
    predict_files,
    summarize_cases,
)
from h3de_lite.training import TrainConfig, build_model_from_config

L = len(LANDMARK_NAMES)
CODES_HU = 1000.0 + 100.0 * np.arange(L)  # landmark l is predicted where the volume holds CODES_HU[l]
BACKGROUND = -1000


class CodedNet(nn.Module):
    """Heatmap ``l = exp(-((x - c_l) / 0.002)²)`` with ``c_l`` the network input of ``CODES_HU[l]``: 1 exactly at those
    voxels, 0 (underflow) everywhere else, since codes lie 0.025 apart in the [0, 1] input."""

    def __init__(self) -> None:
        super().__init__()
        codes = normalize_intensity(CODES_HU, window=DEFAULT_WINDOW) / 255.0
        self.register_buffer("codes", torch.tensor(codes, dtype=torch.float32).view(1, L, 1, 1, 1))
        self.unused = nn.Parameter(torch.zeros(()))  # gives inference a device to read

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.exp(-(((x - self.codes) / 0.002) ** 2)) + 0.0 * self.unused


def coded_volume(shape: tuple[int, int, int], marks: dict[int, tuple]) -> np.ndarray:
    """Air everywhere; landmark ``l``'s code at ``marks[l]`` (an index or a tuple of slices)."""
    volume = np.full(shape, BACKGROUND, dtype=np.int16)
    for landmark, where in marks.items():
        volume[where] = CODES_HU[landmark]
    return volume


def coded_predictor(**kwargs) -> Predictor:
    return Predictor(model=CodedNet(), method="argmax", roi_size=(64, 64, 32), **kwargs)


SHAPE = (40, 36, 24)


def spread_positions(n: int = L) -> np.ndarray:
    """``n`` distinct integer voxels well inside SHAPE (room for offsets of a few voxels)."""
    i = np.arange(n)
    return np.stack([6 + 2 * i, 8 + (3 * i) % 20, 5 + (5 * i) % 12], axis=1).astype(np.float64)


# ---------------------------------------------------------------------------------------------------- radial errors
def test_mre_std_sdr_equal_hand_computed_offsets() -> None:
    # Landmarks 0-6 are predicted 0.5, -0.25, 0.4 voxels off, 7-13 by 4, 0, 2 voxels, at spacing (0.5, 0.8, 1.25) mm:
    # e1 = sqrt(0.25² + 0.2² + 0.5²) = sqrt(0.3525) mm, e2 = sqrt(2² + 0² + 2.5²) = sqrt(10.25) mm.
    spacing = np.array([0.5, 0.8, 1.25])
    predicted = spread_positions()
    offsets = np.where(np.arange(L)[:, None] < 7, [0.5, -0.25, 0.4], [4.0, 0.0, 2.0])
    truth = predicted - offsets
    volume = coded_volume(SHAPE, {l: tuple(predicted[l].astype(int)) for l in range(L)})
    case = Case(volume=volume, landmarks=truth, spacing=spacing, case_id="c0")

    result = evaluate(coded_predictor(), [case])
    e1, e2 = math.sqrt(0.3525), math.sqrt(10.25)
    np.testing.assert_array_equal(result.cases[0].coords, predicted)
    np.testing.assert_allclose(result.cases[0].errors, [e1] * 7 + [e2] * 7, rtol=1e-12)
    summary = result.summary["all"]
    assert summary["n_cases"] == 1 and summary["n_errors"] == 14 and summary["n_missed"] == 0
    assert summary["mre"] == pytest.approx((e1 + e2) / 2, rel=1e-12)
    assert summary["std"] == pytest.approx((e2 - e1) / 2, rel=1e-12)  # population SD of two equal-sized groups
    assert summary["sdr"] == {"2.0": 50.0, "2.5": 50.0, "3.0": 50.0, "4.0": 100.0}
    assert summary["per_landmark"]["L0"]["mre"] == pytest.approx(e1, rel=1e-12)
    assert summary["per_landmark"]["Rf"]["mre"] == pytest.approx(e2, rel=1e-12)
    assert result.summary["complete"]["mre"] == summary["mre"] and result.summary["incomplete"]["n_cases"] == 0


def test_existence_counts_hand_computed_and_missed_landmarks_counted_without_error() -> None:
    positions = spread_positions()
    marks_a = {l: tuple(positions[l].astype(int)) for l in range(12)}  # 12, 13 not predicted: 2 false negatives
    case_a = Case(volume=coded_volume(SHAPE, marks_a), landmarks=positions, spacing=[1.0, 1.0, 1.0], case_id="a")
    truth_b = positions.copy()
    truth_b[[0, 1, 2]] = np.nan  # teeth missing
    marks_b = {l: tuple(positions[l].astype(int)) for l in [0, *range(3, 14)]}  # 0 predicted on a missing tooth: FP
    case_b = Case(volume=coded_volume(SHAPE, marks_b), landmarks=truth_b, spacing=[1.0, 1.0, 2.0], case_id="b")

    result = evaluate(coded_predictor(threshold=0.5), [case_a, case_b])
    s = result.summary
    # complete (a): TP 12, FP 0, FN 2; incomplete (b): TP 11, FP 1, FN 0, TN 2
    assert s["complete"]["existence"] == pytest.approx({"precision": 1.0, "recall": 12 / 14, "f1": 24 / 26,
                                                        "tp": 12, "fp": 0, "fn": 2, "tn": 0}, rel=1e-12)  # fmt: skip
    assert s["incomplete"]["existence"] == pytest.approx({"precision": 11 / 12, "recall": 1.0, "f1": 22 / 23,
                                                          "tp": 11, "fp": 1, "fn": 0, "tn": 2}, rel=1e-12)  # fmt: skip
    exist = s["all"]["existence"]
    assert (exist["tp"], exist["fp"], exist["fn"], exist["tn"]) == (23, 1, 2, 2)
    assert exist["precision"] == pytest.approx(23 / 24, rel=1e-12)
    assert exist["recall"] == pytest.approx(23 / 25, rel=1e-12)
    assert exist["f1"] == pytest.approx(46 / 49, rel=1e-12)
    # the two missed landmarks have no error but are counted; the false positive has nothing to be measured against
    assert s["all"]["n_missed"] == 2 and s["all"]["n_errors"] == 23 and s["all"]["mre"] == 0.0
    assert np.isnan(result.cases[0].errors[12:]).all() and np.isnan(result.cases[0].coords[12:]).all()
    assert np.isnan(result.cases[1].errors[0]) and result.cases[1].present[0]
    assert [c.subset for c in result.cases] == ["complete", "incomplete"]
    rows = result.per_case_csv().splitlines()
    assert rows[1].startswith("a,complete,14,12,12,0,2,0,0.0,") and rows[2].startswith("b,incomplete,11,12,11,1,0,2,")


def test_resampled_predictions_map_back_to_the_stored_voxels() -> None:
    # stored at (0.5, 0.5, 1.0) mm, predicted at 1 mm: a 2×2×1 block [2k, 2k+1] × [2m, 2m+1] × n becomes exactly one
    # 1 mm voxel (k, m, n) (linear zoom halfway between equal values), which maps back to (2k + 0.5, 2m + 0.5, n)
    blocks = {l: (2 * (2 + l), 2 * (1 + (l * 3) % 15), 3 + l) for l in range(L)}
    volume = coded_volume(SHAPE, {l: (slice(i, i + 2), slice(j, j + 2), n) for l, (i, j, n) in blocks.items()})
    expected = np.array([[i + 0.5, j + 0.5, n] for i, j, n in blocks.values()])
    case = Case(volume=volume, landmarks=expected, spacing=[0.5, 0.5, 1.0], case_id="r")

    result = evaluate(coded_predictor(spacing=1.0), [case])
    np.testing.assert_allclose(result.cases[0].coords, expected, atol=1e-12)
    assert result.summary["all"]["mre"] == pytest.approx(0.0, abs=1e-12)
    without = evaluate(coded_predictor(), [case]).cases[0].coords  # on the stored grid: the block's first voxel
    np.testing.assert_array_equal(without, expected - [0.5, 0.5, 0.0])


def test_anchor_head_absences_are_missed_landmarks_without_coordinates() -> None:
    from _training_helpers import TinyAnchorNet

    torch.manual_seed(1)
    net = TinyAnchorNet(num_landmarks=L)
    with torch.no_grad():
        net.logits.bias.copy_(torch.linspace(-3.0, 3.0, L))  # existence probabilities from 0.05 to 0.95 by landmark
    truth = spread_positions()
    truth[[0, 13]] = np.nan
    volume = np.random.default_rng(0).integers(-1000, 2000, size=(32, 32, 32)).astype(np.int16)
    case = Case(volume=volume, landmarks=truth, spacing=[1.0, 1.0, 1.0], case_id="anchor")
    result = evaluate(Predictor(model=net, roi_size=(32, 32, 32)), [case])  # threshold None: probability >= 0.5
    c = result.cases[0]
    assert 0 < c.present.sum() < L  # the head calls some landmarks absent
    np.testing.assert_array_equal(np.isnan(c.coords).any(axis=1), ~c.present)
    np.testing.assert_array_equal(~np.isnan(c.errors), c.present & c.true_present)
    s = result.summary["incomplete"]
    assert s["n_missed"] == int((~c.present & c.true_present).sum()) == s["existence"]["fn"]
    assert s["n_errors"] == int((c.present & c.true_present).sum())


# ---------------------------------------------------------------------------------------------------- files on disk
def rotated_affine(spacing: np.ndarray, origin: np.ndarray) -> np.ndarray:
    angle = math.radians(20.0)
    c, s = math.cos(angle), math.sin(angle)
    rotation = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


def write_image(path: Path, volume: np.ndarray, affine: np.ndarray) -> None:
    if path.name.endswith(".nrrd"):  # NRRD stores LPS geometry, one row per array axis
        lps = np.diag([-1.0, -1.0, 1.0]) @ affine[:3]
        header = {"space": "left-posterior-superior", "space directions": lps[:, :3].T, "space origin": lps[:, 3]}
        nrrd.write(str(path), volume, header=header)
    else:
        write_nifti(path, volume, affine)


@pytest.mark.parametrize(
    ("image_suffix", "label_suffix"), [(".nii.gz", ".mrk.json"), (".nii.gz", ".csv"), (".nrrd", ".fcsv")]
)
def test_folder_of_images_with_landmark_files(tmp_path: Path, image_suffix: str, label_suffix: str) -> None:
    spacing, origin = np.array([0.5, 0.75, 1.5]), np.array([-30.0, 12.5, 40.0])
    affine = rotated_affine(spacing, origin)
    predicted = spread_positions()
    offset = np.array([2.0, -1.0, 1.0])  # voxels: error sqrt(1² + 0.75² + 1.5²) = sqrt(3.8125) mm for each landmark
    truth = predicted - offset
    truth[[4, 9]] = np.nan
    volume = coded_volume(SHAPE, {l: tuple(predicted[l].astype(int)) for l in range(L)})
    folder = tmp_path / "test"
    folder.mkdir()
    write_image(folder / f"0001{image_suffix}", volume, affine)
    world = truth @ affine[:3, :3].T + affine[:3, 3]
    write_markups(folder / f"0001{label_suffix}", {n: p for n, p in zip(LANDMARK_NAMES, world)})

    assert [c.case_id for c in find_cases(tmp_path, "test")] == ["0001"]
    result = evaluate(coded_predictor(), tmp_path, split="test")
    case = result.cases[0]
    assert case.subset == "incomplete" and list(np.flatnonzero(~case.true_present)) == [4, 9]
    np.testing.assert_allclose(case.coords, predicted, atol=1e-9)  # prediction in the stored volume's voxels
    np.testing.assert_allclose(case.world, predicted @ affine[:3, :3].T + affine[:3, 3], atol=1e-4)
    expected = math.sqrt(3.8125)
    np.testing.assert_allclose(case.errors[case.true_present], expected, rtol=1e-5)  # float32 affine in NIfTI
    assert result.summary["incomplete"]["mre"] == pytest.approx(expected, rel=1e-5)
    assert result.summary["incomplete"]["existence"]["fp"] == 2  # heatmaps without a threshold place all 14


def test_json_has_the_specified_keys_and_an_empty_subset_holds_nulls(tmp_path: Path) -> None:
    positions = spread_positions()
    case = Case(volume=coded_volume(SHAPE, {l: tuple(positions[l].astype(int)) for l in range(L)}),
                landmarks=positions, spacing=[1.0, 1.0, 1.0], case_id="only")  # fmt: skip
    result = evaluate(coded_predictor(), [case])
    paths = result.write(tmp_path / "out", stem="eval_test")
    data = json.loads(paths["json"].read_text())
    assert set(data) == {"complete", "incomplete", "all"}
    for subset in data.values():
        assert {"n_cases", "mre", "std", "sdr", "existence"} <= set(subset)
        assert list(subset["sdr"]) == ["2.0", "2.5", "3.0", "4.0"]
        assert {"precision", "recall", "f1"} <= set(subset["existence"])
    assert data["complete"]["n_cases"] == 1 and data["complete"]["sdr"]["2.0"] == 100.0
    empty = data["incomplete"]
    assert empty["n_cases"] == 0 and empty["mre"] is None and empty["std"] is None
    assert set(empty["sdr"].values()) == {None}
    assert [empty["existence"][k] for k in ("precision", "recall", "f1")] == [None, None, None]
    assert "| only |" not in paths["md"].read_text() and "| complete | 1 | 0.00 ± 0.00 |" in paths["md"].read_text()
    assert paths["csv"].read_text().splitlines()[1].startswith("only,complete,14,14,14,0,0,0,0.0,")


def test_find_cases_errors_name_the_fix(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"evaluation folder .*test' does not exist .*--split \."):
        find_cases(tmp_path, "test")
    (tmp_path / "test").mkdir()
    with pytest.raises(ValueError, match="no evaluation cases in"):
        find_cases(tmp_path, "test")
    write_nifti(tmp_path / "test" / "0003.nii.gz", np.zeros((8, 8, 8), np.int16), np.eye(4))
    with pytest.raises(FileNotFoundError, match=r"0003.nii.gz' has no landmark file; put 0003.mrk.json"):
        find_cases(tmp_path, "test")


# ---------------------------------------------------------------------------------------------------- predict files
MRK_SCHEMA = {  # the constraints of Slicer's markups schema v1.0.3 that a point list touches (written for this test)
    "type": "object",
    "required": ["@schema", "markups"],
    "properties": {
        "@schema": {"type": "string"},
        "markups": {"type": "array", "items": {
            "type": "object", "required": ["type"],
            "properties": {
                "type": {"enum": ["Fiducial", "Line", "Angle", "Curve", "ClosedCurve", "Plane", "ROI"]},
                "coordinateSystem": {"enum": ["LPS", "RAS"]},
                "coordinateUnits": {"enum": ["mm", "um"]},
                "locked": {"type": "boolean"},
                "fixedNumberOfControlPoints": {"type": "boolean"},
                "labelFormat": {"type": "string"},
                "lastUsedControlPointNumber": {"type": "integer"},
                "controlPoints": {"type": "array", "items": {
                    "type": "object",
                    "properties": {
                        "id": {"type": "string"}, "label": {"type": "string"}, "description": {"type": "string"},
                        "associatedNodeID": {"type": "string"},
                        "position": {"type": "array", "items": {"type": "number"}, "minItems": 3, "maxItems": 3},
                        "orientation": {"type": "array", "items": {"type": "number"}, "minItems": 9, "maxItems": 9},
                        "selected": {"type": "boolean"}, "locked": {"type": "boolean"},
                        "visibility": {"type": "boolean"},
                        # the published schema lists undefined/preview/defined; Slicer >= 5 also writes and reads
                        # "missing" (vtkMRMLMarkupsNode::PositionMissing), the status of a skipped point
                        "positionStatus": {"enum": ["undefined", "preview", "defined", "missing"]},
                    },
                }},
            },
        }},
    },
}  # fmt: skip


def test_predict_files_roundtrip_and_match_evaluate(tmp_path: Path) -> None:
    import jsonschema

    spacing, origin = np.array([0.6, 0.6, 1.2]), np.array([10.0, -20.0, 5.0])
    affine = rotated_affine(spacing, origin)
    positions = spread_positions()
    present = np.ones(L, dtype=bool)
    present[[2, 11]] = False  # no code written: predicted absent at threshold 0.5
    volume = coded_volume(SHAPE, {l: tuple(positions[l].astype(int)) for l in range(L) if present[l]})
    data = tmp_path / "data"
    data.mkdir()
    world_truth = positions @ affine[:3, :3].T + affine[:3, 3]
    for name, suffix in (("a", ".nii.gz"), ("b", ".nrrd")):
        write_image(data / f"{name}{suffix}", volume, affine)
        write_markups(data / f"{name}.mrk.json", dict(zip(LANDMARK_NAMES, world_truth)))
    predictor = coded_predictor(threshold=0.5)
    evaluated = {c.case_id: c for c in evaluate(predictor, data, split=".").cases}

    outputs = predict_files(predictor, [data / "a.nii.gz", data / "b.nrrd"], tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.csv", "a.mrk.json", "b.csv", "b.mrk.json"]
    for out in outputs:
        document = json.loads(out.markups.read_text())
        jsonschema.validate(document, MRK_SCHEMA)
        (markup,) = document["markups"]
        assert markup["type"] == "Fiducial" and markup["coordinateSystem"] == "LPS"
        assert [p["label"] for p in markup["controlPoints"]] == list(LANDMARK_NAMES)
        status = [p["positionStatus"] for p in markup["controlPoints"]]
        assert [i for i, s in enumerate(status) if s == "missing"] == [2, 11] and status.count("defined") == 12
        for path in (out.markups, out.table):  # both files read back as RAS mm, to 1e-6 mm
            points = read_markups(path)
            back = np.stack([points[n] for n in LANDMARK_NAMES])
            assert np.isnan(back[[2, 11]]).all()
            np.testing.assert_allclose(back[present], out.world[present], rtol=0, atol=1e-6)
            np.testing.assert_allclose(back[present], evaluated[out.case_id].world[present], rtol=0, atol=1e-6)
        np.testing.assert_allclose(out.world[present], world_truth[present], atol=1e-4)
        rows = out.table.read_text().splitlines()
        assert rows[0] == "name,x,y,z,present,score" and rows[3] == "Lb,nan,nan,nan,false,0.0"
        assert rows[1].endswith(",true,1.0")


# ---------------------------------------------------------------------------------------------------- run folders
def make_run(
    run: Path, *, data: dict | None = None, heatmap_loss: str = "mse", which: str = "best", **train: object
) -> Path:
    """A run folder as fit writes it, with an untrained (seeded) tiny MONAI U-Net: no training needed."""
    torch.manual_seed(0)
    spec = {"kind": "baseline", "name": "unet3d"}
    run.mkdir(parents=True)
    config = {"train": TrainConfig(heatmap_loss=heatmap_loss, val_roi_size=(64, 64, 32), **train).to_dict(),
              "model": spec, "world_size": 1}  # fmt: skip
    if data is not None:
        config["data"] = data
    (run / "config.json").write_text(json.dumps(config))
    torch.save({"model": build_model_from_config(spec).state_dict()}, run / f"{which}.pt")
    return run


@pytest.fixture(scope="module")
def phantom_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("eval") / "data"
    write_phantom_dataset(root, seed=3, n_train=0, n_val=0, n_test=2, incomplete_fraction=0.5, shape=(64, 64, 48),
                          progress=False)  # fmt: skip
    return root


DATA_4MM = {"spacing": 4.0, "window": list(DEFAULT_WINDOW), "crop": [64, 64, 32]}


@pytest.fixture(scope="module")
def phantom_eval(tmp_path_factory: pytest.TempPathFactory, phantom_root: Path):
    """An untrained run with a 4 mm data block, its predictor and its evaluation of the phantom test split."""
    predictor = load_predictor(make_run(tmp_path_factory.mktemp("run") / "run", data=DATA_4MM), device="cpu")
    return predictor, evaluate(predictor, phantom_root, split="test")


def test_all_labels_missing_gives_identical_predictions(tmp_path: Path, phantom_root: Path, phantom_eval) -> None:
    predictor, labelled = phantom_eval
    blind = tmp_path / "blind"
    shutil.copytree(phantom_root, blind)
    for case_id in list_mml_cases(blind, "test"):
        np.save(mml_paths(blind / "test", case_id)["label"], np.full((L, 3), MISSING_SENTINEL))
    assert all(np.isnan(read_mml_case(blind / "test", c).landmarks).all() for c in list_mml_cases(blind, "test"))

    unlabelled = evaluate(predictor, blind, split="test")
    assert [c.case_id for c in labelled.cases] == [c.case_id for c in unlabelled.cases] == ["0000", "0001"]
    for a, b in zip(labelled.cases, unlabelled.cases):
        np.testing.assert_array_equal(a.coords, b.coords)
        np.testing.assert_array_equal(a.score, b.score)
        np.testing.assert_array_equal(a.present, b.present)
        assert not np.isnan(a.errors).all() and np.isnan(b.errors).all()
    assert unlabelled.summary["all"]["mre"] is None and unlabelled.summary["complete"]["n_cases"] == 0
    assert unlabelled.summary["incomplete"]["existence"]["fp"] == 2 * L  # every landmark placed, none exists


def test_predictor_preprocessing_is_the_training_datasets(phantom_root: Path, phantom_eval) -> None:
    from h3de_lite.inference import predict_volume

    predictor, result = phantom_eval
    assert predictor.spacing == (4.0, 4.0, 4.0) and predictor.window == DEFAULT_WINDOW
    dataset = LandmarkDataset(phantom_root, "test", crop_size=None, random_crop=False, target_spacing=4.0)
    for index, case_id in enumerate(dataset.case_ids):
        item = dataset[index]  # the item training validates on: resampled to 4 mm, windowed to [0, 255]
        coords, _, _ = predict_volume(predictor.model, item["image"], roi_size=(64, 64, 32), method="subvoxel")
        spacing, source = item["spacing"].double().numpy(), item["source_spacing"].double().numpy()
        reference = to_source_voxels(
            coords.double().numpy(), origin=np.zeros(3), spacing=spacing, source_spacing=source
        )
        assert result.cases[index].case_id == case_id
        np.testing.assert_allclose(result.cases[index].coords, reference, atol=1e-5)  # the item's float32 spacings


def test_load_predictor_reads_the_data_block_or_falls_back(tmp_path: Path) -> None:
    old = load_predictor(make_run(tmp_path / "old"), device="cpu")  # config.json without "data"
    assert (old.spacing, old.window, old.roi_size) == (None, DEFAULT_WINDOW, (64, 64, 32))
    assert old.heatmap_loss == "mse" and old.method == "subvoxel" and not old.model.training
    data = {"spacing": [1.0, 1.5, 2.0], "window": None, "crop": [32] * 3}
    new = load_predictor(make_run(tmp_path / "new", data=data), device="cpu", method="argmax", threshold=0.25)
    assert (new.spacing, new.window, new.method, new.threshold) == ((1.0, 1.5, 2.0), None, "argmax", 0.25)
    assert "run " in new.source and "best.pt" in new.source
    with pytest.raises(FileNotFoundError, match="best.pt is written only by runs with validation data"):
        load_predictor(make_run(tmp_path / "lastonly", which="last"))
    assert load_predictor(tmp_path / "lastonly", which="last", device="cpu").source.endswith("(last.pt)")
    with pytest.raises(FileNotFoundError, match=r"run folder .*nowhere' does not exist"):
        load_predictor(tmp_path / "nowhere")


def test_the_runs_validation_strategy_is_its_default_strategy(tmp_path: Path) -> None:
    assert load_predictor(make_run(tmp_path / "plain"), device="cpu").strategy == "sliding"
    run = make_run(tmp_path / "zoomed", val_strategy="coarse_to_fine")
    assert load_predictor(run, device="cpu").strategy == "coarse_to_fine"
    assert load_predictor(run, device="cpu", strategy="sliding").strategy == "sliding"  # an explicit choice wins


def test_softmax_ce_runs_decode_exp_of_the_logits(tmp_path: Path) -> None:
    volume = np.random.default_rng(0).integers(-1000, 2000, size=(40, 40, 24)).astype(np.int16)
    plain = load_predictor(make_run(tmp_path / "mse"), device="cpu", method="argmax")
    ce = load_predictor(make_run(tmp_path / "ce", heatmap_loss="softmax_ce"), device="cpu", method="argmax")
    coords_mse, _, score_mse = plain.predict(volume, (1.0, 1.0, 2.0))
    coords_ce, _, score_ce = ce.predict(volume, (1.0, 1.0, 2.0))  # same weights (same seed), decoded from exp(logits)
    np.testing.assert_array_equal(coords_ce, coords_mse)  # exp keeps the arg-max
    np.testing.assert_allclose(score_ce, np.exp(score_mse), rtol=1e-5)


# ------------------------------------------------------------------------------------------------ pretrained, tables
def test_pretrained_lists_packaged_runs_and_refuses_unknown_names(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setattr(pretrained, "WEIGHTS_DIR", tmp_path / "weights")
    assert pretrained.available() == []
    with pytest.raises(ValueError, match=r"unknown pretrained model 'tiny'; available: none \(no weights"):
        pretrained.load("tiny")
    make_run(tmp_path / "weights" / "unet-phantom", data=DATA_4MM)
    (tmp_path / "weights" / "not-a-model").mkdir()
    assert pretrained.available() == ["unet-phantom"]
    with pytest.raises(ValueError, match=r"unknown pretrained model 'tiny'; available: unet-phantom;"):
        pretrained.load("tiny")
    predictor = pretrained.load("unet-phantom", device="cpu")
    assert predictor.spacing == (4.0, 4.0, 4.0) and predictor.source == "pretrained unet-phantom (best.pt)"
    assert load_predictor("unet-phantom", device="cpu").source == predictor.source  # a bare name is a package name


def test_paper_numbers_are_absent_until_sourced_and_never_mixed_with_ours() -> None:
    assert PAPER_TABLE_I is None  # must be copied from the paper with its citation, never typed in
    assert format_paper_table().startswith("Paper's Table I: not available")
    synthetic = {"citation": "a test fixture, not the paper",
                 "rows": {"Model X": {"all": {"mre": 9.87, "std": 6.54, "sdr": {"2.0": 12.3}}}}}  # fmt: skip
    text = format_paper_table(synthetic)
    lines = text.splitlines()
    assert lines[0] == "Reported in the paper (a test fixture, not the paper); not computed here:"
    assert "| Model X (paper) | all | — | 9.87 ± 6.54 | 12.3 | n/a | n/a | n/a | n/a | n/a | n/a |" in lines
    assert "| Model X (paper) | complete | — | n/a |" in text
    ours = summarize_cases([])
    assert ours["all"]["mre"] is None  # nothing of the paper's leaks into our summary
