"""A benchmark's report, printed and (``--save PATH``) written as the Markdown file a book page includes.

Every script that feeds a book page prints its report to stdout (progress goes to stderr) and, with ``--save``,
writes the same report to a Markdown file, atomically (:func:`h3de_lite.files.atomic_output`), creating the folder.
The book keeps these files in ``book/results/`` and includes them with MyST's ``{include}`` directive, so that no
measured number on a page is typed by hand. The scripts run as ``python benchmarks/<name>.py`` (their folder is first
on ``sys.path``) and import this module as ``from _report import add_save_option, saved_report``.

The Markdown is the printed text, line for line, in blocks: Markdown table rows (``|``), list items (``- `` and the
indented lines that continue them) and headings (``## ``) stay as they are; every run of other lines (the ``# ...``
header of a run, captions, summaries) goes verbatim into a ```` ```text ```` block. Blocks are separated by one
blank line. A first MyST comment line (``%``, not rendered) names the script that wrote the file.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
from collections.abc import Iterator
from pathlib import Path

from h3de_lite.files import atomic_output

__all__ = ["add_save_option", "saved_report", "to_markdown", "write_report"]


def _kind(line: str, previous: str | None) -> str:
    """``table``, ``list``, ``heading``, ``blank`` or ``text``; ``previous`` is the kind of the last non-blank line."""
    if not line.strip():
        return "blank"
    if line.startswith("|"):
        return "table"
    if line.startswith("- ") or (line.startswith("  ") and previous == "list"):
        return "list"
    if line.startswith("## ") or line.startswith("### "):
        return "heading"
    return "text"


def to_markdown(text: str) -> str:
    """The printed report ``text`` as Markdown: text runs fenced as ``text`` blocks, tables, lists, headings kept.

    Example:
        >>> print(to_markdown("# run 1\\n\\n| a |\\n|---|\\n| 1 |\\n- PASS"))
        ```text
        # run 1
        ```
        <BLANKLINE>
        | a |
        |---|
        | 1 |
        <BLANKLINE>
        - PASS
        <BLANKLINE>
    """
    blocks: list[tuple[str, list[str]]] = []
    previous: str | None = None
    pending_blank = False
    for line in text.rstrip("\n").splitlines():
        kind = _kind(line.rstrip(), previous)
        if kind == "blank":
            pending_blank = True
            continue
        same = blocks and blocks[-1][0] == kind and (not pending_blank or kind == "text")
        if same:
            if pending_blank:  # a blank line inside a text run stays in its block
                blocks[-1][1].append("")
            blocks[-1][1].append(line.rstrip())
        else:
            blocks.append((kind, [line.rstrip()]))
        previous, pending_blank = kind, False
    parts = []
    for kind, lines in blocks:
        body = "\n".join(lines)
        parts.append(f"```text\n{body}\n```" if kind == "text" else body)
    return "\n\n".join(parts) + "\n"


def write_report(path: str | Path, text: str, *, source: str | None = None) -> None:
    """Write the printed report ``text`` to ``path`` as Markdown (:func:`to_markdown`), atomically.

    Args:
        path: the Markdown file; its folder is created.
        text: what the script printed to stdout.
        source: the command named in the file's first line (a MyST comment); default: this process's command line.
    """
    source = source or "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    header = f"% Written by `{source}`; not edited by hand.\n\n"
    with atomic_output(path) as tmp:
        tmp.write_text(header + to_markdown(text), encoding="utf-8")


class _Tee:
    """A stdout stand-in that writes through to the real stream and keeps a copy."""

    def __init__(self, stream) -> None:
        self.stream = stream
        self.captured = io.StringIO()

    def write(self, text: str) -> int:
        self.captured.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


@contextlib.contextmanager
def saved_report(path: str | Path | None) -> Iterator[None]:
    """Inside the block, stdout is printed as usual and, if ``path`` is set, also captured; when the block ends
    without an exception the captured report is written to ``path`` (:func:`write_report`). Nothing is written if
    the block raises, so a failed run never replaces a saved report."""
    if path is None:
        yield
        return
    tee = _Tee(sys.stdout)
    with contextlib.redirect_stdout(tee):
        yield
    write_report(path, tee.captured.getvalue())
    print(f"report saved to {path}", file=sys.stderr)


def add_save_option(parser: argparse.ArgumentParser) -> None:
    """Add ``--save PATH`` to a benchmark's command line."""
    parser.add_argument(
        "--save",
        type=Path,
        default=None,
        metavar="PATH",
        help="also write the printed report to this Markdown file (atomically; e.g. book/results/<script>.md)",
    )
