"""Training curves of one or more log.jsonl files (train_pretrain.py, finetune.py) in one PNG.

    python tools/plot_log.py runs/demo/pretrain/log.jsonl --out results/demo/demo_curves.png
    python tools/plot_log.py runs/a/log.jsonl runs/b/log.jsonl --labels mdp ce --out curves.png

One panel per logged quantity against step: the loss, each loss part present (con, csc, ...), the
evaluation metrics of finetune.py logs (mIoU, aAcc), the learning rate last. Runs are overlaid, one
colour each, named by their log's folder (or --labels). Drawn with PIL: no plotting library needed.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils import ArgumentParser, run_cli  # noqa: E402  (one-line errors)

NOT_CURVES = {"step", "epoch", "labelled_img_per_s", "img_per_s"}  # x axis, bookkeeping, throughput
COLOURS = [(66, 133, 244), (219, 68, 55), (15, 157, 88), (244, 160, 0), (171, 71, 188),
           (0, 172, 193), (120, 120, 120)]
PANEL_W, PANEL_H, COLS, LEGEND_ROW = 420, 260, 2, 16
MARGIN_L, MARGIN_R, MARGIN_T, MARGIN_B = 62, 14, 24, 34  # room for tick labels and the title

Series = dict[str, list[tuple[float, float]]]  # field -> [(step, value), ...]


def read_log(path: Path) -> Series:
    """Numeric fields of a log.jsonl by name, sorted by step. A resumed run appends to its log and
    may log a step again: the later record wins. A last line without its newline is a write in
    progress (the run is still going) and is left out; any other unreadable line is an error."""
    if not path.is_file():
        raise FileNotFoundError(f"log not found: {path}")
    text = path.read_text(errors="replace")
    lines = text.splitlines()
    if lines and not text.endswith("\n"):
        try:
            json.loads(lines[-1])
        except ValueError:
            lines.pop()
    by_step: dict[str, dict[float, float]] = {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise ValueError(f"{path}:{n} is not JSON: expected a log.jsonl of train_pretrain.py "
                             f"or finetune.py") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), (int, float)):
            raise ValueError(f"{path}:{n} has no numeric 'step': not a training log")
        for k, v in record.items():
            # bool is an int in Python; a NaN / inf would wreck the axis range
            if k not in NOT_CURVES and isinstance(v, (int, float)) and not isinstance(v, bool) \
                    and math.isfinite(v):
                by_step.setdefault(k, {})[record["step"]] = float(v)
    if not by_step:
        raise ValueError(f"{path}: no logged values to plot")
    return {k: sorted(points.items()) for k, points in by_step.items()}


def panel_order(runs: list[Series]) -> list[str]:
    """loss first, lr last, everything else in the order it first appears."""
    fields = list(dict.fromkeys(k for series in runs for k in series))
    head = [k for k in ("loss",) if k in fields]
    tail = [k for k in ("lr",) if k in fields]
    return head + [k for k in fields if k not in head + tail] + tail


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n round values (steps of 1, 2 or 5 x 10^k) covering [lo, hi]."""
    raw = (hi - lo) / max(n - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step) * step
    return [first + i * step for i in range(int(math.ceil((hi - first) / step)) + 1)]


def value_range(values: list[float]) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    if hi == lo:  # a flat curve (or one point) still needs a non-empty axis
        pad = abs(lo) * 0.1 or 1.0
        return lo - pad, hi + pad
    return lo, hi


def draw_panel(draw: ImageDraw.ImageDraw, x0: int, y0: int, field: str,
               curves: list[tuple[list[tuple[float, float]], tuple[int, int, int]]]) -> None:
    """One quantity against step, the curves of every run that logged it, with ticks and grid."""
    left, right = x0 + MARGIN_L, x0 + PANEL_W - MARGIN_R
    top, bottom = y0 + MARGIN_T, y0 + PANEL_H - MARGIN_B
    points = [p for pts, _ in curves for p in pts]
    xticks = nice_ticks(*value_range([s for s, _ in points]))
    yticks = nice_ticks(*value_range([v for _, v in points]))
    (xa, xb), (ya, yb) = (xticks[0], xticks[-1]), (yticks[0], yticks[-1])
    px = lambda s: left + (s - xa) / (xb - xa) * (right - left)  # noqa: E731
    py = lambda v: bottom - (v - ya) / (yb - ya) * (bottom - top)  # noqa: E731
    for t in yticks:
        draw.line([(left, py(t)), (right, py(t))], fill=(220, 220, 220))
        label = f"{t:.3g}"
        draw.text((left - 5 - draw.textlength(label), py(t) - 6), label, fill="black")
    for t in xticks:
        draw.line([(px(t), top), (px(t), bottom)], fill=(235, 235, 235))
        label = f"{t:g}"
        draw.text((px(t) - draw.textlength(label) / 2, bottom + 4), label, fill="black")
    draw.rectangle([left, top, right, bottom], outline="black")
    draw.text((left, y0 + 6), field, fill="black")
    draw.text((right - 24, bottom + 18), "step", fill=(90, 90, 90))
    for pts, colour in curves:
        xy = [(px(s), py(v)) for s, v in pts]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=2)
        for x, y in xy if len(xy) <= 20 else []:  # sparse logs (evaluations): mark each point
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)


def plot(runs: list[Series], labels: list[str], out: Path) -> tuple[int, int]:
    """Writes the PNG; returns its (width, height): COLS panels a row under a legend row per run."""
    fields = panel_order(runs)
    cols = min(COLS, len(fields))
    rows = math.ceil(len(fields) / cols)
    legend = 8 + LEGEND_ROW * len(runs)
    img = Image.new("RGB", (cols * PANEL_W, legend + rows * PANEL_H), "white")
    draw = ImageDraw.Draw(img)
    for i, label in enumerate(labels):
        y = 6 + i * LEGEND_ROW
        colour = COLOURS[i % len(COLOURS)]
        draw.line([(MARGIN_L, y + 6), (MARGIN_L + 24, y + 6)], fill=colour, width=3)
        draw.text((MARGIN_L + 30, y), label, fill="black")
    for j, field in enumerate(fields):
        curves = [(series[field], COLOURS[i % len(COLOURS)])
                  for i, series in enumerate(runs) if field in series]
        draw_panel(draw, (j % cols) * PANEL_W, legend + (j // cols) * PANEL_H, field, curves)
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out)
    return img.size


def run_names(paths: list[Path]) -> list[str]:
    """The log's folder name, e.g. "ft_mdp"; its last two folders where that name repeats."""
    names = [p.resolve().parent.name for p in paths]
    if len(set(names)) < len(names):
        names = ["/".join(p.resolve().parent.parts[-2:]) for p in paths]
    return names


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("logs", nargs="+", type=Path, help="log.jsonl files, one per run")
    p.add_argument("--out", required=True, type=Path, help="the PNG to write")
    p.add_argument("--labels", nargs="+", help="one name per log (default: the log's folder)")
    args = p.parse_args(argv)
    if args.labels and len(args.labels) != len(args.logs):
        p.error(f"{len(args.labels)} --labels for {len(args.logs)} logs")
    if args.out.suffix.lower() != ".png":
        p.error(f"--out must name a .png file, got {args.out}")
    runs = [read_log(path) for path in args.logs]
    w, h = plot(runs, args.labels or run_names(args.logs), args.out)
    print(f"wrote {args.out} ({w}x{h}, panels: {', '.join(panel_order(runs))})")


if __name__ == "__main__":
    run_cli(main)
