"""The source's comparisons (METHOD.md M8, "The source's numbers") re-run end to end on toy data.

Every row pretrains with train_pretrain.py and fine-tunes with finetune.py (the same code a user
runs, called in-process to spare a torch import per job) on toy VOC, ADE20K and Cityscapes with one
fixed budget, over several seeds. Finished jobs are skipped, so an interrupted run just continues.

    python studies/reproduce.py                 # full table: 3 seeds (about an hour on 2 CPU cores)
    python studies/reproduce.py --quick         # 1 seed, a tenth of the budget (smoke test)

Writes results/toy/toy_table.md (mean ± std), results/toy/toy_table.json (every run, per-class IoU)
and results/toy/toy_table.png (bar chart).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import finetune  # noqa: E402
import train_pretrain  # noqa: E402
from toy import make_toy  # noqa: E402

VOC_ADE = ["voc", "ade20k"]
# row -> pretraining stages (datasets, extra flags); a later stage starts from the previous one
ROWS: dict[str, list[tuple[list[str], list[str]]]] = {
    "scratch": [],
    "ce": [(VOC_ADE, ["--method", "ce"])],
    "multihead": [(VOC_ADE, ["--method", "multihead"])],
    "pix2pix": [(VOC_ADE, ["--method", "pix2pix"])],
    "sequential": [(["coco_stuff"], []), (["ade20k"], []), (["voc"], [])],
    "mdp_voc": [(["voc"], [])],
    "mdp_voc_ade": [(VOC_ADE, [])],
    "mdp_voc_ade_coco": [(VOC_ADE + ["coco_stuff"], [])],
    "mdp_no_csc": [(VOC_ADE, ["--no-csc"])],
    "mdp_no_mix": [(VOC_ADE, ["--mix", "none"])],
    "mdp_tau0.3": [(VOC_ADE, ["--tau", "0.3"])],
    "mdp_label_map": [(VOC_ADE, ["--label-map", str(ROOT / "studies" / "toy_label_map.txt")])],
    "mdp_unlabelled": [(VOC_ADE, ["--unlabelled", "coco_stuff"])],  # M10: COCO without its labels
}
LABELS = {
    "scratch": "scratch (no pretraining)", "ce": "CE, VOC+ADE", "multihead": "multi-head, VOC+ADE",
    "pix2pix": "pixel-to-pixel, VOC+ADE", "sequential": "sequential COCO→ADE→VOC",
    "mdp_voc": "MDP, VOC", "mdp_voc_ade": "MDP, VOC+ADE", "mdp_voc_ade_coco": "MDP, VOC+ADE+COCO",
    "mdp_no_csc": "MDP w/o CSC, VOC+ADE", "mdp_no_mix": "MDP w/o mixing, VOC+ADE",
    "mdp_tau0.3": "MDP τ=0.3, VOC+ADE", "mdp_label_map": "MDP + label map, VOC+ADE",
    "mdp_unlabelled": "MDP + unlabelled COCO, VOC+ADE",
}
TARGETS = ["voc", "ade20k", "cityscapes"]
# The orderings the source claims (METHOD.md M8 and "The source's numbers") and its own numbers:
# (claim, better row, worse row, toy targets, source's numbers). Every claim is checked on every
# toy target except "CSC helps on an unseen set", which the source makes for Cityscapes only.
CLAIMS = [
    ("MDP beats CE pretraining on the same data", "mdp_voc_ade", "ce", TARGETS,
     "COCO: 76.85 vs 68.48 VOC"),
    ("two datasets beat one", "mdp_voc_ade", "mdp_voc", TARGETS, "73.32 vs 70.92 VOC"),
    ("three datasets beat two", "mdp_voc_ade_coco", "mdp_voc_ade", TARGETS,
     "77.79/42.69/80.64 (200 ep) vs 73.32/40.15/77.75 (100 ep)"),
    ("MDP beats multi-head", "mdp_voc_ade", "multihead", TARGETS, "73.32 vs 71.19 VOC"),
    ("MDP beats pixel-to-pixel", "mdp_voc_ade", "pix2pix", TARGETS,
     "73.32/40.15/77.75 vs 71.19/38.81/77.17"),
    ("joint beats sequential", "mdp_voc_ade_coco", "sequential", TARGETS,
     "77.79/42.69/80.64 vs 75.68/41.44/78.47"),
    ("mixing helps", "mdp_voc_ade", "mdp_no_mix", TARGETS, "73.32 vs 71.98 VOC"),
    ("CSC helps on an unseen set", "mdp_voc_ade", "mdp_no_csc", ["cityscapes"],
     "76.53 vs 75.37 Cityscapes"),
    ("τ = 0.07 beats τ = 0.3", "mdp_voc_ade", "mdp_tau0.3", TARGETS, "0.07 best (no numbers)"),
    ("MDP beats no pretraining", "mdp_voc_ade", "scratch", TARGETS, "(not reported)"),
    ("unlabelled COCO images help (M10 mining)", "mdp_unlabelled", "mdp_voc_ade", TARGETS,
     "74.74 vs 73.32 VOC"),
    # the source's claim is "no change": "within seed noise" is the verdict that agrees with it
    ("a manual label map changes nothing (M1)", "mdp_label_map", "mdp_voc_ade", TARGETS,
     "71.91 vs 71.93 VOC (no change)"),
]

# One toy budget for every row (nothing tuned per row), sized so that 12 rows x 3 seeds x (1
# pretraining + 3 fine-tunings) take about an hour on 2 CPU cores. Pretraining steps are split
# evenly over the stages of the sequential row, so every row sees the same number of images.
# Toy images are ~128 px, so the base scales below keep them at native size (scale 1.0).
ARCH = "resnet14"
PRETRAIN_ITERS, FINETUNE_ITERS = 100, 40
PRETRAIN = ["--arch", ARCH, "--crop-size", "64", "64", "--base-size", "128", "128",
            "--batch-size", "8", "--optimizer", "adamw", "--lr", "1e-3", "--weight-decay", "1e-4",
            "--schedule", "cosine", "--min-lr", "1e-5", "--warmup-iters", "10", "--workers", "0",
            "--bank-size", "128", "--log-interval", "25"]
FINETUNE = {
    "voc": ["--crop-size", "64", "64", "--base-size", "128", "128"],
    "ade20k": ["--crop-size", "64", "64", "--base-size", "128", "128"],
    "cityscapes": ["--crop-size", "64", "128", "--base-size", "192", "96"],
}
FINETUNE_COMMON = ["--batch-size", "8", "--workers", "0", "--num-overlays", "0",
                   "--log-interval", "20"]


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, check=True,
                              capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_once(done: Path, fn, argv: list[str]) -> None:
    """Runs fn(argv) unless `done` exists; writes `done` afterwards, holding the commit the job ran
    at (resumable study). A job cut off before (SIGTERM saves OUT_DIR/last.pth, beside `done`)
    continues from that checkpoint, bit for bit; its wall time, summed over the parts, goes to
    `seconds` beside `done`. A part killed outright (SIGKILL: no `finally`) leaves its start in
    `started` and is counted up to its last checkpoint, the work the next part keeps."""
    if done.exists():
        return
    ckpt, started = done.parent / "last.pth", done.parent / "started"
    if started.is_file():
        if ckpt.is_file():
            add_seconds(done, ckpt.stat().st_mtime - float(started.read_text()))
        started.unlink()
    if ckpt.is_file():
        argv = argv + ["--resume", str(ckpt)]
    print(f"\n$ {fn.__module__}.py {' '.join(argv)}", flush=True)
    done.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    started.write_text(f"{start}\n")
    try:
        fn(argv)
    finally:
        add_seconds(done, time.time() - start)
        started.unlink()
    done.write_text(git_commit() + "\n")


def add_seconds(done: Path, seconds: float) -> None:
    """Adds a part's wall time to the job's `seconds` beside `done`."""
    spent = done.parent / "seconds"
    before = float(spent.read_text()) if spent.is_file() else 0.0
    spent.write_text(f"{before + max(seconds, 0.0):.0f}\n")


def job_record(done: list[Path]) -> dict:
    """Where finished jobs (their `done` files) came from: how many ran at each commit, their summed
    wall time and how many were not timed; records of several groups add up (merge_records)."""
    commits: dict[str, int] = {}
    for f in done:
        key = f.read_text().strip() or "not recorded"
        commits[key] = commits.get(key, 0) + 1
    timed = [float(f.with_name("seconds").read_text()) for f in done
             if f.with_name("seconds").is_file()]
    return {"commits": commits, "seconds": sum(timed), "untimed": len(done) - len(timed)}


def merge_records(records: list[dict]) -> dict:
    merged = {"commits": {}, "seconds": 0.0, "untimed": 0}
    for rec in records:
        for c, n in rec["commits"].items():
            merged["commits"][c] = merged["commits"].get(c, 0) + n
        merged["seconds"] += rec["seconds"]
        merged["untimed"] += rec["untimed"]
    return merged


def provenance(script: str, argv: list[str], work: Path, data_root: str | Path) -> str:
    """'`python SCRIPT ARGV`, table built at commit X, jobs run at Y (n jobs)' for a table's
    header; the work dir and the data root read RUNS and DATA (no machine's paths)."""
    command = shlex.join(["python", script, *argv]).replace(str(work), "RUNS").replace(
        str(data_root), "DATA")
    return (f"`{command}`, table built at commit {git_commit()}, jobs run at "
            f"{job_commits(job_record(list(Path(work).rglob('done'))))}")


def job_commits(record: dict) -> str:
    """The commits of a job_record, e.g. '0ad04c8 (52 jobs)'."""
    return ", ".join(f"{c} ({n} jobs)" for c, n in sorted(record["commits"].items()))


def job_hours(record: dict) -> str:
    """The wall time of a job_record, e.g. '3.2 h over 12 jobs (2 not timed)'."""
    untimed = record["untimed"]
    timed = sum(record["commits"].values()) - untimed
    return (f"{record['seconds'] / 3600:.1f} h over {timed} jobs"
            + (f" ({untimed} not timed)" if untimed else ""))


def pretrain(stages: list[tuple[list[str], list[str]]], seed: int, out: Path, data_root: Path,
             iters: int, flags: list[str] = PRETRAIN) -> str | None:
    """Runs a row's pretraining stages (datasets, extra flags) with the shared `flags`; returns the
    checkpoint to fine-tune from (None: no pretraining)."""
    ckpt = None
    for k, (datasets, extra) in enumerate(stages):
        stage_dir = out / f"pretrain{k}"
        argv = flags + ["--datasets", *datasets, "--data-root", str(data_root),
                           "--iters", str(max(iters // len(stages), 1)), "--seed", str(seed),
                           "--out-dir", str(stage_dir), *extra]
        if ckpt:
            argv += ["--init", ckpt]
        run_once(stage_dir / "done", train_pretrain.main, argv)
        ckpt = str(stage_dir / "last.pth")
    return ckpt


def finetune_all(ckpt: str | None, seed: int, out: Path, data_root: Path, iters: int,
                 targets: list[str]) -> dict[str, dict]:
    results = {}
    for target in targets:
        ft_dir = out / f"ft_{target}"
        argv = ["--ckpt", ckpt or "none", "--dataset", target, "--data-root", str(data_root),
                "--arch", ARCH, "--iters", str(iters), "--eval-interval", str(iters),
                "--seed", str(seed), "--out-dir", str(ft_dir), *FINETUNE[target], *FINETUNE_COMMON]
        run_once(ft_dir / "done", finetune.main, argv)
        results[target] = json.loads((ft_dir / "results.json").read_text())
    return results


def keep_previous_rows(runs: dict, path: Path, targets: list[str]) -> dict[str, str]:
    """Adds to `runs` the rows of a previous results json that this call did not run (so a new row
    joins the committed table without rerunning the rest); returns kept row -> what made it (the
    json's `made`; for a json written before `made` existed, its header's first clause). Rows are
    put in ROWS order."""
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    prev = data.get("runs", {})
    made = data.get("made") or {r: data.get("header", "").split(";")[0] for r in prev}
    kept = [r for r in prev if r not in runs and r in ROWS
            and all(t in res for res in prev[r].values() for t in targets)]
    for r in kept:
        runs[r] = {int(seed): res for seed, res in prev[r].items()}
    order = {r: i for i, r in enumerate(ROWS)}
    for r in sorted(runs, key=order.__getitem__):
        runs[r] = runs.pop(r)  # re-insert in ROWS order
    return {r: made[r] for r in kept}


def summarise(runs: dict[str, dict[int, dict[str, dict]]], targets: list[str]) -> dict:
    """Mean and std of mIoU per row and target over seeds."""
    table = {}
    for row, by_seed in runs.items():
        table[row] = {}
        for t in targets:
            vals = np.array([r[t]["mIoU"] for r in by_seed.values()])  # percent
            table[row][t] = {"mean": float(vals.mean()), "std": float(vals.std()), "n": len(vals)}
    return table


def write_markdown(table: dict, targets: list[str], path: Path, header: str,
                   labels: dict[str, str] = LABELS, column: str = "toy {} mIoU") -> str:
    """The table as markdown: one line per row, mean ± std over seeds per target."""
    lines = [header, "", "| pretraining | " + " | ".join(column.format(t) for t in targets) + " |",
             "|---|" + "---|" * len(targets)]
    for row, cells in table.items():
        vals = [f"{c['mean']:.2f} ± {c['std']:.2f}" if c["n"] > 1 else f"{c['mean']:.2f}"
                for c in (cells[t] for t in targets)]
        lines.append(f"| {labels[row]} | " + " | ".join(vals) + " |")
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def check_claims(table: dict, targets: list[str], claims: list = CLAIMS) -> list[dict]:
    """Each claimed ordering per target: the difference of the means and a verdict against the
    seed spread (`noise` = std of the better row + std of the worse row)."""
    checks = []
    for claim, better, worse, claim_targets, source in claims:
        for t in claim_targets:
            if better not in table or worse not in table or t not in targets:
                continue
            a, b = table[better][t], table[worse][t]
            diff, noise = a["mean"] - b["mean"], a["std"] + b["std"]
            verdict = ("tie" if diff == 0 else "holds" if diff > noise else
                       "reversed" if diff < -noise else "within seed noise")
            if min(a["n"], b["n"]) < 2 and diff != 0:  # no spread to read it against
                verdict = ("holds" if diff > 0 else "reversed") + " (1 seed)"
            checks.append({"claim": claim, "target": t, "better": better, "worse": worse,
                           "diff": diff, "noise": noise, "verdict": verdict, "source": source})
    return checks


def claims_markdown(checks: list[dict], scale: str = "toy") -> str:
    lines = [f"| source's claim | {scale} target | {scale} mIoU difference | ± (sum of stds) | at "
             f"{scale} scale | source's numbers |", "|---|---|---:|---:|---|---|"]
    lines += [f"| {c['claim']} | {c['target']} | {c['diff']:+.2f} | {c['noise']:.2f} | "
              f"{c['verdict']} | {c['source']} |" for c in checks]
    return "\n".join(lines) + "\n"


def bar_chart(table: dict, targets: list[str], path: Path | None, labels: dict[str, str] = LABELS,
              column: str = "toy {} mIoU") -> Image.Image:
    """Grouped bars (one group per row, one bar per target) with ±std whiskers, drawn with PIL;
    saved to `path` when given, and returned."""
    colours = [(66, 133, 244), (219, 68, 55), (15, 157, 88)]
    rows = list(table)
    bar, gap, left, top, height = 14, 18, 60, 30, 300
    width = max(left + len(rows) * (len(targets) * bar + gap) + 20, left + 110 * len(targets) + 20)
    img = Image.new("RGB", (width, top + height + 150), "white")
    draw = ImageDraw.Draw(img)
    ymax = max(c["mean"] + c["std"] for cells in table.values() for c in cells.values()) * 1.1 or 1
    y = lambda v: top + height - v / ymax * height  # noqa: E731
    for tick in np.linspace(0, ymax, 5):
        draw.line([(left - 4, y(tick)), (width - 10, y(tick))], fill=(220, 220, 220))
        draw.text((5, y(tick) - 6), f"{tick:.0f}", fill="black")
    for i, row in enumerate(rows):
        x0 = left + i * (len(targets) * bar + gap)
        for j, t in enumerate(targets):
            c = table[row][t]
            x = x0 + j * bar
            draw.rectangle([x, y(c["mean"]), x + bar - 2, y(0)], fill=colours[j % 3])
            draw.line([(x + bar // 2 - 1, y(c["mean"] - c["std"])),
                       (x + bar // 2 - 1, y(c["mean"] + c["std"]))], fill="black")
        label = Image.new("RGB", (140, 14), "white")
        ImageDraw.Draw(label).text((0, 0), labels[row][:24], fill="black")
        img.paste(label.rotate(60, expand=True, fillcolor="white"), (x0 - 10, top + height + 4))
    for j, t in enumerate(targets):
        draw.rectangle([left + j * 110, 5, left + j * 110 + 10, 15], fill=colours[j % 3])
        draw.text((left + j * 110 + 14, 4), column.format(t), fill="black")
    if path is not None:
        img.save(path)
    return img


def efficiency_plot(table: dict, width: int, evals: dict, labels: dict[str, str]
                    ) -> Image.Image | None:
    """mIoU (mean ± std) against the fraction of labelled images, one line per row (fine-tuning);
    None when the table has no fine-tuning column. evals: name -> (dataset, finetune.py flags,
    fraction, steps) as in studies/real_study.py."""
    colours = [(120, 120, 120), (219, 68, 55), (244, 160, 0), (66, 133, 244), (15, 157, 88),
               (171, 71, 188)]
    points = [(n, f) for n, (_, flags, f, _) in evals.items()
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
        draw.text((left + plot_w + 36, top + 16 * i - 1), labels[row], fill="black")
    return img


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1 seed, a tenth of the budget")
    p.add_argument("--seeds", type=int, default=None, help="default: 3 (1 with --quick)")
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--targets", nargs="+", default=TARGETS, choices=TARGETS)
    p.add_argument("--data-root", default=str(ROOT / "data" / "toy"))
    p.add_argument("--work-dir", default=None, help="default: runs/reproduce[_quick]")
    p.add_argument("--results-dir", default=str(ROOT / "results" / "toy"))
    args = p.parse_args(argv)
    seeds = args.seeds or (1 if args.quick else 3)
    scale = 10 if args.quick else 1
    p_iters, f_iters = PRETRAIN_ITERS // scale, FINETUNE_ITERS // scale
    work = Path(args.work_dir or ROOT / "runs" / ("reproduce_quick" if args.quick else "reproduce"))
    data_root = Path(args.data_root)
    if not (data_root / ".written").exists():
        make_toy(data_root)
        (data_root / ".written").touch()

    runs: dict[str, dict[int, dict]] = {}
    for seed in range(seeds):
        for row in args.rows:
            out = work / row / f"seed{seed}"
            ckpt = pretrain(ROWS[row], seed, out, data_root, p_iters)
            runs.setdefault(row, {})[seed] = finetune_all(ckpt, seed, out, data_root, f_iters,
                                                          args.targets)
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    name = "toy_table_quick" if args.quick else "toy_table"
    kept = keep_previous_rows(runs, results / f"{name}.json", args.targets)  # row -> its maker
    table = summarise(runs, args.targets)
    command = "python studies/reproduce.py" + (" --quick" if args.quick else "") + (
        "" if args.rows == list(ROWS) else " --rows " + " ".join(args.rows))
    # where each row came from: this call, or (kept rows) whatever made them, carried over
    done = list(work.rglob("done"))
    made_now = (f"`{command}` at commit {git_commit()}, jobs run at "
                f"{job_commits(job_record(done))}, {seeds} seed(s)")
    made = {r: made_now for r in args.rows} | kept
    # wall clock from the jobs' own marks, so a rerun that only rebuilds the table reports it too
    marks = sorted(f.stat().st_mtime for f in done)
    header = (f"Toy reproduction: {made_now}; pretraining {p_iters} steps, fine-tuning {f_iters} "
              f"steps, {ARCH}; {len(marks)} jobs, the last finished "
              f"{(marks[-1] - marks[0]) / 60:.0f} min after the first ({os.cpu_count()} CPU "
              f"cores).")
    for source in dict.fromkeys(kept.values()):
        rows = ", ".join(r for r, maker in kept.items() if maker == source)
        header += f" Rows {rows}: not rerun, kept from the previous {name}.json ({source})."
    checks = check_claims(table, args.targets)
    text = write_markdown(table, args.targets, results / f"{name}.md", header)
    if checks:
        text += "\n" + claims_markdown(checks)
        (results / f"{name}.md").write_text(text)
    print("\n" + text)
    (results / f"{name}.json").write_text(json.dumps(
        {"header": header, "table": table, "claims": checks, "runs": runs, "made": made},
        indent=1))
    bar_chart(table, args.targets, results / f"{name}.png")


if __name__ == "__main__":
    main()
