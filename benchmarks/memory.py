"""Training memory of H3DE-Net: peak memory and time of one training step with and without activation checkpointing.

One training step is a forward pass, an MSE loss against a random target and the backward pass (gradients set to
None before, so their memory counts in the step). Each setting runs in its own subprocesses from the same seed, so
all settings start from identical weights and data; the driver then checks that they computed the same loss and the
same gradients ("equal results").

Settings: ``baseline`` (``checkpointing=False``), ``checkpointing`` (``checkpointing=True``: every V-BRA block keeps
only its input for the backward and recomputes its activations there), and with ``--channels-last`` the same two
with the network and input in ``torch.channels_last_3d`` memory format.

Peak memory, as in ``benchmarks/attention.py``:

* CPU: the resident set size. The memory worker sets ``MALLOC_MMAP_THRESHOLD_=65536`` (freed blocks above 64 KiB go
  back to the OS, so RSS follows the live tensors), runs one warm-up step, resets the RSS high-water mark
  (``echo 5 > /proc/self/clear_refs``) and reports ``VmHWM − VmRSS(before the step)``: the step's own peak, on top
  of the parameters and everything else already resident. Timing runs in another worker with the default allocator.
* CUDA: ``torch.cuda.max_memory_allocated() − memory_allocated()`` around the step.

Usage::

    python benchmarks/memory.py                                   # paper preset, 128×128×64, batch 1, CPU
    python benchmarks/memory.py --batch 2 --channels-last --threads 2
    python benchmarks/memory.py --preset tiny --size 64x64x32     # a quick run
    python benchmarks/memory.py --repeats 3 --save book/results/memory.md   # the book's table

``--save PATH`` also writes the printed report to a Markdown file (``benchmarks/_report.py``).

Explained in book/benchmark_attention.md (section "Training memory").
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _report import add_save_option, saved_report  # benchmarks/_report.py
from _rss import reset_peak, rss_environment, rss_kib  # benchmarks/_rss.py
from _worker import run_worker  # benchmarks/_worker.py

ACCEPT_CUT = 0.30  # checkpointing must cut the step's peak memory by at least this fraction


def _parse_size(text: str) -> tuple[int, int, int]:
    parts = tuple(int(p) for p in text.lower().split("x"))
    if len(parts) != 3 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"a size is D×H×W like 128x128x64, got {text!r}")
    return parts  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------------------------------
# worker side
# ----------------------------------------------------------------------------------------------------------------------


def _setup(cfg: dict):
    import torch

    from h3de_lite.models.h3de_net import H3DENet

    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg["device"])
    torch.manual_seed(0)
    model = H3DENet.from_preset(cfg["preset"], checkpointing=cfg["checkpointing"]).to(device).train()
    x = torch.randn(cfg["batch"], 1, *cfg["size"], device=device)
    target = torch.randn(cfg["batch"], model.num_landmarks, *cfg["size"], device=device)
    if cfg["channels_last"]:
        model = model.to(memory_format=torch.channels_last_3d)
        x = x.contiguous(memory_format=torch.channels_last_3d)

    def step() -> float:
        model.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(model(x), target)
        loss.backward()
        return float(loss)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    return model, step, sync


def _time_worker(cfg: dict) -> dict:
    _, step, sync = _setup(cfg)
    step()  # warm-up
    sync()
    times = []
    for _ in range(cfg["repeats"]):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return {"step_s": statistics.median(times), "n": len(times)}


def _memory_worker(cfg: dict) -> dict:
    import torch

    model, step, _ = _setup(cfg)
    step()  # warm-up
    gc.collect()
    if cfg["device"] == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss = step()
        torch.cuda.synchronize()
        peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
        hwm_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        reset_peak()  # reset VmHWM to the current RSS
        base = rss_kib("VmRSS")
        loss = step()
        peak_mb = (rss_kib("VmHWM") - base) / 1024
        hwm_mb = rss_kib("VmHWM") / 1024
    grads = {name: p.grad.detach().cpu() for name, p in model.named_parameters() if p.grad is not None}
    torch.save({"loss": loss, "grads": grads}, cfg["grads_path"])
    return {"peak_mb": peak_mb, "hwm_mb": hwm_mb, "loss": loss}


# ----------------------------------------------------------------------------------------------------------------------
# driver side
# ----------------------------------------------------------------------------------------------------------------------


def _run_worker(cfg: dict, measure: str) -> dict:
    """One measurement (``"memory"`` or ``"time"``) of ``cfg`` in a fresh process, or ``{"error": ...}``."""
    env = rss_environment() if measure == "memory" and cfg["device"] == "cpu" else None
    return run_worker(__file__, {**cfg, "measure": measure}, env=env)


def _max_grad_difference(path_a: str, path_b: str) -> tuple[float, float]:
    """Largest |g_a − g_b| over all gradients, relative to the largest |g_a|; and |loss_a − loss_b|."""
    import torch

    a, b = torch.load(path_a), torch.load(path_b)
    if a["grads"].keys() != b["grads"].keys():
        return float("inf"), abs(a["loss"] - b["loss"])
    diff = max(float((a["grads"][k] - b["grads"][k]).abs().max()) for k in a["grads"])
    scale = max(float(g.abs().max()) for g in a["grads"].values())
    return diff / scale, abs(a["loss"] - b["loss"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="paper", help="an h3de_lite.config preset (default: paper)")
    parser.add_argument("--size", type=_parse_size, default=None, help="input D×H×W (default: the preset's)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="timed training steps per setting (median reported)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--channels-last", action="store_true", help="also measure channels_last_3d memory format")
    add_save_option(parser)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        cfg = json.loads(args.worker)
        result = _time_worker(cfg) if cfg["measure"] == "time" else _memory_worker(cfg)
        print(json.dumps(result))
        return 0
    with saved_report(args.save):
        return _benchmark(args, parser)


def _benchmark(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Measure every setting; print the header, the table, the notes and the acceptance check (the report)."""
    import torch

    from h3de_lite.config import get_preset

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    size = args.size or get_preset(args.preset).input_size
    settings = [("baseline", False, False), ("checkpointing", True, False)]
    if args.channels_last:
        settings += [("baseline, channels-last", False, True), ("checkpointing, channels-last", True, True)]
    threads = args.threads or torch.get_num_threads()
    print(f"# H3DE-Net training memory — {datetime.date.today().isoformat()}")
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()
    print(
        f"# device {args.device} ({device_name}), torch {torch.__version__}, {threads} threads; preset "
        f"`{args.preset}`, input {args.batch}×1×{'×'.join(map(str, size))}; one step = forward, MSE loss, backward"
    )
    print(
        "# peak: "
        + (
            "torch.cuda.max_memory_allocated − memory_allocated before the step"
            if args.device == "cuda"
            else "RSS high-water mark during the step minus RSS before it (VmHWM after clear_refs), own subprocess"
        )
        + f"; time: median of {args.repeats} steps after a warm-up step, own subprocess"
    )
    print(f"# 1-minute load average at start: {os.getloadavg()[0]:.1f} (other processes share the CPU when > 0)")

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, checkpointing, channels_last in settings:
            cfg = {
                "preset": args.preset,
                "size": size,
                "batch": args.batch,
                "repeats": args.repeats,
                "threads": args.threads,
                "device": args.device,
                "checkpointing": checkpointing,
                "channels_last": channels_last,
                "grads_path": str(Path(tmp) / f"grads_{len(rows)}.pt"),
            }
            row = {**_run_worker(cfg, "memory"), **_run_worker(cfg, "time"), "grads_path": cfg["grads_path"]}
            print(f"  measured {label}: {row}", file=sys.stderr, flush=True)
            rows[label] = row

        base = rows["baseline"]
        print()
        print("| setting | step s | n | step peak MB | peak / baseline | step time / baseline | loss | max grad diff |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        checks = []
        for label, row in rows.items():
            if "error" in row or "error" in base:
                print(f"| {label} | error: {row.get('error', base.get('error'))} |" + " |" * 6)
                continue
            grad_diff, loss_diff = _max_grad_difference(base["grads_path"], row["grads_path"])
            print(
                f"| {label} | {row['step_s']:.2f} | {row['n']} | {row['peak_mb']:.0f} | "
                f"{row['peak_mb'] / base['peak_mb']:.2f} | {row['step_s'] / base['step_s']:.2f} | "
                f"{row['loss']:.6f} | {grad_diff:.1e} |"
            )
            if "channels-last" in label:
                checks.append(
                    f"{label}: {row['step_s'] / base['step_s']:.2f}× the baseline's step time, gradients "
                    + (
                        "equal to the baseline's"
                        if loss_diff == 0 and grad_diff < 1e-4
                        else f"NOT equal to the baseline's (largest difference {grad_diff:.1e} of the largest "
                        "gradient): not usable for training"
                    )
                )
            if label == "checkpointing":
                cut = 1 - row["peak_mb"] / base["peak_mb"]
                equal = loss_diff == 0 and grad_diff < 1e-4
                checks.append(
                    f"acceptance: checkpointing cuts the training step's peak memory by ≥ {ACCEPT_CUT:.0%} at equal "
                    f"results: {'PASS' if cut >= ACCEPT_CUT and equal else 'FAIL'} (cut {cut:.0%}, "
                    f"{row['step_s'] / base['step_s']:.2f}× the step time; loss difference {loss_diff:.1e}, "
                    f"largest gradient difference {grad_diff:.1e} of the largest gradient)"
                )
    print()
    print("- max grad diff: largest |gradient − baseline gradient| over all parameters, relative to the largest")
    print("  baseline gradient; checkpointing recomputes the same operations, so only summation order can differ")
    for line in checks:
        print(f"- {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
