"""Why does MDP pretraining not beat CE on CamVid (results/camvid/real_table.md)?

One-change variants of the real study's MDP row, each pretrained once (seed 0) under the study's
protocol and measured on CamVid val by its own task (nearest prototype), the collapse measures of
tools/pretrain_eval.py (--stats), pixel probes of the embedding and of the backbone, and the study's
linear probe; then a per-class table of label purity at stride 16 and own-task IoU.

    python studies/real_diagnosis.py --data-root DATA --work-dir ~/mdp-runs/real

Uses the real study's work dir, so its finished rows (random, mdp, ce, mdp_tau0.3, mdp_no_mix at
seed 0) are reused, not rerun; resumable like the study. Writes results/camvid/real_diagnosis.md,
.json (with --seed N: real_diagnosis_seedN.*).
The rows up to mdp_bank512 and their reading rule were fixed before any variant ran, as were the
two --label-purity rows (README, "On real images"); the rows marked post hoc were not.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "studies"))

import pretrain_eval  # noqa: E402
import real_study  # noqa: E402
import protocols  # noqa: E402
import utils  # noqa: E402
from datasets import RAW_IGNORE, MultiDataset, build_reader, eval_transform  # noqa: E402
from mdp import MDPNet  # noqa: E402
from reproduce import pretrain, provenance  # noqa: E402

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
    # added after the rows above had run (README): does MDP keep classes apart when its backbone
    # starts from features that already separate them? (--init loads every tensor that fits)
    "mdp_from_ce": (["--init", "{work}/ce/seed{seed}/pretrain0/last.pth"],
                    "post hoc: backbone and head initialised from the CE row's (a new bank)"),
    "ce_from_ce": (["--method", "ce", "--init", "{work}/ce/seed{seed}/pretrain0/last.pth"],
                   "post hoc: CE continued from the CE row (the same restart as mdp_from_ce)"),
    "mdp_no_mix_from_ce": (["--mix", "none", "--init",
                            "{work}/ce/seed{seed}/pretrain0/last.pth"],
                           "post hoc: as mdp_from_ce, without mixing"),
    # added after the per-class table: do the classes whose stride-16 labels are mostly another
    # class's pixels crowd the prototypes? (the map is written from the training labels)
    "mdp_pure": (["--label-map", "{work}/low_purity_map.txt"],
                 "post hoc: classes of label purity < 0.5 ignored in pretraining"),
    # the label-purity test, fixed before it ran (README)
    "mdp_pure90": (["--label-purity", "0.9"], "a feature's label kept only if >= 90 % of its "
                                              "cell shares it (--label-purity 0.9)"),
    "ce_pure90": (["--method", "ce", "--label-purity", "0.9"], "CE with --label-purity 0.9"),
}
PURITY_CUT = 0.5
PROBE_IMAGES = 120  # training images whose feature-resolution pixels fit the pixel probes
HEAD = ["own task mIoU", "prototype cos (mean / max)", "class-mean cos (mean / max)",
        "class mean length", "embedding eff. rank", "backbone eff. rank",
        "pixel probe: embedding", "pixel probe: backbone", "linear probe mIoU"]


def label_purity(labels: np.ndarray, cell: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """What a feature's label means at stride `cell`: M4 labels each feature by the pixel at the
    top-left of its cell x cell block (losses.downsample_labels). Per class: the number of
    features so labelled, and the summed fraction of their blocks' labelled pixels that are of
    that class (divide the two for the mean purity; 1 = the block is all that class).
    labels (H, W) uint8 local ids, 255 = ignore; blocks cut at the image border."""
    count, purity = np.zeros(num_classes), np.zeros(num_classes)
    for i in range(0, labels.shape[0], cell):
        for j in range(0, labels.shape[1], cell):
            c, block = labels[i, j], labels[i:i + cell, j:j + cell]
            if c == RAW_IGNORE or not (block != RAW_IGNORE).any():
                continue
            count[c] += 1
            purity[c] += (block == c).sum() / (block != RAW_IGNORE).sum()
    return count, purity


def class_purity(args: argparse.Namespace) -> dict[str, tuple[float, float]]:
    """class -> (share of the labelled training features, mean label purity) at the study's base
    scale: a stride-16 feature of the 240x180 image covers 32x32 pixels of the 480x360 frame.
    Computed once from the training labels, cached in the work dir."""
    cache = args.work_dir / "label_purity.json"
    if cache.exists():
        return json.loads(cache.read_text())
    reader = build_reader(args.dataset, args.data_root, "train")
    K = len(reader.classes)
    cell = 16 * reader[0][1].shape[1] // 240  # feature stride in full-resolution pixels
    count, purity = np.zeros(K), np.zeros(K)
    for i in range(len(reader)):
        n, p = label_purity(reader[i][1], cell, K)
        count, purity = count + n, purity + p
    res = {name: (count[k] / count.sum(), purity[k] / max(count[k], 1))
           for k, name in enumerate(reader.classes)}
    args.work_dir.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(res, indent=1))
    return res


def write_low_purity_map(args: argparse.Namespace) -> None:
    """{work}/low_purity_map.txt: a --label-map that ignores every class of purity < PURITY_CUT."""
    name = build_reader(args.dataset, args.data_root, "train").name
    low = [c for c, (_, purity) in class_purity(args).items() if purity < PURITY_CUT]
    (args.work_dir / "low_purity_map.txt").write_text(
        f"# classes whose stride-16 labels are mostly other classes' pixels "
        f"(purity < {PURITY_CUT})\n"
        + "".join(f"{name}:{c} = ignore\n" for c in low))


def class_table(args: argparse.Namespace, rows: dict[str, dict]) -> list[str]:
    """Per class: its share of the training features, their label purity, each row's own-task
    IoU."""
    own = [r for r in rows if rows[r].get("IoU")]
    lines = ["", "Per class: share of the labelled training features, their label purity at stride "
             "16 (mean fraction of a feature's 32×32-pixel block of the 480×360 frame that is of "
             "its label's class, at the base scale), and own-task IoU on val:", "",
             "| class | share of features | label purity | " + " | ".join(
                 f"{r} IoU" for r in own) + " |", "|---|---:|---:|" + "---:|" * len(own)]
    for name, (share, purity) in class_purity(args).items():
        lines.append(f"| {name} | {100 * share:.1f} % | {purity:.2f} | " + " | ".join(
            f"{rows[r]['IoU'][name] or 0:.1f}" for r in own) + " |")
    return lines


def measure(ckpt: str | None, args: argparse.Namespace, cache: Path) -> dict:
    """Own-task mIoU, the collapse measures and the pixel probes on val, cached beside the row's
    runs."""
    if cache.exists():
        return json.loads(cache.read_text())
    reader = build_reader(args.dataset, args.data_root, "val")
    val = MultiDataset([reader], eval_transform((240, 180)))
    K = len(reader.classes)
    if ckpt is None:  # the untrained network, drawn from the row's seed
        torch.manual_seed(args.seed)
        classifier = pretrain_eval.OwnTaskClassifier(
            MDPNet(protocols.ARCH, int(protocols.OUTPUT_STRIDE)), torch.arange(K))
        res = {"stats": pretrain_eval.embedding_stats(classifier, val, K)}
    else:
        out = cache.with_suffix(".own.json")
        pretrain_eval.main([ckpt, "--dataset", args.dataset, "--data-root", str(args.data_root),
                            "--base-size", "240", "180", "--stats", "--out", str(out)])
        res = json.loads(out.read_text())
        classifier, _ = pretrain_eval.own_task_classifier(utils.load_checkpoint(ckpt), args.dataset)
    # pixel probes: the embedding vs the backbone, on the same train and val pixels
    train = MultiDataset([build_reader(args.dataset, args.data_root, "train")],
                         eval_transform((240, 180)))
    f_train, z_train, y_train = pretrain_eval.pixel_features(classifier.model, train, PROBE_IMAGES)
    f_val, z_val, y_val = pretrain_eval.pixel_features(classifier.model, val, len(val))
    res["stats"]["probe_embedding"] = pretrain_eval.pixel_probe(z_train, y_train, z_val, y_val, K)
    res["stats"]["probe_backbone"] = pretrain_eval.pixel_probe(f_train, y_train, f_val, y_val, K)
    cache.write_text(json.dumps(res, indent=1))
    return res


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="folder:camvid")
    p.add_argument("--data-root", type=Path, default=Path("data"))
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--work-dir", type=Path, default=Path.home() / "mdp-runs" / "real")
    p.add_argument("--seed", type=int, default=0,
                   help="another seed of the study (its own table: real_diagnosis_seedN)")
    p.add_argument("--results-dir", type=Path, default=ROOT / "results" / "camvid")
    p.add_argument("--no-class-table", action="store_true",
                   help="leave out the per-class table (it reads every training label)")
    args = p.parse_args(argv)
    seed, rows = args.seed, {}
    for row in args.rows:
        flags = ROWS[row][0]
        flags = None if flags is None else [f.format(work=args.work_dir, seed=seed) for f in flags]
        if flags and any(f.endswith("low_purity_map.txt") for f in flags):
            write_low_purity_map(args)
        out = args.work_dir / row / f"seed{seed}"
        stages = [] if flags is None else [([args.dataset], flags)]
        real_study.check_budget(out / "pretrain0", protocols.PRETRAIN_ITERS)
        ckpt = pretrain(stages, seed, out, args.data_root, protocols.PRETRAIN_ITERS,
                        protocols.PRETRAIN)
        probe = real_study.evaluate_all(ckpt, seed, out, args.dataset, args.data_root, 1,
                                        ["linear probe"])["linear probe"]
        res = measure(ckpt, args, out / "diagnosis.json")
        rows[row] = {"own-task mIoU": res.get("mIoU"), **res["stats"],
                     "linear probe": probe["mIoU"], "IoU": res.get("IoU")}
    write_table(rows, args)


def write_table(rows: dict[str, dict], args: argparse.Namespace) -> None:
    def cell(v: float | None, fmt: str) -> str:
        return "—" if v is None else format(v, fmt)
    made = provenance("studies/real_diagnosis.py", sys.argv[1:], args.work_dir, args.data_root)
    lines = [f"MDP diagnosis on CamVid: {made}. Seed {args.seed} only; every row is "
             f"the real study's protocol (results/camvid/real_table.md) with one change; rows "
             f"marked post hoc were added after the others had run. Measured at feature resolution "
             f"(labelled pixels, whole images at the base scale): own task on all of val; the "
             f"collapse measures (tools/pretrain_eval.py --stats) on 50 val images; the pixel "
             f"probes, a logistic "
             f"regression on the unit embedding or on the backbone features, fitted on "
             f"{PROBE_IMAGES} training images and scored on all of val (mIoU). The linear probe "
             f"is the study's (seed spread there: about ±2 mIoU).", "",
             "| row | change | " + " | ".join(HEAD) + " |", "|---|---|" + "---:|" * len(HEAD)]
    for row, r in rows.items():
        g = r.get
        lines.append(f"| {row} | {ROWS[row][1]} | {cell(g('own-task mIoU'), '.2f')} | "
                     f"{cell(g('prototype_cos_mean'), '.3f')} / "
                     f"{cell(g('prototype_cos_max'), '.3f')} | {g('class_mean_cos_mean'):.3f} / "
                     f"{g('class_mean_cos_max'):.3f} | {g('class_mean_length'):.3f} | "
                     f"{g('embedding_effective_rank'):.1f} | "
                     f"{g('backbone_effective_rank'):.0f} | {g('probe_embedding'):.2f} | "
                     f"{g('probe_backbone'):.2f} | {g('linear probe'):.2f} |")
    if not args.no_class_table:
        lines += class_table(args, rows)
    text = "\n".join(lines) + "\n"
    args.results_dir.mkdir(parents=True, exist_ok=True)
    name = "real_diagnosis" + (f"_seed{args.seed}" if args.seed else "")
    (args.results_dir / f"{name}.md").write_text(text)
    (args.results_dir / f"{name}.json").write_text(json.dumps(
        {"header": lines[0], "rows": rows}, indent=1))
    print("\n" + text)


if __name__ == "__main__":
    utils.run_cli(main)
