"""Benchmark V-BRA against dense multi-head attention, its two STEP 3 backends, and the legacy (naive) gather.

For each thread count, token grid and method it measures the median time of a forward pass (``torch.no_grad``) and
of a forward + backward pass, and the peak memory of each, then prints one table per thread count with ratios taken in
the same run, and the acceptance checks. The forward speed-ups over dense attention in the notes (ratios of the
medians) come with a 95 % bootstrap interval over the timed rounds (:func:`speedup_interval`: how much this run's
ratio depends on which rounds the shared machine happened to give it) and with the ratio of the fastest calls (the
speed-up without interference, where both layers had an undisturbed call). The default 20 rounds: on the 2-core
machine of the book, runs of 5 rounds at 32×32×16 tokens put the same code at 11.7× to 13.7×
(book/benchmark_attention.md).

Methods (same dim, heads and parameters, batch 1):

* ``dense``  — :class:`h3de_lite.layers.attention.DenseAttention3d`, SDPA over all ``D·H·W`` tokens;
* ``naive``  — V-BRA with the legacy key/value gather (:func:`h3de_lite.layers.routing.naive_gather`: expand to
  ``(R, R, T, C)`` then ``torch.gather``) and no chunking, as in BiFormer's ``bra_legacy.py``;
* ``gather`` — :class:`h3de_lite.layers.attention.BiLevelRoutingAttention3d` with ``backend="gather"`` (index gather
  of whole regions into a reused buffer, chunked query regions, the flash kernel; on CPU the backward regathers
  chunk by chunk instead of keeping the gathers, and inference writes the output over q; with 2 threads or more the
  chunks run side by side on single-threaded worker threads) — what ``backend="auto"`` runs on CPU. Both modules run
  their float32 token projections through oneDNN in inference (``fwd``) and through ``F.linear`` while autograd
  records (``fwd+bwd``), see ``h3de_lite.layers.attention._linear``;
* ``serial`` — the ``gather`` method with its chunks of query regions run one after the other on the calling thread,
  each flash-kernel call using all threads (``h3de_lite.layers.workers.chunk_parallelism(False)``), as before V-BRA
  handed its chunks to single-threaded worker threads (``h3de_lite.layers.workers``). Same numbers, bit for bit;
  at 1 thread the two are one method, and ``serial`` is skipped;
* ``flex``   — the same module with ``backend="flex"``: one block-sparse ``torch.compile(flex_attention)`` call whose
  BlockMask comes from the routing, no gather. On CPU forward only (PyTorch's flex_attention has no CPU backward);
  the compilation happens in the warm-up call and is not timed.

Both modules are called the way :class:`h3de_lite.layers.block.VBRABlock` calls its attention: ``forward_channels_last``
on a contiguous channels-last ``(1, D, H, W, C)`` tensor (the LayerNorm's output). ``--input volume`` times the
modules' channels-first ``forward`` instead, which adds one transpose copy of the input to every method.

Every measurement runs in its own subprocess. Times: one process for the forward passes and one for the
forward + backward passes, each interleaving the methods round by round (a forward is timed in a process that runs
only forwards, as inference does; V-BRA's many mid-sized allocations were slower after the backward passes' large
ones had gone through the allocator). Peak memory:

* CPU: the resident set size (RSS). The worker sets ``MALLOC_MMAP_THRESHOLD_=65536`` so glibc returns every freed
  block above 64 KiB to the OS (RSS then follows the live tensors), runs one warm-up call, resets the kernel's RSS
  high-water mark (``echo 5 > /proc/self/clear_refs``), and reports ``VmHWM − VmRSS(before the call)`` from
  ``/proc/self/status``. Timing runs in separate workers with the default allocator.
* CUDA: ``torch.cuda.max_memory_allocated() − memory_allocated()`` around the measured call.

Usage::

    python benchmarks/attention.py                              # CPU, 1 and all threads, grids 16×16×8 … 64×64×32
    python benchmarks/attention.py --threads 1,2 --grids 32x32x16 # the acceptance setting only
    python benchmarks/attention.py --device cuda --dense-max-tokens 131072
    python benchmarks/attention.py --threads 1,2 --save book/results/attention.md  # the book's table
    python benchmarks/attention.py --from-log run.txt --save book/results/attention.md  # from a run's stdout+stderr

``--save PATH`` also writes the printed report to a Markdown file (``benchmarks/_report.py``). ``--from-log FILE``
measures nothing: it reads what a run printed (stdout and stderr together, e.g. ``... 2>&1 | tee run.txt``), checks
that every table in it is the one this script renders from the run's own ``measured`` progress lines, and prints (and
with ``--save`` writes) the report part, the progress lines left out.

Explained in book/benchmark_attention.md.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import gc
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

from _report import add_save_option, saved_report  # benchmarks/_report.py
from _rss import reset_peak, rss_environment, rss_kib  # benchmarks/_rss.py
from _worker import run_worker  # benchmarks/_worker.py

METHODS = ("dense", "naive", "serial", "gather", "flex")
ACCEPT_GRID = (32, 32, 16)
ACCEPT_SPEEDUP = 12.0  # forward, V-BRA (gather) against dense, at ACCEPT_GRID, for every thread count
FAST_S = 0.25  # calls shorter than this are timed several times per round
SLOW_BUDGET_S = 40.0  # a call stops being timed once its samples add up to this


def parse_grid(text: str) -> tuple[int, int, int]:
    """``"32x32x16"`` → ``(32, 32, 16)``, an argparse type (also of ``attention_runs.py``'s ``--grid``)."""
    parts = tuple(int(p) for p in text.lower().split("x"))
    if len(parts) != 3 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"a grid is D×H×W like 32x32x16, got {text!r}")
    return parts  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------------------------------
# worker side: one method, one grid, one kind of measurement
# ----------------------------------------------------------------------------------------------------------------------


def _build(method: str, cfg: dict):
    import torch

    from h3de_lite.layers.attention import BiLevelRoutingAttention3d, DenseAttention3d
    from h3de_lite.layers.routing import naive_gather

    torch.manual_seed(0)
    if method == "dense":
        module = DenseAttention3d(dim=cfg["dim"], num_heads=cfg["heads"])
    else:
        regions = cfg["regions"] ** 3
        module = BiLevelRoutingAttention3d(
            dim=cfg["dim"],
            num_heads=cfg["heads"],
            regions_per_side=cfg["regions"],
            topk=cfg["topk"],
            query_chunk=regions if method == "naive" else None,  # the legacy code gathers all regions at once
            backend="flex" if method == "flex" else "gather",
        )
        if method == "naive":
            module.gather = naive_gather
    device = torch.device(cfg["device"])
    x = torch.randn(1, cfg["dim"], *cfg["grid"], device=device)  # (1, C, D, H, W)
    if cfg.get("input", "tokens") == "tokens":
        x = x.permute(0, 2, 3, 4, 1).contiguous()  # (1, D, H, W, C): the LayerNorm output VBRABlock passes
    return module.to(device), x


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _steps(module, x, *, lanes: bool = True) -> dict:
    """The two timed calls. Channels-last tokens ``(1, D, H, W, C)`` go to ``forward_channels_last`` (how
    :class:`~h3de_lite.layers.block.VBRABlock` calls either module), a ``(1, C, D, H, W)`` volume to ``forward``.
    ``lanes=False``: V-BRA's chunks run on the calling thread (the ``serial`` method)."""
    import torch

    from h3de_lite.layers.workers import chunk_parallelism

    call = module.forward_channels_last if x.shape[-1] == module.dim else module

    def forward() -> None:
        with torch.no_grad(), chunk_parallelism(lanes):
            call(x)

    def forward_backward() -> None:
        module.zero_grad(set_to_none=True)
        with chunk_parallelism(lanes):
            call(x).sum().backward()

    return {"fwd": forward, "fb": forward_backward}


def _time_worker(cfg: dict) -> dict:
    """Time every (method, step) of ``cfg["plan"]`` in one process, interleaving the methods round by round so that
    a change in the load of the shared machine hits all methods alike.

    After a warm-up call, each round times every call; calls shorter than ``FAST_S`` are timed several times per
    round (more samples where one scheduler hiccup weighs most), and a call is dropped from later rounds once its
    samples exceed ``SLOW_BUDGET_S`` (at least one sample each). The median of all samples is reported.
    """
    import torch

    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    calls = {}
    for method, names in cfg["plan"].items():
        module, x = _build(method, cfg)
        steps = _steps(module, x, lanes=method != "serial")
        for name in names:
            calls[(method, name)] = steps[name]
    rounds: dict = {key: [] for key in calls}  # per call: the samples of each round, in seconds
    per_round: dict = {}
    for key, call in calls.items():
        call()  # warm-up (thread pools, kernel selection, allocator)
        _sync(cfg["device"])
        start = time.perf_counter()
        call()
        _sync(cfg["device"])
        first = time.perf_counter() - start
        rounds[key].append([first])
        per_round[key] = max(1, min(10, int(FAST_S / first)))
    for _ in range(cfg["repeats"] - 1):
        for key, call in calls.items():
            if sum(map(sum, rounds[key])) > SLOW_BUDGET_S:
                continue
            samples = []
            for _ in range(per_round[key]):
                start = time.perf_counter()
                call()
                _sync(cfg["device"])
                samples.append(time.perf_counter() - start)
            rounds[key].append(samples)
    result: dict = {method: {} for method in cfg["plan"]}
    for (method, name), values in rounds.items():
        result[method][f"{name}_ms"] = 1e3 * statistics.median(t for samples in values for t in samples)
        result[method][f"{name}_n"] = sum(map(len, values))
        result[method][f"{name}_rounds"] = [[round(1e3 * t, 3) for t in samples] for samples in values]
    return result


def _memory_worker(cfg: dict) -> dict:
    """Peak memory of each step of one method (``cfg["plan"]`` has one entry), after a warm-up call."""
    import torch

    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    ((method, names),) = cfg["plan"].items()
    module, x = _build(method, cfg)
    steps = _steps(module, x, lanes=method != "serial")
    result: dict = {}
    for name in names:
        steps[name]()  # warm-up
        module.zero_grad(set_to_none=True)
        gc.collect()
        if cfg["device"] == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            steps[name]()
            torch.cuda.synchronize()
            result[f"{name}_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            reset_peak()  # reset VmHWM to the current RSS
            base = rss_kib("VmRSS")
            steps[name]()
            result[f"{name}_mb"] = (rss_kib("VmHWM") - base) / 1024
    return {method: result}


def _worker(cfg: dict) -> dict:
    return _time_worker(cfg) if cfg["measure"] == "time" else _memory_worker(cfg)


# ----------------------------------------------------------------------------------------------------------------------
# driver side
# ----------------------------------------------------------------------------------------------------------------------


def _run_worker(cfg: dict) -> dict:
    """One measurement in a fresh process: ``{method: results}``, or each method's ``{"error": ...}``."""
    env = rss_environment() if cfg["measure"] == "memory" and cfg["device"] == "cpu" else None
    result = run_worker(__file__, cfg, env=env)
    if "error" in result:  # a worker's own result is keyed by method names
        return {method: {"error": result["error"][:120]} for method in cfg["plan"]}
    return result


def _naive_backward_bytes(grid: tuple[int, int, int], args: argparse.Namespace) -> int:
    """Bytes of the (N, R, R, T, c) gradient buffers the naive gather's backward scatters into (k and v, float32)."""
    regions = args.regions**3
    tokens = math.prod(math.ceil(n / args.regions) for n in grid)
    return 2 * args.heads * regions * regions * tokens * (args.dim // args.heads) * 4


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "—" if value is None else format(value, spec)


def _parse_threads(text: str) -> list[int]:
    """``"1,2"`` → ``[1, 2]``; ``all`` (or 0) means torch's default thread count."""
    values = []
    for part in text.split(","):
        part = part.strip().lower()
        if part in ("all", "0"):
            values.append(0)
        elif part.isdigit() and int(part) >= 1:
            values.append(int(part))
        else:
            raise argparse.ArgumentTypeError(f"threads are positive ints or 'all', comma-separated; got {text!r}")
    return values


def _plan(grid: tuple[int, int, int], threads: int, args: argparse.Namespace, notes: list[str]) -> dict[str, list[str]]:
    """Which steps each method runs at ``grid`` on ``threads`` threads (skips are explained in ``notes``)."""
    tokens = math.prod(grid)
    label = "×".join(map(str, grid))
    plan: dict[str, list[str]] = {}
    for method in args.methods:
        if method == "serial" and (threads == 1 or args.device != "cpu"):
            notes.append(
                "serial skipped on 1 thread and on CUDA: V-BRA hands its chunks to worker threads only on CPU with "
                "2 threads or more, so there it is the gather method"
            )
            continue
        if method == "dense" and tokens > args.dense_max_tokens:
            notes.append(
                f"dense skipped at {label} ({tokens} tokens > --dense-max-tokens {args.dense_max_tokens}: "
                "its cost grows as N²)"
            )
            continue
        plan[method] = ["fwd", "fb"]
        if method == "naive" and _naive_backward_bytes(grid, args) > args.naive_max_gb * 2**30:
            plan[method] = ["fwd"]
            notes.append(
                f"naive fwd+bwd skipped at {label}: its backward scatters into (R, R, T, C) buffers of "
                f"{_naive_backward_bytes(grid, args) / 2**30:.1f} GiB"
            )
        if method == "flex" and args.device == "cpu":
            plan[method] = ["fwd"]
            notes.append(f"flex fwd+bwd skipped at {label}: PyTorch's flex_attention has no CPU backward")
    return plan


def _measure(grid, threads: int, args: argparse.Namespace, notes: list[str]) -> dict[str, dict]:
    plan = _plan(grid, threads, args, notes)
    base = {
        "grid": grid,
        "dim": args.dim,
        "heads": args.heads,
        "regions": args.regions,
        "topk": args.topk,
        "device": args.device,
        "threads": threads,
        "repeats": args.repeats,
        "input": args.input,
    }
    results: dict[str, dict] = {method: {} for method in args.methods}
    for step in ("fwd", "fb"):  # one process per step: a forward is timed where only forwards run, as in inference
        step_plan = {method: [step] for method, steps in plan.items() if step in steps}
        if step_plan:
            for method, values in _run_worker({**base, "plan": step_plan, "measure": "time"}).items():
                results[method].update(values)
    for method in plan:
        for key, values in _run_worker({**base, "plan": {method: plan[method]}, "measure": "memory"}).items():
            results[key].update(values)
    for method in args.methods:
        print(
            f"  measured {method:6s} {'×'.join(map(str, grid))} threads={threads or 'all'}: {results[method]}",
            file=sys.stderr,
            flush=True,
        )
    return results


def _ratio(num: float | None, den: float | None, spec: str, suffix: str = "") -> str:
    return "—" if num is None or den is None else format(num / den, spec) + suffix


def _table(rows: dict[tuple, dict], grids: list, methods: tuple[str, ...]) -> list[str]:
    header = (
        "| grid (tokens) | method | fwd ms | fwd+bwd ms | n | fwd peak MB | fwd+bwd peak MB "
        "| fwd speed-up vs dense | fwd+bwd speed-up vs dense | fwd mem / dense | fwd+bwd mem / dense "
        "| fwd speed-up vs naive |"
    )
    columns = header.count("|") - 1
    lines = [header, "|" + "|".join(["---"] * columns) + "|"]
    for grid in grids:
        dense, naive = rows[(grid, "dense")], rows[(grid, "naive")]
        label = f"{'×'.join(map(str, grid))} ({math.prod(grid)})"
        for method in methods:
            row = rows[(grid, method)]
            if not row or "error" in row:
                reason = f"error: {row['error']}" if row else "skipped (see notes)"
                lines.append(f"| {label} | {method} | {reason} |" + " |" * (columns - 3))
                continue
            samples = "/".join(str(row[key]) if key in row else "—" for key in ("fwd_n", "fb_n"))
            cells = [_fmt(row.get(k)) for k in ("fwd_ms", "fb_ms")] + [samples]
            cells += [_fmt(row.get(k)) for k in ("fwd_mb", "fb_mb")]
            if method == "dense":
                cells += [""] * 5
            else:
                cells += [
                    _ratio(dense.get("fwd_ms"), row.get("fwd_ms"), ".1f", "×"),
                    _ratio(dense.get("fb_ms"), row.get("fb_ms"), ".1f", "×"),
                    _ratio(row.get("fwd_mb"), dense.get("fwd_mb"), ".2f"),
                    _ratio(row.get("fb_mb"), dense.get("fb_mb"), ".2f"),
                    "" if method == "naive" else _ratio(naive.get("fwd_ms"), row.get("fwd_ms"), ".1f", "×"),
                ]
            lines.append(f"| {label} | {method} | " + " | ".join(cells) + " |")
    return lines


def speedup_interval(
    reference: list[list[float]], method: list[list[float]], *, level: float = 0.95, draws: int = 2000, seed: int = 0
) -> tuple[float, float] | None:
    """Bootstrap interval of ``median(reference) / median(method)`` over the rounds both were timed in.

    The two were timed in the same rounds, one after the other, so a round is resampled as a pair: a slow minute of
    the shared machine that slows both calls of a round moves the ratio little, and the interval shows how much the
    ratio of this run still depends on which rounds it happened to get. Rounds are paired by index (a call dropped
    after ``SLOW_BUDGET_S`` has fewer rounds: only the rounds both have count).

    Args:
        reference: per round, the reference call's samples (e.g. dense attention's, in ms).
        method: per round, the other call's samples.
        level: coverage of the interval (percentile bootstrap).
        draws: bootstrap resamples of the rounds.
        seed: of the resampling (the same input gives the same interval).

    Returns:
        ``(low, high)``, or None with fewer than 3 rounds in common.

    Example:
        >>> speedup_interval([[26.0], [52.0], [39.0]], [[2.0, 2.0], [4.0, 4.0], [3.0, 3.0]])
        (13.0, 13.0)
    """
    import numpy as np

    count = min(len(reference), len(method))
    if count < 3:
        return None
    rng = np.random.default_rng(seed)
    ratios = np.empty(draws)
    for i, picked in enumerate(rng.integers(0, count, size=(draws, count))):
        ratios[i] = statistics.median(t for r in picked for t in reference[r]) / statistics.median(
            t for r in picked for t in method[r]
        )
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(ratios, [tail, 100 - tail])
    return float(low), float(high)


def _spread_text(reference: dict, method: dict) -> str:
    """``"95 % interval over rounds a–b×; fastest calls c×; "`` for the forward speed-up of ``method`` over
    ``reference`` (``""`` without per-round samples).

    The ratio of the fastest calls is the speed-up without the shared machine's interference where both calls had an
    undisturbed run. On a busy machine a one-second call rarely has one while a short call often does, and the ratio
    then favours the faster method, as it slightly does anyway through its larger number of samples. It is not the
    acceptance statistic (the medians are).
    """
    reference_rounds, method_rounds = reference.get("fwd_rounds", []), method.get("fwd_rounds", [])
    if not reference_rounds or not method_rounds:
        return ""
    text = f"fastest calls {min(map(min, reference_rounds)) / min(map(min, method_rounds)):.1f}×; "
    interval = speedup_interval(reference_rounds, method_rounds)
    return text if interval is None else f"95 % interval over rounds {interval[0]:.1f}–{interval[1]:.1f}×; " + text


def _checks(rows: dict[tuple, dict], grids: list, threads_label: str, ideal: float) -> list[str]:
    checks = []
    for grid in grids:
        dense, gather, flex = (rows[(grid, m)] for m in ("dense", "gather", "flex"))
        label = "×".join(map(str, grid))
        spread = _spread_text(dense, gather)  # interval and fastest calls, for the speed-up and acceptance lines
        if "fwd_ms" in dense and "fwd_ms" in gather:
            speedup = dense["fwd_ms"] / gather["fwd_ms"]
            line = (
                f"{threads_label}, {label}: V-BRA (gather) forward {speedup:.1f}× faster than dense "
                f"({spread}ideal by attention FLOPs R/k = {ideal:.0f}×, fraction "
                f"{speedup / ideal:.2f}), peak memory "
                f"{gather['fwd_mb']:.1f} MB vs dense {dense['fwd_mb']:.1f} MB"
            )
            if "fb_ms" in dense and "fb_ms" in gather:
                line += (
                    f"; forward+backward {dense['fb_ms'] / gather['fb_ms']:.1f}× faster, peak "
                    f"{gather['fb_mb']:.1f} MB vs {dense['fb_mb']:.1f} MB"
                )
            checks.append(line)
        serial = rows[(grid, "serial")]
        if "fwd_ms" in serial and "fwd_ms" in gather:
            line = (
                f"{threads_label}, {label}: chunks on worker threads (gather) against one after the other (serial): "
                f"forward {serial['fwd_ms'] / gather['fwd_ms']:.2f}× faster"
            )
            if "fb_ms" in serial and "fb_ms" in gather:
                line += f", forward+backward {serial['fb_ms'] / gather['fb_ms']:.2f}× faster"
            checks.append(line)
        if "fwd_ms" in flex and "fwd_ms" in gather:
            slower = flex["fwd_ms"] / gather["fwd_ms"]
            checks.append(
                f"{threads_label}, {label}: flex forward {flex['fwd_ms']:.1f} ms = {slower:.2f}× the gather path's time"
                + (" (flex slower)" if slower > 1 else " (flex faster)")
            )
        if tuple(grid) == ACCEPT_GRID and "fwd_ms" in dense and "fwd_ms" in gather:
            speedup = dense["fwd_ms"] / gather["fwd_ms"]
            ok = speedup >= ACCEPT_SPEEDUP and gather["fwd_mb"] <= dense["fwd_mb"]
            checks.append(
                f"acceptance {threads_label}, {label} (forward ≥ {ACCEPT_SPEEDUP:.0f}× faster than dense, peak memory "
                f"no higher): {'PASS' if ok else 'FAIL'} ({spread}medians {speedup:.2f}×)"
            )
        if tuple(grid) == (64, 64, 32) and "fwd_mb" in gather:
            worst = max(gather.get("fwd_mb", 0.0), gather.get("fb_mb", 0.0))
            checks.append(
                f"acceptance {threads_label}, {label} (peak memory < 4 GB in forward and forward+backward): "
                f"{'PASS' if worst < 4096 else 'FAIL'} ({worst:.0f} MB)"
            )
    return checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--grids",
        type=lambda s: [parse_grid(g) for g in s.split(",")],
        default=[(16, 16, 8), (32, 32, 16), (64, 64, 32)],
        help="token grids D×H×W, comma-separated",
    )
    parser.add_argument(
        "--methods",
        type=lambda s: tuple(m for m in METHODS if m in s.split(",")),
        default=METHODS,
        help=f"comma-separated subset of {','.join(METHODS)}",
    )
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--regions", type=int, default=4, help="regions per side S")
    parser.add_argument("--topk", type=int, default=4)
    parser.add_argument(
        "--repeats",
        type=int,
        default=20,
        help="timed rounds per measurement (median reported; more rounds narrow the speed-up intervals)",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--input",
        choices=("tokens", "volume"),
        default="tokens",
        help="tokens: channels-last (1, D, H, W, C) into forward_channels_last, as VBRABlock calls the attention "
        "(default); volume: (1, C, D, H, W) into forward, one channels-first transpose more for every method",
    )
    parser.add_argument(
        "--threads",
        type=_parse_threads,
        default=[1, 0],
        help="torch CPU thread counts, comma-separated, one table each ('all': torch's default); default 1,all",
    )
    parser.add_argument(
        "--dense-max-tokens",
        type=int,
        default=32 * 32 * 16,
        help="skip dense attention above this many tokens (its cost grows as N²)",
    )
    parser.add_argument(
        "--naive-max-gb",
        type=float,
        default=2.0,
        help="skip the naive gather's backward when its (R, R, T, C) gradient buffers exceed this",
    )
    parser.add_argument(
        "--from-log",
        type=Path,
        default=None,
        metavar="FILE",
        help="measure nothing: print (and --save) the report of an earlier run from what it printed (stdout+stderr)",
    )
    add_save_option(parser)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))))
        return 0
    with saved_report(args.save):
        if args.from_log is not None:
            print(report_from_log(args.from_log.read_text(encoding="utf-8")), end="")
            return 0
        return _benchmark(args, parser)


def _benchmark(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Measure every thread count, grid and method of ``args``; print the header, one table per thread count, the
    notes and the acceptance checks (the report)."""
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    ideal = args.regions**3 / args.topk  # N² / (N·k·T) = R / k
    default_threads = torch.get_num_threads()
    print(f"# V-BRA attention benchmark — {datetime.date.today().isoformat()}")
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()
    print(
        f"# device {args.device} ({device_name}, {os.cpu_count()} CPUs), torch {torch.__version__}; batch 1, "
        f"dim {args.dim}, heads {args.heads}, S={args.regions} (R={args.regions**3}), topk {args.topk}"
    )
    print(
        "# input: "
        + (
            "channels-last tokens (1, D, H, W, C) into forward_channels_last, as VBRABlock calls the attention"
            if args.input == "tokens"
            else "a (1, C, D, H, W) volume into forward (one channels-first transpose per call more than in VBRABlock)"
        )
    )
    mem_method = (
        "torch.cuda.max_memory_allocated"
        if args.device == "cuda"
        else "RSS high-water mark (VmHWM after clear_refs) minus RSS before the call, one subprocess each"
    )
    print(
        f"# time: median of the timed calls after one warm-up ({args.repeats} rounds, methods interleaved, one "
        f"process per step (fwd, fwd+bwd); calls under {FAST_S} s repeated up to 10× per round, calls stop after "
        f"{SLOW_BUDGET_S:.0f} s of samples; n = samples fwd/fwd+bwd; speed-ups: of the medians, with a 95 % "
        "bootstrap interval over the rounds (each round's two calls resampled together) and the ratio of the fastest "
        "calls)"
    )
    print(f"# peak memory: {mem_method}")
    print(f"# 1-minute load average at start: {os.getloadavg()[0]:.1f} (other processes share the CPU when > 0)")

    notes: list[str] = []
    checks: list[str] = []
    for threads in args.threads:
        threads_label = f"{threads or default_threads} thread{'s' if (threads or default_threads) > 1 else ''}"
        rows: dict[tuple, dict] = {}
        for grid in args.grids:
            for method, values in _measure(grid, threads, args, notes).items():
                rows[(grid, method)] = values
        for grid in args.grids:  # methods not run at all still need (empty) rows
            for method in METHODS:
                rows.setdefault((grid, method), {})
        print()
        print(f"## {threads_label}")
        print()
        for line in _table(rows, args.grids, args.methods):
            print(line)
        checks += _checks(rows, args.grids, threads_label, ideal)
    print()
    for line in list(dict.fromkeys(notes)) + checks:
        print(f"- {line}")
    return 0


_MEASURED = re.compile(r"^  measured (\w+)\s+(\d+)×(\d+)×(\d+) threads=(\w+): (\{.*\})$")


def measured_results(text: str) -> tuple[dict[str, dict[tuple, dict]], list[str]]:
    """Split what a run printed (stdout and stderr together) into its measured results and its report lines.

    Returns:
        ``({threads as printed: {(grid, method): results}}, the other lines)``: the ``  measured ...`` progress lines
        (stderr) hold each method's raw results (``fwd_ms``, ``fwd_rounds``, ...), in the order they ran.
    """
    measured: dict[str, dict[tuple, dict]] = {}
    report: list[str] = []
    for line in text.splitlines():
        match = _MEASURED.match(line)
        if match:
            grid = tuple(int(g) for g in match.group(2, 3, 4))
            measured.setdefault(match[5], {})[(grid, match[1])] = ast.literal_eval(match[6])
        else:
            report.append(line)
    return measured, report


def report_from_log(text: str) -> str:
    """The report part of what a run of this script printed to stdout and stderr together, checked.

    The ``  measured ...`` progress lines (stderr) hold each method's raw results; every other line is the report. Each
    table is rendered again from the measured lines of its thread count (:func:`_table`; the k-th table belongs to the
    k-th thread count of the measured lines, however stdout and stderr were interleaved) and must equal the printed
    one: a table edited by hand, or printed by another version of the script, is refused.

    Raises:
        ValueError: if the text holds no table, or a printed table differs from the one its measured lines give.
    """
    measured, report = measured_results(text)
    starts = [i for i, line in enumerate(report) if line.startswith("| grid (tokens) |")]
    if not starts or len(starts) != len(measured):
        raise ValueError(
            f"found {len(starts)} table(s) and measured lines for {len(measured)} thread count(s): expected what "
            "`python benchmarks/attention.py ...` printed, stdout and stderr together"
        )
    for start, rows in zip(starts, measured.values(), strict=True):
        grids = list(dict.fromkeys(grid for grid, _ in rows))
        methods = tuple(m for m in METHODS if any((g, m) in rows for g in grids))
        rows = {(grid, method): rows.get((grid, method), {}) for grid in grids for method in METHODS}
        expected = _table(rows, grids, methods)
        if report[start : start + len(expected)] != expected:
            raise ValueError(
                f"the table at report line {start + 1} differs from the one its measured lines give: the log was "
                "edited or comes from another version of benchmarks/attention.py"
            )
    return "\n".join(report).strip("\n") + "\n"


if __name__ == "__main__":
    sys.exit(main())
