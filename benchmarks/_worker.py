"""Measuring in a fresh process: a benchmark script runs itself as a worker and reads back what it printed.

A script that times or measures something in a process of its own (fresh allocator, thread pools and caches, its own
thread count) calls :func:`run_worker` with a JSON payload; the script, started as ``python script --worker
PAYLOAD``, measures and prints one JSON object as its last line of stdout. Used as ``from _worker import
run_worker, thread_counts`` (the scripts' folder is first on ``sys.path``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

__all__ = ["run_worker", "thread_counts"]


def run_worker(script: str, payload: object, *, env: dict[str, str] | None = None) -> dict:
    """Run ``python script --worker <payload as JSON>`` and return the JSON object it printed last.

    Args:
        script: the benchmark script (its ``__file__``).
        payload: what the worker measures, JSON-serialisable.
        env: the worker's environment (default: this process's).

    Returns:
        The worker's result, or ``{"error": <the last line it printed>}`` when it failed.
    """
    proc = subprocess.run(
        [sys.executable, script, "--worker", json.dumps(payload)], capture_output=True, text=True, env=env, check=False
    )
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        return {"error": tail[0][:160]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def thread_counts(text: str) -> list[int]:
    """``"1,2"`` → ``[1, 2]``: comma-separated positive thread counts (an ``argparse`` type).

    Example:
        >>> thread_counts("1,2")
        [1, 2]
    """
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"comma-separated positive ints, like 1,2; got {text!r}")
    return counts
