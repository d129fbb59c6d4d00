"""Training benchmark: optimizer-step time and peak memory of H3DE-Net and the Table I baselines, and whole-volume
inference time of the ``tiny`` preset.

**Training table.** One optimizer step is what :func:`h3de_lite.training.fit` does per batch, with the engine's own
pieces: ``prepare_input`` on a ``(B, 1, D, H, W)`` image in [0, 255], the forward pass (under the engine's autocast
with ``--amp``: bfloat16 where supported, else float16 with a gradient scaler),
:func:`h3de_lite.training.training_losses` on ``(B, 14, 3)`` landmarks (Gaussian targets of eq. 1 built in the step;
the loss of the preset's recipe: the spatial-softmax cross-entropy for ``tiny``, the MSE of eq. 13 for ``paper``),
``zero_grad``, backward, the engine's Adam step and ``float(loss)`` (which waits for the device, as the engine's
logging does). Data loading, augmentation, the learning-rate scheduler and checkpoints are not part of the step.
Rows:

* crop 64×64×32 (the ``tiny`` recipe's crop): H3DE-Net ``tiny`` and the ``size="tiny"`` baselines;
* crop 128×128×64 (the paper's crop): H3DE-Net ``paper`` and the ``size="paper"`` baselines;

each with the ratio of its step time and of its peak memory to the 3D U-Net (MONAI ``BasicUNet``) of the same crop,
measured in the same run. Each measurement runs in its own subprocess:

* time: ``--warmup`` steps, then ``--steps`` timed steps; the median (and minimum) is reported;
* peak memory, CPU: the worker sets ``MALLOC_MMAP_THRESHOLD_=65536`` so that glibc returns freed blocks to the OS
  (RSS then follows the live tensors), notes its RSS after the imports and before building anything, runs the
  warm-up steps (which create Adam's moment buffers), resets the kernel's RSS high-water mark
  (``echo 5 > /proc/self/clear_refs``) and runs one more step. Peak = ``VmHWM`` − RSS after the imports: parameters,
  gradients, Adam states, activations, temporaries and the kernels' scratch buffers of a step;
* peak memory, CUDA: ``torch.cuda.max_memory_allocated()`` during a step after the warm-up, minus what was allocated
  before the model was built (``max_memory_reserved``, what the caching allocator held, goes to ``--json``);
* ``--one-worker`` (for rows whose steps take minutes on a CPU): the timing subprocess, started with the memory
  workers' allocator settings, also records the high-water mark over its timed steps, and no memory worker runs.

**Memory of the paper preset at batch 2 with AMP** on a 16 GB GPU (Colab's T4). With ``--amp`` on a GPU it is
measured. Otherwise it is estimated from two float32 measurements of the ``paper`` row's peak, at batch 1 and 2:
``a = peak(2) − peak(1)`` is the memory per sample (activations and per-sample temporaries), ``f = peak(1) − a`` the
part that does not grow with the batch (float32 parameters, gradients, Adam's two moments: 16 bytes per parameter,
plus scratch). Under AMP the activations are stored in 16 bits, so the estimate is ``f + 2 bytes × parameters (the
16-bit weight copies autocast keeps) + 2 × a / 2``; the float32 peak at batch 2 is an upper bound (some activations,
e.g. of normalisation and softmax, stay float32 under autocast). A CPU run measures CPU kernels' memory, which need
not equal cuDNN's workspaces: the estimate says whether the preset fits with a margin, not to the MiB.

**Inference table.** :func:`h3de_lite.inference.predict_volume` on the phantom of
:func:`h3de_lite.data.phantom.generate_phantom` (seed 0, default shape 192×192×128), windowed to [0, 255], with a
randomly initialised ``tiny`` network (weights do not change the cost), strategies ``sliding`` (overlap 0.25) and
``coarse_to_fine``, in a subprocess per strategy: one warm-up forward pass on one window, then ``--infer-repeats``
timed calls (median), and the RSS high-water mark over the calls minus the RSS before them (default allocator).

Numbers depend on the device and on what else runs on it; the header records the load average.

Usage::

    python benchmarks/training.py --quick                          # smoke run, a few minutes on 2 CPU cores
    python benchmarks/training.py --groups tiny --threads 2        # the 64×64×32 rows and the inference table
    python benchmarks/training.py --groups paper --steps 1 --one-worker --skip-inference   # 128×128×64 on a CPU
    python benchmarks/training.py --device cuda --amp --json out.json
    python benchmarks/training.py --device cuda --amp --compile
    python benchmarks/training.py --groups tiny --steps 5 --threads 2 --save book/results/training_tiny.md

``--save PATH`` also writes the printed report to a Markdown file (``benchmarks/_report.py``); ``--json`` keeps
every raw result (single step times, warm-up times, memory before the step).

Explained in book/benchmark_training.md.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _report import add_save_option, saved_report  # benchmarks/_report.py
from _rss import reset_peak, rss_environment, rss_kib  # benchmarks/_rss.py

#: crop groups: (preset / baseline size, default crop, default timed steps)
GROUPS: dict[str, tuple[str, tuple[int, int, int], int]] = {
    "tiny": ("tiny", (64, 64, 32), 10),
    "paper": ("paper", (128, 128, 64), 3),
}
MODELS = ("unet3d", "h3de", "vnet", "resunet3d")  # the reference first: rows print as they are measured
LABELS = {
    "h3de": "H3DE-Net `{size}`",
    "unet3d": "3D U-Net (MONAI BasicUNet), {size}",
    "vnet": "V-Net (MONAI VNet), {size}",
    "resunet3d": "Residual 3D U-Net (MONAI UNet), {size}",
}
REFERENCE = "unet3d"
NUM_LANDMARKS = 14
GPU_LIMIT_MIB = 15_000  # a 16 GB Colab T4 (15,360 MiB) less the CUDA context and allocator slack
INFER_TARGET_S = 10.0
MIB = 2**20


def _parse_crop(text: str) -> tuple[int, int, int]:
    parts = tuple(int(p) for p in text.lower().replace("×", "x").split("x"))
    if len(parts) != 3 or min(parts) < 1 or any(p % 32 for p in parts):
        raise argparse.ArgumentTypeError(f"a crop is D×H×W in multiples of 32 like 128x128x64, got {text!r}")
    return parts  # type: ignore[return-value]


def _fmt_crop(crop: Any) -> str:
    return "×".join(str(int(c)) for c in crop)


# ----------------------------------------------------------------------------------------------------------------------
# worker side: one model, one crop, one batch size, one kind of measurement
# ----------------------------------------------------------------------------------------------------------------------


def _sync(device: Any) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _imports() -> None:
    """Import everything a worker needs, so that the RSS noted afterwards holds the libraries, not the model."""
    import torch  # noqa: F401

    import h3de_lite.inference  # noqa: F401
    import h3de_lite.models  # noqa: F401
    import h3de_lite.training  # noqa: F401


def _build_model(name: str, size: str):
    from h3de_lite.models import H3DENet, build_baseline

    if name == "h3de":
        return H3DENet.from_preset(size, num_landmarks=NUM_LANDMARKS)
    return build_baseline(name, num_landmarks=NUM_LANDMARKS, size=size)


def _training_step(cfg: dict) -> tuple[Any, Any]:
    """Build the model, optimizer and a fixed batch; return ``(step, model)`` where ``step()`` does one optimizer step
    exactly as :func:`h3de_lite.training.fit` does (see the module docstring) and returns the loss as a float."""
    from contextlib import nullcontext

    import torch

    from h3de_lite.inference import prepare_input
    from h3de_lite.training import TrainConfig, recipe_for, training_losses
    from h3de_lite.training.engine import _amp_settings, _build_optimizer

    torch.manual_seed(0)
    device = torch.device(cfg["device"])
    model = _build_model(cfg["model"], cfg["size"]).to(device).train()
    recipe = {**recipe_for(cfg["size"]).train, "batch_size": cfg["batch"], "device": cfg["device"], "amp": cfg["amp"]}
    config = TrainConfig(**recipe)
    optimizer = _build_optimizer(model, config)
    autocast_on, autocast_dtype, scaler_on = _amp_settings(device, config.amp)
    scaler = torch.amp.GradScaler(device.type if device.type == "cuda" else "cpu", enabled=scaler_on)
    net = torch.compile(model) if cfg["compile"] else model

    generator = torch.Generator().manual_seed(0)
    batch, crop = cfg["batch"], tuple(cfg["crop"])
    image = (torch.rand(batch, 1, *crop, generator=generator) * 255).to(device)
    size = torch.tensor(crop, dtype=torch.float32)
    landmarks = (torch.rand(batch, NUM_LANDMARKS, 3, generator=generator) * (size - 1)).to(device)
    spacing = torch.ones(batch, 3)
    grid_cache: dict = {}

    def step() -> float:
        x = prepare_input(image)
        with torch.autocast(device_type=device.type, dtype=autocast_dtype) if autocast_on else nullcontext():
            outputs = net(x)
        losses = training_losses(outputs, landmarks, config=config, spacing=spacing, grid_cache=grid_cache)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(losses["total"]).backward()
        scaler.step(optimizer)
        scaler.update()
        return float(losses["total"].detach())

    return step, model


def _memory_base(device: Any) -> int:
    """Bytes in use before the model is built: RSS after the imports (CPU), allocated memory (CUDA)."""
    import torch

    gc.collect()
    if torch.device(device).type == "cuda":
        return torch.cuda.memory_allocated()
    return rss_kib("VmRSS") * 1024


def _reset_peak(device: Any) -> int:
    """Reset the high-water mark; return the bytes in use now (parameters, gradients, Adam states after warm-up)."""
    import torch

    gc.collect()
    _sync(device)
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    reset_peak()  # reset VmHWM to the current RSS
    return rss_kib("VmRSS") * 1024


def _peak(device: Any) -> tuple[int, int | None]:
    """Bytes at the high-water mark since :func:`_reset_peak`, and (CUDA) the caching allocator's reserved peak."""
    import torch

    _sync(device)
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
    return rss_kib("VmHWM") * 1024, None


def _memory_result(base: int, state: int, peak: tuple[int, int | None]) -> dict:
    result = {"peak_mib": (peak[0] - base) / MIB, "state_mib": (state - base) / MIB}
    if peak[1] is not None:
        result["reserved_mib"] = peak[1] / MIB
    return result


def _time_worker(cfg: dict) -> dict:
    """Time ``cfg["steps"]`` steps after ``cfg["warmup"]``; with ``cfg["with_memory"]`` also their peak memory."""
    from h3de_lite.models.h3de_net import count_parameters

    _imports()
    base = _memory_base(cfg["device"])
    step, model = _training_step(cfg)
    first = []
    for _ in range(cfg["warmup"]):
        start = time.perf_counter()
        loss = step()
        _sync(cfg["device"])
        first.append(time.perf_counter() - start)
    state = _reset_peak(cfg["device"])
    times = []
    for _ in range(cfg["steps"]):
        start = time.perf_counter()
        loss = step()
        _sync(cfg["device"])
        times.append(time.perf_counter() - start)
    peak = _peak(cfg["device"])
    if not math.isfinite(loss):
        raise RuntimeError(f"non-finite loss {loss}")
    memory = _memory_result(base, state, peak) if cfg.get("with_memory") else {}
    return {
        **memory,
        "params": count_parameters(model),
        "step_s": statistics.median(times),
        "step_min_s": min(times),
        "steps": len(times),
        "times_s": times,
        "warmup_s": first,
    }


def _memory_worker(cfg: dict) -> dict:
    """Peak memory of one step after ``cfg["warmup"]`` steps (which create Adam's moment buffers)."""
    _imports()
    base = _memory_base(cfg["device"])
    step, _ = _training_step(cfg)
    for _ in range(cfg["warmup"]):
        step()
    state = _reset_peak(cfg["device"])
    step()
    return _memory_result(base, state, _peak(cfg["device"]))


def _inference_worker(cfg: dict) -> dict:
    import torch

    from h3de_lite.data.phantom import generate_phantom
    from h3de_lite.data.transforms import normalize_intensity
    from h3de_lite.inference import predict_volume, prepare_input

    _imports()
    torch.manual_seed(0)
    device = torch.device(cfg["device"])
    cuda = device.type == "cuda"
    case = generate_phantom(seed=0, shape=tuple(cfg["volume"]))
    image = torch.from_numpy(normalize_intensity(case.volume))[None]
    model = _build_model("h3de", cfg["preset"]).to(device).eval()
    roi = tuple(cfg["roi"])
    windows: list[int] = []
    model.register_forward_pre_hook(lambda module, args: windows.append(int(args[0].shape[0])))
    with torch.inference_mode():  # warm-up: one window
        model(prepare_input(torch.zeros(1, 1, *roi, device=device)))
    windows.clear()
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        reset_peak()
        base = rss_kib("VmRSS") * 1024
    times = []
    for _ in range(cfg["repeats"]):
        windows.clear()
        start = time.perf_counter()
        coords, _, _ = predict_volume(
            model, image, roi_size=roi, overlap=0.25, strategy=cfg["strategy"], device=device, amp=cfg["amp"]
        )
        _sync(device)
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() if cuda else rss_kib("VmHWM") * 1024) - base
    return {
        "seconds": statistics.median(times),
        "times_s": times,
        "windows": sum(windows),
        "peak_mib": peak / MIB,
        "coords_shape": list(coords.shape),
    }


def _worker(cfg: dict) -> dict:
    import torch

    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    kind = cfg["measure"]
    if kind == "time":
        return _time_worker(cfg)
    if kind == "memory":
        return _memory_worker(cfg)
    return _inference_worker(cfg)


# ----------------------------------------------------------------------------------------------------------------------
# driver side
# ----------------------------------------------------------------------------------------------------------------------


def _run_worker(cfg: dict) -> dict:
    memory = (cfg["measure"] == "memory" or cfg.get("with_memory")) and cfg["device"] == "cpu"
    env = rss_environment() if memory else dict(os.environ)
    load = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(cfg)], capture_output=True, text=True, env=env
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        if proc.returncode < 0:
            reason = f"killed by signal {-proc.returncode} (out of memory?)"
        else:
            lines = (proc.stderr or proc.stdout).strip().splitlines()
            reason = (lines[-1] if lines else "(no output)")[:160]
        result = {"error": reason}
    else:
        result = json.loads(proc.stdout.strip().splitlines()[-1])
    result.update(load_at_start=load, worker_wall_s=wall)
    shown = {k: v for k, v in result.items() if k != "times_s"}
    what = {k: v for k, v in cfg.items() if k != "measure"}
    print(f"  {cfg['measure']:9s} {json.dumps(what)} -> {shown}", file=sys.stderr, flush=True)
    return result


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _ratio(num: float | None, den: float | None) -> str:
    return "—" if num is None or den is None else f"{num / den:.2f}"


def _write_json(path: Path, payload: dict) -> None:
    """Atomic write: a temporary file in the target folder, then ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(payload, handle, indent=2)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Training-step time and peak memory of H3DE-Net and the Table I baselines; whole-volume inference."
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--groups", nargs="+", choices=tuple(GROUPS), default=list(GROUPS), help="crop groups")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument(
        "--crop", type=_parse_crop, default=None,
        help="training crop D×H×W for every group (default: tiny 64×64×32, paper 128×128×64)",
    )  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per row (default: tiny 10, paper 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 1; 2 with --compile)")
    parser.add_argument("--amp", action="store_true", help="the engine's autocast (CUDA: bf16 or fp16; CPU: bf16)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA only)")
    parser.add_argument("--volume", type=int, nargs=3, default=None, metavar=("D", "H", "W"),
                        help="inference volume (default 192 192 128, the phantom's default shape)")  # fmt: skip
    parser.add_argument("--infer-repeats", type=int, default=2, help="timed predict_volume calls per strategy")
    parser.add_argument(
        "--one-worker", action="store_true",
        help="measure a row's peak memory in its timing subprocess (over the timed steps, with the CPU allocator "
        "settings of the memory workers) instead of a separate one: saves the memory worker's steps on slow rows",
    )  # fmt: skip
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--skip-inference", action="store_true")
    parser.add_argument("--skip-estimate", action="store_true", help="no batch-1 run for the AMP memory estimate")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT", help="also save every result as JSON")
    parser.add_argument(
        "--quick", action="store_true",
        help="smoke run: tiny group only, 2 steps, a 96×96×64 volume, one inference call, no estimate",
    )  # fmt: skip
    add_save_option(parser)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))))
        return 0
    with saved_report(args.save):
        return _benchmark(args, parser, sys.argv[1:] if argv is None else argv)


def _benchmark(args: argparse.Namespace, parser: argparse.ArgumentParser, argv: list[str]) -> int:
    """Measure the training rows, the memory estimate and the inference rows of ``args``; print the report."""
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False; use --device cpu")
    if args.compile and args.device != "cuda":
        parser.error("--compile needs --device cuda (compiling 3D networks on a CPU takes minutes per row)")
    for name in ("batch_size", "infer_repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.steps is not None and args.steps < 1:
        parser.error("--steps must be at least 1")
    if args.quick:
        args.groups = ["tiny"]
        args.steps = args.steps or 2
        args.volume = args.volume or [96, 96, 64]
        args.infer_repeats = 1
        args.skip_estimate = True
    volume = tuple(args.volume or (192, 192, 128))
    warmup = args.warmup if args.warmup is not None else (2 if args.compile else 1)
    threads = args.threads or torch.get_num_threads()
    if args.device == "cuda":
        device_name = torch.cuda.get_device_name()
    else:
        device_name = f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs"
    mode = "AMP" if args.amp else "float32"
    if args.compile:
        mode += " + torch.compile"

    results: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "device": args.device,
        "device_name": device_name,
        "torch": torch.__version__,
        "threads": threads,
        "mode": mode,
        "batch_size": args.batch_size,
        "warmup": warmup,
        "load_at_start": os.getloadavg(),
        "command": "python benchmarks/training.py " + " ".join(argv),
        "training": [],
        "estimate": None,
        "inference": [],
    }
    print(f"# Training benchmark — {results['date']}")
    print(f"# device {args.device} ({device_name}), torch {torch.__version__}, {threads} threads, {mode}")
    load = results["load_at_start"]
    print(f"# load average at start (1/5/15 min): {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}")

    base = {"device": args.device, "threads": args.threads, "amp": args.amp, "compile": args.compile}
    rows: dict[tuple[str, str], dict] = {}
    if not args.skip_training:
        print(
            f"# training step: batch {args.batch_size}, {warmup} warm-up step(s), then the median of the timed steps "
            f"(n); peak memory: "
            + ("torch.cuda.max_memory_allocated" if args.device == "cuda" else "RSS high-water mark")
            + (
                " over the timed steps, in the timing subprocess (--one-worker)"
                if args.one_worker
                else " over one step; one subprocess per measurement"
            )
        )
        print()
        print(
            "| model | crop | batch | params (M) | step (s, median) | step (s, min) | n | volumes/s "
            "| peak memory (MiB) | time / UNet3D | memory / UNet3D |"
        )
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|", flush=True)
        for group in args.groups:
            size, default_crop, default_steps = GROUPS[group]
            crop = args.crop or default_crop
            for model in sorted(args.models, key=MODELS.index):
                cfg = {
                    **base, "model": model, "size": size, "crop": list(crop), "batch": args.batch_size,
                    "steps": args.steps or default_steps, "warmup": warmup, "with_memory": args.one_worker,
                }  # fmt: skip
                row = {"group": group, "model": model, "size": size, "crop": list(crop), "batch": args.batch_size}
                row["time"] = _run_worker({**cfg, "measure": "time"})
                if args.one_worker:
                    row["memory"] = {k: v for k, v in row["time"].items() if k in ("peak_mib", "state_mib", "error")}
                else:
                    row["memory"] = _run_worker({**cfg, "measure": "memory"})
                rows[(group, model)] = row
                results["training"].append(row)
                ref = rows.get((group, REFERENCE), {})
                ref_t = ref.get("time", {}).get("step_s")
                ref_m = ref.get("memory", {}).get("peak_mib")
                t, m = row["time"], row["memory"]
                label = LABELS[model].format(size=row["size"])
                params = t.get("params")
                step_s = t.get("step_s")
                cells = [
                    label,
                    _fmt_crop(row["crop"]),
                    str(row["batch"]),
                    _fmt(None if params is None else params / 1e6, ".2f"),
                    _fmt(step_s, ".2f") if "error" not in t else f"error: {t['error']}",
                    _fmt(t.get("step_min_s"), ".2f"),
                    str(t.get("steps", "—")),
                    _fmt(None if step_s is None else row["batch"] / step_s, ".2f"),
                    _fmt(m.get("peak_mib"), ",.0f") if "error" not in m else f"error: {m['error']}",
                    _ratio(step_s, ref_t),
                    _ratio(m.get("peak_mib"), ref_m),
                ]
                print("| " + " | ".join(cells) + " |", flush=True)

    checks: list[str] = []
    paper = rows.get(("paper", "h3de"))
    if paper is not None:
        unet = rows.get(("paper", REFERENCE), {})
        t_p, t_u = paper["time"].get("step_s"), unet.get("time", {}).get("step_s")
        crop = _fmt_crop(paper["crop"])
        if t_p is not None and t_u is not None:
            checks.append(
                f"target: `paper` step time ≤ 3D U-Net's at {crop}, batch {paper['batch']} on this device: "
                f"{'PASS' if t_p <= t_u else 'FAIL'} ({t_p:.2f} s vs {t_u:.2f} s, ratio {t_p / t_u:.2f})"
            )
        params = paper["time"].get("params")
        if args.amp and paper["batch"] == 2 and args.device == "cuda":
            peak = paper["memory"].get("peak_mib")
            if peak is not None:
                results["estimate"] = {"measured_amp_batch2_mib": peak}
                checks.append(
                    f"target: `paper` at batch 2 with AMP fits a 16 GB GPU (≤ {GPU_LIMIT_MIB:,} MiB): "
                    f"{'PASS' if peak <= GPU_LIMIT_MIB else 'FAIL'} (measured {peak:,.0f} MiB allocated)"
                )
        elif not args.skip_estimate and not args.amp and params is not None:
            peaks = {}
            for batch in (1, 2):
                if batch == paper["batch"]:
                    peaks[batch] = paper["memory"].get("peak_mib")
                else:
                    cfg = {**base, "model": "h3de", "size": "paper", "crop": paper["crop"], "batch": batch,
                           "steps": 1, "warmup": warmup, "measure": "memory"}  # fmt: skip
                    peaks[batch] = _run_worker(cfg).get("peak_mib")
            if None not in peaks.values():
                per_sample = peaks[2] - peaks[1]
                fixed = peaks[1] - per_sample
                weights16 = 2 * params / MIB
                estimate = fixed + weights16 + 2 * per_sample / 2
                results["estimate"] = {
                    "peak_batch1_mib": peaks[1], "peak_batch2_mib": peaks[2], "per_sample_mib": per_sample,
                    "fixed_mib": fixed, "fp32_state_mib": 16 * params / MIB, "weights16_mib": weights16,
                    "amp_batch2_estimate_mib": estimate,
                }  # fmt: skip
                print()
                print(f"`paper` at {crop}, batch 2, AMP — memory estimate from float32 {args.device} peaks:\n")
                print("| quantity | MiB |")
                print("|---|---:|")
                print(f"| peak, float32, batch 1 (measured) | {peaks[1]:,.0f} |")
                print(f"| peak, float32, batch 2 (measured) | {peaks[2]:,.0f} |")
                print(f"| a: per sample = peak(2) − peak(1) | {per_sample:,.0f} |")
                print(f"| f: not growing with the batch = peak(1) − a | {fixed:,.0f} |")
                print(f"| of which float32 weights + gradients + Adam m, v (16 B × {params / 1e6:.2f} M) | "
                      f"{16 * params / MIB:,.0f} |")  # fmt: skip
                print(f"| 16-bit weight copies under autocast (2 B × parameters) | {weights16:,.0f} |")
                print(f"| **estimate, AMP, batch 2: f + 16-bit weights + 2 × a / 2** | **{estimate:,.0f}** |")
                print(f"| upper bound: float32 peak at batch 2 | {peaks[2]:,.0f} |")
                checks.append(
                    f"target: `paper` at batch 2 with AMP fits a 16 GB GPU (≤ {GPU_LIMIT_MIB:,} MiB): "
                    f"{'PASS' if estimate <= GPU_LIMIT_MIB else 'FAIL'} (estimate {estimate:,.0f} MiB; "
                    f"float32 upper bound {peaks[2]:,.0f} MiB, "
                    f"{'within' if peaks[2] <= GPU_LIMIT_MIB else 'above'} the limit too)"
                )

    if not args.skip_inference:
        from h3de_lite.config import get_preset

        roi = get_preset("tiny").input_size
        print()
        print(
            f"Whole-volume inference: phantom seed 0, {_fmt_crop(volume)}, `tiny` preset (random weights), window "
            f"{_fmt_crop(roi)}, sliding overlap 0.25, {threads} threads, {args.device}"
            f"{', AMP' if args.amp and args.device == 'cuda' else ''}; median of {args.infer_repeats} call(s) "
            "after a one-window warm-up\n"
        )
        memory = "peak memory (MiB)" if args.device == "cuda" else "RSS increase (MiB)"
        print(f"| strategy | volume | windows | time (s) | {memory} |")
        print("|---|---|---:|---:|---:|")
        for strategy in ("sliding", "coarse_to_fine"):
            cfg = {
                **base, "measure": "inference", "preset": "tiny", "roi": list(roi), "volume": list(volume),
                "strategy": strategy, "repeats": args.infer_repeats,
            }  # fmt: skip
            r = _run_worker(cfg)
            results["inference"].append({"strategy": strategy, "volume": list(volume), **r})
            if "error" in r:
                print(f"| {strategy} | {_fmt_crop(volume)} | error: {r['error']} | | |", flush=True)
                continue
            print(f"| {strategy} | {_fmt_crop(volume)} | {r['windows']} | {r['seconds']:.1f} | "
                  f"{r['peak_mib']:,.0f} |", flush=True)  # fmt: skip
            if volume == (192, 192, 128):
                setting = args.device == "cpu" and threads == 2
                checks.append(
                    f"target: `tiny` whole-volume inference of 192×192×128 in < {INFER_TARGET_S:.0f} s on 2 CPU "
                    f"cores ({strategy}): {'PASS' if r['seconds'] < INFER_TARGET_S else 'FAIL'} ({r['seconds']:.1f} s"
                    + ("" if setting else f"; measured on {args.device} with {threads} threads, not the target's")
                    + ")"
                )

    results["load_at_end"] = os.getloadavg()
    load = results["load_at_end"]
    print()
    for line in checks:
        print(f"- {line}")
    print(f"# load average at end (1/5/15 min): {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}")
    if args.json is not None:
        _write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
