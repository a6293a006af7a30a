"""train_pretrain.py run as a user runs it: subprocesses on the toy data (tiny budget)."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--arch", "resnet14", "--crop-size", "32", "32", "--base-size", "64", "32",
        "--batch-size", "4", "--optimizer", "adamw", "--lr", "1e-3", "--workers", "0",
        "--log-interval", "1", "--bank-size", "8", "--embed-dim", "16"]


def run(args: list[str], torchrun: int = 0, **kw) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={torchrun}"] if torchrun else [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(launcher + [str(ROOT / "train_pretrain.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600, **kw)


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def assert_resume_equals(r: subprocess.CompletedProcess, out: Path, ref: Path, resumed_at: int,
                         total: int) -> dict:
    """The resumed run `r` in `out` said where it resumed and ends bit-for-bit equal to the
    uninterrupted run in `ref` (weights and bank). Returns the reference checkpoint."""
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {out / 'last.pth'} at step {resumed_at}" in r.stdout
    a, b = load(ref / "last.pth"), load(out / "last.pth")
    assert a["step"] == b["step"] == total
    assert_same_state(a["model"], b["model"])
    assert_same_state(a["bank"], b["bank"])
    return a


def test_two_process_torchrun(toy_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    r = run(["--datasets", "voc", "ade20k", "--data-root", str(toy_root), "--iters", "3",
             "--out-dir", str(out), *TINY], torchrun=2)
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = load(out / "last.pth")
    assert ckpt["step"] == 3 and ckpt["task"] == "pretrain"
    # both ranks' hard-labelled pixels reached the bank: every class it holds was seen, and the
    # label space is VOC (21) + ADE20K (150)
    assert ckpt["bank"]["count"].shape == (171,) and ckpt["bank"]["count"].sum() > 0
    assert ckpt["label_space"]["names"] == ["voc", "ade20k"]
    lines = (out / "log.jsonl").read_text().splitlines()
    assert len(lines) == 3  # rank 0 only writes the log
    assert (out / "config.json").exists()

    # the checkpoint feeds the downstream tools: fine-tuning loads every backbone tensor ...
    ft = subprocess.run([sys.executable, str(ROOT / "finetune.py"), "--ckpt", str(out / "last.pth"),
                         "--dataset", "cityscapes", "--data-root", str(toy_root), "--iters", "2",
                         "--crop-size", "32", "64", "--base-size", "96", "48", "--batch-size", "2",
                         "--workers", "0", "--num-overlays", "0", "--out-dir",
                         str(tmp_path / "ft")],
                        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert ft.returncode == 0, ft.stderr[-3000:]
    n_backbone = len([k for k in ckpt["model"] if k.startswith("backbone.")])
    assert f"loaded {n_backbone}/{n_backbone} tensors" in ft.stdout
    # ... and the export is a torchvision ResNet state_dict equal to the trained backbone
    export = tmp_path / "r14.pth"
    ex = subprocess.run([sys.executable, str(ROOT / "mdp.py"), "export", "--ckpt",
                         str(out / "last.pth"), "--out", str(export)], cwd=ROOT,
                        capture_output=True, text=True, timeout=600)
    assert ex.returncode == 0, ex.stderr
    sd = torch.load(export, weights_only=True)
    assert sd.keys() == {k[len("backbone."):] for k in ckpt["model"] if k.startswith("backbone.")}
    for k, v in sd.items():
        assert torch.equal(v, ckpt["model"]["backbone." + k]), k


def test_sigterm_then_resume_is_bit_for_bit(toy_root: Path, tmp_path: Path) -> None:
    common = ["--datasets", "voc", "ade20k", "--data-root", str(toy_root), "--iters", "8", *TINY]
    ref = tmp_path / "ref"
    assert run(common + ["--out-dir", str(ref)]).returncode == 0

    out = tmp_path / "interrupted"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_pretrain.py"), *common,
                             "--out-dir", str(out)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    log = out / "log.jsonl"
    deadline = time.time() + 300
    while not (log.exists() and len(log.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.time() < deadline, "run ended before it was interrupted"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]  # not "finished"
    stopped_at = load(out / "last.pth")["step"]
    assert 2 <= stopped_at < 8, stdout

    assert_resume_equals(run(common + ["--out-dir", str(out), "--resume", "auto"]), out, ref,
                         stopped_at, 8)


def one_error_line(r: subprocess.CompletedProcess, *fragments: str) -> None:
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr
    # minus tqdm bars, and what a closed nested bar leaves: blanks and a cursor-up escape
    lines = [l for l in r.stderr.splitlines()
             if re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", l).strip() and "%|" not in l]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert r.stderr.rstrip().endswith(lines[0])  # the last thing the user sees
    for f in fragments:
        assert f in lines[0], lines[0]


def test_bad_inputs_fail_with_one_line(toy_root: Path, tmp_path: Path) -> None:
    base = ["--data-root", str(toy_root), "--iters", "1", "--out-dir", str(tmp_path / "x"), *TINY]
    one_error_line(run(["--datasets", "voc", "pascal", *base]), "pascal", "voc")
    one_error_line(run(["--datasets", "voc", *base[:1], str(tmp_path / "nowhere"), *base[2:]]),
                   "nowhere")
    one_error_line(run(["--datasets", "voc", "--tau", "-1", *base]), "--tau")
    one_error_line(run(["--datasets", "voc", "--label-purity", "1.5", *base]), "--label-purity")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    one_error_line(run(["--datasets", "voc", "--resume", str(garbage), *base]), str(garbage))
    foreign = tmp_path / "foreign.pth"
    torch.save({"weights": torch.zeros(1)}, foreign)
    one_error_line(run(["--datasets", "voc", "--resume", str(foreign), *base]), str(foreign))


def test_resume_refuses_a_changed_training_flag(toy_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    base = ["--datasets", "voc", "--data-root", str(toy_root), "--out-dir", str(out), *TINY,
            "--unlabelled", "coco_stuff", "--mine-warmup", "1"]
    r = run(base + ["--iters", "1"])
    assert r.returncode == 0, r.stderr[-3000:]
    last = str(out / "last.pth")
    no_unlabelled = base[:base.index("--unlabelled")]
    for changed, says in ((no_unlabelled, "--unlabelled coco_stuff, not (unset)"),
                          (base + ["--unlabelled", "voc"], "--unlabelled coco_stuff, not voc"),
                          (base + ["--mine-threshold", "0.5"], "--mine-threshold 0.9, not 0.5"),
                          (base + ["--learn-tau"], "--learn-tau False, not True")):
        one_error_line(run(changed + ["--iters", "2", "--resume", "auto"]), last, says)
    # where and how it runs may change, and it may run for longer
    r = run(base + ["--iters", "2", "--resume", "auto", "--workers", "1", "--log-interval", "2",
                    "--save-interval", "5", "--skip-data-check"])
    assert r.returncode == 0 and f"resumed from {last} at step 1" in r.stdout, r.stderr[-3000:]
    assert load(out / "last.pth")["step"] == 2
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [rec["step"] for rec in log] == [1, 2] and "labelled_img_per_s" in log[-1]


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(toy_root: Path,
                                                              tmp_path: Path) -> None:
    out = tmp_path / "nan"
    # a constant learning rate this large overflows the weights within a few steps
    r = run(["--datasets", "voc", "--data-root", str(toy_root), "--out-dir", str(out), *TINY,
             "--iters", "8", "--save-interval", "1", "--method", "ce", "--optimizer", "sgd",
             "--lr", "1e30", "--schedule", "cosine", "--min-lr", "1e30"])
    one_error_line(r, "non-finite", str(out / "last.pth"))
    kept = load(out / "last.pth")
    assert 1 <= kept["step"] < 8
    for k, v in kept["model"].items():
        assert torch.isfinite(v.float()).all(), k


def test_show_batch_writes_png(toy_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "show"
    r = run(["--datasets", "voc", "ade20k", "--data-root", str(toy_root), "--show-batch", "4",
             "--out-dir", str(out), *TINY])
    assert r.returncode == 0, r.stderr[-3000:]
    from PIL import Image
    img = Image.open(out / "batch.png")
    assert img.size[0] > 2 * 32 and img.size[1] > 4 * 32  # 2 columns x 4 rows of 32 px tiles
    assert not (out / "last.pth").exists()  # --show-batch does not train
