"""Does MDP pretraining learn better features than CE, pixel-to-pixel and random weights, on real
photographs? Pretraining rows on one real labelled set, each evaluated by a linear probe and by
fine-tuning with 1/8 and all of the training images, over seeds, on that set's val split.

    python scripts/real_study.py --data-root DATA                # DATA/camvid: CamVid, 3 seeds
    python scripts/real_study.py --data-root DATA --quick --seeds 1   # a tenth of the budget
    python scripts/real_study.py --data-root DATA --table-only   # the table from finished jobs
    python scripts/real_study.py --data-root DATA --pretrain-iters 1200 --rows ce mdp --seeds 1 \
        --evals "linear probe" --own-task --work-dir ~/mdp-runs/real_iters1200   # a diagnostic

Every job is train_pretrain.py or finetune.py called in-process (scripts/reproduce.py's runner), so
finished jobs are skipped and an interrupted study just continues; run outputs live in --work-dir
(default $HOME/mdp-runs/real), outside the repository. The table is rebuilt from whatever has
finished, so it can be committed while the study fills in. Writes results/real_table.md, .json
and .png (bars with the seed spread, and mIoU against the fraction of labelled images).

Single-dataset study: every pretraining row consumes the same training labels as the fine-tuning
that follows, so pretraining methods compare fairly at every fraction; against random weights the
pretrained rows have seen all the training labels even when fine-tuned on 1/8 of them.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import finetune  # noqa: E402
import pretrain_eval  # noqa: E402
from reproduce import (bar_chart, check_claims, claims_markdown, git_commit,  # noqa: E402
                       job_commits, pretrain, run_once, summarise, write_markdown)

# The protocol, fixed before any result was seen; every row gets exactly the same budget and
# nothing is tuned per row. Half resolution (CamVid 480x360 -> 240x180 base scale, random rescale
# 0.5-2.0 as M9), 96x128 crops, resnet14 at output stride 16: the budget fits about 2 hours on 2
# CPU cores (3 seeds). Bank size: the source's 1024 at 16 images x 8 GPUs holds about 8 steps of
# image means; 8 steps x 8 images = 64 here.
ARCH, OUTPUT_STRIDE = "resnet14", "16"
PRETRAIN_ITERS, FINETUNE_ITERS, PROBE_ITERS = 300, 120, 200
SIZE = ["--base-size", "240", "180", "--crop-size", "96", "128", "--arch", ARCH,
        "--output-stride", OUTPUT_STRIDE, "--batch-size", "8", "--workers", "0"]
PRETRAIN = SIZE + ["--optimizer", "adamw", "--lr", "1e-3", "--weight-decay", "1e-4",
                   "--schedule", "cosine", "--min-lr", "1e-5", "--warmup-iters", "15",
                   "--bank-size", "64", "--log-interval", "25", "--save-interval", "100"]
# row -> extra pretraining flags (None: no pretraining, the random-weights row)
ROWS: dict[str, list[str] | None] = {
    "random": None,
    "ce": ["--method", "ce"],
    "pix2pix": ["--method", "pix2pix"],
    "mdp": [],
    "mdp_tau0.3": ["--tau", "0.3"],
    "mdp_no_mix": ["--mix", "none"],
}
LABELS = {"random": "random weights (fewer labels seen)", "ce": "CE", "pix2pix": "pixel-to-pixel",
          "mdp": "MDP", "mdp_tau0.3": "MDP τ=0.3", "mdp_no_mix": "MDP w/o mixing"}
# evaluation -> (finetune.py flags, fraction of labelled training images, steps)
EVALS: dict[str, tuple[list[str], float, int]] = {
    "linear probe": (["--model", "linear"], 1.0, PROBE_ITERS),
    "fine-tune 1/8": (["--train-fraction", "0.125"], 0.125, FINETUNE_ITERS),
    "fine-tune all": ([], 1.0, FINETUNE_ITERS),
}
FINETUNE = SIZE + ["--num-overlays", "0", "--log-interval", "20"]
EVALS_ALL = list(EVALS)
CLAIMS = [
    ("MDP beats CE pretraining on the same data", "mdp", "ce", EVALS_ALL,
     "COCO: 76.85 vs 68.48 VOC"),
    ("MDP beats pixel-to-pixel", "mdp", "pix2pix", EVALS_ALL,
     "73.32/40.15/77.75 vs 71.19/38.81/77.17"),
    ("MDP beats random weights", "mdp", "random", EVALS_ALL, "(scratch: not reported for VOC)"),
    ("CE beats random weights", "ce", "random", EVALS_ALL, "—"),
    ("mixing helps", "mdp", "mdp_no_mix", EVALS_ALL, "73.32 vs 71.98 VOC"),
    ("τ = 0.07 beats τ = 0.3", "mdp", "mdp_tau0.3", EVALS_ALL, "0.07 best (no numbers)"),
]


def eval_dir(out: Path, name: str) -> Path:
    return out / name.replace(" ", "_").replace("/", "of")  # "fine-tune 1/8" -> fine-tune_1of8


def evaluate_all(ckpt: str | None, seed: int, out: Path, dataset: str, data_root: Path,
                 scale: int, evals: list[str]) -> dict[str, dict]:
    """The row's evaluations; the 1/8 subset depends on the seed only (same for every row)."""
    results = {}
    for name in evals:
        extra, _, iters = EVALS[name]
        iters = max(iters // scale, 1)
        ft_dir = eval_dir(out, name)
        argv = FINETUNE + ["--ckpt", ckpt or "none", "--dataset", dataset, "--data-root",
                           str(data_root), "--iters", str(iters), "--eval-interval", str(iters),
                           "--seed", str(seed), "--subset-seed", str(seed), "--out-dir",
                           str(ft_dir), *extra]
        run_once(ft_dir / "done", finetune.main, argv)
        results[name] = json.loads((ft_dir / "results.json").read_text())
    return results


def efficiency_plot(table: dict, width: int) -> Image.Image | None:
    """mIoU (mean ± std) against the fraction of labelled images, one line per row (fine-tuning);
    None when the table has no fine-tuning column."""
    colours = [(120, 120, 120), (219, 68, 55), (244, 160, 0), (66, 133, 244), (15, 157, 88),
               (171, 71, 188)]
    points = [(n, f) for n, (flags, f, _) in EVALS.items()
              if "--model" not in flags and any(n in by_eval for by_eval in table.values())]
    if not points:
        return None
    left, top, height, plot_w = 60, 30, 260, 360
    img = Image.new("RGB", (max(width, left + plot_w + 260), top + height + 50), "white")
    draw = ImageDraw.Draw(img)
    vals = [table[r][n] for r in table for n, _ in points if n in table[r]]
    ymax = max(v["mean"] + v["std"] for v in vals) * 1.1 or 1
    x = lambda f: left + 20 + (np.log2(f) + 3) / 3 * (plot_w - 40)  # noqa: E731 (1/8 .. 1)
    y = lambda v: top + height - v / ymax * height  # noqa: E731
    for tick in np.linspace(0, ymax, 5):
        draw.line([(left - 4, y(tick)), (left + plot_w, y(tick))], fill=(220, 220, 220))
        draw.text((5, y(tick) - 6), f"{tick:.0f}", fill="black")
    for _, f in points:
        draw.text((x(f) - 10, top + height + 6), "all" if f == 1 else f"1/{round(1 / f)}",
                  fill="black")
    draw.text((left + plot_w // 2 - 90, top + height + 24), "labelled training images (fraction)",
              fill="black")
    draw.text((left, 8), "fine-tuned mIoU vs labelled images", fill="black")
    for i, row in enumerate(table):
        c = colours[i % len(colours)]
        xy = [(x(f), y(table[row][n]["mean"])) for n, f in points if n in table[row]]
        if len(xy) > 1:
            draw.line(xy, fill=c, width=2)
        for (px, py), (n, _) in zip(xy, points):
            s = table[row][n]["std"] / ymax * height
            draw.line([(px, py - s), (px, py + s)], fill=c)
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=c)
        draw.rectangle([left + plot_w + 20, top + 16 * i, left + plot_w + 30, top + 16 * i + 10],
                       fill=c)
        draw.text((left + plot_w + 36, top + 16 * i - 1), LABELS[row], fill="black")
    return img


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="folder:camvid", help="a reader name or folder:PATH")
    p.add_argument("--data-root", default="data", help="the folder that holds --dataset")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--evals", nargs="+", default=list(EVALS), choices=list(EVALS))
    p.add_argument("--pretrain-iters", type=int, default=PRETRAIN_ITERS,
                   help="diagnostic only: another pretraining budget (use its own --work-dir; "
                        "the table goes to real_table_itersN)")
    p.add_argument("--quick", action="store_true", help="a tenth of the budget (smoke test)")
    p.add_argument("--work-dir", default=str(Path.home() / "mdp-runs" / "real"))
    p.add_argument("--results-dir", default=str(ROOT / "results"))
    p.add_argument("--table-only", action="store_true",
                   help="rebuild the table from the finished jobs, run nothing")
    p.add_argument("--own-task", action="store_true",
                   help="diagnostic: each finished pretraining checkpoint's own-task mIoU on val "
                        "(scripts/pretrain_eval.py, cached beside the checkpoint) in the table")
    args = p.parse_args(argv)
    scale = 10 if args.quick else 1
    data_root, work = Path(args.data_root), Path(args.work_dir)
    iters = max(args.pretrain_iters // scale, 1)
    if (not args.table_only and args.dataset.startswith("folder:")
            and not (data_root / args.dataset.removeprefix("folder:")).exists()):
        raise SystemExit(f"error: {data_root / args.dataset[7:]} not found (--data-root, --dataset)")

    runs: dict[str, dict[int, dict]] = {}
    for seed in range(args.seeds):  # seed-major: a partial study has every row at some seeds
        for row in args.rows:
            out = work / row / f"seed{seed}"
            if args.table_only:
                runs.setdefault(row, {})[seed] = {
                    n: json.loads((eval_dir(out, n) / "results.json").read_text())
                    for n in args.evals if (eval_dir(out, n) / "done").exists()}
                continue
            stages = [] if ROWS[row] is None else [([args.dataset], ROWS[row])]
            check_budget(out / "pretrain0", iters)
            t0 = time.time()
            ckpt = pretrain(stages, seed, out, data_root, iters, PRETRAIN)
            runs.setdefault(row, {})[seed] = evaluate_all(ckpt, seed, out, args.dataset,
                                                          data_root, scale, args.evals)
            print(f"[{row} seed {seed}: {time.time() - t0:.0f} s]", flush=True)
    own = own_task(work, args) if args.own_task else {}
    write_results(runs, args, scale, work, own)


def check_budget(stage_dir: Path, iters: int) -> None:
    """A work dir holds one budget: a pretraining run there with other --iters is refused, not
    silently reused (finished jobs are skipped by name)."""
    config = stage_dir / "config.json"
    done = json.loads(config.read_text())["iters"] if config.exists() else iters
    if done != iters:
        raise SystemExit(f"error: {config} pretrained for {done} steps, this study asks for "
                         f"{iters}: use another --work-dir")


def own_task(work: Path, args: argparse.Namespace) -> dict[str, dict[int, float]]:
    """row -> seed -> own-task val mIoU of its pretraining checkpoint (nearest prototype for MDP,
    the classifier for CE; pix2pix has neither). Evaluated once, cached in own_task.json."""
    scores: dict[str, dict[int, float]] = {}
    for row, flags in ROWS.items():
        if flags is None or "pix2pix" in flags or row not in args.rows:
            continue
        for seed in range(args.seeds):
            out = work / row / f"seed{seed}"
            if not (out / "pretrain0" / "done").exists():
                continue
            cache = out / "own_task.json"
            if not cache.exists():
                pretrain_eval.main([str(out / "pretrain0" / "last.pth"), "--dataset", args.dataset,
                                    "--data-root", args.data_root, "--base-size", *SIZE[1:3],
                                    "--out", str(cache)])
            scores.setdefault(row, {})[seed] = json.loads(cache.read_text())["mIoU"]
    return scores


def write_results(runs: dict, args: argparse.Namespace, scale: int, work: Path,
                  own: dict[str, dict[int, float]] | None = None) -> None:
    """Rows x evaluations, mean ± std over the seeds finished so far (n per cell in the json)."""
    evals = args.evals
    runs = {r: {s: res for s, res in by_seed.items() if all(n in res for n in evals)}
            for r, by_seed in runs.items()}
    runs = {r: by_seed for r, by_seed in runs.items() if by_seed}
    if not runs:
        raise SystemExit("error: no finished row yet")
    table = summarise(runs, evals)
    seeds = sorted({s for by_seed in runs.values() for s in by_seed})
    marks = sorted(f.stat().st_mtime for f in work.rglob("done"))
    argv = [a for a in sys.argv[1:] if a != "--table-only"]  # the command that ran the jobs
    evaluations = "".join(  # only the evaluations this table has
        text for wanted, text in (
            (any(n.startswith("fine-tune") for n in evals),
             f", fine-tuning DeepLabV3 {FINETUNE_ITERS // scale} steps (SGD 0.01, poly)"),
            ("linear probe" in evals, f", linear probe {PROBE_ITERS // scale} steps (SGD 0.1, "
                                      f"frozen backbone and BN statistics)")) if wanted)
    command = shlex.join(["python", "scripts/real_study.py", *argv])
    header = (f"Real-image study: `{command}`, table built at commit {git_commit()}, jobs run at "
              f"{job_commits(work)}; {args.dataset} train "
              f"(pretraining and fine-tuning) and val (mIoU, %), seeds {seeds} (mean ± std over "
              f"seeds; each seed = its own pretraining, fine-tuning and 1/8 subset, the same for "
              f"every row). Protocol: {ARCH} at output stride {OUTPUT_STRIDE}, crops 96×128 of "
              f"the half-resolution images, batch 8; pretraining {args.pretrain_iters // scale} "
              f"steps (AdamW 1e-3, cosine, bank 64){evaluations}. "
              f"{len(marks)} jobs, the last finished "
              f"{(marks[-1] - marks[0]) / 60:.0f} min after the first ({os.cpu_count()} CPU "
              f"cores). The random-weights row saw only the fine-tuning labels; every other row "
              f"also pretrained on all of the training labels.")
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    name = "real_table" + ("" if args.pretrain_iters == PRETRAIN_ITERS else
                           f"_iters{args.pretrain_iters}") + ("_quick" if args.quick else "")
    text = write_markdown(table, evals, results / f"{name}.md", header, LABELS, "{} mIoU")
    checks = check_claims(table, evals, CLAIMS)
    text += "\n" + claims_markdown(checks, "real")
    per_seed = ["", "Per seed (mIoU):", "", "| row | " + " | ".join(evals) + " |",
                "|---|" + "---|" * len(evals)]
    per_seed += [f"| {LABELS[r]} | " + " | ".join(
        ", ".join(f"{runs[r][s][n]['mIoU']:.2f}" for s in sorted(runs[r])) for n in evals) + " |"
        for r in runs]
    text += "\n".join(per_seed) + "\n"
    if own:
        text += ("\nDiagnostic (`--own-task`): each pretraining checkpoint on its own task, "
                 "val mIoU (scripts/pretrain_eval.py: MDP by the nearest prototype, CE by its "
                 "classifier), per seed and mean:\n\n| row | per seed | mean |\n|---|---|---:|\n")
        text += "".join(f"| {LABELS[r]} | {', '.join(f'{v:.2f}' for v in by.values())} | "
                        f"{np.mean(list(by.values())):.2f} |\n" for r, by in own.items())
    (results / f"{name}.md").write_text(text)
    print("\n" + text)
    (results / f"{name}.json").write_text(json.dumps(
        {"header": header, "table": table, "claims": checks, "runs": runs, "own_task": own or {}},
        indent=1))
    bars = bar_chart(table, evals, None, LABELS, "{} mIoU")
    parts = [p for p in (bars, efficiency_plot(table, bars.width)) if p is not None]
    png = Image.new("RGB", (max(p.width for p in parts), sum(p.height for p in parts)), "white")
    for k, part in enumerate(parts):
        png.paste(part, (0, sum(p.height for p in parts[:k])))
    png.save(results / f"{name}.png")


if __name__ == "__main__":
    main()
