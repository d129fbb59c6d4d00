"""The ``h3de-lite`` command line.

``h3de-lite phantom --out DIR --seed 0 --n-train 4 --n-val 1 --n-test 2`` writes a phantom dataset in the MML release
layout, each case's metadata beside it as ``<id>_meta.json`` (see :func:`h3de_lite.data.phantom.write_phantom_dataset`;
``--difficulty v1`` for the first, easier phantom). It refuses an ``--out`` that already holds a dataset unless
``--overwrite`` is given.

``h3de-lite train --data DIR --out RUN_DIR --preset tiny`` trains H3DE-Net (or a baseline, ``--model``) on such a
dataset through :func:`h3de_lite.training.fit`; under ``torchrun --nproc_per_node N -m h3de_lite.cli train ...`` the
same command trains with DistributedDataParallel. ``h3de-lite train --help`` explains every option.

``h3de-lite evaluate --run RUN_DIR --data DIR --split test`` scores a trained model on whole volumes (radial errors,
MRE ± SD, SDR at 2/2.5/3/4 mm, existence precision/recall/F1 for the complete, incomplete and all subsets), prints the
table and writes ``eval_<split>.json``, ``.csv`` (per case) and ``.md`` into the run folder or ``--out``.
``h3de-lite predict --run RUN_DIR IMAGE... --out DIR`` writes a 3D Slicer ``.mrk.json`` and a CSV per image
(:mod:`h3de_lite.evaluation`). Both take ``--pretrained NAME`` (:mod:`h3de_lite.pretrained`) instead of ``--run``.

User errors print one line ``h3de-lite <command>: error: ...`` and exit with code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

__all__ = ["main", "build_parser"]


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a count >= 0, got {value}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1], got {value}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return value


def _spacing(text: str) -> str | float:
    if text.lower() == "none":
        return "none"
    return _positive_float(text)


def _recipe_defaults(field: str) -> str:
    """``"tiny X, paper Y"``: a field's value in the two presets' recipes, for help texts that cannot go stale.

    ``field`` names a :class:`~h3de_lite.training.Recipe` field (``spacing``, ``p_partial``) or a
    :class:`~h3de_lite.training.TrainConfig` field (``epochs``), read from the config the recipe makes, as ``train``
    does (``TrainConfig().replace(**recipe.train)``).
    """
    from h3de_lite.training import RECIPES, TrainConfig

    def value(name: str) -> object:
        recipe = RECIPES[name]
        source = recipe if hasattr(recipe, field) else TrainConfig().replace(**recipe.train)
        found = getattr(source, field)
        return "none" if found is None else found

    return ", ".join(f"{name} {value(name)}" for name in ("tiny", "paper"))


def _add_train_parser(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser(
        "train",
        help="train H3DE-Net or a baseline on an MML-layout dataset",
        description="Train on DIR/train, validate on whole volumes of DIR/val, write RUN_DIR/{config.json, "
        "history.json, last.pt, best.pt}. Options not given take the preset's recipe (h3de_lite.training.recipes): "
        "tiny = the CPU recipe (1.5 mm, 64x64x32 crops, spatial softmax with an absent class), paper = the paper's "
        "setting. Under `torchrun --nproc_per_node N -m h3de_lite.cli train ...` the same "
        "command trains with DistributedDataParallel (NCCL on GPUs, gloo on CPU); only rank 0 writes.",
    )
    add = train.add_argument
    add("--data", type=Path, required=True, help="dataset folder with train/ and val/ (MML layout: h3de-lite phantom)")
    add("--out", type=Path, required=True, help="run folder (created); refused if it holds another run")
    add("--preset", default="tiny", help="H3DE-Net preset: tiny (CPU), paper (128x128x64 GPU), paper-complete, ...")
    add("--model", default="h3de", choices=["h3de", "unet3d", "vnet", "resunet3d"],
        help="h3de (H3DE-Net) or a MONAI baseline trained by the same engine")  # fmt: skip
    add("--head", default=None, choices=["heatmap", "anchor"],
        help="H3DE-Net head: heatmap (anchor-free, eq. 12) or anchor (eq. 5-8, for missing landmarks); default: "
             "the preset's")  # fmt: skip
    add("--anchors", default=None, choices=["single", "multi"],
        help="anchor configuration of --head anchor: single (n_a=1, r=0.5u) or multi (n_a=3, r up to 1u)")  # fmt: skip
    add("--epochs", type=_positive_int, default=None,
        help=f"epochs (default: the recipe's; {_recipe_defaults('epochs')})")  # fmt: skip
    add("--batch-size", type=_positive_int, default=None,
        help="crops per optimizer step and process "
             f"(default: the recipe's; {_recipe_defaults('batch_size')})")  # fmt: skip
    add("--lr", type=_positive_float, default=None, help=f"peak learning rate (default: {_recipe_defaults('lr')})")
    add("--optimizer", default=None, choices=["adam", "adamw"], help="adam (the paper) or adamw")
    add("--loss", default=None, choices=["mse", "softmax_ce"],
        help="heatmap loss: mse (the paper's eq. 13; the paper recipe) or softmax_ce (spatial-softmax "
             "cross-entropy on the same targets: converges much faster on CPU, not the paper's; "
             "the tiny recipe)")  # fmt: skip
    add("--sigma", type=_positive_float, default=None,
        help=f"Gaussian target sigma in voxels (eq. 1; default: {_recipe_defaults('sigma')})")  # fmt: skip
    add("--crop", type=_positive_int, nargs=3, metavar=("D", "H", "W"), default=None,
        help="training crop in voxels (default: the preset's input size; multiples of 32)")  # fmt: skip
    add("--spacing", type=_spacing, default=None,
        help="resample every case to this isotropic voxel size in mm first, or 'none' to keep the stored spacing "
             f"(default: the recipe's; {_recipe_defaults('spacing')})")  # fmt: skip
    add("--subset", default="all", choices=["all", "complete", "incomplete"],
        help="training cases: all, complete (every landmark present) or incomplete (some missing)")  # fmt: skip
    add("--augment", action=argparse.BooleanOptionalAction, default=None,
        help="left-right flips (swapping L/R names), rotations up to 10 deg, scaling 0.9-1.1 and intensity jitter "
             f"(default: the recipe's; {_recipe_defaults('augment')})")  # fmt: skip
    add("--p-background", type=_fraction, default=None,
        help="share of training crops that hold no landmark, so sliding windows learn the background "
             f"(default: the recipe's; {_recipe_defaults('p_background')})")  # fmt: skip
    add("--p-partial", type=_fraction, default=None,
        help="share of training crops that hold only some landmarks "
             f"(default: the recipe's; {_recipe_defaults('p_partial')})")  # fmt: skip
    add("--p-zoom", type=_fraction, default=None,
        help="share of training items that are the whole volume zoomed to fit the crop, the coarse view of "
             f"coarse-to-fine inference (default: the recipe's; {_recipe_defaults('p_zoom')})")  # fmt: skip
    add("--hard-negatives", type=_positive_float, default=None, metavar="RATIO",
        help="anchor head: the existence loss keeps only the RATIO x (positives) hardest negatives (not in the "
             "paper; default: all negatives)")  # fmt: skip
    add("--landmark-existence", type=_positive_float, default=None, metavar="WEIGHT",
        help="anchor head: add a per-landmark existence term, BCE of each landmark's best anchor logit against "
             "'in the crop', with this weight (not in the paper; default: off)")  # fmt: skip
    add("--val-strategy", default=None, choices=["sliding", "coarse_to_fine"],
        help="whole-volume inference of validation, and the run's default in evaluate and predict "
             f"(default: the recipe's; {_recipe_defaults('val_strategy')})")  # fmt: skip
    add("--val-roi", type=_positive_int, nargs=3, metavar=("D", "H", "W"), default=None,
        help="sliding-window size of whole-volume validation (default: the training crop)")  # fmt: skip
    add("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="device (auto: cuda, mps, then cpu)")
    add("--amp", action="store_true", help="mixed precision on CUDA: bfloat16 where supported, else float16 + scaler")
    add("--compile", action="store_true", help="torch.compile the model")
    add("--checkpointing", action="store_true",
        help="activation checkpointing of the stem, stages and decoder levels (H3DE-Net): about half the training "
             "memory of the paper preset for some extra time")  # fmt: skip
    add("--seed", type=int, default=0, help="seed of weights, data order, crops and augmentation")
    add("--workers", type=_non_negative_int, default=0, help="DataLoader worker processes")
    add("--val-every", type=_positive_int, default=None,
        help="validate every N epochs (the last epoch always; default: the recipe's, 1 for paper presets)")  # fmt: skip
    add("--checkpoint-every", type=_non_negative_int, default=0,
        help="also write last.pt every N optimizer steps (0: at epoch ends only)")  # fmt: skip
    add("--patience", type=_non_negative_int, default=None,
        help="stop after N validations without a lower validation MRE (0: never; default 20)")  # fmt: skip
    add("--resume", action="store_true", help="continue the run in --out from its last.pt (bit for bit)")
    add("--overwrite", action="store_true", help="delete the run in --out and start over")
    add("--no-progress", action="store_true", help="hide the progress bar")


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--run | --pretrained`` and the inference options shared by ``evaluate`` and ``predict``."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", type=Path, default=None, metavar="RUN_DIR",
                        help="run folder written by `h3de-lite train --out`")  # fmt: skip
    source.add_argument("--pretrained", default=None, metavar="NAME",
                        help="packaged pretrained model (h3de_lite.pretrained.available())")  # fmt: skip
    add = parser.add_argument
    add("--which", default="best", choices=["best", "last"], help="checkpoint of --run: best (lowest validation MRE) "
        "or last")  # fmt: skip
    add("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="device (auto: cuda, mps, then cpu)")
    add("--amp", action="store_true", help="mixed precision on CUDA")
    add("--threshold", type=_fraction, default=None,
        help="presence threshold in [0, 1] on the decoder score (default: heatmaps place every landmark, eq. 2; the "
             "anchor head needs existence probability >= 0.5)")  # fmt: skip
    add("--method", default=None, choices=["subvoxel", "argmax"], help="heatmap decoding (default: the run's)")
    add("--overlap", type=_fraction, default=0.5,
        help="sliding-window overlap in [0, 1) "
             "(default 0.5: more accurate than 0.25, about twice the time)")  # fmt: skip
    add("--strategy", default=None, choices=["sliding", "coarse_to_fine"],
        help="whole-volume inference: Gaussian-blended sliding windows or coarse-to-fine (default: the run's "
             "validation strategy)")  # fmt: skip
    add("--tta", default=None, choices=["none", "flip"],
        help="test-time augmentation: flip averages every window with its left-right mirror (L/R landmarks "
             "swapped; twice the time) (default: the run's, flip for runs of the tiny recipe)")  # fmt: skip
    add("--no-progress", action="store_true", help="hide the progress bar")


def _add_evaluate_parser(sub: argparse._SubParsersAction) -> None:
    evaluate = sub.add_parser(
        "evaluate",
        help="score a trained model on whole volumes (MRE, SDR, existence F1)",
        description="Predict every volume of DIR/SPLIT whole (as in training: the run's voxel size and HU window) and "
        "score it against its labels in the stored volume's spacing: MRE ± SD, SDR at 2/2.5/3/4 mm and existence "
        "precision/recall/F1 for the complete, incomplete and all subsets. Prints the table and writes "
        "eval_<split>.json (keys complete, incomplete, all), eval_<split>.csv (per case) and eval_<split>.md into the "
        "run folder or --out. DIR/SPLIT holds MML files (<id>_volume.nrrd, <id>_label.npy, <id>_spacing.npy) or "
        "images (<id>.nii.gz, <id>.nrrd) with landmark files (<id>.mrk.json, <id>.fcsv or <id>.csv, world mm).",
    )
    _add_model_arguments(evaluate)
    evaluate.add_argument("--data", type=Path, required=True, help="dataset folder holding the split folder")
    evaluate.add_argument("--split", default="test",
                          help="split folder inside --data (default test; . for --data itself)")  # fmt: skip
    evaluate.add_argument("--out", type=Path, default=None, help="folder for the results (default: the run folder)")
    evaluate.add_argument("--paper", action="store_true",
                          help="also print the paper's Table I numbers, in their own labelled table")  # fmt: skip
    evaluate.add_argument("--sdr", type=_positive_float, nargs="+", default=None, metavar="MM",
                          help="SDR radii in mm (default: the paper's 2 2.5 3 4)")  # fmt: skip


def _add_predict_parser(sub: argparse._SubParsersAction) -> None:
    predict = sub.add_parser(
        "predict",
        help="predict landmarks of NIfTI/NRRD images and write 3D Slicer markups",
        description="For every IMAGE (NIfTI .nii/.nii.gz or NRRD, any size and spacing) write OUT/<id>.mrk.json (a "
        "3D Slicer point list in world mm; absent landmarks have positionStatus 'missing') and OUT/<id>.csv (name, "
        "x, y, z in RAS mm, present, score). The coordinates are those `h3de-lite evaluate` scores.",
    )
    _add_model_arguments(predict)
    predict.add_argument("images", type=Path, nargs="+", metavar="IMAGE", help="NIfTI or NRRD images")
    predict.add_argument("--out", type=Path, required=True, help="output folder (created)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, one sub-command per task."""
    parser = argparse.ArgumentParser(prog="h3de-lite", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    phantom = sub.add_parser("phantom", help="write a phantom head-CT dataset in the MML release layout")
    phantom.add_argument("--out", type=Path, required=True, help="output folder (created; gets train/ val/ test/)")
    phantom.add_argument("--seed", type=int, default=0, help="master seed: the same seed writes the same dataset")
    phantom.add_argument("--n-train", type=_non_negative_int, default=8, help="number of training cases")
    phantom.add_argument("--n-val", type=_non_negative_int, default=2, help="number of validation cases")
    phantom.add_argument("--n-test", type=_non_negative_int, default=4, help="number of test cases")
    phantom.add_argument(
        "--incomplete-fraction", type=_fraction, default=0.3, help="share of cases with missing teeth, in [0, 1]"
    )
    phantom.add_argument(
        "--shape", type=int, nargs=3, metavar=("D", "H", "W"), default=None, help="volume size in voxels"
    )
    phantom.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a dataset already in --out (its train/ val/ test/ case files are deleted first); without it an "
        "--out that holds a dataset is refused",
    )
    phantom.add_argument(
        "--difficulty",
        choices=["v1", "v2"],
        default="v2",
        help="v2 (default): varied anatomy, impacted third molars, missing-tooth situations, metal and artefacts; "
        "v1: the first, easier phantom (byte-identical to earlier releases)",
    )
    phantom.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    _add_train_parser(sub)
    _add_evaluate_parser(sub)
    _add_predict_parser(sub)
    return parser


def _phantom(args: argparse.Namespace) -> int:
    from h3de_lite.data.phantom import write_phantom_dataset

    paths = write_phantom_dataset(
        args.out,
        seed=args.seed,
        n_train=args.n_train,
        n_val=args.n_val,
        n_test=args.n_test,
        incomplete_fraction=args.incomplete_fraction,
        shape=tuple(args.shape) if args.shape else None,
        progress=not args.no_progress,
        overwrite=args.overwrite,
        difficulty=args.difficulty,
    )
    print(f"wrote {len(paths)} cases to {args.out} (phantom {args.difficulty})")
    return 0


def _train(args: argparse.Namespace) -> int:
    import torch

    from h3de_lite.config import get_preset
    from h3de_lite.data.augment import training_augmentation
    from h3de_lite.data.dataset import LandmarkDataset
    from h3de_lite.data.transforms import DEFAULT_WINDOW
    from h3de_lite.training import TrainConfig, build_model_from_config, fit, recipe_for

    if args.resume and args.overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite deletes it: pass only one")
    if not args.data.is_dir():
        raise FileNotFoundError(
            f"dataset folder {str(args.data)!r} does not exist; write one with `h3de-lite phantom --out "
            f"{args.data}` or point --data at an MML-layout folder with train/ and val/"
        )
    preset = get_preset(args.preset)
    recipe = recipe_for(args.preset)
    if args.model == "h3de":
        overrides = dict(recipe.model)  # the recipe's changes to the preset, then the options
        overrides.update({key: value for key, value in (("head", args.head), ("anchors", args.anchors)) if value})
        if args.checkpointing:
            overrides["checkpointing"] = True
        spec: dict = {"kind": "h3de", "preset": args.preset, "overrides": overrides}
    else:
        if args.head == "anchor":
            raise ValueError(f"--head anchor needs --model h3de; the {args.model} baseline has a heatmap head only")
        if args.checkpointing:
            raise ValueError(f"--checkpointing needs --model h3de; the {args.model} baseline has no checkpointing")
        spec = {"kind": "baseline", "name": args.model, "size": "paper" if args.preset.startswith("paper") else "tiny"}
    crop = tuple(args.crop or recipe.crop or preset.input_size)
    if any(c % 32 for c in crop):
        raise ValueError(f"--crop {' '.join(map(str, crop))}: each size must be a multiple of 32 (5 halvings)")
    spacing = recipe.spacing if args.spacing is None else (None if args.spacing == "none" else float(args.spacing))

    given = {
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "optimizer": args.optimizer,
        "heatmap_loss": args.loss,
        "sigma": args.sigma,
        "val_every": args.val_every,
        "val_strategy": args.val_strategy,
        "hard_negative_ratio": args.hard_negatives,
        "lambda_landmark": args.landmark_existence,
    }
    changes = {**recipe.train, **{key: value for key, value in given.items() if value is not None}}
    if args.patience is not None:
        changes["patience"] = args.patience or None  # 0: never stop early
    config = TrainConfig().replace(
        **changes,
        val_roi_size=tuple(args.val_roi) if args.val_roi else crop,
        seed=args.seed,
        device=args.device,
        amp=args.amp,
        compile=args.compile,
        num_workers=args.workers,
        checkpoint_every=args.checkpoint_every,
    )
    augmented = recipe.augment if args.augment is None else args.augment
    augment, intensity = training_augmentation() if augmented else (None, None)
    p_partial = recipe.p_partial if args.p_partial is None else args.p_partial
    p_background = recipe.p_background if args.p_background is None else args.p_background
    p_zoom = recipe.p_zoom if args.p_zoom is None else args.p_zoom
    train_data = LandmarkDataset(
        args.data, "train", subset=args.subset, crop_size=crop, random_crop=True, target_spacing=spacing,
        seed=args.seed, augment=augment, intensity_augment=intensity, p_partial=p_partial, p_background=p_background,
        p_zoom=p_zoom, cache=recipe.cache,
    )  # fmt: skip
    val_data = LandmarkDataset(
        args.data, "val", crop_size=None, random_crop=False, target_spacing=spacing, cache=recipe.cache
    )
    torch.manual_seed(args.seed)  # the initial weights follow --seed too (fit seeds only data order and crops after)
    model = build_model_from_config(spec)
    if hasattr(model, "_check_input"):  # a crop the network cannot take fails here, before the run folder exists
        model._check_input(torch.empty(1, 1, *crop, device="meta"))
    if not args.no_progress:
        print(
            f"recipe {recipe.name}: spacing {spacing or 'as stored'} mm, crop {crop}, loss {config.heatmap_loss}, "
            f"{config.epochs} epochs of batch {config.batch_size}, lr {config.lr:g} ({config.schedule}), "
            f"{len(train_data)} training / {len(val_data)} validation cases",
            file=sys.stderr,
        )
    data_config = {"spacing": spacing, "window": list(DEFAULT_WINDOW), "crop": list(crop), "subset": args.subset,
                   "recipe": recipe.name, "augment": augmented, "p_partial": p_partial,
                   "p_background": p_background, "p_zoom": p_zoom}  # fmt: skip
    history = fit(
        model, train_data, val_data, config, run_dir=args.out, resume=args.resume, overwrite=args.overwrite,
        progress=not args.no_progress, model_config=spec, data_config=data_config, inference_config={"tta": recipe.tta},
    )  # fmt: skip
    mres = [e["val_mre"] for e in history["epochs"] if e.get("val_mre") is not None]
    summary = f"validation MRE {mres[0]:.2f} -> {mres[-1]:.2f} mm" if mres else "no validation"
    best = history.get("best_epoch")
    print(f"trained {len(history['epochs'])} epochs into {args.out}: {summary} (best.pt: epoch {best})")
    return 0


def _load_predictor(args: argparse.Namespace):  # -> h3de_lite.evaluation.Predictor
    from h3de_lite import pretrained
    from h3de_lite.evaluation import load_predictor

    options = {"which": args.which, "device": args.device, "threshold": args.threshold, "method": args.method,
               "strategy": args.strategy, "overlap": args.overlap,
               "amp": args.amp, "tta": args.tta}  # fmt: skip
    if args.run is not None:
        return load_predictor(args.run, **options)
    return pretrained.load(args.pretrained, **options)


def _split_stem(split: str) -> str:
    import re

    name = split.strip("/\\")
    return f"eval_{name}" if re.fullmatch(r"[\w-][\w.-]*", name) and name not in (".", "..") else "eval"


def _evaluate(args: argparse.Namespace) -> int:
    from h3de_lite.evaluation import evaluate, find_cases

    if args.run is None and args.out is None:
        raise ValueError("--pretrained needs --out DIR: there is no run folder to write eval results into")
    out = args.out if args.out is not None else args.run
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file; pass a folder")
    find_cases(args.data, args.split)  # a bad dataset fails before the model loads
    predictor = _load_predictor(args)
    options = {} if args.sdr is None else {"thresholds": tuple(args.sdr)}
    result = evaluate(predictor, args.data, split=args.split, progress=not args.no_progress, **options)
    paths = result.write(out, stem=_split_stem(args.split), paper=args.paper)
    print(result.table(paper=args.paper))
    print(f"wrote {paths['json']}, {paths['csv'].name} and {paths['md'].name}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from h3de_lite.evaluation import predict_files

    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out {str(args.out)!r} is a file; pass a folder")
    predictor = _load_predictor(args)
    results = predict_files(predictor, args.images, args.out, progress=not args.no_progress)
    for r in results:
        print(f"{r.image}: {int(r.present.sum())}/{len(r.present)} landmarks -> {r.markups}, {r.table.name}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``h3de-lite`` console script."""
    args = build_parser().parse_args(argv)
    try:
        commands = {"phantom": _phantom, "train": _train, "evaluate": _evaluate, "predict": _predict}
        return commands[args.command](args)
    except (ValueError, FileNotFoundError) as err:
        print(f"h3de-lite {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
