"""The data check before training (utils.check_data), as a user meets it: a garbage image or a mask
value that is no class id, in a split the run reads (train, val, the unlabelled images), ends
train_pretrain.py and finetune.py before their first step with exit code 2 and one line naming the
file, the last thing printed; --skip-data-check gives the old behaviour (the run starts and stops
when a step reads the file). Broken copies of a few toy VOC files in the folder:PATH layout."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_train_pretrain import ROOT, TINY, one_error_line
from test_train_pretrain import run as pretrain

from datasets import VOC_CLASSES, build_reader

FT = ["--ckpt", "none", "--arch", "resnet14", "--crop-size", "32", "32", "--base-size", "64", "48",
      "--batch-size", "2", "--iters", "1", "--eval-interval", "1", "--log-interval", "1",
      "--workers", "0", "--num-overlays", "0"]


def finetune(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "finetune.py"), *args], cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=600)


def folder_set(toy_root: Path, root: Path) -> Path:
    """The first 4 train / 2 val toy VOC images and masks as a folder:PATH data set (a train split
    of exactly one batch of 4: --iters 1 reads every image)."""
    for split, n in (("train", 4), ("val", 2)):
        for sub in ("images", "masks"):
            (root / sub / split).mkdir(parents=True)
        for img, lbl in build_reader("voc", toy_root, split).files[:n]:
            shutil.copy(img, root / "images" / split / img.name)
            shutil.copy(lbl, root / "masks" / split / lbl.name)
    (root / "classes.txt").write_text("\n".join(VOC_CLASSES) + "\n")
    return root


def break_file(root: Path, split: str, what: str) -> tuple[Path, str]:
    """Spoils the second file of `split`: garbage bytes for its image, or raw value 37 in one pixel
    of its mask (21 classes: ids 0-20, 255 = ignore). Returns the file and what the error says."""
    if what == "image":
        path = sorted((root / "images" / split).glob("*.jpg"))[1]
        path.write_bytes(b"not a jpeg")
        return path, "unreadable image"
    path = sorted((root / "masks" / split).glob("*.png"))[1]
    mask = Image.open(path)
    ids = np.array(mask)
    ids[0, 0] = 37
    spoilt = Image.fromarray(ids, mode=mask.mode)
    if mask.mode == "P":
        spoilt.putpalette(mask.getpalette())
    spoilt.save(path)
    return path, f"mask value 37 is not a class id of {root.name} (0-20) or the ignore value 255"


def stopped_before_step_one(r: subprocess.CompletedProcess, out: Path, *words: str) -> None:
    assert r.returncode == 2, r.stderr[-3000:]
    one_error_line(r, *words)  # one line, no traceback, no progress bar after it
    assert not (out / "config.json").exists() and not (out / "log.jsonl").exists()


@pytest.mark.parametrize("split,what", [("train", "image"), ("train", "mask"),
                                        ("unlabelled", "image")])
def test_pretrain_stops_on_a_bad_file(toy_root: Path, tmp_path: Path, split: str,
                                      what: str) -> None:
    data = folder_set(toy_root, tmp_path / "set")
    extra = []
    if split == "unlabelled":  # the 2 val images, read as unlabelled ones (M10), 2 a step
        extra = ["--unlabelled", f"images:{data / 'images' / 'val'}", "--mine-ratio", "0.5"]
        split = "val"
    bad, says = break_file(data, split, what)
    out = tmp_path / "out"
    r = pretrain(["--datasets", f"folder:{data}", "--data-root", str(tmp_path), "--iters", "1",
                  "--out-dir", str(out), *TINY, *extra])
    stopped_before_step_one(r, out, str(bad), says)
    assert "steps" not in r.stdout  # the run's summary line comes after the check


@pytest.mark.parametrize("split,what", [("train", "image"), ("train", "mask"), ("val", "image"),
                                        ("val", "mask")])
def test_finetune_stops_on_a_bad_file(toy_root: Path, tmp_path: Path, split: str,
                                      what: str) -> None:
    data = folder_set(toy_root, tmp_path / "set")
    bad, says = break_file(data, split, what)
    out = tmp_path / "out"
    r = finetune(["--dataset", f"folder:{data}", "--data-root", str(tmp_path), *FT,
                  "--out-dir", str(out)])
    stopped_before_step_one(r, out, str(bad), says)


def test_skip_data_check_stops_only_when_a_step_reads_the_file(toy_root: Path,
                                                                tmp_path: Path) -> None:
    data = folder_set(toy_root, tmp_path / "set")
    bad, says = break_file(data, "train", "mask")
    out = tmp_path / "pre"
    r = pretrain(["--datasets", f"folder:{data}", "--data-root", str(tmp_path), "--iters", "1",
                  "--out-dir", str(out), *TINY, "--skip-data-check"])
    assert r.returncode == 2 and "1 steps" in r.stdout  # the run started ...
    one_error_line(r, str(bad), says)  # ... and its first step read the file
    assert (out / "config.json").exists() and not (out / "log.jsonl").read_text()

    # a bad val image: fine-tuning trains its step, and the evaluation after it stops the run
    data = folder_set(toy_root, tmp_path / "set2")
    bad, says = break_file(data, "val", "image")
    out = tmp_path / "ft"
    r = finetune(["--dataset", f"folder:{data}", "--data-root", str(tmp_path), *FT,
                  "--out-dir", str(out), "--skip-data-check"])
    assert r.returncode == 2
    one_error_line(r, str(bad), says)  # both bars (train, eval) closed before the error line
    assert json.loads((out / "log.jsonl").read_text().splitlines()[0])["step"] == 1


def test_torchrun_every_rank_stops(toy_root: Path, tmp_path: Path) -> None:
    # the spoilt second image is rank 1's to read (rank r reads items r, r + 2, ...): rank 0
    # learns of it, says it once, and both ranks exit with code 2, none left waiting
    data = folder_set(toy_root, tmp_path / "set")
    bad, says = break_file(data, "train", "image")
    out = tmp_path / "out"
    r = pretrain(["--datasets", f"folder:{data}", "--data-root", str(tmp_path), "--iters", "1",
                  "--out-dir", str(out), *TINY, "--batch-size", "2"], torchrun=2)
    errors = [l for l in r.stderr.splitlines() if l.startswith("error: ")]
    assert r.returncode != 0 and errors == [f"error: {bad}: {says} (UnidentifiedImageError)"], \
        r.stderr[-3000:]
    assert "exitcode: 2" in r.stderr and not (out / "config.json").exists()
