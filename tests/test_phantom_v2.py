"""Phantom v2: missing-tooth situations and their landmark truth, third molars, metal and streaks, effect switches,
noise, slice profile, the projector, field of view, head holder, metadata files and the CLI flag.

The seeds below were chosen for what their metadata says they hold (checked in each test first, so a change of the
generator that moves a situation to another seed fails with a clear message rather than testing nothing).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from h3de_lite.data.landmarks import LANDMARK_NAMES
from h3de_lite.data.phantom import DEFAULT_SHAPE, REQUIRED_FOV_MM, Tissue, generate_phantom, write_phantom_dataset
from h3de_lite.data.phantom_anatomy import _paint_holder, _place
from h3de_lite.data.phantom_render import _box_profile, _render_v2, fbp, forward_project
from h3de_lite.data.phantom_teeth import _BentRoot

SMALL = (64, 64, 48)
MEDIUM = (112, 112, 80)
APEX = {Tissue.DENTIN, Tissue.CANCELLOUS, Tissue.CORTICAL}
CROWN = {Tissue.ENAMEL, Tissue.DENTIN, Tissue.METAL}


def _row(name: str) -> int:
    return LANDMARK_NAMES.index(name)


def _label(tissue: np.ndarray, point: np.ndarray) -> Tissue:
    return Tissue(int(tissue[tuple(np.rint(point).astype(int))]))


def _mm(case, name: str) -> np.ndarray:
    return case.landmarks[_row(name)] * case.spacing


def test_retained_root_keeps_its_apex_landmarks() -> None:
    """MML convention: the crown is gone (crown landmark NaN), the roots are there (apex landmarks on their tips)."""
    case, tissue, meta = generate_phantom(seed=0, shape=MEDIUM, incomplete=True, return_tissue=True, return_meta=True)
    assert meta["teeth"]["lower-R-M2"]["state"] == "root"
    assert not case.present[_row("Ra")] and case.present[_row("Rb")] and case.present[_row("Rc")]
    assert meta["landmarks_present"]["Ra"] is False and meta["landmarks_present"]["Rb"] is True
    for name in ("Rb", "Rc"):
        assert _label(tissue, case.landmarks[_row(name)]) in APEX
    # the remnant is dentin between the two apices, ending under the crest: no enamel within 4 mm above its roots
    mid = 0.5 * (case.landmarks[_row("Rb")] + case.landmarks[_row("Rc")])
    lo = np.maximum(np.floor(mid - 4.0 / case.spacing).astype(int), 0)
    hi = np.ceil(mid + 4.0 / case.spacing).astype(int) + 1
    assert (tissue[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] == Tissue.DENTIN).sum() > 5


def test_implant_replaces_a_missing_cuspid() -> None:
    case, tissue, meta = generate_phantom(seed=22, shape=SMALL, incomplete=True, return_tissue=True, return_meta=True)
    assert meta["teeth"]["lower-L-C"]["state"] == "implant" and "implant:lower-L-C" in meta["metal"]
    assert not case.present[_row("L0")]  # an implant is not tooth structure
    assert "implant" in meta["situations"]
    assert (tissue == Tissue.METAL).sum() > 20
    assert case.volume[tissue == Tissue.METAL].max() > 4000.0  # titanium on the extended CT scale


def test_impacted_third_molar_lies_below_and_across() -> None:
    """A horizontally impacted third molar: its landmarks are present, on the tooth, and follow its axis, which lies
    across the second molar's axis and below its crown."""
    case, tissue, meta = generate_phantom(seed=4, shape=MEDIUM, return_tissue=True, return_meta=True)
    assert meta["third_molars"]["R"] == "horizontal" and case.is_complete
    assert _label(tissue, case.landmarks[_row("Rd")]) in CROWN
    second = _mm(case, "Ra") - 0.5 * (_mm(case, "Rb") + _mm(case, "Rc"))
    third = _mm(case, "Rd") - 0.5 * (_mm(case, "Re") + _mm(case, "Rf"))
    angle = math.degrees(math.acos(second @ third / np.linalg.norm(second) / np.linalg.norm(third)))
    assert angle > 60.0
    assert (_mm(case, "Rd") - _mm(case, "Ra")) @ (second / np.linalg.norm(second)) < -2.0


SITUATION_CASES = [  # (seed, incomplete, tooth, key in its metadata, value)
    (0, True, "lower-R-M2", "state", "root"),
    (10, True, "lower-L-M2", "state", "implant"),
    (4, True, "lower-L-M2", "state", "pontic"),
    (5, True, "lower-R-M2", "events", ["drift"]),
    (9, False, "lower-L-M2", "events", ["over_eruption"]),
    (42, False, "lower-L-M2", "restoration", "crown"),
    (1, False, "lower-R-M3", "third_molar", "partial"),
    (2, False, "lower-R-M3", "third_molar", "mesioangular"),
    (11, False, "lower-L-M3", "third_molar", "vertical"),
    (0, False, "lower-L-M3", "third_molar", "distoangular"),
    (7, False, "lower-L-M3", "root_form", "fused"),
    (6, False, "lower-R-M3", "root_form", "conical"),
]


@pytest.mark.parametrize("seed, incomplete, tooth, key, value", SITUATION_CASES)
def test_landmarks_on_their_structure_in_every_situation(seed: int, incomplete: bool, tooth: str, key: str,
                                                         value: object) -> None:  # fmt: skip
    """The landmark-truth check of tests/test_phantom.py, on cases chosen for each situation: one of the 8 voxels
    around every present landmark carries its tissue, and the tooth's landmarks are present as the MML convention
    says (see h3de_lite.data.phantom_teeth)."""
    case, tissue, meta = generate_phantom(seed=seed, shape=SMALL, incomplete=incomplete, return_tissue=True,
                                          return_meta=True)  # fmt: skip
    assert meta["teeth"][tooth][key] == value, meta["teeth"].get(tooth)
    for name, point, present in zip(LANDMARK_NAMES, case.landmarks, case.present):
        if present:
            low = np.floor(point).astype(int)
            corners = [tuple(np.clip(low + o, 0, np.asarray(SMALL) - 1)) for o in np.ndindex(2, 2, 2)]
            around = {Tissue(int(tissue[c])) for c in corners}
            assert around & (CROWN if name[1] in "0ad" else APEX), (name, around)
    side, letters = tooth.split("-")[1], {"C": "0", "M2": "abc", "M3": "def"}[tooth.split("-")[2]]
    expected = {"root": [False, True, True], "implant": [False] * 3, "pontic": [False] * 3}.get(str(value), [True] * 3)
    assert [bool(case.present[_row(side + letter)]) for letter in letters] == expected[: len(letters)]
    if value == "conical":  # one root, one apex: both apex landmarks on it
        np.testing.assert_allclose(case.landmarks[_row(side + "e")], case.landmarks[_row(side + "f")])


def test_switching_metal_off_keeps_the_case() -> None:
    """Each effect draws from its own stream: without metal the same head, pose and landmarks, and no metal."""
    case, tissue, meta = generate_phantom(seed=2, shape=SMALL, return_tissue=True, return_meta=True)
    plain, plain_tissue, plain_meta = generate_phantom(seed=2, shape=SMALL, return_tissue=True, return_meta=True,
                                                       effects={"metal": False})  # fmt: skip
    assert meta["metal"] and not plain_meta["metal"] and plain_meta["effects"]["metal"] is False
    assert np.array_equal(case.landmarks, plain.landmarks) and np.array_equal(case.spacing, plain.spacing)
    assert (tissue == Tissue.METAL).any() and not (plain_tissue == Tissue.METAL).any()
    assert not np.isin(plain_tissue, [Tissue.METAL]).any()
    enamel = np.percentile(case.volume[tissue == Tissue.ENAMEL], 99)
    assert case.volume[tissue == Tissue.METAL].max() > enamel + 1000.0  # metal outshines enamel
    assert plain.volume.max() < 5000.0


def test_streaks_stay_in_and_near_metal_slices() -> None:
    case, tissue = generate_phantom(seed=2, shape=MEDIUM, return_tissue=True)
    calm = generate_phantom(seed=2, shape=MEDIUM, effects={"streaks": False})
    diff = case.volume - calm.volume
    metal_slices = np.flatnonzero((tissue == Tissue.METAL).any(axis=(0, 1)))
    distance = np.min(np.abs(np.arange(MEDIUM[2])[:, None] - metal_slices[None, :]), axis=1)
    assert np.all(diff[:, :, distance > 10] == 0.0)  # filters along the slices reach a few slices, no further
    streaks = diff[:, :, metal_slices][tissue[:, :, metal_slices] == Tissue.SOFT]
    assert streaks.std() > 20.0 and streaks.min() < -100.0 and streaks.max() > 100.0  # dark and bright streaks


def test_projector_and_fbp_known_answers() -> None:
    """A disc of radius 12 pixels: its central ray is the diameter, and FBP gives back 1 inside and 0 outside."""
    n, radius = 48, 12.0
    i, j = np.meshgrid(np.arange(n) - (n - 1) / 2, np.arange(n) - (n - 1) / 2, indexing="ij")
    disc = (np.hypot(i, j) <= radius).astype(np.float32)
    sino = forward_project(disc, n_angles=90)
    centre = (sino.shape[1] - 1) // 2
    chord = 2.0 * math.sqrt(radius**2 - (centre - (sino.shape[1] - 1) / 2.0) ** 2)
    assert abs(sino[:, centre, 0].mean() - chord) < 0.5
    image = fbp(sino, n)[:, :, 0]
    r = np.hypot(i, j)
    assert abs(image[r < radius - 3].mean() - 1.0) < 0.03
    assert abs(image[(r > radius + 3) & (r < n / 2 - 2)].mean()) < 0.03


def test_box_profile_hand_computed() -> None:
    np.testing.assert_allclose(_box_profile(2.5), [0.3, 0.4, 0.3])  # (0.75, 1, 0.75) / 2.5
    np.testing.assert_allclose(_box_profile(3.0), [1 / 3, 1 / 3, 1 / 3])
    np.testing.assert_allclose(_box_profile(1.0), [1.0])


def test_bent_root_apex_landmark_on_the_bowed_axis() -> None:
    root = _BentRoot(np.array([0.0, 0.0, 0.0]), np.array([0.0, 0.0, -12.0]), (2.0, 2.0), 0.7, np.array([2.0, 0.0]))
    w = -12.0 + 0.5 * 1.3 * 0.7
    f = -w / 12.0
    np.testing.assert_allclose(root.apex_landmark, [-2.0 * f * (1 - f), 0.0, w])  # centre − bow·f(1 − f)
    u, v, w_ = (np.array([c]) for c in root.apex_landmark)
    assert root.mask(u, v, w_)[0]
    assert root.mask(np.array([-2.0 * 0.25]), np.array([0.0]), np.array([-6.0]))[0]  # mid-root bowed by 0.5 mm


def _render(labels: np.ndarray, noise: bool) -> np.ndarray:
    rngs = {k: np.random.default_rng(i) for i, k in enumerate(("render", "streaks", "motion"))}
    effects = {"streaks": False, "noise": noise, "kernel": False, "slice_thickness": False, "motion": False}
    volume, _ = _render_v2(labels, np.zeros_like(labels), np.array([1.0, 1.0, 1.0]), rngs, effects)
    return volume


def test_noise_rises_near_dense_tissue() -> None:
    labels = np.full((64, 64, 32), Tissue.SOFT, dtype=np.int8)
    labels[:16] = Tissue.CORTICAL
    for noise, low, high in ((True, 1.15, 3.0), (False, 0.9, 1.1)):
        volume = _render(labels, noise)
        near, far = volume[18:26].std(), volume[52:62].std()
        assert low < near / far < high, (noise, near, far)


def test_field_of_view_kinds_and_off_centre_jaw() -> None:
    """Default shape: from a dental crop (< 100 mm) to a whole head (> 170 mm), the jaw off-centre, every landmark
    2 mm inside; small shapes keep v1's jaw field of view."""
    points = np.array([[x, y, z] for x in (-28.0, 28.0) for y in (-12.0, 30.0) for z in (-20.0, 0.0)])
    fovs, offsets = [], []
    for k in range(60):
        grid, spacing, meta = _place(points, DEFAULT_SHAPE, None, np.random.default_rng(k),
                                     np.random.default_rng(1000 + k), fov=True)  # fmt: skip
        vox = grid.voxel(points)
        room = (np.asarray(DEFAULT_SHAPE) - 1 - vox) * spacing
        assert np.all(vox * spacing >= 2.0 - 1e-6) and np.all(room >= 2.0 - 1e-6)
        fovs.append(meta["fov_mm"][0])
        offsets.append(np.linalg.norm(vox.mean(axis=0) - (np.asarray(DEFAULT_SHAPE) - 1) / 2) * spacing[0])
    assert min(fovs) < 100.0 and max(fovs) > 170.0
    assert np.median(offsets) > 5.0
    for k in range(20):
        _, spacing, meta = _place(points, SMALL, None, np.random.default_rng(k), np.random.default_rng(k), fov=True)
        assert np.all(np.asarray(SMALL) * spacing >= np.asarray(REQUIRED_FOV_MM) - 1e-9) and meta["fov_kind"] == "jaw"


def test_head_holder_only_in_air_behind_the_head() -> None:
    labels = np.zeros((80, 80, 6), dtype=np.int8)
    i, j = np.meshgrid(np.arange(80), np.arange(80), indexing="ij")
    labels[np.hypot(i - 40, j - 50) <= 20] = Tissue.SOFT  # the back of the head at axis-1 index 30
    soft = (labels == Tissue.SOFT).sum()
    assert _paint_holder(labels, np.ones(3), np.random.default_rng(0)) == {"holder": True}
    device = np.argwhere(labels == Tissue.DEVICE)
    assert len(device) > 0 and (labels == Tissue.SOFT).sum() == soft  # painted into air only
    assert device[:, 1].min() < 30 - 9  # a table 9 mm thick behind the back of the head (axis-1 index 30)
    assert np.all(device[:, 1] < 50 + 20 + 12)  # the cradle holds the back half of the head, no more
    cut = np.zeros((80, 80, 6), dtype=np.int8)
    cut[np.hypot(i - 40, j - 10) <= 20] = Tissue.SOFT  # the head runs out of the volume at the back
    assert _paint_holder(cut, np.ones(3), np.random.default_rng(0)) == {"holder": False}
    assert not (cut == Tissue.DEVICE).any()


def test_dataset_writes_metadata_beside_each_case(tmp_path) -> None:
    from h3de_lite.data.dataset import LandmarkDataset
    from h3de_lite.data.mml import list_mml_cases, read_mml_case

    shape = (48, 48, 40)
    paths = write_phantom_dataset(tmp_path, seed=5, n_train=2, n_val=0, n_test=1, incomplete_fraction=0.5,
                                  shape=shape, progress=False)  # fmt: skip
    assert list_mml_cases(tmp_path, "train") == ["0000", "0001"]  # the JSON files are not cases
    for path in paths:
        case_id = path.name[:4]
        meta = json.loads((path.parent / f"{case_id}_meta.json").read_text())
        case = read_mml_case(path.parent, case_id)
        assert meta["case_id"] == case_id and meta["difficulty"] == "v2" and meta["split"] == path.parent.name
        assert [meta["landmarks_present"][n] for n in LANDMARK_NAMES] == case.present.tolist()
        assert meta["incomplete"] == (not case.is_complete)
    assert len(LandmarkDataset(tmp_path, "train", crop_size=(32, 32, 32))) == 2
    write_phantom_dataset(tmp_path, seed=6, n_train=1, n_val=0, n_test=0, shape=shape, progress=False,
                          overwrite=True)  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "test").iterdir()) == []  # old metadata went with its case
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == [
        "0000_label.npy", "0000_meta.json", "0000_spacing.npy", "0000_volume.nrrd"]  # fmt: skip


def test_cli_difficulty_flag_writes_v1(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    from h3de_lite.cli import main
    from h3de_lite.data.mml import read_mml_case
    from h3de_lite.data.phantom import _dataset_jobs

    argv = ["phantom", "--out", str(tmp_path), "--seed", "3", "--n-train", "1", "--n-val", "0", "--n-test", "0",
            "--shape", "48", "48", "40", "--no-progress", "--difficulty", "v1"]  # fmt: skip
    assert main(argv) == 0 and "(phantom v1)" in capsys.readouterr().out
    meta = json.loads((tmp_path / "train" / "0000_meta.json").read_text())
    assert meta["difficulty"] == "v1"
    (_, _, case_seed, incomplete), = _dataset_jobs(3, {"train": 1, "val": 0, "test": 0}, 0.3)
    expected = generate_phantom(seed=case_seed, shape=(48, 48, 40), incomplete=incomplete, difficulty="v1")
    assert np.array_equal(read_mml_case(tmp_path / "train", "0000").volume, expected.volume)
    with pytest.raises(SystemExit):
        main([*argv[:-1], "v3"])
