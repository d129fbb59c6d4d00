"""Atomic file output: a reader never sees a half-written volume, label file or checkpoint."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_output"]


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` and move it onto ``path`` only if the block succeeds.

    The temporary name keeps the final name as its suffix (``.tmp-XXXX-case.nii.gz``) so libraries that choose the
    format from the extension (nibabel, numpy) still see it; ``os.replace`` makes the switch atomic, so readers never
    see a half-written file. Shared by every writer in h3de-lite
    (volumes, landmarks, markups, checkpoints).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".tmp-", suffix=f"-{path.name}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
