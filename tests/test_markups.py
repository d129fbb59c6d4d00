"""Slicer markups (.mrk.json, .fcsv) and CSV: roundtrips in LPS and RAS, real-format parsing, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from h3de_lite.data.markups import read_markups, write_markups

POINTS = {
    "L0": np.array([-53.388409961685827, -73.33572796934868, 0.1]),
    "La": np.array([49.8682950191571, -88.58955938697324, 12.25]),
    "Rf": np.array([-25.22749042145594, 59.255268199233729, -7.0]),
}


def _assert_same(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert list(got) == list(expected)
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name])  # exact: LPS ↔ RAS is a sign flip


@pytest.mark.parametrize("name", ["p.mrk.json", "p.fcsv", "p.csv"])
@pytest.mark.parametrize("system", ["LPS", "RAS", None])
def test_roundtrip(tmp_path: Path, name: str, system: str | None) -> None:
    write_markups(tmp_path / name, POINTS, coordinate_system=system)
    _assert_same(read_markups(tmp_path / name), POINTS)
    assert [p.name for p in tmp_path.iterdir()] == [name]  # atomic write: no temporary left behind


def test_mrk_json_stores_lps_as_slicer_does(tmp_path: Path) -> None:
    write_markups(tmp_path / "p.mrk.json", POINTS, coordinate_system="LPS")
    doc = json.loads((tmp_path / "p.mrk.json").read_text())
    markup = doc["markups"][0]
    assert doc["@schema"].endswith("markups-schema-v1.0.3.json#")
    assert markup["type"] == "Fiducial" and markup["coordinateSystem"] == "LPS" and markup["coordinateUnits"] == "mm"
    first = markup["controlPoints"][0]
    assert first["label"] == "L0" and first["positionStatus"] == "defined"
    assert first["position"] == [53.388409961685827, 73.33572796934868, 0.1]


def test_fcsv_layout(tmp_path: Path) -> None:
    write_markups(tmp_path / "p.fcsv", POINTS, coordinate_system="RAS")
    lines = (tmp_path / "p.fcsv").read_text().splitlines()
    assert lines[1] == "# CoordinateSystem = RAS"
    assert lines[2] == "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID"
    fields = lines[3].split(",")
    assert len(fields) == 14 and fields[11] == "L0" and float(fields[1]) == POINTS["L0"][0]


def test_csv_layout(tmp_path: Path) -> None:
    write_markups(tmp_path / "p.csv", POINTS)
    lines = (tmp_path / "p.csv").read_text().splitlines()
    assert lines[0] == "name,x,y,z"
    assert lines[1].split(",")[0] == "L0" and float(lines[1].split(",")[1]) == POINTS["L0"][0]


def test_missing_points_are_omitted(tmp_path: Path) -> None:
    points = {**POINTS, "Rb": np.full(3, np.nan)}
    for name in ("p.mrk.json", "p.fcsv", "p.csv"):
        write_markups(tmp_path / name, points)
        assert "Rb" not in read_markups(tmp_path / name)


def test_reads_slicer_documentation_example(tmp_path: Path) -> None:
    # the minimal example from the Slicer markups documentation: no units, no status, LPS
    path = tmp_path / "ex.mrk.json"
    path.write_text(
        '{"@schema": "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/'
        'Schema/markups-schema-v1.0.0.json#", "markups": [{"type": "Fiducial", "coordinateSystem": "LPS", '
        '"controlPoints": [{"label": "F-1", "position": [-53.4, -73.3, 0.0]}, '
        '{"label": "F-2", "position": [49.9, -88.6, 0.0]}]}]}'
    )
    points = read_markups(path)
    np.testing.assert_array_equal(points["F-1"], [53.4, 73.3, 0.0])
    np.testing.assert_array_equal(points["F-2"], [-49.9, 88.6, 0.0])


def test_mrk_json_undefined_points_and_micrometres(tmp_path: Path) -> None:
    doc = {
        "@schema": "x",
        "markups": [
            {"type": "Line", "controlPoints": [{"label": "ignored", "position": [0, 0, 0]}]},
            {
                "type": "Fiducial",
                "coordinateSystem": "RAS",
                "coordinateUnits": "um",
                "controlPoints": [
                    {"label": "L0", "position": [1000.0, -2000.0, 500.0], "positionStatus": "defined"},
                    {"label": "La", "position": [0.0, 0.0, 0.0], "positionStatus": "undefined"},
                    {"label": "Lb"},
                ],
            },
        ],
    }
    (tmp_path / "u.mrk.json").write_text(json.dumps(doc))
    points = read_markups(tmp_path / "u.mrk.json")
    assert list(points) == ["L0", "La", "Lb"]
    np.testing.assert_allclose(points["L0"], [1.0, -2.0, 0.5])
    assert np.isnan(points["La"]).all() and np.isnan(points["Lb"]).all()


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("# CoordinateSystem = 0\n", [1.5, -2.0, 3.0]),  # legacy numeric code: 0 = RAS
        ("# CoordinateSystem = 1\n", [-1.5, 2.0, 3.0]),  # 1 = LPS
        ("# CoordinateSystem = LPS\n", [-1.5, 2.0, 3.0]),
        ("", [1.5, -2.0, 3.0]),  # no header line: RAS, as in Slicer before 4.11
    ],
)
def test_fcsv_coordinate_system_header(tmp_path: Path, header: str, expected: list[float]) -> None:
    path = tmp_path / "legacy.fcsv"
    path.write_text(
        "# Markups fiducial file version = 4.6\n" + header
        + "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID\n"
        + "vtkMRMLMarkupsFiducialNode_0,1.5,-2,3,0,0,0,1,1,1,0,L0,,\n"
    )  # fmt: skip
    np.testing.assert_array_equal(read_markups(path)["L0"], expected)


def test_csv_slicer_export_lps_with_defined_column(tmp_path: Path) -> None:
    path = tmp_path / "table.csv"
    path.write_text("label,l,p,s,defined,selected,visible,locked,description\n"
                    "L0,1,2,3,true,true,true,false,\nLa,0,0,0,false,true,true,false,\n")  # fmt: skip
    points = read_markups(path)
    np.testing.assert_array_equal(points["L0"], [-1.0, -2.0, 3.0])
    assert np.isnan(points["La"]).all()


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\.mrk\.json, \.fcsv or \.csv"):
        read_markups(tmp_path / "p.txt")
    with pytest.raises(FileNotFoundError, match="absent.fcsv"):
        read_markups(tmp_path / "absent.fcsv")
    (tmp_path / "broken.mrk.json").write_text("{not json")
    with pytest.raises(ValueError, match="broken.mrk.json"):
        read_markups(tmp_path / "broken.mrk.json")
    (tmp_path / "nolist.mrk.json").write_text('{"markups": [{"type": "Line"}]}')
    with pytest.raises(ValueError, match="nolist.mrk.json.*Fiducial"):
        read_markups(tmp_path / "nolist.mrk.json")
    (tmp_path / "dup.csv").write_text("name,x,y,z\nL0,1,2,3\nL0,4,5,6\n")
    with pytest.raises(ValueError, match="dup.csv.*more than once"):
        read_markups(tmp_path / "dup.csv")
    (tmp_path / "short.fcsv").write_text("# CoordinateSystem = LPS\nid0,1,2\n")
    with pytest.raises(ValueError, match="short.fcsv.*line 2"):
        read_markups(tmp_path / "short.fcsv")
    (tmp_path / "ijk.fcsv").write_text("# CoordinateSystem = IJK\nid0,1,2,3,0,0,0,1,1,1,0,L0,,\n")
    with pytest.raises(ValueError, match="ijk.fcsv.*IJK"):
        read_markups(tmp_path / "ijk.fcsv")
    (tmp_path / "text.csv").write_text("name,x,y,z\nL0,one,2,3\n")
    with pytest.raises(ValueError, match="text.csv"):
        read_markups(tmp_path / "text.csv")
    with pytest.raises(ValueError, match="finite numbers or all NaN"):
        write_markups(tmp_path / "w.fcsv", {"L0": np.array([1.0, np.nan, 2.0])})
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        write_markups(tmp_path / "w.fcsv", {"L0": np.array([1.0, 2.0])})
    with pytest.raises(ValueError, match="coordinate_system"):
        write_markups(tmp_path / "w.fcsv", POINTS, coordinate_system="IJK")  # type: ignore[arg-type]
