"""Make the packaged pretrained models and their model cards, end to end, with the public CLI only.

Steps (each a ``h3de-lite`` command, printed and timed):

1. the training data of the README (phantom v2, seed 0: 24 training and 4 validation cases) and a test set from a
   seed no training run sees (``--test-seed``, 20 cases, 30 % incomplete);
2. training with ``h3de-lite train --preset tiny`` (the CPU recipe) plus ``--train-args`` for every model of the
   comparison: H3DE-Net with the anchor-free head (``heatmap``) and with the multi-scale anchor head (``anchor``),
   and the three baselines (``unet3d``, ``vnet``, ``resunet3d``) trained the same way;
3. ``h3de-lite evaluate`` of each on the test set (``eval_test.json``), with the run's inference defaults (the
   recipe's test-time mirror averaging); ``--reevaluate`` repeats this step for finished runs;
4. :func:`h3de_lite.pretrained.export` of the two H3DE-Net runs, with a ``card.json`` holding the commands, the data,
   the training time, the machine and every model's test results (the book's model-card page reads it).

Run from the repository root (a long CPU job: start it with ``nohup`` and a log)::

    python book/scripts/make_pretrained.py --work /tmp/pretrained --train-args "--epochs 120 --val-every 5"

``--export`` writes into ``h3de_lite/weights/`` (omit it to try a recipe without touching the package); ``--ship``
chooses which of the two H3DE-Net runs it packages, leaving the other's packaged model as it is. Runs that already
have their test results are not trained again, so the five trainings can run in two invocations side by side (each
with ``--models`` and ``OMP_NUM_THREADS=1``), followed by one with ``--export``; ``--note`` records that in the
cards.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

MODELS: dict[str, list[str]] = {
    "heatmap": ["--head", "heatmap"],
    "anchor": ["--head", "anchor", "--anchors", "multi"],
    "unet3d": ["--model", "unet3d"],
    "vnet": ["--model", "vnet"],
    "resunet3d": ["--model", "resunet3d"],
}
SHIPPED = ("heatmap", "anchor")


def _run(command: list[str], log: list[dict]) -> float:
    """Run one CLI command (echoed), fail loudly, return its wall time in seconds."""
    print("$ " + shlex.join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True)
    seconds = time.perf_counter() - start
    log.append({"command": shlex.join(command), "seconds": round(seconds, 1)})
    print(f"  ({seconds:.0f} s)", flush=True)
    return seconds


def _without_note(argv: list[str] | None) -> list[str]:
    """The command line as given, less ``--note`` and its text (the card holds the note on its own)."""
    args, kept = list(sys.argv[1:] if argv is None else argv), []
    while args:
        arg = args.pop(0)
        if arg == "--note":
            args = args[1:]
        elif not arg.startswith("--note="):
            kept.append(arg)
    return kept


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for data, runs and logs")
    parser.add_argument("--train-args", default="", help="extra options for every h3de-lite train (quoted)")
    parser.add_argument("--test-seed", type=int, default=2027, help="seed of the test set (never trained on)")
    parser.add_argument("--n-test", type=int, default=20, help="test cases")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS), help="models to train")
    parser.add_argument("--export", action="store_true", help="package the --ship models into h3de_lite/weights/")
    parser.add_argument("--ship", nargs="+", default=list(SHIPPED), choices=list(SHIPPED),
                        help="which H3DE-Net runs --export packages (default: both)")  # fmt: skip
    parser.add_argument("--note", default="",
                        help="how the runs were made, where the command line alone does not say (into the cards)")
    parser.add_argument("--reevaluate", action="store_true",
                        help="evaluate finished runs again (e.g. after their config.json gained an inference default) "
                             "instead of skipping them; runs without made_with.json are still trained")  # fmt: skip
    args = parser.parse_args(argv)

    cli = [sys.executable, "-m", "h3de_lite.cli"]
    work: Path = args.work
    data, test = work / "data" / "phantom", work / "data" / f"test-{args.test_seed}"
    log: list[dict] = []
    if not (data / "train").is_dir():
        _run([*cli, "phantom", "--out", str(data), "--seed", "0", "--n-train", "24", "--n-val", "4", "--n-test", "0",
              "--no-progress"], log)  # fmt: skip
    if not (test / "test").is_dir():
        _run([*cli, "phantom", "--out", str(test), "--seed", str(args.test_seed), "--n-train", "0", "--n-val", "0",
              "--n-test", str(args.n_test), "--incomplete-fraction", "0.3", "--no-progress"], log)  # fmt: skip

    results: dict[str, dict] = {}
    made: dict[str, dict] = {}
    extra = shlex.split(args.train_args)
    for name in args.models:
        run = work / "runs" / name
        command = [*cli, "train", "--data", str(data), "--out", str(run), "--preset", "tiny", *MODELS[name], *extra,
                   "--overwrite", "--no-progress"]  # fmt: skip
        evaluate = [*cli, "evaluate", "--run", str(run), "--data", str(test), "--split", "test", "--no-progress"]
        if not (run / "eval_test.json").is_file():
            seconds = _run(command, log)
            (run / "made_with.json").write_text(json.dumps({"command": shlex.join(command), "seconds": seconds}))
            _run(evaluate, log)
        elif args.reevaluate:
            _run(evaluate, log)  # with the run's own inference defaults (config.json → inference)
        made[name] = json.loads((run / "made_with.json").read_text())
        results[name] = json.loads((run / "eval_test.json").read_text())
    (work / "results.json").write_text(json.dumps({"results": results, "log": log}, indent=1))

    if args.export:
        from h3de_lite.pretrained import export, machine_info

        for name in args.ship:
            if name not in results:
                print(f"not exported: {name} (no test results; add it to --models)", flush=True)
                continue
            card = {
                "name": name,
                "made_with": "book/scripts/make_pretrained.py " + shlex.join(_without_note(argv)),
                "train_command": made[name]["command"],
                "train_seconds": round(made[name]["seconds"], 1),
                "data": {"phantom": "v2", "seed": 0, "n_train": 24, "n_val": 4},
                "test": {"phantom": "v2", "seed": args.test_seed, "n_test": args.n_test, "incomplete_fraction": 0.3},
                "machine": machine_info(),
                "results": results,
                "commands": log,
            }
            if args.note:
                card["note"] = args.note
            folder = export(work / "runs" / name, name, card=card)
            print(f"exported {name} to {folder}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
