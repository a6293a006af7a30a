"""Why does M4 fold CamVid's classes together, and what undoes it? One-change variants of the real
study's MDP row (results/camvid/README.md), each pretrained at two seeds under the study's protocol
and measured on CamVid val as studies/real_diagnosis.py measures a row: own task (nearest
prototype), the collapse measures, pixel probes of the embedding and the backbone, the study's
linear probe; plus the mean prototype cosine logged during pretraining (`proto_cos`).

    python studies/m4_mechanism.py --data-root DATA                  # every row, seeds 0 and 1
    python studies/m4_mechanism.py --data-root DATA --table-only     # the table from finished rows

Run outputs in --work-dir (default $HOME/mdp-runs/m4), finished jobs skipped, so an interrupted
study continues; the table is rebuilt from whatever has finished. Writes results/m4/m4_mechanism.md
and .json. The rows and the reading rule (READING) were committed before any variant ran.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "studies"))

import real_diagnosis  # noqa: E402
import real_study  # noqa: E402
import protocols  # noqa: E402
import utils  # noqa: E402
from reproduce import pretrain, provenance  # noqa: E402

# row -> (pretraining flags on top of the real study's, the candidate it tests)
ROWS: dict[str, tuple[list[str], str]] = {
    "ce": (["--method", "ce"], "CE instead of MDP (the reference)"),
    "mdp": ([], "the source's M4: prototypes from the M3 bank"),
    "mdp_anchors": (["--prototypes", "anchors"],
                    "(a) fixed random orthonormal class anchors: targets that never follow the "
                    "embeddings"),
    "mdp_learned": (["--prototypes", "learned"],
                    "(b) free prototypes: a cosine classifier at the same τ, started at (a)'s "
                    "anchors"),
    "mdp_learn_tau": (["--learn-tau"], "(c) the bank with a learned temperature"),
    "mdp_proto_grad": (["--proto-grad"],
                       "(e) the bank, its batch share of each prototype carrying the gradient"),
    "mdp_os8": (["--output-stride", "8"], "(d) output stride 8: a 12×16 feature map, not 6×8"),
}
SEEDS = [0, 1]
READING = (
    "Reading rule (fixed before any variant ran): a candidate names a cause of the failure when, "
    "at both seeds, its row beats the MDP row of the same seed by at least 3 own-task mIoU points "
    "and lowers the class-mean cosine by at least 0.1. A candidate that keeps the method's idea "
    "(one prototype per class made from the embeddings: (c), (d), (e)) and passes, with a mean "
    "linear probe at least MDP's, is a remedy: an opt-in flag and a row of the multi-set study. "
    "(a) and (b) give up that idea; passing, they locate the cause in the bank.")
HEAD = ["own task mIoU", "class-mean cos", "prototype cos", "proto_cos in training (25 / 100 / "
        "300)", "embedding eff. rank", "pixel probe: embedding", "pixel probe: backbone",
        "linear probe mIoU"]


def logged_proto_cos(out: Path) -> dict[int, float]:
    """step -> mean prototype cosine logged by train_pretrain.py (MDP rows)."""
    log = out / "pretrain0" / "log.jsonl"
    if not log.exists():
        return {}
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return {r["step"]: r["proto_cos"] for r in rows if "proto_cos" in r}


def run_row(row: str, seed: int, args: argparse.Namespace) -> dict | None:
    """Pretrains and measures one (row, seed), or with --table-only reads it if finished."""
    out = args.work_dir / row / f"seed{seed}"
    if args.table_only and not (out / "diagnosis.json").exists():
        return None
    ckpt = pretrain([([args.dataset], ROWS[row][0])], seed, out, args.data_root,
                    protocols.PRETRAIN_ITERS, protocols.PRETRAIN)
    probe = real_study.evaluate_all(ckpt, seed, out, args.dataset, args.data_root, 1,
                                    ["linear probe"])["linear probe"]
    diag = argparse.Namespace(dataset=args.dataset, data_root=args.data_root, seed=seed)
    res = real_diagnosis.measure(ckpt, diag, out / "diagnosis.json")
    return {"own-task mIoU": res["mIoU"], **res["stats"], "linear probe": probe["mIoU"],
            "IoU": res["IoU"], "proto_cos_log": logged_proto_cos(out)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="folder:camvid")
    p.add_argument("--data-root", type=Path, default=Path("data"))
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--seeds", nargs="+", type=int, default=SEEDS)
    p.add_argument("--work-dir", type=Path, default=Path.home() / "mdp-runs" / "m4")
    p.add_argument("--results-dir", type=Path, default=ROOT / "results" / "m4")
    p.add_argument("--table-only", action="store_true")
    args = p.parse_args(argv)
    runs: dict[str, dict[int, dict]] = {}
    for seed in args.seeds:  # seed-major: a partial study has every row at some seed
        for row in args.rows:
            res = run_row(row, seed, args)
            if res is not None:
                runs.setdefault(row, {})[seed] = res
    write_table(runs, args)


KEYS = {"own task mIoU": "own-task mIoU", "class-mean cos": "class_mean_cos_mean",
        "prototype cos": "prototype_cos_mean", "embedding eff. rank": "embedding_effective_rank",
        "pixel probe: embedding": "probe_embedding", "pixel probe: backbone": "probe_backbone",
        "linear probe mIoU": "linear probe"}


def cell(by_seed: dict[int, dict], key: str, fmt: str) -> str:
    """'mean ± std (seed values)' over the seeds that have the value; '—' when none has."""
    vals = [r[key] for r in by_seed.values() if r.get(key) is not None]
    if not vals:
        return "—"
    std = f" ± {np.std(vals):{fmt}}" if len(vals) > 1 else ""
    return f"{np.mean(vals):{fmt}}{std} ({', '.join(format(v, fmt) for v in vals)})"


def curve_cell(by_seed: dict[int, dict]) -> str:
    """Mean over seeds of the logged prototype cosine at steps 25, 100 and 300."""
    logs = [r["proto_cos_log"] for r in by_seed.values() if r.get("proto_cos_log")]
    if not logs:
        return "—"
    return " / ".join(f"{np.mean([lg[s] for lg in logs]):.2f}" for s in (25, 100, 300))


def write_table(runs: dict[str, dict[int, dict]], args: argparse.Namespace) -> None:
    if not runs:
        raise SystemExit("error: no finished row yet")
    made = provenance("studies/m4_mechanism.py", [a for a in sys.argv[1:] if a != "--table-only"],
                      args.work_dir, args.data_root)
    seeds = sorted({s for by in runs.values() for s in by})
    lines = [f"M4 mechanism study on CamVid: {made}. Seeds {seeds}; every row is the real "
             f"study's pretraining protocol (resnet14, output stride 16, 96×128 crops, 300 steps, "
             f"AdamW 1e-3, bank 64, τ 0.07) with one change, evaluated at the study's protocol "
             f"(output stride 16). Cells: mean ± std over seeds (per-seed values). Measures as in "
             f"results/camvid/real_diagnosis.md: own task on all of val, collapse measures on "
             f"50 val images, pixel probes fitted on {real_diagnosis.PROBE_IMAGES} training "
             f"images.", "",
             READING, "",
             "| row | change | " + " | ".join(HEAD) + " |", "|---|---|" + "---:|" * len(HEAD)]
    for row, by_seed in runs.items():
        cells = [curve_cell(by_seed) if h.startswith("proto_cos") else
                 cell(by_seed, KEYS[h], ".1f" if "rank" in h else
                      ".3f" if "cos" in h else ".2f") for h in HEAD]
        lines.append(f"| {row} | {ROWS[row][1]} | " + " | ".join(cells) + " |")
    lines += verdicts(runs)
    text = "\n".join(lines) + "\n"
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / "m4_mechanism.md").write_text(text)
    (args.results_dir / "m4_mechanism.json").write_text(json.dumps(
        {"header": lines[0], "reading": READING, "runs": runs}, indent=1))
    print("\n" + text)


def verdicts(runs: dict[str, dict[int, dict]]) -> list[str]:
    """The reading rule applied to each variant row with every seed of the MDP row."""
    base = runs.get("mdp", {})
    out = ["", "| row | own task − MDP, per seed | class-mean cos − MDP, per seed | passes |",
           "|---|---|---|---|"]
    for row, by_seed in runs.items():
        if row in ("ce", "mdp"):
            continue
        seeds = [s for s in SEEDS if s in by_seed and s in base]
        d_own = [by_seed[s]["own-task mIoU"] - base[s]["own-task mIoU"] for s in seeds]
        d_cos = [by_seed[s]["class_mean_cos_mean"] - base[s]["class_mean_cos_mean"] for s in seeds]
        passes = (len(seeds) == len(SEEDS) and all(d >= 3 for d in d_own)
                  and all(d <= -0.1 for d in d_cos))
        verdict = "yes" if passes else ("no" if len(seeds) == len(SEEDS) else "pending")
        out.append(f"| {row} | {', '.join(f'{d:+.2f}' for d in d_own)} | "
                   f"{', '.join(f'{d:+.3f}' for d in d_cos)} | {verdict} |")
    return out


if __name__ == "__main__":
    utils.run_cli(main)
