"""A checkpoint write that fails (disk full, no permission, a folder in the way), also on SIGTERM
and under DDP, and an --out-dir that names a file end in one `error: ...` line naming the file and
the cause, exit code 2; the temp file goes, the previous checkpoint stays as it was."""
from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import utils  # noqa: E402
from gloo import free_port  # noqa: E402

REAL_SAVE = torch.save
GOOD = {"model": {"w": torch.arange(4.0)}, "step": 1}  # the previous checkpoint
NEW = {"model": {"w": torch.ones(100_000)}, "step": 2}  # 400 kB: the write that fails
ENOSPC = os.strerror(errno.ENOSPC)  # "No space left on device"


def half_then(exc: BaseException) -> Callable:
    """A torch.save that writes half the file (to a path or a file object), then fails."""
    def save(obj, f, *args, **kw) -> None:
        buf = io.BytesIO()
        REAL_SAVE(obj, buf)
        half = buf.getvalue()[: len(buf.getvalue()) // 2]
        if isinstance(f, (str, os.PathLike)):
            Path(f).write_bytes(half)
        else:
            f.write(half)
        raise exc
    return save


def one_error_line(stderr: str, *fragments: str) -> None:
    assert "Traceback" not in stderr, stderr
    # minus tqdm bars, and what a closed bar leaves: blanks and a cursor-up escape
    lines = [l for l in stderr.splitlines()
             if re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", l).strip() and "%|" not in l]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert stderr.rstrip().endswith(lines[0])  # the last thing the user sees
    for f in fragments:
        assert f in lines[0], (f, lines[0])


def assert_kept(folder: Path, before: bytes) -> None:
    """Only last.pth in `folder` (no temp file), byte-equal to `before` and loading as GOOD."""
    assert sorted(p.name for p in folder.iterdir()) == ["last.pth"]
    assert (folder / "last.pth").read_bytes() == before
    kept = torch.load(folder / "last.pth", weights_only=False)
    assert kept["step"] == 1 and torch.equal(kept["model"]["w"], GOOD["model"]["w"])


def save_via_cli(state: dict, path: Path, capsys) -> str:
    """save_checkpoint as a script runs it (under run_cli): must exit 2; returns stderr."""
    with pytest.raises(SystemExit) as e:
        utils.run_cli(lambda: utils.save_checkpoint(state, path))
    assert e.value.code == 2
    return capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# in process: utils.save_checkpoint / atomic_save


@pytest.mark.parametrize("exc, cause", [
    (RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed "
                  f"writing file data/0: {ENOSPC}"), ENOSPC),
    (OSError(errno.ENOSPC, ENOSPC), ENOSPC),
    (PermissionError(errno.EACCES, os.strerror(errno.EACCES)), os.strerror(errno.EACCES)),
], ids=["torch-runtime-error", "enospc", "permission"])
def test_failed_write_is_one_line_and_keeps_the_previous(exc: BaseException, cause: str,
                                                         tmp_path: Path, monkeypatch,
                                                         capsys) -> None:
    path = tmp_path / "last.pth"
    utils.save_checkpoint(GOOD, path)
    before = path.read_bytes()
    monkeypatch.setattr(torch, "save", half_then(exc))
    one_error_line(save_via_cli(NEW, path, capsys), str(path), cause)
    assert_kept(tmp_path, before)


def test_real_writer_failure_names_the_os_cause(tmp_path: Path, capsys) -> None:
    """torch's own writer, failing for real: files of this process stop at 64 kB (RLIMIT_FSIZE;
    Python ignores SIGXFSZ, so a write past it is OSError EFBIG), which torch reports only as
    'unexpected pos ...'."""
    path = tmp_path / "last.pth"
    utils.save_checkpoint(GOOD, path)
    before = path.read_bytes()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
    try:
        err = save_via_cli(NEW, path, capsys)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    one_error_line(err, str(path), os.strerror(errno.EFBIG))
    assert_kept(tmp_path, before)


def test_folder_in_the_way(tmp_path: Path, capsys) -> None:
    # a non-empty folder named last.pth: the rename fails, the temp file must not stay
    path = tmp_path / "last.pth"
    (path / "x").mkdir(parents=True)
    one_error_line(save_via_cli(GOOD, path, capsys), str(path), os.strerror(errno.EISDIR))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pth"]
    # a file where the checkpoint's folder should be
    (tmp_path / "file").write_text("x")
    one_error_line(save_via_cli(GOOD, tmp_path / "file" / "last.pth", capsys),
                   str(tmp_path / "file"))
    assert (tmp_path / "file").read_text() == "x"


def cli_error(fn: Callable[[], object], capsys) -> str:
    """`fn` under run_cli, as a script runs it: must exit 2; returns stderr."""
    with pytest.raises(SystemExit) as e:
        utils.run_cli(fn)
    assert e.value.code == 2
    return capsys.readouterr().err


def test_log_that_cannot_be_written(tmp_path: Path, capsys) -> None:
    """The training log: a folder where it should be, then a disk that fills mid-run (files of
    this process stop at 4 kB, for real)."""
    (tmp_path / "log.jsonl").mkdir()
    one_error_line(cli_error(lambda: utils.JsonlLogger(tmp_path / "log.jsonl"), capsys),
                   f"cannot write {tmp_path / 'log.jsonl'}", os.strerror(errno.EISDIR))
    logger = utils.JsonlLogger(tmp_path / "ok.jsonl")
    logger.log(step=1)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        err = cli_error(lambda: [logger.log(step=k, pad="x" * 100) for k in range(100)], capsys)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    one_error_line(err, str(tmp_path / "ok.jsonl"), os.strerror(errno.EFBIG))
    assert json.loads((tmp_path / "ok.jsonl").read_text().splitlines()[0]) == {"step": 1}


def test_detectron2_export_that_fails_keeps_the_previous(tmp_path: Path, monkeypatch,
                                                         capsys) -> None:
    import pickle

    from mdp import MDPNet
    from mdp import main as mdp_main
    ckpt, out = tmp_path / "ckpt.pth", tmp_path / "bb.pkl"
    torch.save({"model": MDPNet("resnet14", embed_dim=8).state_dict(),
                "args": {"arch": "resnet14"}}, ckpt)
    out.write_bytes(b"the previous export")

    def half_dump(obj, f) -> None:
        f.write(pickle.dumps(obj)[:1000])
        raise OSError(errno.ENOSPC, ENOSPC)
    monkeypatch.setattr(pickle, "dump", half_dump)
    err = cli_error(lambda: mdp_main(["export", "--ckpt", str(ckpt), "--out", str(out),
                                      "--format", "detectron2"]), capsys)
    one_error_line(err, str(out), ENOSPC)
    assert out.read_bytes() == b"the previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bb.pkl", "ckpt.pth"]  # no temp file


def test_os_error_is_one_line_in_words(tmp_path: Path, capsys) -> None:
    """An OSError raised by the OS (args: errno, words) reads as its file and words, not as a
    number."""
    one_error_line(cli_error(lambda: open(tmp_path / "missing.txt"), capsys),
                   f"error: {tmp_path / 'missing.txt'}: {os.strerror(errno.ENOENT)}")


def _ddp_worker(rank: int, port: int, folder: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    if rank == 0:  # rank 0 alone writes: its disk is full
        torch.save = half_then(OSError(errno.ENOSPC, ENOSPC))
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            utils.save_checkpoint(NEW, Path(folder) / "ckpt" / "last.pth")
        code: object = "returned"
    except SystemExit as e:
        code = e.code
    except Exception as e:  # noqa: BLE001  (reported to the test)
        code = repr(e)
    if dist.is_initialized():
        dist.destroy_process_group()
    (Path(folder) / f"rank{rank}.json").write_text(json.dumps({"code": code,
                                                              "stderr": err.getvalue()}))


def test_ddp_every_rank_exits_when_rank0_cannot_write(tmp_path: Path) -> None:
    utils.save_checkpoint(GOOD, tmp_path / "ckpt" / "last.pth")
    before = (tmp_path / "ckpt" / "last.pth").read_bytes()
    mp.spawn(_ddp_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["code"] == 2 and r1["code"] == 2, (r0, r1)
    one_error_line(r0["stderr"], str(tmp_path / "ckpt" / "last.pth"), ENOSPC)
    assert r1["stderr"] == ""  # rank 0 says it, once
    assert_kept(tmp_path / "ckpt", before)


# ----------------------------------------------------------------------------------------------
# the scripts, run as a user runs them (toy data, tiny budget)

PRETRAIN = ["--datasets", "voc", "--arch", "resnet14", "--crop-size", "32", "32", "--base-size",
            "64", "32", "--batch-size", "4", "--optimizer", "adamw", "--lr", "1e-3", "--workers",
            "0", "--log-interval", "1", "--bank-size", "8", "--embed-dim", "16"]
FINETUNE = ["--ckpt", "none", "--dataset", "voc", "--arch", "resnet14", "--crop-size", "32", "32",
            "--base-size", "64", "48", "--batch-size", "2", "--iters", "2", "--eval-interval", "2",
            "--log-interval", "1", "--workers", "0", "--num-overlays", "0"]


def command(script: str, *args: str) -> list[str]:
    return [sys.executable, str(ROOT / script), *args]


def run(cmd: list[str], fsize: int | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"},
                          preexec_fn=limit_files(fsize) if fsize else None, **kw)


def limit_files(size: int) -> Callable[[], None]:
    """For preexec_fn: the child's files stop at `size` bytes (a disk that fills, for real)."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE,
                                      (size, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


@pytest.mark.parametrize("script", ["train_pretrain.py", "finetune.py"])
def test_out_dir_that_is_a_file(script: str, toy_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "a_file"
    out.write_text("keep me")
    flags = PRETRAIN + ["--iters", "1"] if script == "train_pretrain.py" else FINETUNE
    r = run(command(script, *flags, "--data-root", str(toy_root), "--out-dir", str(out)))
    assert r.returncode == 2, r.stderr[-3000:]
    one_error_line(r.stderr, "--out-dir", str(out))
    assert out.read_text() == "keep me"


def test_pretrain_sigterm_save_that_fails_keeps_the_previous(toy_root: Path,
                                                             tmp_path: Path) -> None:
    out = tmp_path / "run"
    base = PRETRAIN + ["--data-root", str(toy_root), "--out-dir", str(out)]
    r = run(command("train_pretrain.py", *base, "--iters", "1"))
    assert r.returncode == 0, r.stderr[-3000:]
    before = (out / "last.pth").read_bytes()
    # resumed with a disk that cannot take another checkpoint; no save before SIGTERM's
    proc = subprocess.Popen(command("train_pretrain.py", *base, "--iters", "500", "--resume",
                                    "auto", "--save-interval", "1000", "--skip-data-check"),
                            cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=limit_files(len(before) // 2))
    log = out / "log.jsonl"
    while proc.poll() is None and len(log.read_text().splitlines()) < 3:
        time.sleep(0.05)  # two resumed steps logged: the SIGTERM handler is in place
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 2, stderr[-3000:]
    one_error_line(stderr, str(out / "last.pth"), os.strerror(errno.EFBIG))
    assert "SIGTERM: saved" not in stdout
    assert json.loads(log.read_text().splitlines()[-1])["step"] < 500  # SIGTERM's save failed
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "last.pth", "log.jsonl"]
    assert (out / "last.pth").read_bytes() == before
    assert torch.load(out / "last.pth", weights_only=False)["step"] == 1


def test_finetune_checkpoint_that_fails(toy_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "ft"
    r = run(command("finetune.py", *FINETUNE, "--data-root", str(toy_root), "--out-dir", str(out),
                    "--skip-data-check"), fsize=256 * 1024)  # the head alone is larger
    assert r.returncode == 2, r.stderr[-3000:]
    one_error_line(r.stderr, str(out / "best.pth"), os.strerror(errno.EFBIG))
    assert not [p.name for p in out.iterdir() if ".pth" in p.name]  # no checkpoint, no temp file
