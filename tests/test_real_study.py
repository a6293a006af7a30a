"""scripts/real_study.py --table-only: the table, claims and plots from finished jobs, checked
against numbers computed by hand here (no training: the jobs' results are written by the test)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import real_study  # noqa: E402


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
        for name, v in zip(real_study.EVALS, vals):
            fake_job(work, row, seed, name, v)
    fake_job(work, "random", 1, "linear probe", 99.0)
    monkeypatch.setattr(sys, "argv", ["real_study.py", "--table-only"])
    real_study.main(["--table-only", "--seeds", "2", "--rows", "random", "ce", "mdp",
                     "--work-dir", str(work), "--results-dir", str(results)])
    data = json.loads((results / "real_table.json").read_text())
    for row in ("mdp", "ce"):
        for k, name in enumerate(real_study.EVALS):
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
    assert "abc1234 (16 jobs)" in text and "--table-only" not in text
    assert "fine-tuning DeepLabV3 120 steps" in text and "linear probe 200 steps" in text
    assert "| MDP | 42.00 ± 2.00 | 32.00 ± 2.00 | 51.00 ± 1.00 |" in text
    assert (results / "real_table.png").stat().st_size > 1000


def test_no_finished_job_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="no finished row"):
        real_study.main(["--table-only", "--work-dir", str(tmp_path), "--results-dir",
                         str(tmp_path / "r")])


def test_own_task_diagnostic_in_the_table(tmp_path: Path, monkeypatch) -> None:
    work, results = tmp_path / "work", tmp_path / "results"
    for name in real_study.EVALS:
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
