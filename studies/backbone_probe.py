"""How much does the backbone's initialisation decide? Fine-tuning vs frozen-backbone fine-tuning,
from a pretraining checkpoint vs from random weights, over seeds, with one set of fine-tuning flags.

If a frozen random backbone reaches what a frozen pretrained one does, the head alone solves the
target and no pretraining can show at that budget; that is what this measures on the demo.

    make probe      # after make demo: its checkpoint and its fine-tuning flags, 3 seeds
    python studies/backbone_probe.py --ckpt runs/demo/pretrain/last.pth -- --dataset cityscapes ...

Every run is finetune.py (called in-process); finished runs are skipped. Writes
results/toy/backbone_probe.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "studies"))

import finetune  # noqa: E402
import utils  # noqa: E402
from reproduce import git_commit, run_once  # noqa: E402

INITS = ("scratch", "pretrained")
MODES = {"fine-tuned": ("ft", []), "frozen backbone": ("frozen", ["--freeze-backbone"])}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="a train_pretrain.py checkpoint")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--work-dir", default=str(ROOT / "runs" / "backbone_probe"))
    p.add_argument("--results-dir", default=str(ROOT / "results" / "toy"))
    p.add_argument("finetune_flags", nargs=argparse.REMAINDER,
                   help="after --: the finetune.py flags every run shares (dataset, budget, ...)")
    args = p.parse_args(argv)
    flags = [f for f in args.finetune_flags if f != "--"]
    try:
        arch = utils.load_checkpoint(args.ckpt, required=("model", "args"))["args"]["arch"]
    except utils.CheckpointError as e:
        raise SystemExit(f"error: {e} (make probe needs make demo's checkpoint)") from None

    work, done = Path(args.work_dir), []
    miou: dict[tuple[str, str], list[float]] = {}
    for seed in range(args.seeds):
        for init in INITS:
            for mode, (tag, extra) in MODES.items():
                out = work / f"{init}_{tag}_seed{seed}"
                run_argv = [*flags, "--ckpt", args.ckpt if init == "pretrained" else "none",
                            "--arch", arch, "--seed", str(seed), "--out-dir", str(out),
                            "--num-overlays", "0", *extra]
                run_once(out / "done", finetune.main, run_argv)
                done.append((out / "done").stat().st_mtime)
                res = json.loads((out / "results.json").read_text())
                miou.setdefault((init, mode), []).append(res["mIoU"])

    cell = lambda v: f"{np.mean(v):.2f} ± {np.std(v):.2f}"  # noqa: E731
    lines = [f"Backbone probe: `python studies/backbone_probe.py --ckpt {args.ckpt} -- "
             f"{' '.join(flags)}` at commit {git_commit()}; {args.seeds} seed(s), "
             f"{len(done)} runs, the last finished {(max(done) - min(done)) / 60:.0f} min after "
             f"the first ({os.cpu_count()} CPU cores). "
             f"mIoU (%), mean ± std over seeds; per seed in brackets.", "",
             f"| backbone initialisation | {' | '.join(MODES)} |", "|---|---:|---:|"]
    for init in INITS:
        name = "random (scratch)" if init == "scratch" else f"pretrained ({args.ckpt})"
        lines.append(f"| {name} | " + " | ".join(
            f"{cell(miou[init, m])} [{', '.join(f'{v:.2f}' for v in miou[init, m])}]"
            for m in MODES) + " |")
    text = "\n".join(lines) + "\n"
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    (results / "backbone_probe.md").write_text(text)
    print("\n" + text)


if __name__ == "__main__":
    main()
