"""Whole-volume inference benchmark: time and peak memory of ``predict_volume`` on one large volume.

Each row runs :func:`h3de_lite.inference.predict_volume` once on a ``--size`` volume (a phantom CT windowed to
[0, 255], or uniform noise with ``--input random``) with a randomly initialised preset network (weights do not change
the cost), in a fresh child process so that its peak resident memory (``ru_maxrss``) belongs to that row alone.
Before timing, the child builds the model and the input and runs one warm-up forward pass on one window; the table
reports the wall time of the call, the windows the network ran on, the peak RSS of the child and its increase over
the RSS just before the call (on CUDA, ``torch.cuda.max_memory_allocated`` instead). Printed as Markdown.

The numbers depend on the CPU and on what else runs on it: on a shared machine they are noisy.

Usage:
    python benchmarks/inference.py                                   # tiny preset, 192×192×128, both strategies
    python benchmarks/inference.py --overlaps 0.25 --sw-batch-sizes 1 4 --threads 2
    python benchmarks/inference.py --preset paper --device cuda --amp
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing as mp
import os
import platform
import resource
import time
from typing import Any

import torch


def _rss_mb() -> float:
    """Current resident set size of this process in MiB (Linux ``/proc``; falls back to the peak elsewhere)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return _peak_rss_mb()


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if platform.system() == "Darwin" else peak / 2**10


def _make_image(size: tuple[int, int, int], kind: str) -> torch.Tensor:
    if kind == "random":
        return torch.rand(1, *size, generator=torch.Generator().manual_seed(0)) * 255
    from h3de_lite.data.phantom import generate_phantom
    from h3de_lite.data.transforms import normalize_intensity

    case = generate_phantom(seed=0, shape=size)
    return torch.from_numpy(normalize_intensity(case.volume))[None]


def _run_row(config: dict[str, Any], queue: mp.Queue) -> None:
    """Child process: build, warm up, time one ``predict_volume`` call, report through ``queue``."""
    torch.set_num_threads(config["threads"])
    from h3de_lite.config import get_preset
    from h3de_lite.inference import predict_volume, prepare_input
    from h3de_lite.models.h3de_net import H3DENet

    torch.manual_seed(0)
    preset = get_preset(config["preset"])
    model = H3DENet.from_config(preset.replace(head=config["head"])).to(config["device"]).eval()
    roi = preset.input_size
    image = _make_image(config["size"], config["input"])
    windows = []
    model.register_forward_pre_hook(lambda module, args: windows.append(args[0].shape[0]))
    with torch.inference_mode():  # warm-up: one window
        model(prepare_input(torch.zeros(1, 1, *roi, device=config["device"])))
    windows.clear()
    cuda = config["device"].startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = _rss_mb()
    start = time.perf_counter()
    predict_volume(
        model, image, roi_size=roi, overlap=config["overlap"], sw_batch_size=config["sw_batch_size"],
        strategy=config["strategy"], device=config["device"], amp=config["amp"],
    )  # fmt: skip
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else _peak_rss_mb()
    queue.put({"seconds": seconds, "windows": sum(windows), "peak": peak, "before": 0.0 if cuda else before})


def run_row(config: dict[str, Any]) -> dict[str, Any]:
    """Run one configuration in a fresh (spawned) process and return its measurements."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_run_row, args=(config, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", help="H3DE-Net preset (its input_size is the window)")
    parser.add_argument("--head", default="heatmap", choices=("heatmap", "anchor"))
    parser.add_argument("--size", type=int, nargs=3, default=(192, 192, 128), metavar=("D", "H", "W"))
    parser.add_argument("--input", default="phantom", choices=("phantom", "random"))
    parser.add_argument("--strategies", nargs="+", default=["sliding", "coarse_to_fine"])
    parser.add_argument("--overlaps", type=float, nargs="+", default=[0.25, 0.5], help="sliding strategy only")
    parser.add_argument("--sw-batch-sizes", type=int, nargs="+", default=[1])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", action="store_true", help="float16 autocast (CUDA only)")
    args = parser.parse_args()

    rows = []
    for strategy in args.strategies:
        for overlap in args.overlaps if strategy == "sliding" else [args.overlaps[0]]:
            for sw_batch_size in args.sw_batch_sizes:
                rows.append(dict(
                    preset=args.preset, head=args.head, size=tuple(args.size), input=args.input, strategy=strategy,
                    overlap=overlap, sw_batch_size=sw_batch_size, threads=args.threads, device=args.device,
                    amp=args.amp,
                ))  # fmt: skip

    from h3de_lite.config import get_preset

    memory = "peak CUDA memory (MiB)" if args.device.startswith("cuda") else "peak RSS (MiB) | RSS increase (MiB)"
    print(f"Whole-volume inference, {datetime.date.today()}, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {args.threads} thread(s), device {args.device}{', AMP' if args.amp else ''}")
    print(f"Volume {'×'.join(map(str, args.size))} ({args.input}), preset `{args.preset}` ({args.head} head, "
          f"random weights), window {'×'.join(map(str, get_preset(args.preset).input_size))}\n")  # fmt: skip
    print(f"| strategy | overlap | sw_batch_size | windows | time (s) | {memory} |")
    print("|---|---|---|---|---|---|" + ("" if args.device.startswith("cuda") else "---|"))
    for config in rows:
        r = run_row(config)
        overlap = f"{config['overlap']:.2f}" if config["strategy"] == "sliding" else "—"
        mem = f"{r['peak']:,.0f}"
        if not args.device.startswith("cuda"):
            mem += f" | {r['peak'] - r['before']:,.0f}"
        print(f"| {config['strategy']} | {overlap} | {config['sw_batch_size']} | {r['windows']} | "
              f"{r['seconds']:.1f} | {mem} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
