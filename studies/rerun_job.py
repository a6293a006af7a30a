"""Rerun one finished evaluation job of a real-image study, its mIoU beside the committed one: how
much of a result is the machine's float rounding (threads, kernels, precision) rather than the seed.
The job runs exactly as the study ran it (studies/real_study.py's flags); the rounding is set from
outside, by the environment:

    OMP_NUM_THREADS=2 python studies/rerun_job.py --data-root DATA --eval "CamVid all" --seed 1
    OMP_NUM_THREADS=1 python studies/rerun_job.py --data-root DATA --eval "CamVid all" --seed 1
    ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2 \\
        python studies/rerun_job.py --data-root DATA --eval "CamVid all" --seed 1

Random weights by default (no checkpoint needed); a pretrained row needs its checkpoint (--ckpt,
e.g. the study's <work-dir>/<row>/seed<k>/pretrain0/last.pth).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "studies"))

from real_study import evaluate_all  # noqa: E402
from protocols import make_study  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--study", default="multi", choices=["camvid", "multi"])
    p.add_argument("--data-root", required=True)
    p.add_argument("--row", default="random")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval", default="CamVid all")
    p.add_argument("--ckpt", default=None, help="the row's pretraining checkpoint (not for random)")
    p.add_argument("--out-dir", default=None, help="default: a temporary folder, removed after")
    args = p.parse_args(argv)
    study = make_study(args.study, "folder:camvid")
    if args.eval not in study.evals:
        sys.exit(f"--eval {args.eval!r}: expected one of {', '.join(study.evals)}")
    if (args.row == "random") != (args.ckpt is None):
        sys.exit(f"--row {args.row}: random weights take no --ckpt, every other row needs one")
    committed = json.loads((ROOT / "results" / study.folder / f"{study.table}.json").read_text())
    runs = committed["runs"].get(args.row, {}).get(str(args.seed), {})
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out_dir or tmp)
        result = evaluate_all(args.ckpt, args.seed, out, "folder:camvid", Path(args.data_root), 1,
                              [args.eval], study.evals)[args.eval]
    before = runs.get(args.eval, {}).get("mIoU")
    print(f"{args.row} seed {args.seed} {args.eval}: mIoU {result['mIoU']:.2f} here "
          f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
          f"kernels {torch.backends.cpu.get_cpu_capability()}), committed "
          + ("none" if before is None else f"{before:.2f}"))


if __name__ == "__main__":
    main()
