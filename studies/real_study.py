"""The real-image studies: pretraining rows on real labelled sets, each row's backbone evaluated
by linear probes and by fine-tuning DeepLabV3 on 1/8 and on all of a downstream set's training
images, over seeds. One runner, two studies:

- `--study camvid` (the default): pretrain on CamVid, evaluate on CamVid
  (results/camvid/real_table.*);
- `--study multi`: pretrain on stanford_background + msrc_v2 + labelmefacade (39 concatenated
  classes), evaluate on CamVid, unseen, and probe each source's val (results/multi/multi_table.*).

    python studies/real_study.py --data-root DATA                # CamVid, 3 seeds
    python studies/real_study.py --data-root DATA --study multi --own-task
    python studies/real_study.py --data-root DATA --quick --seeds 1   # a tenth of the budget
    python studies/real_study.py --data-root DATA --table-only   # the table from finished jobs
    python studies/real_study.py --data-root DATA --pretrain-iters 1200 --rows ce mdp --seeds 1 \
        --evals "linear probe" --own-task --work-dir ~/mdp-runs/real_iters1200   # a diagnostic

The rows, evaluations and protocol constants of both studies are in studies/protocols.py.
Every job is train_pretrain.py or finetune.py called in-process (studies/reproduce.py's runner), so
finished jobs are skipped and an interrupted study just continues; run outputs live in --work-dir
(default $HOME/mdp-runs/<study>), outside the repository. The committed results json carries every
finished (row, seed) with its provenance (its jobs' commits and wall time) and mining's mined_frac,
so a study spread over machines whose run outputs are gone continues where the table
stops: a (row, seed) the json already holds is kept, not rerun, and a rebuild over some of the
rows (--rows) keeps the others as the json holds them.
The table is rebuilt from whatever has finished, so it can be committed while the study fills in.
Writes results/<table>.md, .json and .png (bars with the seed spread, and mIoU against the
fraction of labelled images).

CamVid study: every pretraining row consumes the same training labels as the fine-tuning that
follows, so pretraining methods compare fairly at every fraction; against random weights the
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
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "studies"))

import finetune  # noqa: E402
import pretrain_eval  # noqa: E402
import utils  # noqa: E402
from datasets import MultiDataset, build_reader, eval_transform  # noqa: E402
from mine import threshold_for_precision  # noqa: E402
from plot_log import read_log  # noqa: E402
from reproduce import (bar_chart, check_claims, claims_markdown,  # noqa: E402
                       efficiency_plot, git_commit, job_commits, job_hours, job_record,
                       merge_records, pretrain, run_once,
                       summarise, write_markdown)
from protocols import (ARCH, CAMVID_EVALS, DOWNSTREAM, EVALS, FINETUNE,  # noqa: E402
                       MINE_PRECISION, MINED_BY, MULTI_PRETRAIN_ITERS, MULTI_ROWS, OUTPUT_STRIDE,
                       PRETRAIN, PROBE_ITERS, SIZE, SOURCE_PROBES, SOURCES, Study, make_study)
from readings import (T975, glance_markdown, group_verdict, paired_checks,  # noqa: E402,F401
                      paired_difference, paired_markdown, scale_markdown, verdicts_markdown)



def eval_dir(out: Path, name: str) -> Path:
    return out / name.replace(" ", "_").replace("/", "of")  # "fine-tune 1/8" -> fine-tune_1of8


def evaluate_all(ckpt: str | None, seed: int, out: Path, dataset: str, data_root: Path,
                 scale: int, evals: list[str],
                 specs: dict[str, tuple[str | None, list[str], float, int]] = EVALS
                 ) -> dict[str, dict]:
    """The row's evaluations (`specs`, each on its own dataset or else `dataset`); the 1/8 subset
    depends on the seed only (same for every row)."""
    results = {}
    for name in evals:
        target, extra, _, iters = specs[name]
        iters = max(iters // scale, 1)
        ft_dir = eval_dir(out, name)
        argv = FINETUNE + ["--ckpt", ckpt or "none", "--dataset", target or dataset, "--data-root",
                           str(data_root), "--iters", str(iters), "--eval-interval", str(iters),
                           "--seed", str(seed), "--subset-seed", str(seed), "--out-dir",
                           str(ft_dir), *extra]
        run_once(ft_dir / "done", finetune.main, argv)
        results[name] = json.loads((ft_dir / "results.json").read_text())
    return results


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--study", default="camvid", choices=["camvid", "multi"])
    p.add_argument("--dataset", default="folder:camvid",
                   help="camvid study: a reader name or folder:PATH")
    p.add_argument("--data-root", default="data", help="the folder that holds the datasets")
    p.add_argument("--seeds", type=int, default=None,
                   help="seeds per row (default: camvid 3; multi: protocols.MULTI_SEEDS, 2 for "
                        "the rows it does not name)")
    p.add_argument("--rows", nargs="+", default=None, help="default: every row of the study")
    p.add_argument("--evals", nargs="+", default=None, help="default: every evaluation")
    p.add_argument("--pretrain-iters", type=int, default=None,
                   help="diagnostic only: another pretraining budget (use its own --work-dir; "
                        "the table goes to <table>_itersN)")
    p.add_argument("--quick", action="store_true", help="a tenth of the budget (smoke test)")
    p.add_argument("--work-dir", default=None, help="default: $HOME/mdp-runs/<real|multi>")
    p.add_argument("--results-dir", default=None, help="default: results/<camvid|multi>")
    p.add_argument("--table-only", action="store_true",
                   help="rebuild the table from the finished jobs, run nothing")
    p.add_argument("--choose", choices=["finetune", "pretrain", "mine"], default=None,
                   help="multi study: run the rule that fixes the fine-tuning steps (random "
                        "weights on CamVid), the pretraining steps (CE's own task on the "
                        "sources' val) or (g)'s mining threshold (the precision of learned "
                        "prototypes' pseudo-labels on the sources' val) and write "
                        "results/multi/multi_protocol.json")
    p.add_argument("--own-task", action="store_true",
                   help="diagnostic: each finished pretraining checkpoint's own-task mIoU on val "
                        "(tools/pretrain_eval.py, cached beside the checkpoint) in the table")
    args = p.parse_args(argv)
    study = make_study(args.study, args.dataset)
    args.results_dir = args.results_dir or str(ROOT / "results" / study.folder)
    args.rows = args.rows or list(study.rows)
    args.evals = args.evals or list(study.evals)
    for what, names, known in (("row", args.rows, study.rows), ("evaluation", args.evals,
                                                                   study.evals)):
        if bad := [n for n in names if n not in known]:
            p.error(f"unknown {what} {bad[0]!r} of the {args.study} study; expected one of "
                    f"{', '.join(known)}")
    if args.choose:
        return choose(args.choose, Path(args.data_root), Path(args.work_dir or Path.home() /
                                                              "mdp-runs" / "multi"), args)
    if any(study.evals[n][3] <= 0 for n in args.evals) and not args.table_only:
        p.error("the fine-tuning budget is not fixed yet: run `--choose finetune` first "
                "(results/multi/README.md)")
    if not args.table_only and (r := next((r for r in args.rows for _, f in study.rows[r]
                                           if "None" in f), None)):
        p.error(f"row {r}'s mining threshold is not fixed yet: run `--choose mine` first, or "
                f"leave the row out with --rows")
    args.pretrain_iters = args.pretrain_iters or study.pretrain_iters
    scale = 10 if args.quick else 1
    data_root = Path(args.data_root)
    work = Path(args.work_dir or Path.home() / "mdp-runs" / (
        "real" if args.study == "camvid" else "multi"))
    iters = max(args.pretrain_iters // scale, 1)
    needed = {d for n in args.evals for d in [study.evals[n][0] or args.dataset]}
    needed |= {d for r in args.rows for ds, _ in study.rows[r] for d in ds}
    for d in sorted(needed):
        if not args.table_only and d.startswith("folder:") and not (data_root / d[7:]).exists():
            raise SystemExit(f"error: {data_root / d[7:]} not found (--data-root, --dataset)")

    name = study.table + ("" if args.pretrain_iters == study.pretrain_iters else
                          f"_iters{args.pretrain_iters}") + ("_quick" if args.quick else "")
    kept = previous_runs(Path(args.results_dir) / f"{name}.json")
    runs: dict[str, dict[int, dict]] = {}

    def table() -> None:
        own = own_task(work, args, study, name) if args.own_task else {}
        # rows outside --rows keep what the json holds: a rebuild never drops a finished pair
        others = {r: by_seed for r, by_seed in kept.items() if r not in args.rows}
        write_results({**others, **runs}, args, scale, work, study, name, own)
    n_seeds = {r: max(args.seeds or study.seeds.get(r, 3 if args.study == "camvid" else 2),
                      1 + max(kept.get(r, {}), default=-1))  # nor a seed the json holds
               for r in args.rows}
    for seed in range(max(n_seeds.values())):  # seed-major: a partial study has every row at some
        for row in args.rows:                  # seeds
            if seed >= n_seeds[row]:
                continue
            out = work / row / f"seed{seed}"
            old = kept.get(row, {}).get(seed)
            if (old is not None and all(n in old for n in args.evals)
                    and not all((eval_dir(out, n) / "done").exists() for n in args.evals)):
                runs.setdefault(row, {})[seed] = old  # finished where its outputs are gone: kept
                continue
            if args.table_only:
                runs.setdefault(row, {})[seed] = {
                    n: json.loads((eval_dir(out, n) / "results.json").read_text())
                    for n in args.evals if (eval_dir(out, n) / "done").exists()}
                continue
            check_budget(out / "pretrain0", iters)
            t0 = time.time()
            ckpt = pretrain(study.rows[row], seed, out, data_root, iters, PRETRAIN)
            runs.setdefault(row, {})[seed] = evaluate_all(ckpt, seed, out, args.dataset,
                                                          data_root, scale, args.evals,
                                                          study.evals)
            print(f"[{row} seed {seed}: {time.time() - t0:.0f} s]", flush=True)
            table()  # the table fills in as the study runs
    table()


KEPT = "kept from the committed json: "


# The two rules of the multi study's protocol (results/multi/README.md), fixed before they ran.
FINETUNE_CANDIDATES = [240, 480, 960]  # fine-tuning steps tried in order on the random row
LEARNED_IOU, LEARNED_CLASSES = 10.0, 6  # "learns a clear majority": >= 6 of 11 classes at IoU >= 10
PRETRAIN_CANDIDATES, PRETRAIN_GAIN = [1200, 2400], 2.0  # longer only if CE gains >= 2 points


def choose(which: str, data_root: Path, work: Path, args: argparse.Namespace) -> None:
    """Applies one protocol rule and records what it measured in results/multi/multi_protocol.json.
    finetune: random weights fine-tuned on all of CamVid's training images (seed 0) for each
    candidate in turn; the first at which scratch learns >= LEARNED_CLASSES classes is chosen
    (the last candidate if none). pretrain: CE on the three sources (seed 0) for each candidate
    length, own task on each source's val; the longer length only if the mean gains >= 2."""
    path = Path(args.results_dir) / "multi_protocol.json"
    record = json.loads(path.read_text()) if path.is_file() else {}

    def save(rec: dict) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rec, indent=1))
    if which == "finetune":
        tried = {}
        for steps in FINETUNE_CANDIDATES:
            specs = {"CamVid all": (DOWNSTREAM, [], 1.0, steps)}
            res = evaluate_all(None, 0, work / "choose_finetune" / f"steps{steps}", DOWNSTREAM,
                               data_root, 1, ["CamVid all"], specs)["CamVid all"]
            learned = [c for c, v in res["IoU"].items() if v is not None and v >= LEARNED_IOU]
            tried[steps] = {"mIoU": res["mIoU"], "learned": learned}
            save({**record, "finetune": {"tried": tried, "chosen": None}})  # if cut off here
            print(f"[random weights, {steps} fine-tuning steps: mIoU {res['mIoU']:.2f}, "
                  f"{len(learned)} classes at IoU >= {LEARNED_IOU:g}]", flush=True)
            if len(learned) >= LEARNED_CLASSES:
                break
        record["finetune"] = {"tried": tried, "chosen": steps}
    elif which == "pretrain":
        tried = {}
        for steps in PRETRAIN_CANDIDATES:
            out = work / ("ce" if steps == MULTI_PRETRAIN_ITERS else f"ce_iters{steps}") / "seed0"
            check_budget(out / "pretrain0", steps)
            pretrain(MULTI_ROWS["ce"], 0, out, data_root, steps, PRETRAIN)
            own = {source: own_task_of(out, source, data_root, per_source=True)["mIoU"]
                   for source in SOURCES}
            tried[steps] = {"own task": own, "mean": float(np.mean(list(own.values())))}
            save({**record, "pretrain": {"tried": tried, "chosen": None}})  # if cut off here
        gain = tried[PRETRAIN_CANDIDATES[1]]["mean"] - tried[PRETRAIN_CANDIDATES[0]]["mean"]
        chosen = PRETRAIN_CANDIDATES[1] if gain >= PRETRAIN_GAIN else PRETRAIN_CANDIDATES[0]
        record["pretrain"] = {"tried": tried, "gain": gain, "chosen": chosen}
    else:
        record["mine"] = choose_mine_threshold(work, data_root)
    record.setdefault("made", {})[which] = f"commit {git_commit()}"
    save(record)
    print(json.dumps(record[which], indent=1))


def choose_mine_threshold(work: Path, data_root: Path) -> dict:
    """(g)'s rule [ours, committed before (g) ran]: the first finished mdp_learned checkpoint in
    `work` (lowest seed); each source's val pixels (first 50 images, feature resolution) as M10
    reads them, pooled; the lowest threshold at which their pseudo-labels are MINE_PRECISION
    correct (mine.threshold_for_precision), rounded down to 0.001. The source's 0.9 stays when
    that threshold is None or above it."""
    done = sorted(work.glob("mdp_learned/seed*/pretrain0/done"), key=lambda d: d.parents[1].name)
    if not done:
        raise SystemExit(f"error: no finished mdp_learned pretraining under {work}: run that row "
                         f"first")
    ckpt = done[0].parent / "last.pth"
    state = utils.load_checkpoint(ckpt, required=("model", "args", "label_space", "bank"))
    conf, correct = [], []
    for source in SOURCES:
        classifier, _ = pretrain_eval.own_task_classifier(state, source)
        val = MultiDataset([build_reader(source, data_root, "val")],
                           eval_transform((int(SIZE[1]), int(SIZE[2]))))
        c, ok = pretrain_eval.mining_confidence(classifier, val, state["args"]["tau"])
        conf.append(c), correct.append(ok)
    conf, correct = torch.cat(conf), torch.cat(correct)
    found = threshold_for_precision(conf, correct, MINE_PRECISION)
    # rounded down to 0.001; the 1e-4 keeps a float32 0.7 (0.69999999) at 0.7, which float32
    # mining compares equal
    chosen = 0.9 if found is None or found >= 0.9 else float(np.floor(found * 1000 + 1e-4) / 1000)
    return {"checkpoint": f"mdp_learned {done[0].parents[1].name}", "pixels": len(conf),
            "max_confidence": float(conf.max()), "correct_at_0.9": None if not (
                conf >= 0.9).any() else float(correct[conf >= 0.9].float().mean()),
            "threshold": found, "chosen": chosen, "precision": MINE_PRECISION}


def own_task_of(out: Path, source: str, data_root: str | Path, per_source: bool) -> dict:
    """tools/pretrain_eval.py on the (row, seed) in `out`: its checkpoint's own task on `source`'s
    val, evaluated once and cached beside it (per_source: own_task_<name>.json with the collapse
    measures, --stats; else own_task.json, the CamVid study's)."""
    cache = out / (f"own_task_{source.removeprefix('folder:')}.json" if per_source else
                   "own_task.json")
    if not cache.exists():
        pretrain_eval.main([str(out / "pretrain0" / "last.pth"), "--dataset", source,
                            "--data-root", str(data_root), "--base-size", *SIZE[1:3],
                            "--out", str(cache)] + (["--stats"] if per_source else []))
    return json.loads(cache.read_text())


def previous_runs(path: Path) -> dict[str, dict[int, dict]]:
    """row -> seed -> evaluations of the committed results json (empty when there is none)."""
    if not path.is_file():
        return {}
    runs = json.loads(path.read_text()).get("runs", {})
    return {r: {int(s): res for s, res in by.items()} for r, by in runs.items()}


def check_budget(stage_dir: Path, iters: int) -> None:
    """A work dir holds one budget: a pretraining run there with other --iters is refused, not
    silently reused (finished jobs are skipped by name)."""
    config = stage_dir / "config.json"
    done = json.loads(config.read_text())["iters"] if config.exists() else iters
    if done != iters:
        raise SystemExit(f"error: {config} pretrained for {done} steps, this study asks for "
                         f"{iters}: use another --work-dir")


def own_task(work: Path, args: argparse.Namespace, study: Study,
             name: str) -> dict[str, dict[int, float | dict]]:
    """row -> seed -> own-task val mIoU of its pretraining checkpoint (nearest prototype for MDP,
    the classifier for CE; pix2pix has neither), evaluated once and cached beside the checkpoint.
    One source: the mIoU; several: {source: {"mIoU", "stats"}} (with the collapse measures).
    Seeds whose run outputs are gone keep the committed json's value."""
    prev = json.loads((Path(args.results_dir) / f"{name}.json").read_text()).get(
        "own_task", {}) if (Path(args.results_dir) / f"{name}.json").is_file() else {}
    scores: dict[str, dict[int, float | dict]] = {}
    for row in args.rows:
        stages = study.rows[row]
        if not stages or "pix2pix" in stages[-1][1]:
            continue
        for seed in range(max(args.seeds or 0, study.seeds.get(row, 0), 3)):
            out = work / row / f"seed{seed}"
            if not (out / "pretrain0" / "done").exists():
                if str(seed) in prev.get(row, {}):
                    scores.setdefault(row, {})[seed] = prev[row][str(seed)]
                continue
            res = {}
            for source in (d for d in study.sources if d in stages[-1][0]):
                got = own_task_of(out, source, args.data_root, len(study.sources) > 1)
                res[source] = {"mIoU": got["mIoU"], "stats": got.get("stats")}
            if res:
                scores.setdefault(row, {})[seed] = (
                    res[study.sources[0]]["mIoU"] if len(study.sources) == 1 else res)
    scores.update({r: {int(s): v for s, v in by.items()} for r, by in prev.items()
                   if r not in args.rows})  # rows outside --rows: as the json holds them
    return scores


def write_results(runs: dict, args: argparse.Namespace, scale: int, work: Path, study: Study,
                  name: str, own: dict[str, dict[int, float | dict]] | None = None) -> None:
    """Rows x evaluations, mean ± std over the seeds finished so far (n per cell in the json)."""
    evals = args.evals
    runs = {r: {s: res for s, res in runs[r].items() if all(n in res for n in evals)}
            for r in study.rows if r in runs}  # in the study's order, whatever ran first
    runs = {r: by_seed for r, by_seed in runs.items() if by_seed}
    if not runs:
        raise SystemExit("error: no finished row yet")
    results_dir = Path(args.results_dir)
    table = summarise(runs, evals)
    by_seeds: dict[tuple, list[str]] = {}  # the rows' seeds, the largest group as "the others"
    for r, by_seed in runs.items():
        by_seeds.setdefault(tuple(sorted(by_seed)), []).append(f"`{r}`")
    groups = sorted(by_seeds.items(), key=lambda g: len(g[1]))
    seeds = " and ".join(f"{list(k)} for {', '.join(rows)}" for k, rows in groups[:-1])
    seeds = f"seeds {seeds} and {list(groups[-1][0])} for the others" if seeds else (
        f"seeds {list(groups[-1][0])}")
    # the jobs of the table's (row, seed)s only: the length rules' own runs are not counted
    done = {(r, s): list((work / r / f"seed{s}").rglob("done")) for r in runs for s in runs[r]}
    argv = [a for a in sys.argv[1:] if a != "--table-only"]  # the command that ran the jobs
    ft_iters = max((study.evals[n][3] for n in evals if "--model" not in study.evals[n][1]),
                   default=0)
    evaluations = "".join(  # only the evaluations this table has
        text for wanted, text in (
            (ft_iters > 0, f", fine-tuning DeepLabV3 {ft_iters // scale} steps (SGD 0.01, poly)"),
            (any("--model" in study.evals[n][1] for n in evals),
             f", linear probe {PROBE_ITERS // scale} steps (SGD 0.1, frozen backbone and BN "
             f"statistics)")) if wanted)
    command = placeholders(shlex.join(["python", "studies/real_study.py", *argv]), args, work)
    previous = (json.loads((results_dir / f"{name}.json").read_text())
                if (results_dir / f"{name}.json").is_file() else {})
    # where each (row, seed) came from (its jobs' commits and wall time): from its `done` files
    # here, else as the json holds it (a pair finished on a machine whose outputs are gone); pairs
    # kept from before the json held them per pair share one record, `carried`
    here, kept, unrecorded = [], [], 0
    for (r, s), files in done.items():
        if files:
            runs[r][s]["jobs"] = {**job_record(files), "cpus": os.cpu_count()}
            runs[r][s]["made"] = ", ".join(sorted(runs[r][s]["jobs"]["commits"]))
            here.append(runs[r][s]["jobs"])
        elif "jobs" in runs[r][s]:
            kept.append(runs[r][s]["jobs"])
        else:
            unrecorded += 1
    carried = unrecorded > 0 and "carried" in previous
    kept += [previous["carried"]] if carried else []
    cpus = "/".join(sorted({str(k.get("cpus")) for k in kept}))
    ran_here, ran_kept = merge_records(here), kept and merge_records(kept)  # one record each
    # summed job time, not first-to-last: a study that runs over several sessions has gaps
    timing = "; ".join(filter(None, [
        f"{sum(ran_here['commits'].values())} jobs here, their wall time {job_hours(ran_here)} on "
        f"{os.cpu_count()} CPU cores",
        ran_kept and KEPT + job_hours(ran_kept) + " on " + cpus + " CPU cores"]))
    made = ", ".join(filter(None, [job_commits(ran_here) or "none here",
                                   ran_kept and KEPT + job_commits(ran_kept),
                                   not carried and unrecorded and
                                   f"{unrecorded} kept (row, seed)s of unrecorded provenance"]))
    header = (f"Real-image study: `{command}`, table built at commit {git_commit()}, jobs run at "
              f"{made}; "
              f"{study.pretraining}; val mIoU (%), {seeds} (mean ± std over "
              f"seeds; each seed = its own pretraining, fine-tuning and 1/8 subset, the same for "
              f"every row). Protocol: {ARCH} at output stride {OUTPUT_STRIDE}, crops 96×128 of "
              f"the images at a 240×180 base scale, batch 8; pretraining "
              f"{args.pretrain_iters // scale} steps (AdamW 1e-3, cosine, bank 64){evaluations}. "
              f"{timing}. " + (
                  "The random-weights row saw only the fine-tuning labels; every other row "
                  "also pretrained on all of the training labels." if study.table == "real_table"
                  else "Each (row, seed) keeps in the json the commits its jobs ran at (`made`) "
                  "and, for pairs finished since the json holds it, their wall time (`jobs`)."))
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    text = write_markdown(table, evals, results / f"{name}.md", header, study.labels, "{} mIoU")
    checks = check_claims(table, evals, study.claims)
    text += "\n" + claims_markdown(checks, "real")
    # each mining row's mined_frac per seed: from its log here, else as the committed json kept it
    # (a json from before (g) kept mdp_unlabelled's alone, as seed -> mined_frac)
    kept_mined = previous.get("mined", {})
    if any(not isinstance(v, dict) for v in kept_mined.values()):
        kept_mined = {"mdp_unlabelled": kept_mined}
    here_mined = mined_fractions(work)
    mined = {}
    for row in MINED_BY.values():
        by_seed = {**{int(s): v for s, v in kept_mined.get(row, {}).items()},
                   **here_mined.get(row, {})}
        if by_seed := {s: by_seed[s] for s in sorted(by_seed) if s in runs.get(row, {})}:
            mined[row] = by_seed
    if study.table == "multi_table":
        text += verdicts_markdown(checks, mined)
        paired = paired_checks(runs, study.claims, evals)
        text += paired_markdown(paired, mined)
        if name != study.table and not args.quick:  # the scale step: against the study's budget
            text += scale_markdown(previous_runs(results / f"{study.table}.json"), runs,
                                   study.pretrain_iters, args.pretrain_iters, study.labels)
        # the README's table, at a glance: of the study's own table only (not _itersN, _quick)
        if name == study.table and set(CAMVID_EVALS + SOURCE_PROBES) <= set(evals):
            glance = glance_markdown(runs, study.labels)
            (results / "glance.md").write_text(glance)
            if results.resolve() == (ROOT / "results" / study.folder).resolve():
                readme_glance(ROOT / "README.md", glance)
    per_seed = ["", "Per seed (mIoU):", "", "| row | " + " | ".join(evals) + " |",
                "|---|" + "---|" * len(evals)]
    per_seed += [f"| {study.labels[r]} | " + " | ".join(
        ", ".join(f"{runs[r][s][n]['mIoU']:.2f}" for s in sorted(runs[r])) for n in evals) + " |"
        for r in runs]
    text += "\n".join(per_seed) + "\n"
    if own:
        text += own_task_markdown(own, study)
    (results / f"{name}.md").write_text(text)
    print("\n" + text)
    (results / f"{name}.json").write_text(json.dumps(
        {"header": header, "table": table, "claims": checks,
         **({"paired": paired} if study.table == "multi_table" else {}), "runs": runs,
         "own_task": own or previous.get("own_task", {}),  # without --own-task: as it was
         "mined": mined, **({"carried": previous["carried"]} if carried else {})},
        indent=1))
    bars = bar_chart(table, evals, None, study.labels, "{} mIoU")
    parts = [p for p in (bars, efficiency_plot(table, bars.width, study.evals, study.labels))
             if p is not None]
    png = Image.new("RGB", (max(p.width for p in parts), sum(p.height for p in parts)), "white")
    for k, part in enumerate(parts):
        png.paste(part, (0, sum(p.height for p in parts[:k])))
    png.save(results / f"{name}.png")


def readme_glance(readme: Path, glance: str) -> None:
    """The README's table between its glance markers becomes `glance` (tests/test_docs.py checks
    that they agree), so the README's numbers are the runner's."""
    text = readme.read_text()
    start = text.find("\n", text.find("<!-- glance: results/multi/glance.md")) + 1
    end = text.find("<!-- /glance -->")
    if start > 0 and end > start:
        readme.write_text(text[:start] + glance + text[end:])


def placeholders(text: str, args: argparse.Namespace, work: Path) -> str:
    """No machine's paths in a committed file: the data root and the work dir become DATA, RUNS."""
    return text.replace(str(work), "RUNS").replace(str(args.data_root), "DATA")


def mined_fractions(work: Path) -> dict[str, dict[int, float]]:
    """Each mining row -> seed -> mean `mined_frac` of its last 100 logged pretraining steps."""
    fractions: dict[str, dict[int, float]] = {}
    for row in MINED_BY.values():
        for log in sorted(work.glob(f"{row}/seed*/pretrain0/log.jsonl")):
            if (log.parent / "done").exists():
                series = read_log(log).get("mined_frac", [])  # (step, value); a resumed step once
                last = [v for step, v in series if step > series[-1][0] - 100] if series else []
                seed = int(log.parents[1].name[4:])
                fractions.setdefault(row, {})[seed] = float(np.mean(last)) if last else 0.0
    return fractions


def own_task_markdown(own: dict[str, dict[int, float | dict]], study: Study) -> str:
    """The own-task diagnostic: one number per seed (one source), or per source the mean over
    seeds of the own-task mIoU, the class-mean cosine, the prototypes' mean cosine (— for rows
    without prototypes) and the backbone's effective rank (several sources)."""
    text = ("\nDiagnostic (`--own-task`): each pretraining checkpoint on its own task, val mIoU "
            "(tools/pretrain_eval.py: MDP by the nearest prototype, CE by its classifier)")
    if len(study.sources) == 1:
        text += ", per seed and mean:\n\n| row | per seed | mean |\n|---|---|---:|\n"
        return text + "".join(f"| {study.labels[r]} | {', '.join(f'{v:.2f}' for v in by.values())}"
                              f" | {np.mean(list(by.values())):.2f} |\n" for r, by in own.items())
    names = [s.removeprefix("folder:") for s in study.sources]
    text += (", the mean cosine between its classes' mean embeddings, the mean cosine between "
             "its prototypes of the source's classes (the targets the contrast trained towards) "
             "and the effective rank of its 2048-d backbone features (`--stats`), each the mean "
             "over seeds on the source's val:\n\n| row | " + " | ".join(
                 f"{n} own task / class-mean cos / prototype cos / backbone rank" for n in names)
             + " |\n|---|" + "---:|" * len(names) + "\n")
    for r, by in own.items():
        cells = []
        for src in study.sources:
            got = [v[src] for v in by.values() if src in v]
            if not got:
                cells.append("—")
                continue
            stats = [g["stats"] for g in got]
            proto = [s["prototype_cos_mean"] for s in stats if "prototype_cos_mean" in s]
            cells.append(f"{np.mean([g['mIoU'] for g in got]):.2f} / "
                         f"{np.mean([s['class_mean_cos_mean'] for s in stats]):.3f} / "
                         f"{f'{np.mean(proto):.3f}' if proto else '—'} / "
                         f"{np.mean([s['backbone_effective_rank'] for s in stats]):.0f}")
        text += f"| {study.labels[r]} | " + " | ".join(cells) + " |\n"
    return text


if __name__ == "__main__":
    main()
