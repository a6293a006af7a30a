"""studies/m4_mechanism.py --table-only: the table and the reading rule's verdicts from finished
(row, seed)s, checked against values computed by hand here (no training: the test writes what the
jobs would have written)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
import m4_mechanism  # noqa: E402
import real_study  # noqa: E402


def fake_row(work: Path, row: str, seed: int, own: float, cos: float, probe: float) -> None:
    """The files a finished (row, seed) leaves: pretraining's done and log, the linear probe's
    results, the cached diagnosis."""
    out = work / row / f"seed{seed}"
    (out / "pretrain0").mkdir(parents=True)
    (out / "pretrain0" / "done").write_text("abc1234\n")
    (out / "pretrain0" / "log.jsonl").write_text("".join(
        json.dumps({"step": s, "proto_cos": cos + s / 1000}) + "\n" for s in (25, 100, 300)))
    ft = real_study.eval_dir(out, "linear probe")
    ft.mkdir(parents=True)
    (ft / "results.json").write_text(json.dumps({"mIoU": probe, "IoU": {}}))
    (ft / "done").write_text("abc1234\n")
    stats = {"class_mean_cos_mean": cos, "prototype_cos_mean": cos - 0.1,
             "embedding_effective_rank": 3.0 + seed, "probe_embedding": 20.0,
             "probe_backbone": 25.0}
    (out / "diagnosis.json").write_text(json.dumps({"mIoU": own, "IoU": {}, "stats": stats}))


def test_table_and_verdicts_from_finished_rows(tmp_path: Path, monkeypatch) -> None:
    work, results = tmp_path / "work", tmp_path / "results"
    runs = {("mdp", 0): (20.0, 0.80, 18.0), ("mdp", 1): (22.0, 0.84, 19.0),
            ("mdp_learned", 0): (26.0, 0.60, 21.0), ("mdp_learned", 1): (25.0, 0.70, 20.0),
            ("mdp_anchors", 0): (30.0, 0.50, 20.0), ("mdp_anchors", 1): (23.0, 0.50, 20.0),
            ("mdp_learn_tau", 0): (40.0, 0.10, 30.0)}  # seed 1 unfinished
    for (row, seed), vals in runs.items():
        fake_row(work, row, seed, *vals)
    monkeypatch.setattr(sys, "argv", ["m4_mechanism.py"])
    m4_mechanism.main(["--table-only", "--rows", "mdp", "mdp_learned", "mdp_anchors",
                       "mdp_learn_tau", "mdp_proto_grad", "--work-dir", str(work),
                       "--results-dir", str(results)])
    text = (results / "m4_mechanism.md").read_text()
    # cells: mean ± std (per-seed values), from the diagnosis and the probe
    own = np.array([20.0, 22.0])
    assert f"| {own.mean():.2f} ± {own.std():.2f} (20.00, 22.00) |" in text
    assert "| 18.50 ± 0.50 (18.00, 19.00) |" in text  # MDP's linear probe
    assert "| 3.5 ± 0.5 (3.0, 4.0) |" in text  # effective rank at one decimal
    # the logged proto_cos at steps 25 / 100 / 300, averaged over MDP's seeds
    curve = [np.mean([0.80 + s / 1000, 0.84 + s / 1000]) for s in (25, 100, 300)]
    assert "| " + " / ".join(f"{c:.2f}" for c in curve) + " |" in text
    assert "mdp_proto_grad" not in text  # no finished seed: no row
    # the rule: +3 own task and -0.1 class-mean cosine against MDP at both seeds
    assert "| mdp_learned | +6.00, +3.00 | -0.200, -0.140 | yes |" in text
    assert "| mdp_anchors | +10.00, +1.00 | -0.300, -0.340 | no |" in text  # seed 1: +1 < 3
    assert "| mdp_learn_tau | +20.00 | -0.700 | pending |" in text
    assert "abc1234 (14 jobs)" in text and "--table-only" not in text and str(work) not in text
    data = json.loads((results / "m4_mechanism.json").read_text())
    assert data["runs"]["mdp_learned"]["1"]["own-task mIoU"] == 25.0
    assert data["runs"]["mdp"]["0"]["linear probe"] == 18.0


def test_no_finished_row_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="no finished row"):
        m4_mechanism.main(["--table-only", "--work-dir", str(tmp_path), "--results-dir",
                           str(tmp_path / "r")])
