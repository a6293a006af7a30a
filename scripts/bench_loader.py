"""Loader throughput (not a test): augmented training samples per second per DataLoader worker.

One worker = one process on one thread, so the figures are measured in this process with
torch.set_num_threads(1) (what DataLoader workers use). Per setting:
  read     the reader alone (JPEG/PNG decode + label checks),
  train    read + M9 train pipeline (rescale 0.5-2.0, crop with padding, flip, jitter, normalise)
           + global label mapping (M1), i.e. one MultiDataset item.
Data: the toy VOC + ADE20K sets (~128 px) and full-size 500x375 VOC-layout JPEGs, both written by
make_toy into a temporary directory. Writes results/bench_loader.md.

    python scripts/bench_loader.py [--samples 150]
"""
import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import datasets as D  # noqa: E402


def rate(fn, n: int) -> float:
    """Items per second of fn(i) over n items, after a few warm-up calls."""
    for i in range(3):
        fn(i)
    t0 = time.perf_counter()
    for i in range(n):
        fn(i)
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=150, help="items timed per setting")
    ap.add_argument("--out", default=str(ROOT / "results" / "bench_loader.md"))
    args = ap.parse_args()
    torch.set_num_threads(1)  # one DataLoader worker
    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        toy = D.make_toy(Path(tmp) / "toy", n_train=64, n_val=1, datasets=("voc", "ade20k"))
        full = D.make_toy(Path(tmp) / "full", n_train=32, n_val=1, size=500, datasets=("voc",))
        settings = [  # (label, data root, datasets, base size, crop (h, w))
            ("toy VOC+ADE20K (~128 px)", toy, ["voc", "ade20k"], (256, 128), (128, 128)),
            ("full-size 500x375 JPEG, VOC recipe", full, ["voc"], (2048, 512), (512, 512)),
        ]
        for label, root, names, base, crop in settings:
            ds = D.build_multidataset(names, root, "train", D.train_transform(base, crop))
            n = len(ds)
            read = rate(lambda i: ds.readers[0][i % ds.sizes[0]], args.samples)
            train = rate(lambda i: ds[i % n], args.samples)
            rows.append((label, f"{base[0]}x{base[1]}", f"{crop[0]}x{crop[1]}", read, train))
    lines = ["| data | base scale | crop | read only (samples/s) | augmented train sample (samples/s) | ms / sample |",
             "|---|---|---|---:|---:|---:|"]
    lines += [f"| {d} | {b} | {c} | {r:.0f} | {t:.0f} | {1000 / t:.1f} |" for d, b, c, r, t in rows]
    table = "\n".join(lines)
    print(table)
    note = (f"Per DataLoader worker (1 process, 1 thread), {args.samples} samples per setting; "
            f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores), torch {torch.__version__}, "
            f"`python scripts/bench_loader.py`.\n")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("# Loader throughput\n\n" + note + "\n" + table + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
