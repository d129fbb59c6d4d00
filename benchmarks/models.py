"""Model benchmark: parameters, FLOPs and CPU latency of H3DE-Net presets, its ablations and the Table I baselines.

Each row builds one network, counts its parameters, counts the FLOPs of one forward pass with
``torch.utils.flop_counter.FlopCounterMode`` (multiply–add = 2 FLOPs; see ``h3de_lite.models.h3de_net.model_flops``)
and times ``--repeats`` forward passes at batch 1 under ``torch.no_grad()`` after one warm-up pass (round-robin over
the models of a group), reporting the median and the minimum. A first table gives, per encoder stage of the
``paper`` preset, the analytic FLOPs of dense and of routed attention: the reason for the CNN / V-BRA split.
Tables are printed as Markdown, ready for book/benchmark_models.md, followed by notes that compare the rows (the
ratios the book's text discusses).

Usage:
    python benchmarks/models.py                      # everything (a few minutes on 2 CPU cores)
    python benchmarks/models.py --scale tiny         # only the 64×64×32 group
    python benchmarks/models.py --repeats 5 --threads 2 --save book/results/models.md   # the book's tables

``--save PATH`` also writes the printed report to a Markdown file (``benchmarks/_report.py``).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from _report import add_save_option, saved_report  # benchmarks/_report.py
from h3de_lite.config import get_preset
from h3de_lite.models.baselines import build_baseline
from h3de_lite.models.h3de_net import _EXTRA_FLOP_FORMULAS, H3DENet, count_parameters, model_flops


@dataclass(frozen=True)
class Row:
    """One benchmarked network: a label, how to build it, its input ``(D, H, W)`` and a key the notes refer to."""

    scale: str
    label: str
    build: Callable[[], nn.Module]
    size: tuple[int, int, int]
    key: str = ""


def _h3de(name: str, **overrides: object) -> Callable[[], nn.Module]:
    return lambda: H3DENet.from_preset(name, **overrides)


def _baseline(name: str, size: str) -> Callable[[], nn.Module]:
    return lambda: build_baseline(name, size=size)


def rows() -> list[Row]:
    """The benchmark's table rows: the paper scale at 128×128×64, then the CPU "tiny" scale at 64×64×32."""
    paper, tiny = get_preset("paper").input_size, get_preset("tiny").input_size
    return [
        Row("paper", "H3DE-Net `paper` (anchor-free)", _h3de("paper"), paper, "paper"),
        Row("paper", "H3DE-Net `paper-incomplete` (anchor, n_a = 3)", _h3de("paper-incomplete"), paper, "anchor"),
        Row("paper", "H3DE-Net `paper`, use_ffm=False", _h3de("paper", use_ffm=False), paper, "use_ffm=False"),
        Row("paper", "H3DE-Net `paper`, use_srb=False", _h3de("paper", use_srb=False), paper, "use_srb=False"),
        Row("paper", "H3DE-Net `paper`, use_vbra=False", _h3de("paper", use_vbra=False), paper, "use_vbra=False"),
        Row("paper", "3D U-Net (MONAI BasicUNet)", _baseline("unet3d", "paper"), paper, "unet3d"),
        Row("paper", "V-Net (MONAI VNet)", _baseline("vnet", "paper"), paper, "vnet"),
        Row("paper", "Residual 3D U-Net (MONAI UNet)", _baseline("resunet3d", "paper"), paper, "resunet3d"),
        Row("tiny", "H3DE-Net `tiny` (anchor-free)", _h3de("tiny"), tiny),
        Row("tiny", "H3DE-Net `tiny`, head=anchor (n_a = 3)", _h3de("tiny", head="anchor", anchors="multi"), tiny),
        Row("tiny", "3D U-Net tiny", _baseline("unet3d", "tiny"), tiny),
        Row("tiny", "V-Net tiny (width 4)", _baseline("vnet", "tiny"), tiny),
        Row("tiny", "Residual 3D U-Net tiny", _baseline("resunet3d", "tiny"), tiny),
    ]


def _gflops(value: float) -> str:
    return f"{value:,.2f}" if value >= 0.01 else f"{value:.1e}"


def stage_table(preset: str = "paper") -> list[dict]:
    """Print, per encoder stage of a preset at its input size, the token count and the attention-core FLOPs per block.

    Analytic counts of the two attention matmuls (``QKᵀ`` and ``AV``, multiply–add = 2 FLOPs) with ``qk_dim = C``:
    dense attention over all N tokens costs ``4·N²·C``; V-BRA, where each token attends to the ``k·T`` tokens of its
    region's k routed regions, costs ``4·N·k·T·C`` (plus the negligible ``R²·C`` routing). Conv stages are shown with
    the V-BRA they would have with the preset's (unused) region grid and top-k.

    Returns:
        Per stage, ``{"type", "dense", "vbra"}``: its kind and the two GFLOPs columns.
    """
    cfg = get_preset(preset)
    stages = []
    print(f"Encoder stages of `{preset}` at {'×'.join(map(str, cfg.input_size))}: attention-core GFLOPs per block")
    print("(analytic: dense 4·N²·C, V-BRA 4·N·k·T·C)\n")
    print("| stage | type | resolution | tokens N | C | regions S | T per region | k | dense | V-BRA |")
    print("|---|---|---|---:|---:|---|---:|---:|---:|---:|")
    for i in range(5):
        size = [s // 2 ** (i + 1) for s in cfg.input_size]
        tokens = size[0] * size[1] * size[2]
        dim = cfg.channels[i]
        grid = cfg.regions_per_side[i]
        grid = (grid,) * 3 if isinstance(grid, int) else tuple(grid)
        per_region = 1
        for n, g in zip(size, grid, strict=True):
            per_region *= -(-n // g)  # ceil: padded regions
        k = cfg.topk[i]
        dense = 4 * tokens**2 * dim / 1e9
        routed = 4 * tokens * k * per_region * dim / 1e9
        kind = cfg.stage_types[i]
        stages.append({"type": kind, "dense": dense, "vbra": routed})
        print(
            f"| E_{i + 1} | {kind} | H/{2 ** (i + 1)} ({'×'.join(map(str, size))}) | {tokens} | {dim} | "
            f"{'×'.join(map(str, grid))} | {per_region} | {k} | {_gflops(dense)} | {_gflops(routed)} |"
        )
    print()
    return stages


def flop_breakdown(preset: str = "paper") -> dict:
    """Print where a preset's forward FLOPs go, by part of the network and by kind of operation.

    Returns:
        GFLOPs: ``{"total", "stages": [E_1 … E_5], "attention"}`` (the last: the attention kernels, QKᵀ and AV).
    """
    cfg = get_preset(preset)
    model = H3DENet.from_preset(preset).eval()
    counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOP_FORMULAS)
    with torch.no_grad(), counter:
        model(torch.zeros(1, 1, *cfg.input_size))
    per_module = counter.get_flop_counts()
    total = counter.get_total_flops()
    parts = [("stem E_0 (full resolution)", "H3DENet.stem")]
    parts += [(f"stage E_{i + 1} ({cfg.stage_types[i]}, H/{2 ** (i + 1)})", f"H3DENet.stages.{i}") for i in range(5)]
    parts += [
        ("decoder: upsampling (SRB)", "H3DENet.upsamplers"),
        ("decoder: fusion (FFM)", "H3DENet.fusions"),
        ("decoder: refinement convs", "H3DENet.refines"),
        ("heatmap head", "H3DENet.heatmap_head"),
    ]
    kinds = {
        "convolution": ("aten.convolution", "aten.mkldnn_convolution"),
        # V-BRA projects through oneDNN in float32 inference (h3de_lite.layers.attention._linear)
        "linear (qkv, projections, MLP)": ("aten.addmm", "aten.mm", "mkldnn._linear_pointwise"),
        "attention (QKᵀ, AV)": ("aten._scaled_dot_product_flash_attention_for_cpu", "aten.bmm"),
    }
    print(f"Forward GFLOPs of `{preset}` at {'×'.join(map(str, cfg.input_size))}, total {total / 1e9:.1f}\n")
    print("| part | GFLOPs | share |")
    print("|---|---:|---:|")

    def module_flops(key: str) -> int:
        if key in per_module:
            return sum(per_module[key].values())
        # a ModuleList is indexed, never called: add up its direct children
        children = [k for k in per_module if k.startswith(key + ".") and "." not in k[len(key) + 1 :]]
        return sum(sum(per_module[k].values()) for k in children)

    stages = []
    for label, key in parts:
        flops = module_flops(key)
        if key.startswith("H3DENet.stages."):
            stages.append(flops / 1e9)
        print(f"| {label} | {flops / 1e9:.1f} | {100 * flops / total:.0f} % |")
    print("\n| operation | GFLOPs | share |")
    print("|---|---:|---:|")
    global_counts = {str(op): n for op, n in per_module["Global"].items()}
    by_kind = {}
    for label, ops in kinds.items():
        flops = sum(global_counts.get(op, 0) for op in ops)
        by_kind[label] = flops / 1e9
        print(f"| {label} | {flops / 1e9:.1f} | {100 * flops / total:.0f} % |")
    other = total - sum(global_counts.get(op, 0) for ops in kinds.values() for op in ops)
    if other:  # an operator none of the kinds names: shown, so that the table always adds up to the total
        print(f"| other ({', '.join(sorted(set(global_counts) - {op for ops in kinds.values() for op in ops}))}) "
              f"| {other / 1e9:.1f} | {100 * other / total:.0f} % |")
    print()
    return {"total": total / 1e9, "stages": stages, "attention": by_kind["attention (QKᵀ, AV)"]}


def notes(stages: list[dict], breakdown: dict, measured: dict[str, dict]) -> list[str]:
    """The comparisons the book's text makes, computed from the tables (one Markdown list item each, without ``- ``).

    Args:
        stages: :func:`stage_table`'s result for ``paper``.
        breakdown: :func:`flop_breakdown`'s result for ``paper``.
        measured: per :class:`Row` key (and label for rows without one), ``{"params", "gflops", "median", "min"}``:
            parameters in M, GFLOPs, latency in ms.
    """
    total = breakdown["total"]
    e1 = stages[0]
    lines = [
        f"E_1 (H/2), one block: dense attention {e1['dense']:,.0f} GFLOPs = {e1['dense'] / total:.1f}× the whole "
        f"`paper` forward pass ({total:.1f} GFLOPs), V-BRA {e1['vbra']:.1f} GFLOPs = {e1['vbra'] / total:.2f}× it; "
        f"the convolutional stage E_1 as built: {breakdown['stages'][0]:.1f} GFLOPs",
    ]
    vbra = [i for i, stage in enumerate(stages) if stage["type"] == "vbra"]
    if vbra:
        flops, attention = sum(breakdown["stages"][i] for i in vbra), breakdown["attention"]
        names = f"E_{vbra[0] + 1} … E_{vbra[-1] + 1}" if len(vbra) > 1 else f"E_{vbra[0] + 1}"
        lines.append(
            f"V-BRA stages {names} together: {flops:.1f} GFLOPs ({100 * flops / total:.0f} % of the forward pass); the "
            f"attention kernels (QKᵀ, AV) alone: {attention:.1f} GFLOPs ({100 * attention / total:.0f} %)"
        )
    paper = measured.get("paper")

    def ratios(row: dict, ref: dict) -> str:
        return (
            f"parameters ×{row['params'] / ref['params']:.2f}, FLOPs ×{row['gflops'] / ref['gflops']:.2f}, "
            f"latency (minimum) ×{row['min'] / ref['min']:.2f}"
        )

    if paper is not None:
        for key, name in (("unet3d", "the 3D U-Net"), ("vnet", "V-Net")):
            if key in measured:
                lines.append(f"`paper` against {name}: {ratios(paper, measured[key])}")
        if "anchor" in measured:
            anchor = measured["anchor"]
            lines.append(
                f"`paper-incomplete` (anchor head) against `paper`: {anchor['params'] - paper['params']:+.2f} M "
                f"parameters, {anchor['gflops'] - paper['gflops']:+.1f} GFLOPs"
            )
        for key in ("use_ffm=False", "use_srb=False", "use_vbra=False"):
            if key in measured:
                lines.append(f"`paper`, {key} against `paper`: {ratios(measured[key], paper)}")
    if measured:
        spread = max(row["median"] / row["min"] - 1 for row in measured.values())
        lines.append(f"latency: in every row the median is at most {100 * spread:.0f} % above the minimum")
    return lines


def _forward_ms(model: nn.Module, x: torch.Tensor) -> float:
    """Wall time of one no-grad forward pass, in milliseconds (synchronised on CUDA)."""
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        model(x)
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def latencies_ms(
    models: list[nn.Module], shapes: list[tuple[int, ...]], *, repeats: int, device: torch.device
) -> list[tuple[float, float]]:
    """Median and minimum forward time of each model, in milliseconds, timed round-robin.

    Every model first runs one warm-up pass (allocator, oneDNN kernel selection); then ``repeats`` rounds time one
    pass of each model in turn, so that load from other processes on a shared machine falls on all rows alike. Such
    load only ever adds time: the minimum is the steadier estimate of a model's own cost, the median what a user of
    the same machine would typically wait.
    """
    inputs = [torch.randn(shape, device=device) for shape in shapes]
    for model, x in zip(models, inputs, strict=True):
        _forward_ms(model, x)
    times: list[list[float]] = [[] for _ in models]
    for _ in range(repeats):
        for i, (model, x) in enumerate(zip(models, inputs, strict=True)):
            times[i].append(_forward_ms(model, x))
    return [(statistics.median(t), min(t)) for t in times]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=("all", "paper", "tiny"), default="all", help="which group of rows")
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed forward passes per row (median and minimum reported)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    add_save_option(parser)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    with saved_report(args.save):
        _benchmark(args)
    return 0


def _benchmark(args: argparse.Namespace) -> None:
    """Print the report: header, stage table, FLOP breakdown, the table of rows and the notes."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)

    print(
        f"date: {datetime.date.today().isoformat()}; torch {torch.__version__}; device {device}; "
        f"{torch.get_num_threads()} threads; {platform.processor() or platform.machine()}"
    )
    print(
        f"latency: median and minimum of {args.repeats} forward passes at batch 1, no_grad, after one warm-up; "
        "the models of a group are timed round-robin"
    )
    print(f"1-minute load average at start: {os.getloadavg()[0]:.1f} (other processes share the CPU when > 0)\n")
    stages = stage_table("paper")
    breakdown = flop_breakdown("paper")
    measured: dict[str, dict] = {}
    print("| model | input (D×H×W) | parameters (M) | GFLOPs | latency median (ms) | latency min (ms) |")
    print("|---|---|---:|---:|---:|---:|")
    for scale in ("paper", "tiny"):
        if args.scale not in ("all", scale):
            continue
        group = [row for row in rows() if row.scale == scale]
        models = [row.build().to(device).eval() for row in group]
        shapes = [(1, 1, *row.size) for row in group]
        timings = latencies_ms(models, shapes, repeats=args.repeats, device=device)
        for row, model, shape, (median, fastest) in zip(group, models, shapes, timings, strict=True):
            params = count_parameters(model) / 1e6
            gflops = model_flops(model, shape) / 1e9
            size = "×".join(map(str, row.size))
            print(f"| {row.label} | {size} | {params:.2f} | {gflops:.1f} | {median:.0f} | {fastest:.0f} |", flush=True)
            measured[row.key or row.label] = {"params": params, "gflops": gflops, "median": median, "min": fastest}
        del models
    print()
    for line in notes(stages, breakdown, measured):
        print(f"- {line}")
    print(f"\n1-minute load average at end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    sys.exit(main())
