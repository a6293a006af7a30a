"""tools/plot_log.py: curves of hand-made log.jsonl files in one PNG, and one-line errors."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

import plot_log  # noqa: E402
from utils import run_cli  # noqa: E402


def write_log(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def two_logs(tmp_path: Path) -> list[Path]:
    """A train_pretrain.py log (loss, con, csc, lr) and a finetune.py one (loss, lr, mIoU lines)."""
    pretrain = [dict(step=s, epoch=0, lr=1e-3 / s, labelled_img_per_s=10.0, loss=3.0 - s / 10,
                     con=2.9 - s / 10, csc=0.1) for s in range(1, 11)]
    finetune = [dict(step=s, epoch=0, loss=1.0 / s, lr=0.01) for s in range(1, 6)]
    finetune.append(dict(step=5, mIoU=40.0, aAcc=80.0))
    return [write_log(tmp_path / "mdp" / "log.jsonl", pretrain),
            write_log(tmp_path / "ft_mdp" / "log.jsonl", finetune)]


def test_plot_two_runs(tmp_path: Path, two_logs: list[Path], capsys) -> None:
    out = tmp_path / "curves.png"
    plot_log.main([*map(str, two_logs), "--out", str(out)])
    panels = ["loss", "con", "csc", "mIoU", "aAcc", "lr"]  # loss first, lr last
    assert f"panels: {', '.join(panels)}" in capsys.readouterr().out
    img = Image.open(out).convert("RGB")
    # 6 panels in 2 columns = 3 rows, under a legend of one row per run
    assert img.size == (2 * plot_log.PANEL_W, 8 + 2 * plot_log.LEGEND_ROW + 3 * plot_log.PANEL_H)
    colours = {c for _, c in img.getcolors(maxcolors=1 << 16)}
    assert plot_log.COLOURS[0] in colours and plot_log.COLOURS[1] in colours  # both runs drawn


def test_labels_and_one_panel(tmp_path: Path) -> None:
    log = write_log(tmp_path / "run" / "log.jsonl", [dict(step=s, loss=2.0) for s in (1, 2)])
    plot_log.main([str(log), "--labels", "flat", "--out", str(tmp_path / "one.png")])
    assert Image.open(tmp_path / "one.png").size == (plot_log.PANEL_W,
                                                     8 + plot_log.LEGEND_ROW + plot_log.PANEL_H)


def test_run_names_repeated_steps_unfinished_line(tmp_path: Path) -> None:
    a = write_log(tmp_path / "a" / "pretrain" / "log.jsonl", [dict(step=1, loss=1.0)])
    b = write_log(tmp_path / "b" / "pretrain" / "log.jsonl", [dict(step=1, loss=1.0)])
    assert plot_log.run_names([a, b]) == ["a/pretrain", "b/pretrain"]  # the folder name repeats
    with open(b, "a") as f:  # resumed from step 1 after logging step 2: the later record wins
        f.write('{"step": 2, "loss": 0.5}\n{"step": 2, "loss": 0.7}\n{"step": 1, "loss": 0.9}\n')
        f.write('{"step": 3, "lo')  # a running job mid-write: the partial line is left out
    assert plot_log.read_log(b) == {"loss": [(1, 0.9), (2, 0.7)]}


@pytest.mark.parametrize("ticks", [(0.0, 1.0), (1e-5, 1e-3), (-3.2, 7.9), (10, 40000)])
def test_nice_ticks_cover_the_range(ticks: tuple[float, float]) -> None:
    lo, hi = ticks
    t = plot_log.nice_ticks(lo, hi)
    assert t[0] <= lo and t[-1] >= hi and 3 <= len(t) <= 8


@pytest.mark.parametrize("kind, match", [
    ("missing", "log not found"),
    ("garbage", "log.jsonl:2 is not JSON"),
    ("no_step", "log.jsonl:1 has no numeric 'step'"),
    ("empty", "no logged values"),
    ("labels", "1 --labels for 2 logs"),
    ("not_png", "must name a .png"),
])
def test_bad_input_one_line_error(tmp_path: Path, two_logs: list[Path], capsys, kind: str,
                                  match: str) -> None:
    log = tmp_path / "bad" / "log.jsonl"
    extra, out = [], tmp_path / "out.png"
    if kind == "garbage":
        log.parent.mkdir()
        log.write_text('{"step": 1, "loss": 2.0}\nnot json at all\n')
    elif kind == "no_step":
        write_log(log, [{"loss": 2.0}])
    elif kind == "empty":
        write_log(log, [])
    elif kind == "labels":
        log, extra = two_logs[1], ["--labels", "only_one"]
    elif kind == "not_png":
        log, out = two_logs[1], tmp_path / "out.jpg"
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: plot_log.main([str(two_logs[0]), str(log), "--out", str(out), *extra]))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error:"), err
    assert len(err.strip().splitlines()) == 1, err
    assert match in err
    assert not out.exists()
