"""Per-class IoU and mIoU of several fine-tuning runs side by side (reads each RUN/results.json).

    python tools/compare.py runs/demo/ft_scratch runs/demo/ft_mdp \
        --pretrain-log runs/demo/pretrain/log.jsonl   # also: did the pretraining loss fall?
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--pretrain-log", type=Path, help="a train_pretrain.py log.jsonl")
    args = p.parse_args(argv)
    if args.pretrain_log:
        losses = [json.loads(line)["loss"] for line in args.pretrain_log.read_text().splitlines()]
        k = max(len(losses) // 10, 1)  # single-batch losses are noisy: average a tenth of the log
        first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
        print(f"pretraining loss, mean of the first / last {k} logged steps: "
              f"{first:.3f} -> {last:.3f} ({'falls' if last < first else 'does NOT fall'})\n")
    results = {}
    for run in args.runs:
        path = run / "results.json"
        if not path.is_file():
            raise SystemExit(f"error: {path} not found: expected a finished finetune.py run")
        results[run.name] = json.loads(path.read_text())
    names = list(next(iter(results.values()))["IoU"])
    cell = lambda v: "   –  " if v is None else f"{v:6.2f}"  # noqa: E731  (absent class: NaN)
    width = max(len(n) for n in names + ["mIoU"])
    print(f"{'class':<{width}}  " + "  ".join(f"{r:>12}" for r in results))
    for n in names:
        print(f"{n:<{width}}  " + "  ".join(f"{cell(r['IoU'][n]):>12}" for r in results.values()))
    print(f"{'mIoU':<{width}}  " + "  ".join(f"{cell(r['mIoU']):>12}" for r in results.values()))


if __name__ == "__main__":
    main()
