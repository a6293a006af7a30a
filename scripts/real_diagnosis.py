"""Why does MDP pretraining not beat CE on CamVid (results/real_table.md)? One-change variants of
the real study's MDP row, each pretrained once (seed 0) under the study's protocol and measured on
CamVid val by its own task (nearest prototype), the collapse measures of scripts/pretrain_eval.py
(--stats) and the study's linear probe.

    python scripts/real_diagnosis.py --data-root DATA --work-dir ~/mdp-runs/real

Uses the real study's work dir, so its finished rows (mdp, ce, mdp_tau0.3, mdp_no_mix at seed 0)
are reused, not rerun; resumable like the study. Writes results/real_diagnosis.md and .json.
The rows and the reading rule were fixed before any variant ran (README, "On real images").
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import pretrain_eval  # noqa: E402
import real_study  # noqa: E402
import utils  # noqa: E402
from datasets import MultiDataset, build_reader, eval_transform  # noqa: E402
from mdp import MDPNet  # noqa: E402
from reproduce import git_commit, job_commits, pretrain  # noqa: E402

# row -> (pretraining flags on top of the study's, what changed); None: the untrained network
ROWS: dict[str, tuple[list[str] | None, str]] = {
    "random": (None, "no pretraining (the network at initialisation)"),
    "ce": (["--method", "ce"], "CE instead of MDP"),
    "mdp": ([], "the study's MDP row (AdamW 1e-3, bank 64, τ 0.07, mixing)"),
    "mdp_tau0.3": (["--tau", "0.3"], "τ 0.3"),
    "mdp_no_mix": (["--mix", "none"], "no mixing"),
    "mdp_lr1e-4": (["--lr", "1e-4", "--min-lr", "1e-6"], "learning rate ÷10"),
    "mdp_sgd": (["--optimizer", "sgd", "--lr", "0.01", "--min-lr", "1e-4"],
                "SGD 0.01, momentum 0.9 (the script's default optimiser)"),
    "mdp_bank8": (["--bank-size", "8"], "bank 8: the last step's image means only"),
    "mdp_bank512": (["--bank-size", "512"], "bank 512: the last 64 steps' image means"),
}
HEAD = ["own task mIoU", "prototype cos (mean / max)", "class mean length",
        "embedding eff. rank", "backbone eff. rank", "linear probe mIoU"]


def measure(ckpt: str | None, args: argparse.Namespace, cache: Path) -> dict:
    """Own-task mIoU and the collapse measures on val, cached beside the row's runs."""
    if cache.exists():
        return json.loads(cache.read_text())
    reader = build_reader(args.dataset, args.data_root, "val")
    val = MultiDataset([reader], eval_transform((240, 180)))
    if ckpt is None:  # the untrained network, as the random-weights row fine-tunes it (seed 0)
        torch.manual_seed(0)
        net = MDPNet(real_study.ARCH, int(real_study.OUTPUT_STRIDE))
        res = {"stats": pretrain_eval.embedding_stats(
            pretrain_eval.OwnTaskClassifier(net, slice(0, len(reader.classes))), val,
            len(reader.classes))}
    else:
        out = cache.with_suffix(".own.json")
        pretrain_eval.main([ckpt, "--dataset", args.dataset, "--data-root", str(args.data_root),
                            "--base-size", "240", "180", "--stats", "--out", str(out)])
        res = json.loads(out.read_text())
    cache.write_text(json.dumps(res, indent=1))
    return res


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="folder:camvid")
    p.add_argument("--data-root", type=Path, default=Path("data"))
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--work-dir", type=Path, default=Path.home() / "mdp-runs" / "real")
    p.add_argument("--results-dir", type=Path, default=ROOT / "results")
    args = p.parse_args(argv)
    seed, rows = 0, {}
    for row in args.rows:
        flags, _ = ROWS[row]
        out = args.work_dir / row / f"seed{seed}"
        stages = [] if flags is None else [([args.dataset], flags)]
        real_study.check_budget(out / "pretrain0", real_study.PRETRAIN_ITERS)
        ckpt = pretrain(stages, seed, out, args.data_root, real_study.PRETRAIN_ITERS,
                        real_study.PRETRAIN)
        probe = real_study.evaluate_all(ckpt, seed, out, args.dataset, args.data_root, 1,
                                        ["linear probe"])["linear probe"]
        res = measure(ckpt, args, out / "diagnosis.json")
        rows[row] = {"own-task mIoU": res.get("mIoU"), **res["stats"],
                     "linear probe": probe["mIoU"]}
    write_table(rows, args)


def write_table(rows: dict[str, dict], args: argparse.Namespace) -> None:
    def cell(v: float | None, fmt: str) -> str:
        return "—" if v is None else format(v, fmt)
    command = shlex.join(["python", "scripts/real_diagnosis.py", *sys.argv[1:]])
    lines = [f"MDP diagnosis on CamVid: `{command}`, table built at commit {git_commit()}, jobs run "
             f"at {job_commits(args.work_dir)}. Seed 0 only; every row is the real study's "
             f"protocol (results/real_table.md) with one change. Measured on val at feature "
             f"resolution (50 images) by scripts/pretrain_eval.py --stats; the linear probe is "
             f"the study's (seed spread there: about ±2 mIoU).", "",
             "| row | change | " + " | ".join(HEAD) + " |", "|---|---|" + "---:|" * len(HEAD)]
    for row, r in rows.items():
        g = r.get
        lines.append(f"| {row} | {ROWS[row][1]} | {cell(g('own-task mIoU'), '.2f')} | "
                     f"{cell(g('prototype_cos_mean'), '.3f')} / {cell(g('prototype_cos_max'), '.3f')}"
                     f" | {g('class_mean_length'):.3f} | {g('embedding_effective_rank'):.1f} | "
                     f"{g('backbone_effective_rank'):.0f} | {g('linear probe'):.2f} |")
    text = "\n".join(lines) + "\n"
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / "real_diagnosis.md").write_text(text)
    (args.results_dir / "real_diagnosis.json").write_text(json.dumps(
        {"header": lines[0], "rows": rows}, indent=1))
    print("\n" + text)


if __name__ == "__main__":
    utils.run_cli(main)
