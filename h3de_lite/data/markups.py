"""Named landmark points in world coordinates: 3D Slicer markups (``.mrk.json``, legacy ``.fcsv``) and a plain CSV.

Every reader returns ``{label: (3,) position}`` in **RAS** mm, whatever the file stores; every writer takes the same.
Slicer files may store LPS (Slicer's default on disk since 4.11) or RAS; the two differ by the sign of the first two
axes, ``(x, y, z)_LPS = (-x, -y, z)_RAS``, so the conversion is exact.

Formats:

- ``.mrk.json`` (Slicer markups schema v1.0.x): ``markups[i].type == "Fiducial"`` (a point list), its
  ``coordinateSystem`` (``"LPS"`` default, or ``"RAS"``), ``coordinateUnits`` (``"mm"`` default, or ``"um"``) and
  ``controlPoints[j]`` with ``label``, ``position`` and ``positionStatus``. A point whose status is not
  ``"defined"`` (``"undefined"``, ``"preview"``, ``"missing"``) or that has no position reads as ``NaN``.
- ``.fcsv`` (legacy): ``#`` header lines ``# CoordinateSystem = LPS|RAS|0|1`` (0 = RAS, 1 = LPS; a file without the
  line is RAS, as in Slicer before 4.11) and ``# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,
  associatedNodeID``, then one comma-separated row per point.
- ``.csv``: a header row with a name column (``name`` or ``label``) and either ``x,y,z`` or ``r,a,s`` (RAS mm) or
  ``l,p,s`` (LPS mm, as Slicer's "export control points table" writes). A ``defined`` column that is false marks a
  missing point.

Missing points (``NaN`` positions) are **omitted** on write in every format: an absent label is how all three formats
say "not annotated", and :func:`h3de_lite.data.nifti.load_nifti_case` turns absent names back into ``NaN`` rows.

Explained in notebooks/02_data.ipynb.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Literal, Mapping

import numpy as np

from h3de_lite.files import atomic_output

__all__ = ["read_markups", "write_markups", "MARKUPS_SCHEMA", "FCSV_COLUMNS"]

CoordinateSystem = Literal["LPS", "RAS"]
NameField = Literal["label", "description"]

MARKUPS_SCHEMA: str = (
    "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/Schema/"
    "markups-schema-v1.0.3.json#"
)
"""The ``@schema`` URL written into ``.mrk.json`` files."""
FCSV_COLUMNS: tuple[str, ...] = (
    "id", "x", "y", "z", "ow", "ox", "oy", "oz", "vis", "sel", "lock", "label", "desc", "associatedNodeID",
)  # fmt: skip
"""Column order of a Slicer ``.fcsv`` file (``ow, ox, oy, oz`` is the orientation quaternion)."""

_LPS_FLIP = np.array([-1.0, -1.0, 1.0])


def _format_of(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".json"):
        return "mrk.json"
    if name.endswith(".fcsv"):
        return "fcsv"
    if name.endswith(".csv"):
        return "csv"
    raise ValueError(f"unsupported markups file {str(path)!r}: the name must end in .mrk.json, .fcsv or .csv")


def _coordinate_system(value: object, *, path: Path) -> CoordinateSystem:
    text = str(value).strip().upper()
    if text in ("LPS", "1"):
        return "LPS"
    if text in ("RAS", "0"):
        return "RAS"
    raise ValueError(
        f"markups file {str(path)!r}: coordinate system {value!r} is not supported; "
        "only LPS (1) and RAS (0) world coordinates can be read (not IJK voxel coordinates)"
    )


def _to_ras(position: np.ndarray, system: CoordinateSystem) -> np.ndarray:
    return position * _LPS_FLIP if system == "LPS" else position


def _add_point(points: dict[str, np.ndarray], label: str, position: np.ndarray, *, path: Path) -> None:
    if not label:
        raise ValueError(f"markups file {str(path)!r} has a point without a label; name every landmark")
    if label in points:
        raise ValueError(f"markups file {str(path)!r} has the label {label!r} more than once; labels must be unique")
    points[label] = position


# ----------------------------------------------------------------------------------------------------- readers
def _read_mrk_json(path: Path, name_from: NameField = "label") -> dict[str, np.ndarray]:
    data = json.loads(path.read_text(encoding="utf-8"))
    markups = data.get("markups") if isinstance(data, dict) else None
    if not isinstance(markups, list):
        raise ValueError("no 'markups' list at the top level")
    point_lists = [m for m in markups if isinstance(m, dict) and m.get("type") == "Fiducial"]
    if not point_lists:
        raise ValueError("no point list (a markup of type 'Fiducial') in the file")
    points: dict[str, np.ndarray] = {}
    for markup in point_lists:
        system = _coordinate_system(markup.get("coordinateSystem", "LPS"), path=path)
        units = markup.get("coordinateUnits", "mm")
        units = units[0] if isinstance(units, list) and units else units
        scale = {"mm": 1.0, "um": 1e-3}.get(str(units))
        if scale is None:
            raise ValueError(f"coordinateUnits {units!r} is not supported; use 'mm' or 'um'")
        for point in markup.get("controlPoints", []):
            position = point.get("position")
            if point.get("positionStatus", "defined") != "defined" or position is None:
                value = np.full(3, np.nan)
            else:
                value = np.asarray(position, dtype=np.float64)
                if value.shape != (3,):
                    raise ValueError(f"control point {point.get('label')!r} position must have 3 numbers")
                value = _to_ras(value * scale, system)
            _add_point(points, str(point.get(name_from, "")).strip(), value, path=path)
    return points


def _read_fcsv(path: Path, name_from: NameField = "label") -> dict[str, np.ndarray]:
    system: CoordinateSystem = "RAS"
    columns = list(FCSV_COLUMNS)
    rows: list[tuple[int, str]] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith("#"):
            key, sep, value = stripped.lstrip("#").partition("=")
            key = key.strip().lower()
            if sep and key == "coordinatesystem":
                system = _coordinate_system(value, path=path)
            elif sep and key == "columns":
                columns = [c.strip() for c in value.split(",")]
            continue
        rows.append((number, line))
    name_column = "desc" if name_from == "description" else "label"
    for needed in ("x", "y", "z", name_column):
        if needed not in columns:
            raise ValueError(f"the '# columns' header has no {needed!r} column")
    ix, iy, iz, il = (columns.index(c) for c in ("x", "y", "z", name_column))
    points: dict[str, np.ndarray] = {}
    for number, fields in zip((n for n, _ in rows), csv.reader(line for _, line in rows)):
        if len(fields) <= max(ix, iy, iz, il):
            raise ValueError(f"line {number} has {len(fields)} fields, expected {len(columns)} ({','.join(columns)})")
        value = np.array([float(fields[ix]), float(fields[iy]), float(fields[iz])])
        _add_point(points, fields[il].strip(), _to_ras(value, system), path=path)
    return points


def _read_csv(path: Path, name_from: NameField = "label") -> dict[str, np.ndarray]:
    if name_from != "label":
        raise ValueError("a .csv point table has no description column; read it with name_from='label'")
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = [h.strip().lower() for h in next(reader, [])]
        name_col = "name" if "name" in header else "label" if "label" in header else None
        if name_col is None:
            raise ValueError("the header row needs a 'name' (or 'label') column")
        for axes, system in ((("x", "y", "z"), "RAS"), (("r", "a", "s"), "RAS"), (("l", "p", "s"), "LPS")):
            if all(a in header for a in axes):
                break
        else:
            raise ValueError("the header row needs coordinate columns x,y,z (RAS), r,a,s (RAS) or l,p,s (LPS)")
        i_name = header.index(name_col)
        i_xyz = [header.index(a) for a in axes]
        i_defined = header.index("defined") if "defined" in header else None
        points: dict[str, np.ndarray] = {}
        for number, fields in enumerate(reader, start=2):
            if not any(f.strip() for f in fields):
                continue
            if len(fields) < len(header):
                raise ValueError(f"line {number} has {len(fields)} fields, expected {len(header)}")
            value = np.array([float(fields[i]) for i in i_xyz])
            if i_defined is not None and fields[i_defined].strip().lower() in ("false", "0", "no"):
                value = np.full(3, np.nan)
            _add_point(points, fields[i_name].strip(), _to_ras(value, system), path=path)  # type: ignore[arg-type]
    return points


def read_markups(path: str | Path, *, name_from: NameField = "label") -> dict[str, np.ndarray]:
    """Read named points from a Slicer ``.mrk.json``, a legacy ``.fcsv`` or a ``.csv`` file, in RAS mm.

    The format follows the file name; LPS files are converted to RAS. Points that are not defined read as ``NaN``.

    Args:
        path: the markups file.
        name_from: which field names a point: ``"label"`` (default) or ``"description"`` (the ``desc`` column of a
            ``.fcsv``, the ``description`` of a ``.mrk.json`` control point). Some releases keep the anatomical name
            in the description and a number in the label, e.g. the AFIDs ground truth (label ``1``, description
            ``AC``; :mod:`h3de_lite.data.afids`). A ``.csv`` table has labels only.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: unknown extension, unreadable or malformed content, duplicate or empty labels.

    Shape:
        - output: ``{label: (3,)}`` RAS mm, in file order

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     write_markups(f"{folder}/p.mrk.json", {"L0": np.array([1.0, 2.0, 3.0])})
        ...     read_markups(f"{folder}/p.mrk.json")["L0"].shape
        (3,)

    Explained in notebooks/02_data.ipynb.
    """
    path = Path(path)
    kind = _format_of(path)
    if name_from not in ("label", "description"):
        raise ValueError(f"name_from must be 'label' or 'description', got {name_from!r}")
    if not path.is_file():
        raise FileNotFoundError(f"markups file {str(path)!r} does not exist; check the path")
    reader = {"mrk.json": _read_mrk_json, "fcsv": _read_fcsv, "csv": _read_csv}[kind]
    try:
        return reader(path, name_from)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error, TypeError, KeyError) as exc:
        raise ValueError(f"could not read markups file {str(path)!r}: {exc}") from exc
    except ValueError as exc:
        if str(path) in str(exc):
            raise
        raise ValueError(f"could not read markups file {str(path)!r}: {exc}") from exc


# ----------------------------------------------------------------------------------------------------- writers
def _num(value: float) -> str:
    return repr(float(value))  # shortest text that reads back to the same float


def _validated(points: Mapping[str, np.ndarray], path: Path) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for label, position in points.items():
        if not isinstance(label, str) or not label.strip():
            raise ValueError(f"points for {str(path)!r}: every label must be a non-empty string, got {label!r}")
        value = np.asarray(position, dtype=np.float64)
        if value.shape != (3,):
            raise ValueError(f"points for {str(path)!r}: {label!r} must have shape (3,), got {value.shape}")
        missing = np.isnan(value)
        if missing.all():
            continue  # missing landmark: omitted (see module docstring)
        if missing.any() or not np.all(np.isfinite(value)):
            raise ValueError(f"points for {str(path)!r}: {label!r} must be 3 finite numbers or all NaN, got {value}")
        if label.strip() in out:
            raise ValueError(f"points for {str(path)!r}: the label {label.strip()!r} appears more than once")
        out[label.strip()] = value
    return out


def _mrk_json_text(points: dict[str, np.ndarray], system: CoordinateSystem) -> str:
    # identity orientation in RAS, expressed in the file's system (what Slicer writes)
    orientation = [float(v) for v in np.diag(_LPS_FLIP if system == "LPS" else np.ones(3)).ravel()]
    control_points = [
        {
            "id": str(i + 1),
            "label": label,
            "description": "",
            "associatedNodeID": "",
            "position": [float(v) for v in _to_ras(position, system)],  # RAS ↔ LPS is its own inverse
            "orientation": orientation,
            "selected": True,
            "locked": False,
            "visibility": True,
            "positionStatus": "defined",
        }
        for i, (label, position) in enumerate(points.items())
    ]
    document = {
        "@schema": MARKUPS_SCHEMA,
        "markups": [
            {
                "type": "Fiducial",
                "coordinateSystem": system,
                "coordinateUnits": "mm",
                "locked": False,
                "fixedNumberOfControlPoints": False,
                "labelFormat": "%N-%d",
                "lastUsedControlPointNumber": len(control_points),
                "controlPoints": control_points,
            }
        ],
    }
    return json.dumps(document, indent=4) + "\n"


def _fcsv_text(points: dict[str, np.ndarray], system: CoordinateSystem) -> str:
    buffer = io.StringIO()
    buffer.write("# Markups fiducial file version = 4.11\n")
    buffer.write(f"# CoordinateSystem = {system}\n")
    buffer.write(f"# columns = {','.join(FCSV_COLUMNS)}\n")
    writer = csv.writer(buffer, lineterminator="\n")
    for i, (label, position) in enumerate(points.items()):
        x, y, z = _to_ras(position, system)
        # id, x, y, z, orientation quaternion (w, x, y, z), vis, sel, lock, label, desc, associatedNodeID
        row = [f"vtkMRMLMarkupsFiducialNode_{i}", _num(x), _num(y), _num(z), 0, 0, 0, 1, 1, 1, 0, label, "", ""]
        writer.writerow(row)
    return buffer.getvalue()


def _csv_text(points: dict[str, np.ndarray], system: CoordinateSystem) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["name", "x", "y", "z"] if system == "RAS" else ["name", "l", "p", "s"])
    for label, position in points.items():
        writer.writerow([label, *(_num(v) for v in _to_ras(position, system))])
    return buffer.getvalue()


def write_markups(
    path: str | Path,
    points: Mapping[str, np.ndarray],
    coordinate_system: CoordinateSystem | None = None,
) -> None:
    """Write named RAS points to a Slicer ``.mrk.json``, a legacy ``.fcsv`` or a ``.csv`` file, atomically.

    Points whose position is all ``NaN`` (missing landmarks) are omitted. Numbers are written with Python's
    shortest round-trip ``repr``, so :func:`read_markups` gives back the same floats.

    Args:
        path: output file; the format follows the name (``.mrk.json``, ``.fcsv``, ``.csv``).
        points: ``{label: (3,)}`` in RAS mm.
        coordinate_system: ``"LPS"`` or ``"RAS"``, the system stored in the file. ``None`` picks the format's
            convention: LPS for ``.mrk.json``/``.fcsv`` (Slicer's default), RAS (``name,x,y,z``) for ``.csv``;
            an LPS ``.csv`` has columns ``name,l,p,s``.

    Shape:
        - points: ``{label: (3,)}``

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     write_markups(f"{folder}/p.fcsv", {"L0": np.array([1.0, 2.0, 3.0])}, coordinate_system="RAS")
        ...     read_markups(f"{folder}/p.fcsv")["L0"].shape
        (3,)

    Explained in notebooks/02_data.ipynb.
    """
    path = Path(path)
    kind = _format_of(path)
    if coordinate_system is None:
        system: CoordinateSystem = "RAS" if kind == "csv" else "LPS"
    elif str(coordinate_system).upper() in ("LPS", "RAS"):
        system = str(coordinate_system).upper()  # type: ignore[assignment]
    else:
        raise ValueError(f"coordinate_system must be 'LPS' or 'RAS', got {coordinate_system!r}")
    valid = _validated(points, path)
    text = {"mrk.json": _mrk_json_text, "fcsv": _fcsv_text, "csv": _csv_text}[kind](valid, system)
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
