"""studies/real_study.py --table-only: the table, claims and plots from finished jobs, checked
against numbers computed by hand here (no training: the jobs' results are written by the test)."""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
import real_study  # noqa: E402
import protocols  # noqa: E402
import readings  # noqa: E402


def fake_job(work: Path, row: str, seed: int, name: str, miou: float) -> None:
    d = real_study.eval_dir(work / row / f"seed{seed}", name)
    d.mkdir(parents=True)
    (d / "results.json").write_text(json.dumps({"mIoU": miou, "IoU": {"a": miou}}))
    (d / "done").write_text("abc1234\n")


def test_table_from_finished_jobs(tmp_path: Path, monkeypatch) -> None:
    work, results = tmp_path / "work", tmp_path / "results"
    miou = {("mdp", 0): (40.0, 30.0, 50.0), ("mdp", 1): (44.0, 34.0, 52.0),
            ("ce", 0): (38.0, 31.0, 49.0), ("ce", 1): (36.0, 29.0, 47.0),
            ("random", 0): (20.0, 10.0, 30.0)}  # seed 1 of random unfinished: one eval only
    for (row, seed), vals in miou.items():
        for name, v in zip(protocols.EVALS, vals):
            fake_job(work, row, seed, name, v)
    fake_job(work, "random", 1, "linear probe", 99.0)
    fake_job(work, "ce_iters1200", 0, "linear probe", 1.0)  # a rule's run: not a job of the table
    monkeypatch.setattr(sys, "argv", ["real_study.py", "--table-only"])
    real_study.main(["--table-only", "--seeds", "2", "--rows", "random", "ce", "mdp",
                     "--work-dir", str(work), "--results-dir", str(results)])
    data = json.loads((results / "real_table.json").read_text())
    for row in ("mdp", "ce"):
        for k, name in enumerate(protocols.EVALS):
            vals = np.array([miou[row, s][k] for s in (0, 1)])
            cell = data["table"][row][name]
            assert cell["n"] == 2 and cell["mean"] == pytest.approx(vals.mean())
            assert cell["std"] == pytest.approx(vals.std())
    # a seed with an unfinished evaluation is left out of the row, never half-counted
    assert data["table"]["random"]["linear probe"] == {"mean": 20.0, "std": 0.0, "n": 1}
    probe = next(c for c in data["claims"] if c["better"] == "mdp" and c["worse"] == "ce"
                 and c["target"] == "linear probe")
    assert probe["diff"] == pytest.approx(42.0 - 37.0) and probe["noise"] == pytest.approx(3.0)
    assert probe["verdict"] == "holds"
    text = (results / "real_table.md").read_text()
    # the jobs of the table's (row, seed)s: 5 x 3 evaluations (not random seed 1, not the rule run)
    assert "abc1234 (15 jobs)" in text and "15 jobs here" in text and "--table-only" not in text
    assert "fine-tuning DeepLabV3 120 steps" in text and "linear probe 200 steps" in text
    assert "| MDP | 42.00 ± 2.00 | 32.00 ± 2.00 | 51.00 ± 1.00 |" in text
    assert (results / "real_table.png").stat().st_size > 1000


def test_no_finished_job_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="no finished row"):
        real_study.main(["--table-only", "--work-dir", str(tmp_path), "--results-dir",
                         str(tmp_path / "r")])


def test_own_task_diagnostic_in_the_table(tmp_path: Path, monkeypatch) -> None:
    work, results = tmp_path / "work", tmp_path / "results"
    for name in protocols.EVALS:
        fake_job(work, "mdp", 0, name, 30.0)
    cached = work / "mdp" / "seed0" / "own_task.json"  # what pretrain_eval.py --out wrote
    cached.write_text(json.dumps({"mIoU": 21.5}))
    (work / "mdp" / "seed0" / "pretrain0").mkdir()
    (work / "mdp" / "seed0" / "pretrain0" / "done").write_text("abc1234\n")
    monkeypatch.setattr(sys, "argv", ["real_study.py"])
    real_study.main(["--table-only", "--own-task", "--seeds", "1", "--rows", "mdp",
                     "--work-dir", str(work), "--results-dir", str(results)])
    assert "| MDP | 21.50 | 21.50 |" in (results / "real_table.md").read_text()
    assert json.loads((results / "real_table.json").read_text())["own_task"] == {"mdp": {"0": 21.5}}


def test_probe_only_diagnostic_at_another_budget(tmp_path: Path, monkeypatch) -> None:
    work, results = tmp_path / "work", tmp_path / "results"
    for row, v in (("ce", 31.0), ("mdp", 27.0)):
        fake_job(work, row, 0, "linear probe", v)
    monkeypatch.setattr(sys, "argv", ["real_study.py"])
    real_study.main(["--table-only", "--seeds", "1", "--rows", "ce", "mdp", "--evals",
                     "linear probe", "--pretrain-iters", "1200", "--work-dir", str(work),
                     "--results-dir", str(results)])
    text = (results / "real_table_iters1200.md").read_text()
    assert "pretraining 1200 steps" in text and "| MDP | 27.00 |" in text
    assert "fine-tune" not in text.split("| pretraining |")[1].splitlines()[0]  # probe column only
    header = text.split("| pretraining |")[0]  # the protocol names only the evaluations run
    assert "linear probe 200 steps" in header and "fine-tuning DeepLabV3" not in header
    assert not (results / "real_table.md").exists()  # the main table is left alone


def test_a_work_dir_holds_one_budget(tmp_path: Path) -> None:
    stage = tmp_path / "pretrain0"
    stage.mkdir()
    (stage / "config.json").write_text(json.dumps({"iters": 300}))
    real_study.check_budget(stage, 300)  # same budget: resumed / skipped as usual
    real_study.check_budget(tmp_path / "fresh", 1200)  # nothing there yet
    with pytest.raises(SystemExit, match="pretrained for 300 steps, this study asks for 1200"):
        real_study.check_budget(stage, 1200)


@pytest.mark.parametrize("seed", [0, 1])
def test_diagnosis_table_from_finished_jobs(tmp_path: Path, monkeypatch, seed: int) -> None:
    """studies/real_diagnosis.py over finished jobs: every cell is the job's own number; another
    seed reads that seed's jobs and writes its own table."""
    import real_diagnosis
    work, results = tmp_path / "work", tmp_path / "results"
    stats = {"backbone_effective_rank": 486.9, "embedding_effective_rank": 14.75,
             "class_mean_length": 0.95, "class_mean_cos_mean": 0.9, "class_mean_cos_max": 0.999,
             "probe_embedding": 24.66, "probe_backbone": 32.5}
    for row, probe, own in (("random", 27.8, None), ("mdp", 26.0, 20.26)):
        fake_job(work, row, seed, "linear probe", probe)
        seed_dir = work / row / f"seed{seed}"
        cached = {"stats": stats if own is None else
                  {**stats, "prototype_cos_mean": 0.826, "prototype_cos_max": 1.0}}
        if own is not None:
            cached["mIoU"] = own
            (seed_dir / "pretrain0").mkdir()
            (seed_dir / "pretrain0" / "done").write_text("abc1234\n")  # pretraining skipped
        (seed_dir / "diagnosis.json").write_text(json.dumps(cached))
    monkeypatch.setattr(sys, "argv", ["real_diagnosis.py"])
    real_diagnosis.main(["--rows", "random", "mdp", "--work-dir", str(work), "--seed", str(seed),
                         "--results-dir", str(results), "--no-class-table"])
    name = "real_diagnosis" + ("_seed1" if seed else "")
    text = (results / f"{name}.md").read_text()
    assert f"Seed {seed} only" in text
    assert ("| mdp | the study's MDP row (AdamW 1e-3, bank 64, τ 0.07, mixing) | 20.26 | "
            "0.826 / 1.000 | 0.900 / 0.999 | 0.950 | 14.8 | 487 | 24.66 | 32.50 | 26.00 |") in text
    assert "| random | no pretraining (the network at initialisation) | — | — / — |" in text
    assert json.loads((results / f"{name}.json").read_text())["rows"]["mdp"][
        "linear probe"] == 26.0


def test_label_purity_by_hand() -> None:
    import real_diagnosis
    y = np.array([[0, 0, 1, 1],
                  [0, 2, 1, 1],
                  [255, 255, 2, 2],
                  [255, 255, 2, 0]], np.uint8)
    # 2x2 cells labelled by their top-left pixel: 0 (3 of 4 pixels are 0), 1 (4 of 4), ignore
    # (skipped), 2 (3 of 4); a 3-pixel stride cuts blocks at the border and skips ignore pixels
    count, purity = real_diagnosis.label_purity(y, 2, 3)
    assert count.tolist() == [1, 1, 1] and purity.tolist() == [0.75, 1.0, 0.75]
    count, purity = real_diagnosis.label_purity(y, 3, 3)
    # cells at (0,0) [0,0,1 / 0,2,1 / -,-,2] -> 3 of 7 labelled pixels are class 0; (0,3) [1 / 1 /
    # 2] -> 2/3 of class 1; (3,0) starts on ignore: skipped; (3,3) [0] -> class 0, 1/1
    assert count.tolist() == [2, 1, 0] and purity.tolist() == pytest.approx([3 / 7 + 1, 2 / 3, 0])


def test_multi_study_keeps_committed_seeds_and_never_reruns_them(tmp_path: Path,
                                                                monkeypatch) -> None:
    """A (row, seed) finished on another machine (in the committed json, its run outputs gone) is
    kept as it is and not rerun; a (row, seed) finished here is read from its jobs; the header
    counts both provenances and both wall times once however often it is rebuilt, and again after
    a second move of machine (the pairs finished here then kept too); mining's mined_frac of a kept
    seed is carried, a rebuild over some rows drops none of the others, nor a seed beyond --seeds,
    no machine path is written."""
    work, results = tmp_path / "work", tmp_path / "results"
    results.mkdir()
    evals = list(protocols.MULTI_EVALS)
    kept = {e: {"mIoU": 40.0 + k, "IoU": {}} for k, e in enumerate(evals)}
    (results / "multi_table.json").write_text(json.dumps({  # pairs from before per-pair records
        "header": "Real-image study: `x`", "mined": {"0": 0.125},
        "carried": {"commits": {"1234abc": 9}, "seconds": 7200.0, "untimed": 0, "cpus": 2},
        "runs": {"mdp": {"0": {**kept, "made": "1234abc"}, "1": {**kept, "made": "1234abc"}},
                 "mdp_unlabelled": {"0": {**kept, "made": "1234abc"}}}}))
    for k, e in enumerate(evals):
        fake_job(work, "ce", 0, e, 30.0 + k)
    (work / "ce" / "seed0" / "CamVid_all" / "seconds").write_text("1800\n")
    for d in ("camvid", "stanford_background", "msrc_v2", "labelmefacade"):
        (tmp_path / "data" / d).mkdir(parents=True)  # the data check looks for the folders

    def must_not_run(*a, **kw):
        raise AssertionError("a kept (row, seed) was rerun")
    monkeypatch.setattr(real_study, "pretrain", must_not_run)
    monkeypatch.setattr(real_study, "evaluate_all", must_not_run)
    monkeypatch.setattr(sys, "argv", ["real_study.py"])
    argv = ["--study", "multi", "--rows", "mdp", "mdp_unlabelled", "--seeds", "1", "--work-dir",
            str(work), "--results-dir", str(results), "--data-root", str(tmp_path / "data")]
    real_study.main(argv)  # runs nothing: both rows' seed 0 is kept, and MDP's seed 1 (> --seeds)
    data = json.loads((results / "multi_table.json").read_text())
    assert sorted(data["runs"]["mdp"]) == ["0", "1"]
    assert data["table"]["mdp"]["CamVid 1/8"]["n"] == 2
    assert "seeds [0, 1] for `mdp` and [0] for the others (mean" in data["header"]
    rows = argv[:2] + ["--rows", "ce", "mdp", "mdp_unlabelled", "--table-only"] + argv[5:]
    for _ in range(2):  # rebuilt twice: what is carried is not carried twice
        real_study.main(rows)
    data = json.loads((results / "multi_table.json").read_text())
    assert data["runs"]["mdp"]["0"]["CamVid probe"]["mIoU"] == 40.0
    assert data["table"]["ce"]["CamVid all"]["mean"] == 32.0
    assert data["runs"]["ce"]["0"]["made"] == "abc1234"
    assert data["runs"]["ce"]["0"]["jobs"]["commits"] == {"abc1234": 6}
    cores = os.cpu_count()
    assert ("jobs run at abc1234 (6 jobs), kept from the committed json: 1234abc (9 jobs);"
            in data["header"])
    assert (f"6 jobs here, their wall time 0.5 h over 1 jobs (5 not timed) on {cores} CPU cores; "
            "kept from the committed json: 2.0 h over 9 jobs on 2 CPU cores. " in data["header"])
    assert data["mined"] == {"mdp_unlabelled": {"0": 0.125}}  # the old json's form, converted
    assert "mdp_unlabelled: seed 0: 0.125" in (results / "multi_table.md").read_text()
    # the README's glance comes from the study's own table only, never a diagnostic budget's
    assert (results / "glance.md").is_file()
    (results / "glance.md").unlink()
    real_study.main(rows + ["--pretrain-iters", "100"])
    assert (results / "multi_table_iters100.md").is_file()
    assert not (results / "glance.md").exists()
    assert str(tmp_path) not in (results / "multi_table.md").read_text()
    # a rebuild over a subset of the rows drops none of the others, nor their own task
    stats = dict.fromkeys(["backbone_effective_rank", "embedding_effective_rank",
                           "class_mean_length", "class_mean_cos_mean", "class_mean_cos_max"], 0.5)
    data["own_task"] = {"mdp": {"0": {"folder:msrc_v2": {"mIoU": 12.5, "stats": stats}}}}
    (results / "multi_table.json").write_text(json.dumps(data))
    real_study.main(argv[:2] + ["--rows", "ce", "--table-only", "--own-task"] + argv[5:])
    data = json.loads((results / "multi_table.json").read_text())
    assert sorted(data["runs"]) == ["ce", "mdp", "mdp_unlabelled"]
    assert data["runs"]["mdp_unlabelled"]["0"]["msrc_v2 probe"]["mIoU"] == 44.0
    assert data["own_task"]["mdp"]["0"]["folder:msrc_v2"]["mIoU"] == 12.5
    assert data["mined"] == {"mdp_unlabelled": {"0": 0.125}}
    real_study.main(rows)  # without --own-task: the json keeps the diagnostic, the page omits it
    data = json.loads((results / "multi_table.json").read_text())
    assert data["own_task"]["mdp"]["0"]["folder:msrc_v2"]["mIoU"] == 12.5
    assert "Diagnostic (`--own-task`)" not in (results / "multi_table.md").read_text()
    # the machine moves again: CE's outputs go too, and its pair is kept with its own record
    shutil.rmtree(work)
    for _ in range(2):
        real_study.main(rows)
    header = json.loads((results / "multi_table.json").read_text())["header"]
    assert ("jobs run at none here, kept from the committed json: 1234abc (9 jobs), abc1234 (6 "
            "jobs);" in header)
    assert ("0 jobs here, their wall time 0.0 h over 0 jobs on "
            f"{cores} CPU cores; kept from the committed json: 2.5 h over 10 jobs (5 not timed) "
            f"on {'/'.join(sorted({'2', str(cores)}))} CPU cores. " in header)


def test_multi_own_task_table_by_hand() -> None:
    study = protocols.make_study("multi", "folder:camvid")
    src = protocols.SOURCES
    own = {r: {s: {d: {"mIoU": 10.0 * (k + 1) + s,
                       "stats": {"class_mean_cos_mean": 0.5 + s / 10,
                                 "backbone_effective_rank": 100.0 * (k + 1) + 10 * s,
                                 **({"prototype_cos_mean": 0.8 + s / 10} if r == "mdp" else {})}}
                   for k, d in enumerate(src)} for s in (0, 1)} for r in ("mdp", "ce")}
    text = real_study.own_task_markdown(own, study)
    # per source: the mean over seeds 0 and 1 of mIoU (10 + s, 20 + s, 30 + s), class-mean cos
    # (0.5, 0.6), prototype cos (0.8, 0.9; none for CE) and backbone rank (100 + 10 s, ...)
    assert ("| MDP | 10.50 / 0.550 / 0.850 / 105 | 20.50 / 0.550 / 0.850 / 205 | "
            "30.50 / 0.550 / 0.850 / 305 |") in text
    assert ("| CE, 39 concatenated classes | 10.50 / 0.550 / — / 105 | 20.50 / 0.550 / — / 205 | "
            "30.50 / 0.550 / — / 305 |") in text


@pytest.mark.parametrize("learned_at, chosen", [(240, 240), (960, 960), (None, 960)])
def test_choose_finetune_rule(tmp_path: Path, monkeypatch, learned_at, chosen) -> None:
    """The first candidate at which scratch learns >= 6 classes at IoU >= 10; the last if none."""
    calls = []

    def fake_eval(ckpt, seed, out, dataset, data_root, scale, evals, specs):
        steps = specs["CamVid all"][3]
        calls.append(steps)
        n = 6 if steps == learned_at else 5
        iou = {f"c{i}": (10.0 if i < n else 9.9) for i in range(11)}
        return {"CamVid all": {"mIoU": float(steps), "IoU": iou}}
    monkeypatch.setattr(real_study, "evaluate_all", fake_eval)
    real_study.main(["--study", "multi", "--choose", "finetune", "--work-dir", str(tmp_path),
                     "--results-dir", str(tmp_path)])
    rec = json.loads((tmp_path / "multi_protocol.json").read_text())["finetune"]
    assert rec["chosen"] == chosen and calls == [s for s in (240, 480, 960) if s <= chosen]
    assert len(rec["tried"][str(chosen)]["learned"]) == (6 if learned_at else 5)


@pytest.mark.parametrize("gain, chosen", [(2.0, 2400), (1.9, 1200)])
def test_choose_pretrain_rule(tmp_path: Path, monkeypatch, gain, chosen) -> None:
    """The longer length only if CE's mean own task over the three sources gains >= 2 points."""
    monkeypatch.setattr(real_study, "pretrain", lambda *a, **kw: None)

    def fake_own(argv):
        run = Path(argv[0]).parents[2].name  # RUNS/ce/seed0/pretrain0/last.pth: the study's length
        steps = int(run[8:]) if run.startswith("ce_iters") else real_study.MULTI_PRETRAIN_ITERS
        out = Path(argv[argv.index("--out") + 1])
        k = protocols.SOURCES.index(argv[argv.index("--dataset") + 1])
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"mIoU": 30.0 + k + (gain if steps == 2400 else 0.0)}))
    monkeypatch.setattr(real_study.pretrain_eval, "main", fake_own)
    real_study.main(["--study", "multi", "--choose", "pretrain", "--work-dir", str(tmp_path),
                     "--results-dir", str(tmp_path)])
    rec = json.loads((tmp_path / "multi_protocol.json").read_text())["pretrain"]
    assert rec["chosen"] == chosen and rec["gain"] == pytest.approx(gain)
    assert rec["tried"]["1200"]["mean"] == pytest.approx(31.0)


def test_claim_verdicts_by_the_reading_rule_by_hand(tmp_path: Path) -> None:
    """Per group of three evaluations: holds = at least two hold and none reversed; reversed the
    same way round; "changes nothing" = within noise on all three; a group not complete is not
    read; a 1-seed verdict is marked; mining that never fired is said to leave the claim
    untested."""
    def check(claim: str, target: str, verdict: str, diff: float = 5.0) -> dict:
        return dict(claim=claim, target=target, verdict=verdict, diff=diff, noise=1.25)

    def verdicts(checks: list[dict], mined: dict[str, dict[int, float]]) -> str:
        # without the differences
        return re.sub(r": [−+][^|]*?(?= \|)", "", real_study.verdicts_markdown(checks, mined))
    cam, src = protocols.CAMVID_EVALS, protocols.SOURCE_PROBES
    checks = ([check("A", t, v) for t, v in zip(cam, ["holds", "holds", "within seed noise"])]
              + [check("A", t, v) for t, v in zip(src, ["holds", "holds", "reversed"])]
              + [check("B", t, v)
                 for t, v in zip(cam, ["reversed (1 seed)"] * 2 + ["holds (1 seed)"])]
              + [check("B", src[0], "holds")]
              + [check(protocols.NO_CHANGE, t, "within seed noise") for t in cam]
              + [check(protocols.NO_CHANGE, t, v) for t, v in zip(src, ["within seed noise"] * 2
                                                                   + ["holds"])]
              + [check(protocols.MINING, t, "holds (1 seed)") for t in cam])
    text = verdicts(checks, {"mdp_unlabelled": {0: 0.0, 1: 0.0}})
    assert "| A | holds (2 / 0 / 1) | does not hold (2 / 1 / 0) |" in text
    # weak: a fine-tuning under 3 points read as within noise changes the verdict; a probe never
    weak = [check("W", t, v, d) for t, v, d in zip(cam, ["holds"] * 3, [4.0, 2.9, 1.0])]
    weak += [check("S", t, v, d) for t, v, d in zip(cam, ["holds"] * 3, [1.0, 3.0, 2.0])]
    weak += [check("R", t, "reversed", -2.0) for t in cam]
    weak += [check(protocols.NO_CHANGE, cam[0], "within seed noise", 0.1),
             check(protocols.NO_CHANGE, cam[1], "within seed noise", 0.1),
             check(protocols.NO_CHANGE, cam[2], "reversed", -2.5)]
    text_weak = verdicts(weak, {})
    assert "| W | holds, weak (3 / 0 / 0) | — |" in text_weak  # 1/8 and all under 3
    assert "| S | holds (3 / 0 / 0) | — |" in text_weak  # probe never weakened
    assert "| R | reversed, weak (0 / 3 / 0) | — |" in text_weak
    assert f"| {protocols.NO_CHANGE} | does not hold, weak (0 / 1 / 2) | — |" in text_weak
    assert "| B | does not hold (1 seed) (1 / 2 / 0) | not read yet |" in text
    assert f"| {protocols.NO_CHANGE} | holds (0 / 0 / 3) | does not hold (1 / 0 / 2) |" in text
    assert "mining did not fire at this budget" in text
    assert f"| {protocols.MINING} | not tested: mining did not fire (3 / 0 / 0) | — |" in text
    assert f"| {protocols.MINING} | holds (1 seed) (3 / 0 / 0) | — |" in verdicts(
        checks, {"mdp_unlabelled": {0: 0.0, 1: 0.01}})  # fired at one seed: read by the rule
    # (g)'s claim is read on (g)'s own mining, not on mdp_unlabelled's
    g = [check(protocols.MINING_G, t, "holds (1 seed)") for t in cam]
    both = {"mdp_unlabelled": {0: 0.5}, "mdp_learned_unlabelled": {0: 0.0}}
    assert (f"| {protocols.MINING_G} | not tested: mining did not fire (3 / 0 / 0) | — |"
            in verdicts(checks + g, both))
    assert (f"| {protocols.MINING} | holds (1 seed) (3 / 0 / 0) | — |"
            in verdicts(checks + g, both))
    assert "mdp_learned_unlabelled: seed 0: 0.000; mining did not fire" in verdicts(g, both)
    assert f"| {protocols.MINING_G} | holds (1 seed) (3 / 0 / 0) | — |" in verdicts(
        g, {"mdp_learned_unlabelled": {0: 0.2}})
    # each evaluation's difference ± noise, in the group's order whatever the checks' order
    assert ("| R | reversed, weak (0 / 3 / 0): " + " / ".join(["−2.0 ± 1.2"] * 3) + " | — |"
            in real_study.verdicts_markdown(weak, {}))
    assert ("| W | holds, weak (3 / 0 / 0): +4.0 ± 1.2 / +2.9 ± 1.2 / +1.0 ± 1.2 | — |"
            in real_study.verdicts_markdown(weak[2::-1], {}))
    # mined_frac: the mean of the records in the last 100 steps, finished runs only
    for seed, fracs in ((0, [0.5, 0.1, 0.2, 0.3]), (1, [0.9])):
        run = tmp_path / "mdp_unlabelled" / f"seed{seed}" / "pretrain0"
        run.mkdir(parents=True)
        (run / "log.jsonl").write_text("".join(json.dumps({"step": 50 * (k + 1), "mined_frac": f})
                                               + "\n" for k, f in enumerate(fracs)))
    with open(tmp_path / "mdp_unlabelled" / "seed0" / "pretrain0" / "log.jsonl", "a") as log:
        log.write(json.dumps({"step": 200, "mined_frac": 0.3}) + "\n")  # resumed: step 200 again
    (tmp_path / "mdp_unlabelled" / "seed0" / "pretrain0" / "done").write_text("abc\n")
    g_run = tmp_path / "mdp_learned_unlabelled" / "seed2" / "pretrain0"  # (g), a row of its own
    g_run.mkdir(parents=True)
    (g_run / "log.jsonl").write_text(json.dumps({"step": 10, "mined_frac": 0.75}) + "\n")
    (g_run / "done").write_text("abc\n")
    got = real_study.mined_fractions(tmp_path)  # seed 0: steps 150 and 200 are within 100 of 200
    assert got.keys() == {"mdp_unlabelled", "mdp_learned_unlabelled"}
    assert got["mdp_unlabelled"].keys() == {0} and abs(got["mdp_unlabelled"][0] - 0.25) < 1e-12
    assert got["mdp_learned_unlabelled"] == {2: 0.75}
    assert "seed 0: 0.250." in real_study.verdicts_markdown(checks, got)


def test_rerun_job_runs_the_studys_job_and_sets_the_committed_value_beside(tmp_path: Path,
                                                                           monkeypatch,
                                                                           capsys) -> None:
    import rerun_job
    seen = []

    def fake_finetune(argv: list[str]) -> None:
        seen.append(argv)
        out = Path(argv[argv.index("--out-dir") + 1])
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps({"mIoU": 12.5}))

    monkeypatch.setattr(real_study.finetune, "main", fake_finetune)
    rerun_job.main(["--data-root", "DATA", "--seed", "1", "--eval", "CamVid all",
                    "--out-dir", str(tmp_path / "job")])
    argv = seen[0]
    flag = {k: argv[argv.index(k) + 1] for k in ("--ckpt", "--dataset", "--seed", "--iters",
                                                 "--amp", "--data-root")}
    assert flag == {"--ckpt": "none", "--dataset": "folder:camvid", "--seed": "1",
                    "--iters": str(protocols.MULTI_FINETUNE_ITERS), "--amp": "none",
                    "--data-root": "DATA"}
    committed = json.loads((ROOT / "results" / "multi" / "multi_table.json").read_text())
    before = committed["runs"]["random"]["1"]["CamVid all"]["mIoU"]
    line = capsys.readouterr().out.strip().splitlines()[-1]  # after the job's "$ ..." line
    assert line.startswith("random seed 1 CamVid all: mIoU 12.50 here")
    assert line.endswith(f"committed {before:.2f}")


@pytest.mark.parametrize("args, says", [(["--eval", "nope"], "--eval 'nope': expected one of"),
                                        (["--row", "ce"], "--row ce: random weights take no")])
def test_rerun_job_bad_arguments(args: list[str], says: str) -> None:
    import rerun_job
    with pytest.raises(SystemExit) as e:
        rerun_job.main(["--data-root", "DATA", *args])
    assert str(e.value).startswith(says)


def test_t_quantiles_against_a_numerical_integral() -> None:
    """T975[df] is where Student's t CDF reaches 0.975: the density integrated by the trapezoid
    rule from 0 (CDF 0.5 by symmetry)."""
    import math
    for df, t in real_study.T975.items():
        x = np.linspace(0.0, t, 200_001)
        logc = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
        density = np.exp(logc) * (1 + x ** 2 / df) ** (-(df + 1) / 2)
        cdf = 0.5 + float(np.sum((density[1:] + density[:-1]) / 2 * np.diff(x)))
        assert abs(cdf - 0.975) < 2e-5, (df, cdf)


def test_paired_rule_by_hand() -> None:
    """The issue's three seeds of learned prototypes vs CE (CamVid probe, all): t = mean / (sd /
    sqrt 3) = 2.1 and 3.4, below t_{0.975, 2} = 4.303: level. [2, 3, 4]: mean 3, sd 1, half-width
    4.303 / sqrt 3 = 2.484: holds; negated: reversed; one seed: the sign, marked."""
    probe = real_study.paired_difference([3.94, 0.59, 1.71])
    assert probe["mean"] == pytest.approx(2.08) and probe["verdict"] == "within"
    assert probe["mean"] / (probe["half"] / 4.303) == pytest.approx(2.1, abs=0.05)
    full = real_study.paired_difference([1.99, 0.90, 0.85])
    assert full["mean"] / (full["half"] / 4.303) == pytest.approx(3.35, abs=0.01)
    up = real_study.paired_difference([2.0, 3.0, 4.0])
    assert up["half"] == pytest.approx(4.303 / 3 ** 0.5) and up["verdict"] == "holds"
    assert real_study.paired_difference([-2.0, -3.0, -4.0])["verdict"] == "reversed"
    assert real_study.paired_difference([1.5]) == {"n": 1, "mean": 1.5, "half": None,
                                                   "verdict": "holds (1 seed)"}
    # pairing: seed 0's shift is shared by both rows, so it cancels; only common seeds count
    evals = protocols.CAMVID_EVALS

    def row(values: dict[int, float]) -> dict[int, dict]:
        return {s: {e: {"mIoU": v} for e in evals} for s, v in values.items()}
    runs = {"a": row({0: 40.0, 1: 21.0, 2: 31.5, 3: 50.0}), "b": row({0: 38.0, 1: 20.0, 2: 30.0})}
    claims = [("a beats b", "a", "b", evals, "—"), ("b beats a", "b", "a", evals, "—")]
    got = real_study.paired_checks(runs, claims, evals)
    assert [c["seeds"] for c in got] == [[0, 1, 2]] * 6
    assert got[0]["diffs"] == [2.0, 1.0, 1.5] and got[0]["verdict"] == "holds"
    assert got[3]["verdict"] == "reversed"
    text = real_study.paired_markdown(got, {})
    assert ("| a beats b | 0, 1, 2 | holds (3 / 0 / 0): " + " / ".join(["+1.5 [+0.3, +2.7]"] * 3)
            + " | — |") in text
    assert "| b beats a | 0, 1, 2 | reversed (0 / 3 / 0): " in text


def test_scale_step_reading_by_hand() -> None:
    """The scale step's rule: per seed the gap row - CE at each budget; a row gains on CE when the
    gap's change is above zero at both seeds on two of three CamVid evaluations and below at both
    on none; loses the other way; a row without both budgets' seeds gets no line."""
    evals = protocols.CAMVID_EVALS

    def row(values: dict[int, list[float]]) -> dict[int, dict]:
        return {s: {e: {"mIoU": v} for e, v in zip(evals, vs)} for s, vs in values.items()}
    ce = row({0: [30, 30, 30], 1: [30, 30, 30]})
    base = {"ce": ce, "mdp": row({0: [26, 29, 28], 1: [28, 29, 28]}),
            "mdp_learned": row({0: [32, 31, 32], 1: [33, 31, 31]})}
    # MDP's changes: probe +3, +1; 1/8 -1, +1; all +1, +0.5 -> (2 / 0 / 1): gains on CE.
    # learned's: probe -1, -2; 1/8 -1, -0.5; all +1, -1 -> (0 / 2 / 1): loses to CE
    scaled = {"ce": ce, "mdp": row({0: [29, 28, 29], 1: [29, 30, 28.5]}),
              "mdp_learned": row({0: [31, 30, 33], 1: [31, 30.5, 30]}),
              "mdp_centred": row({0: [40, 40, 40]})}
    text = readings.scale_markdown(base, scaled, 2400, 9600, protocols.MULTI_LABELS)
    assert ("| MDP | 0, 1 | −4.0 → −1.0, −2.0 → −1.0 | −1.0 → −2.0, −1.0 → +0.0 | "
            "−2.0 → −1.0, −2.0 → −1.5 | gains on CE (2 / 0 / 1) |") in text
    assert "| MDP, learned prototypes [ours] | 0, 1 | " in text
    assert text.rstrip().endswith("| loses to CE (0 / 2 / 1) |")
    assert protocols.MULTI_LABELS["mdp_centred"] not in text

def test_repair_lines_by_hand() -> None:
    """The README's line per repair: against CE and the source's MDP, the group verdict of the
    three CamVid evaluations by the paired rule and each mean [interval] on the common seeds; a
    repair with one common seed is not read; rows that are not repairs get no line."""
    evals = protocols.CAMVID_EVALS

    def row(values: dict[int, list[float]]) -> dict[int, dict]:
        return {s: {e: {"mIoU": v} for e, v in zip(evals, vs)} for s, vs in values.items()}
    # (f) - CE: probe [2, 1, 1.5] (mean 1.5, sd 0.5, half 4.303 * 0.5 / sqrt 3 = 1.242) holds,
    # 1/8 and all [1, -1, 0]: level -> the group (1 holds, 0 reversed) is level;
    # (f) - MDP: [3, 2, 4] on all three (mean 3, half 2.484) holds everywhere -> above
    runs = {"ce": row({0: [30, 30, 30], 1: [30, 30, 30], 2: [30, 30, 30]}),
            "mdp": row({0: [29, 28, 28], 1: [29, 27, 27], 2: [27.5, 26, 26]}),
            "mdp_learned_csc_bank": row({0: [32, 31, 31], 1: [31, 29, 29], 2: [31.5, 30, 30]}),
            "mdp_centred": row({2: [40, 40, 40], 7: [40, 40, 40]}),
            "random": row({0: [1, 1, 1], 1: [1, 1, 1]})}
    got = readings.repair_lines(runs, protocols.MULTI_LABELS)
    lines = [line for line in got if line.startswith("- ")]
    assert lines == [
        f"- {protocols.MULTI_LABELS['mdp_learned_csc_bank']}: **level with CE** on CamVid (seeds "
        "0, 1, 2; probe +1.5 [+0.3, +2.7], 1/8 +0.0 [−2.5, +2.5], all +0.0 [−2.5, +2.5]); "
        "**above the source's MDP** on CamVid (seeds 0, 1, 2; probe +3.0 [+0.5, +5.5], 1/8 "
        "+3.0 [+0.5, +5.5], all +3.0 [+0.5, +5.5]).",
        f"- {protocols.MULTI_LABELS['mdp_centred']}: against CE: 1 common seed, not read yet; "
        "against the source's MDP: 1 common seed, not read yet."]


@pytest.mark.parametrize("confs, oks, chosen", [
    # pooled over the sources: 0.8 ok, 0.7 ok, 0.6 wrong (source 1); 0.75 ok, 0.5 wrong (source 2)
    # sorted 0.8 0.75 0.7 0.6 0.5: precision 1, 1, 1, 3/4, 3/5 -> 0.7 is the lowest at 0.9
    ([[0.8, 0.7, 0.6], [0.75, 0.5], [0.4]], [[1, 1, 0], [1, 0], [0]], 0.7),
    ([[0.95, 0.91], [0.5], [0.3]], [[1, 1], [0], [0]], 0.9),  # found above 0.9: the source's 0.9
    ([[0.8], [0.7], [0.6]], [[0], [0], [0]], 0.9),  # never 90 % correct: the source's 0.9
    ([[0.6667], [0.1], [0.1]], [[1], [0], [0]], 0.666),  # rounded down to 0.001
])
def test_choose_mine_rule(tmp_path: Path, monkeypatch, confs, oks, chosen) -> None:
    """(g)'s threshold: the first finished mdp_learned checkpoint (lowest seed), every source's
    val pixels pooled, the lowest threshold at 90 % correct, else the source's 0.9."""
    for seed in (4, 3):
        (tmp_path / "mdp_learned" / f"seed{seed}" / "pretrain0").mkdir(parents=True)
        (tmp_path / "mdp_learned" / f"seed{seed}" / "pretrain0" / "done").write_text("x\n")
    loaded = []
    monkeypatch.setattr(real_study.utils, "load_checkpoint",
                        lambda path, required: loaded.append(path) or {"args": {"tau": 0.07}})
    monkeypatch.setattr(real_study.pretrain_eval, "own_task_classifier",
                        lambda state, source: (protocols.SOURCES.index(source), "mdp"))
    monkeypatch.setattr(real_study, "build_reader", lambda *a: None)
    monkeypatch.setattr(real_study, "MultiDataset", lambda *a: None)
    monkeypatch.setattr(real_study.pretrain_eval, "mining_confidence", lambda k, val, tau: (
        torch.tensor(confs[k]), torch.tensor(oks[k], dtype=torch.bool)))
    rec = real_study.choose_mine_threshold(tmp_path, tmp_path)
    assert loaded == [tmp_path / "mdp_learned" / "seed3" / "pretrain0" / "last.pth"]
    assert rec["chosen"] == pytest.approx(chosen) and rec["checkpoint"] == "mdp_learned seed3"
    assert rec["pixels"] == sum(map(len, confs))
    with pytest.raises(SystemExit, match="no finished mdp_learned"):
        real_study.choose_mine_threshold(tmp_path / "empty", tmp_path)


def test_g_row_waits_for_its_threshold(tmp_path: Path, monkeypatch) -> None:
    """Until `--choose mine` has fixed it, the row (g) is refused (one line), the others run; once
    fixed, its flags carry the number."""
    monkeypatch.setattr(protocols, "MINE_THRESHOLD", None)
    study = protocols.make_study("multi", "folder:camvid")
    assert "None" in study.rows["mdp_learned_unlabelled"][0][1]
    with pytest.raises(SystemExit):
        real_study.main(["--study", "multi", "--rows", "mdp_learned_unlabelled", "--work-dir",
                         str(tmp_path), "--results-dir", str(tmp_path), "--data-root",
                         str(tmp_path)])
    monkeypatch.setattr(protocols, "MINE_THRESHOLD", 0.55)
    flags = protocols.make_study("multi", "folder:camvid").rows["mdp_learned_unlabelled"][0][1]
    assert flags[flags.index("--mine-threshold") + 1] == "0.55"


def test_readme_glance_replaces_only_its_block(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- glance: results/multi/glance.md, by the runner -->\n| old |\n"
                      "<!-- /glance -->\nafter\n")
    real_study.readme_glance(readme, "| new |\n| rows |\n")
    assert readme.read_text() == ("intro\n<!-- glance: results/multi/glance.md, by the runner -->\n"
                                  "| new |\n| rows |\n<!-- /glance -->\nafter\n")
    plain = tmp_path / "plain.md"
    plain.write_text("no markers\n")
    real_study.readme_glance(plain, "| new |\n")
    assert plain.read_text() == "no markers\n"
