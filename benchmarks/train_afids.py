"""Train, evaluate and package the single-atlas AFIDs model (the ``afids`` recipe of ``h3de_lite.training.recipes``).

One annotated scan, the MNI152NLin2009cAsym T1w template with its 32 AFIDs (:mod:`h3de_lite.data.afids`, fetched
once from the autoafids wheel), becomes an endless training set: every sample a new pose (rigid ±30°/±30 mm, mild
affine, elastic), appearance (bias field, blur or thick slices, contrast, gamma, noise) and skull (30 % stripped) of
the template (:class:`h3de_lite.data.atlas.AtlasDataset`), at 3 mm in 64×64×64 crops. Validation: 4 rigid copies
(≤ 20°, ≤ 20 mm) from the validation stream. The network is H3DE-Net ``tiny`` with 32 heatmap channels; the loss is
the spatial-softmax cross-entropy; the run folder is an ordinary ``fit`` run folder whose ``config.json`` ``data``
block carries ``names`` (the AFIDs) and ``percentiles`` (the MRI normalisation), so ``h3de-lite evaluate/predict
--run`` work on it.

Usage::

    # a 1-minute trial: seconds per step and the estimated time of the full recipe (leaves a partial run folder)
    python benchmarks/train_afids.py --out runs/afids-trial --trial-seconds 60 --overwrite
    # the full recipe (60 epochs of 50 steps of 2 samples), then the test evaluation and the packaged model
    python benchmarks/train_afids.py --out runs/afids --evaluate data/afids-test --export h3de_lite/weights/afids
    # continue an interrupted run
    python benchmarks/train_afids.py --out runs/afids --resume

``--evaluate DIR`` writes 20 rigid test copies (test stream, ≤ 20°, ≤ 20 mm) into ``DIR`` if it holds none, scores
the run's best checkpoint with ``h3de_lite.evaluation.evaluate`` (what ``h3de-lite evaluate --run RUN --data DIR
--split . --sdr 2 4 8`` does) and the two references of :mod:`h3de_lite.references`, and writes
``RUN/afids_eval.md`` and ``RUN/afids_eval.json``. ``--export DIR`` writes the packaged model: ``config.json``,
``best.pt`` with the model weights only, ``history.json``, ``card.json`` (commands, data, machine, test results; the
book's model cards read it), ``reference.json`` (:func:`h3de_lite.pretrained.export`), ``MODEL_CARD.md`` (data
attribution and licences) and the test tables.

Explained in notebooks/09_real_anatomy.ipynb.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from h3de_lite.data.afids import AFIDS_ATTRIBUTION, AFIDS_NAMES, AUTOAFIDS_VERSION, load_afids_template
from h3de_lite.data.atlas import AtlasDataset, atlas_data_config, brain_mask, write_rigid_copies
from h3de_lite.evaluation import evaluate, find_cases, load_predictor
from h3de_lite.files import atomic_output
from h3de_lite.references import (
    ATLAS_THRESHOLDS_MM,
    comparison_table,
    identity_reference,
    known_transform_reference,
    per_landmark_table,
)
from h3de_lite.training import RECIPES, TrainConfig, build_model_from_config, fit
from h3de_lite.training.checkpoint import write_json

RECIPE = RECIPES["afids"]
MODEL_SPEC = {"kind": "h3de", "preset": "tiny", "num_landmarks": len(AFIDS_NAMES)}


class _TrialOver(Exception):
    """Raised from ``on_step`` to end a timed trial."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--out", type=Path, required=True, help="run folder")
    add("--epochs", type=int, default=RECIPE.train["epochs"], help="epochs (default: the recipe's)")
    add("--steps-per-epoch", type=int, default=50, help="optimizer steps per epoch")
    add("--batch-size", type=int, default=RECIPE.train["batch_size"], help="samples per step")
    add("--lr", type=float, default=RECIPE.train["lr"], help="peak learning rate")
    add("--spacing", type=float, default=RECIPE.spacing, help="working voxel size in mm")
    add("--crop", type=int, nargs=3, default=list(RECIPE.crop), metavar=("D", "H", "W"), help="training crop")
    add("--n-val", type=int, default=4, help="validation copies (validation stream)")
    add("--p-stripped", type=float, default=0.3, help="share of skull-stripped training samples")
    add("--seed", type=int, default=0, help="seed of weights, data order and samples")
    add("--threads", type=int, default=2, help="torch threads")
    add("--device", default="auto", help="auto, cpu, cuda or mps")
    add("--workers", type=int, default=0, help="DataLoader workers")
    add("--cache-dir", type=Path, default=None, help="where the autoafids wheel is cached")
    add("--resume", action="store_true", help="continue the run in --out")
    add("--overwrite", action="store_true", help="replace the run in --out")
    add("--trial-seconds", type=float, default=None,
        help="stop after this many CPU seconds of training (at least 4 steps) and print the estimated CPU time of "
             "the full run")  # fmt: skip
    add("--evaluate", type=Path, default=None, metavar="DIR", help="score the best checkpoint on rigid test copies")
    add("--n-test", type=int, default=20, help="test copies written into --evaluate DIR when it has none")
    add("--test-seed", type=int, default=0, help="seed of the test copies (test stream)")
    add("--export", type=Path, default=None, metavar="DIR", help="write the packaged model here")
    add("--no-progress", action="store_true", help="hide the progress bar")
    return parser.parse_args(argv)


def data_config(args: argparse.Namespace) -> dict:
    """The ``data`` block of ``config.json``: what inference must repeat, and what the samples were."""
    return atlas_data_config(
        spacing=args.spacing, crop=args.crop, names=AFIDS_NAMES, recipe="afids",
        template=f"MNI152NLin2009cAsym 1 mm T1w + AFIDs ground truth (autoafids {AUTOAFIDS_VERSION})",
        samples={"steps_per_epoch": args.steps_per_epoch, "p_stripped": args.p_stripped, "n_val": args.n_val,
                 "pose": "RandomPose() defaults", "intensity": "MRIntensityAugment() defaults"},
    )  # fmt: skip


def train(args: argparse.Namespace, template) -> dict:
    mask = brain_mask(template.case) if args.p_stripped > 0 else None
    train_data = AtlasDataset(template.case, length=args.steps_per_epoch * args.batch_size, spacing=args.spacing,
                              crop_size=args.crop, seed=args.seed, p_stripped=args.p_stripped, mask=mask)  # fmt: skip
    val_data = AtlasDataset(template.case, split="val", length=args.n_val, spacing=args.spacing, seed=args.seed)
    config = TrainConfig().replace(**{**RECIPE.train, "epochs": args.epochs, "batch_size": args.batch_size,
                                      "lr": args.lr, "val_roi_size": tuple(args.crop), "seed": args.seed,
                                      "device": args.device, "num_workers": args.workers})  # fmt: skip
    torch.manual_seed(args.seed)
    model = build_model_from_config(MODEL_SPEC)
    cpu_start = time.process_time()
    steps: list[tuple[float, float]] = []  # (wall, CPU) after each step

    def on_step(step: int, losses: dict[str, float]) -> None:
        steps.append((time.perf_counter(), time.process_time()))
        if args.trial_seconds is not None and steps[-1][1] - cpu_start > args.trial_seconds and len(steps) >= 4:
            raise _TrialOver

    print(f"afids recipe: {args.spacing} mm, crop {tuple(args.crop)}, {args.epochs} epochs × {args.steps_per_epoch} "
          f"steps × {args.batch_size} samples, lr {args.lr:g}, {torch.get_num_threads()} threads", file=sys.stderr)
    try:
        history = fit(model, train_data, val_data, config, run_dir=args.out, resume=args.resume,
                      overwrite=args.overwrite, progress=not args.no_progress, model_config=MODEL_SPEC,
                      data_config=data_config(args), on_step=on_step)  # fmt: skip
    except _TrialOver:
        return trial_report(args, steps, val_data, model, config)
    return history


def trial_report(args: argparse.Namespace, steps: list[tuple[float, float]], val_data, model, config) -> dict:
    """CPU and wall seconds per step (medians, the first step excluded), one validation pass, the full run estimated.

    CPU time (user + system of this process, all threads) hardly depends on what else runs on the machine; wall time
    does. On an idle machine wall time is about CPU time / threads (less than perfect parallelism makes it longer).
    """
    from h3de_lite.training.engine import resolve_device, validate

    wall = np.diff([w for w, _ in steps[1:]])
    cpu = np.diff([c for _, c in steps[1:]])
    device = resolve_device(args.device)
    c0, w0 = time.process_time(), time.perf_counter()
    validate(model, val_data, config=config, device=device, roi_size=tuple(args.crop))  # builds the cached items
    first_val = (time.process_time() - c0, time.perf_counter() - w0)
    c0, w0 = time.process_time(), time.perf_counter()
    validate(model, val_data, config=config, device=device, roi_size=tuple(args.crop))
    val = (time.process_time() - c0, time.perf_counter() - w0)
    total_steps = args.epochs * args.steps_per_epoch
    cpu_total = total_steps * float(np.median(cpu)) + args.epochs * val[0] + first_val[0]
    load = os.getloadavg()
    report = {"steps_timed": len(cpu), "cpu_s_per_step": float(np.median(cpu)),
              "wall_s_per_step": float(np.median(wall)), "validation_cpu_s": val[0],
              "first_validation_cpu_s": first_val[0], "total_steps": total_steps,
              "estimated_cpu_hours": cpu_total / 3600, "threads": torch.get_num_threads(),
              "load_average": load}  # fmt: skip
    print(json.dumps(report, indent=2))
    print(f"trial: {len(cpu)} timed steps, {np.median(cpu):.2f} CPU s/step ({np.median(wall):.2f} s wall at load "
          f"{load[0]:.1f}), validation {val[0]:.1f} CPU s; full run of {total_steps} steps ≈ {cpu_total / 3600:.2f} "
          f"CPU hours, ≈ {cpu_total / 3600 / torch.get_num_threads():.2f} h on {torch.get_num_threads()} idle cores "
          "(perfect parallelism)")  # fmt: skip
    return report


def evaluate_run(args: argparse.Namespace, template) -> dict:
    folder = args.evaluate
    try:
        find_cases(folder, ".")
    except (FileNotFoundError, ValueError):
        print(f"writing {args.n_test} rigid test copies into {folder}", file=sys.stderr)
        write_rigid_copies(template.case, folder, n=args.n_test, seed=args.test_seed)
    predictor = load_predictor(args.out, device=args.device)
    model = evaluate(predictor, folder, split=".", thresholds=ATLAS_THRESHOLDS_MM, progress=not args.no_progress)
    results = {
        "h3de-lite afids (tiny)": model,
        "identity baseline": identity_reference(folder, template.case),
        f"known transform, {args.spacing:g} mm, sub-voxel": known_transform_reference(
            folder, template.case, spacing=args.spacing, sigma=TrainConfig().sigma),
        f"known transform, {args.spacing:g} mm, arg-max": known_transform_reference(
            folder, template.case, spacing=args.spacing, sigma=TrainConfig().sigma, method="argmax"),
    }  # fmt: skip
    text = "\n\n".join([comparison_table(results), per_landmark_table(results)])
    print(text)
    with atomic_output(args.out / "afids_eval.md") as tmp:
        tmp.write_text(text + "\n", encoding="utf-8")
    write_json(args.out / "afids_eval.json", {label: r.summary for label, r in results.items()})
    model.write(args.out, stem="eval_afids_test")
    return {label: r.summary["all"] for label, r in results.items()}


MODEL_CARD = """# afids: H3DE-Net `tiny`, 32 AFIDs on T1-weighted brain MRI (single-atlas)

- **What it predicts**: the 32 anatomical fiducials of the AFIDs protocol (AC, PC, ... in the order of
  `h3de_lite.data.afids.AFIDS_NAMES`), in world RAS mm, for a T1-weighted head MRI of any size and spacing
  (`h3de-lite predict --pretrained afids SCAN.nii.gz --out DIR` writes Slicer markups labelled with the AFIDs names).
- **How it was trained**: `python benchmarks/train_afids.py` (recipe `afids`): one annotated scan, the
  MNI152NLin2009cAsym 1 mm T1w template, in a new random pose, appearance and skull for every sample; 3 mm voxels,
  64x64x64 crops, spatial-softmax cross-entropy. Run: {run}.
- **How it was tested**: 20 rigid copies of the same template (rotations <= 20 deg, shifts <= 20 mm, a random stream
  never used in training), beside the identity baseline and the known-transform floor: see `afids_eval.md`.
- **What it cannot know**: it has seen one brain. Anatomy that differs from the template (other ages, atrophy,
  lesions, other contrasts) and images oriented away from RAS by more than the training rotations (30 deg) are
  outside what it was trained on; errors on other subjects are not measured here.

## Data and licences

{attribution}

The AFIDs fiducials and the template are used under CC-BY 4.0; the autoafids code is MIT. The weights are released
with h3de-lite (MIT) and carry the attribution above.
"""


def export(args: argparse.Namespace, argv: list[str]) -> Path:
    """Package the run as ``args.export`` through :func:`h3de_lite.pretrained.export` (weights only, config, history,
    ``card.json``, ``reference.json``; one atomic swap), with ``MODEL_CARD.md`` and the test tables beside them."""
    from h3de_lite.pretrained import export as export_package
    from h3de_lite.pretrained import machine_info

    history = json.loads((args.out / "history.json").read_text(encoding="utf-8"))
    evaluation = args.out / "afids_eval.json"
    command = "benchmarks/train_afids.py " + " ".join(argv)
    card = {
        "name": args.export.name,
        "made_with": command,
        "train_command": command,
        "train_seconds": round(sum(e.get("seconds", 0.0) for e in history["epochs"]), 1),
        "data": {
            "atlas": "tpl-MNI152NLin2009cAsym_res-01_T1w with its AFIDs consensus annotation",
            "source": f"autoafids=={AUTOAFIDS_VERSION} (PyPI wheel; h3de_lite.data.afids)",
            "n_train": 1,
            "spacing_mm": args.spacing,
            "crop": list(args.crop),
            "epochs": args.epochs,
            "steps_per_epoch": args.steps_per_epoch,
            "batch_size": args.batch_size,
        },
        "test": {"rigid_copies": args.n_test, "seed": args.test_seed, "max_rotation_deg": 20, "max_shift_mm": 20},
        "machine": machine_info(),
        "results": json.loads(evaluation.read_text(encoding="utf-8")) if evaluation.is_file() else None,
        "attribution": AFIDS_ATTRIBUTION,
        "licence": "AFIDs fiducials and template: CC-BY 4.0; autoafids code: MIT; weights: MIT with the attribution",
    }
    with tempfile.TemporaryDirectory() as tmp:
        model_card = Path(tmp) / "MODEL_CARD.md"
        model_card.write_text(MODEL_CARD.format(run=str(args.out), attribution=AFIDS_ATTRIBUTION), encoding="utf-8")
        extra = {"MODEL_CARD.md": model_card}
        extra.update({name: args.out / name for name in ("afids_eval.md", "afids_eval.json")
                      if (args.out / name).is_file()})  # fmt: skip
        out = export_package(args.out, args.export.name, card=card, dest=args.export.parent, extra_files=extra)
    size = sum(p.stat().st_size for p in out.iterdir()) / 2**20
    print(f"packaged model in {out} ({size:.1f} MiB)")
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    template = load_afids_template(cache_dir=args.cache_dir)
    trained = (args.out / "best.pt").is_file()
    if not (args.evaluate or args.export) or not trained or args.resume or args.overwrite:
        result = train(args, template)
        if args.trial_seconds is not None:
            return 0
        print(f"best epoch {result.get('best_epoch')}, validation MRE {result.get('best_val_mre')}")
    if args.evaluate is not None:
        evaluate_run(args, template)
    if args.export is not None:
        export(args, sys.argv[1:] if argv is None else list(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
