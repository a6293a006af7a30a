"""studies/reproduce.py --quick end to end on a subset of rows (the full --quick runs every row)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_reproduce_quick_subset(toy_root: Path, tmp_path: Path) -> None:
    cmd = [sys.executable, str(ROOT / "studies" / "reproduce.py"), "--quick",
           "--rows", "scratch", "sequential", "mdp_voc_ade", "--targets", "cityscapes",
           "--data-root", str(toy_root), "--work-dir", str(tmp_path / "work"),
           "--results-dir", str(tmp_path / "results")]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    table = json.loads((tmp_path / "results" / "toy_table_quick.json").read_text())
    # the table is the mean of the per-run results.json files it was built from
    for row in ("scratch", "sequential"):
        run = json.loads((tmp_path / "work" / row / "seed0" / "ft_cityscapes" /
                          "results.json").read_text())
        assert table["table"][row]["cityscapes"]["mean"] == run["mIoU"]
    # the claim "MDP beats no pretraining" is judged from those same two runs
    miou = {row: json.loads((tmp_path / "work" / row / "seed0" / "ft_cityscapes" /
                             "results.json").read_text())["mIoU"]
            for row in ("mdp_voc_ade", "scratch")}
    (check,) = [c for c in table["claims"] if c["claim"] == "MDP beats no pretraining"]
    assert check["diff"] == miou["mdp_voc_ade"] - miou["scratch"]
    expected = {1: "holds (1 seed)", -1: "reversed (1 seed)", 0: "tie"}
    assert check["verdict"] == expected[(check["diff"] > 0) - (check["diff"] < 0)]
    # sequential = three pretraining stages, each initialised from the previous one
    stages = sorted((tmp_path / "work" / "sequential" / "seed0").glob("pretrain*/last.pth"))
    assert len(stages) == 3
    md = (tmp_path / "results" / "toy_table_quick.md").read_text()
    assert "sequential COCO→ADE→VOC" in md and "scratch" in md
    assert (tmp_path / "results" / "toy_table_quick.png").stat().st_size > 0
    # resumable: a second call finds every job done and runs nothing
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and "$ " not in again.stdout
    # one row rerun (skipped): the others are kept, and the header says from which table
    one = cmd[:cmd.index("--rows") + 1] + ["scratch"] + cmd[cmd.index("--targets"):]
    kept = subprocess.run(one, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert kept.returncode == 0 and "$ " not in kept.stdout, kept.stderr[-3000:]
    first = json.loads((tmp_path / "results" / "toy_table_quick.json").read_text())
    assert first["header"].startswith("Toy reproduction: `python studies/reproduce.py --quick "
                                      "--rows scratch` at commit")
    assert ("Rows sequential, mdp_voc_ade: not rerun, kept from the previous "
            "toy_table_quick.json (`python studies/reproduce.py --quick --rows scratch sequential "
            "mdp_voc_ade` at commit") in first["header"]
    # rebuilt again: the kept rows still name the call that ran them, not the last rebuild
    subprocess.run(one, cwd=ROOT, capture_output=True, text=True, timeout=900, check=True)
    second = json.loads((tmp_path / "results" / "toy_table_quick.json").read_text())
    assert second["made"]["sequential"] == first["made"]["sequential"] != second["made"]["scratch"]
    assert "--rows scratch sequential mdp_voc_ade` at commit" in second["header"]


def test_rows_not_rerun_are_kept_from_the_previous_table(tmp_path: Path) -> None:
    from reproduce import keep_previous_rows

    res = lambda v: {"cityscapes": {"mIoU": v}, "voc": {"mIoU": v + 1}}  # noqa: E731
    prev = {"header": "Toy reproduction: `old command` at commit abc; pretraining ...",
            "runs": {"scratch": {"0": res(30.0), "1": res(32.0)},
                     "mdp_voc_ade": {"0": res(35.0)},
                     "ce": {"0": {"voc": {"mIoU": 1.0}}},  # lacks a target: not kept
                     "gone_row": {"0": res(1.0)}}}  # no longer in ROWS: not kept
    path = tmp_path / "toy_table.json"
    path.write_text(json.dumps(prev))
    runs = {"mdp_label_map": {0: res(40.0)}, "mdp_voc_ade": {0: res(99.0)}}  # rerun wins
    kept = keep_previous_rows(runs, path, ["cityscapes", "voc"])
    assert list(kept) == ["scratch"]
    # a json from before `made` existed: the kept row is credited to its header's first clause
    assert kept["scratch"] == "Toy reproduction: `old command` at commit abc"
    assert list(runs) == ["scratch", "mdp_voc_ade", "mdp_label_map"]  # ROWS order
    assert runs["scratch"] == {0: res(30.0), 1: res(32.0)}  # int seeds, values untouched
    assert runs["mdp_voc_ade"] == {0: res(99.0)}
    assert keep_previous_rows(runs, tmp_path / "missing.json", ["voc"]) == {}


def test_a_preempted_job_is_not_marked_done(tmp_path: Path, monkeypatch) -> None:
    """A job stopped by SIGTERM saves its checkpoint and exits 143; the runner must not write
    `done` (a session ended mid-job once left a 20-step probe marked done), and reruns it."""
    sys.path.insert(0, str(ROOT))
    import reproduce
    import utils
    from reproduce import run_once

    calls = []
    clock = iter([0.0, 1000.0, 5000.0, 7600.0])  # start and end of each of the job's two parts
    monkeypatch.setattr(reproduce, "time", SimpleNamespace(time=lambda: next(clock)))

    def preempted(argv: list[str]) -> None:
        calls.append(argv)
        (tmp_path / "last.pth").write_bytes(b"")  # what the SIGTERM handler saves
        utils.exit_preempted(tmp_path / "last.pth", 3, "auto")

    done = tmp_path / "done"
    with pytest.raises(SystemExit) as exit_info:
        run_once(done, preempted, ["--x"])
    assert exit_info.value.code == 128 + signal.SIGTERM
    assert not done.exists()
    assert calls == [["--x"]]
    run_once(done, lambda argv: calls.append(argv), ["--x"])  # the rerun continues and finishes
    assert done.exists() and calls[1] == ["--x", "--resume", str(tmp_path / "last.pth")]
    run_once(done, preempted, ["--x"])  # finished: skipped
    assert len(calls) == 2
    assert (tmp_path / "seconds").read_text() == "3600\n"  # both parts timed: 1000 s + 2600 s
    assert reproduce.job_hours(reproduce.job_record([done])) == "1.0 h over 1 jobs"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "done").write_text("abc\n")  # finished before jobs were timed
    both = [done, tmp_path / "other" / "done"]
    assert reproduce.job_hours(reproduce.job_record(both)) == "1.0 h over 1 jobs (1 not timed)"
    merged = reproduce.merge_records([reproduce.job_record(both), reproduce.job_record([done])])
    ran_at = done.read_text().strip()  # the commit run_once wrote
    assert merged == {"commits": {"abc": 1, ran_at: 2}, "seconds": 7200.0, "untimed": 1}
    assert (reproduce.job_commits(merged)
            == ", ".join(sorted(["abc (1 jobs)", f"{ran_at} (2 jobs)"])))


def test_a_killed_part_is_timed_to_its_last_checkpoint(tmp_path: Path, monkeypatch) -> None:
    """A session's end may SIGKILL a job: no `finally` runs, so the part leaves `started` behind.
    The rerun counts that part from its start to its last checkpoint's write, then its own."""
    import reproduce
    from reproduce import run_once

    clock = iter([10_000.0, 10_500.0])  # start and end of the rerun
    monkeypatch.setattr(reproduce, "time", SimpleNamespace(time=lambda: next(clock)))
    (tmp_path / "started").write_text("1000.0\n")  # the killed part began at t = 1000 s ...
    (tmp_path / "last.pth").write_bytes(b"")
    os.utime(tmp_path / "last.pth", (1720.0, 1720.0))  # ... and saved its last checkpoint at 1720 s
    calls = []

    def resumed(argv: list[str]) -> None:
        calls.append(argv)
        assert float((tmp_path / "started").read_text()) == 10_000.0  # this part's start, kept
    run_once(tmp_path / "done", resumed, ["--x"])
    assert calls == [["--x", "--resume", str(tmp_path / "last.pth")]]
    assert (tmp_path / "seconds").read_text() == "1220\n"  # 720 s killed part + 500 s rerun
    assert not (tmp_path / "started").exists() and (tmp_path / "done").exists()


def test_claim_verdicts_against_the_seed_spread_by_hand() -> None:
    """Each claim's verdict from the means and the summed population stds, worked by hand; a
    comparison in which either row has one seed has no spread to read it against."""
    from reproduce import check_claims, summarise

    runs = {"a": {0: {"t": {"mIoU": 30.0}}, 1: {"t": {"mIoU": 34.0}}},  # 32 ± 2
            "b": {0: {"t": {"mIoU": 27.0}}, 1: {"t": {"mIoU": 27.0}}},  # 27 ± 0
            "c": {0: {"t": {"mIoU": 31.0}}, 1: {"t": {"mIoU": 29.0}}},  # 30 ± 1
            "d": {0: {"t": {"mIoU": 20.0}}}}  # one seed
    claims = [("a > b", "a", "b", ["t"], ""), ("a > c", "a", "c", ["t"], ""),
              ("b > c", "b", "c", ["t"], ""), ("a > d", "a", "d", ["t"], ""),
              ("d > a", "d", "a", ["t"], ""), ("a > e", "a", "e", ["t"], "")]
    got = {c["claim"]: c for c in check_claims(summarise(runs, ["t"]), ["t"], claims)}
    assert {k: (c["diff"], c["noise"], c["verdict"]) for k, c in got.items()} == {
        "a > b": (5.0, 2.0, "holds"),  # 5 > 2 + 0
        "a > c": (2.0, 3.0, "within seed noise"),  # |2| < 2 + 1
        "b > c": (-3.0, 1.0, "reversed"),  # -3 < -(0 + 1)
        "a > d": (12.0, 2.0, "holds (1 seed)"),  # d has one seed: no spread, whichever side
        "d > a": (-12.0, 2.0, "reversed (1 seed)")}  # a row not in the table: no check
