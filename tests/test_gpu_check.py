"""tools/gpu_check.py on a CPU: the no-GPU exit, the command lines, failure handling, the page, and
the in-process step builders its GPU checks call (run here on the CPU, fp32)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import finetune
import gpu_check as G
import train_pretrain as T

CPU_ONLY = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}


def has(cmd: list[str], *flags: str) -> bool:
    """`flags` appear in `cmd` as one consecutive run, e.g. has(cmd, '--amp', 'bf16')."""
    n = len(flags)
    return any(cmd[i:i + n] == list(flags) for i in range(len(cmd) - n + 1))


def test_without_a_gpu_it_says_so_in_one_line_and_exits_0(tmp_path: Path) -> None:
    out = tmp_path / "gpu.md"
    r = subprocess.run([sys.executable, str(G.ROOT / "tools" / "gpu_check.py"), "--out", str(out)],
                       env=CPU_ONLY, capture_output=True, text=True, timeout=120)
    assert (r.returncode, r.stdout.splitlines(), r.stderr) == (0, [G.NO_GPU], "")
    assert not out.exists()


def test_commands_carry_the_flags_each_check_exists_for() -> None:
    runs = {r: G.pretrain_cmd(r, "DATA", "OUT") for r in G.RUNS}
    for cmd in runs.values():
        assert cmd[:6] == [*G.TORCHRUN, "train_pretrain.py"] and "--nproc_per_node=1" in cmd
        assert has(cmd, "--amp", "bf16") and has(cmd, "--data-root", "DATA")
        assert "--skip-data-check" not in cmd
        T.get_args(cmd[6:])  # every flag exists in the script as it is now
    assert "--sync-bn" in runs["first"] and "--sync-bn" in runs["resume"]
    assert has(runs["resume"], "--resume", "auto") and "--resume" not in runs["first"]
    assert "--compile" in runs["compile"]
    assert "--skip-data-check" in G.pretrain_cmd("first", "DATA", "OUT", skip_check=True)

    ft = G.finetune_cmd("DATA", "OUT")
    assert ft[1] == "finetune.py" and "--sliding-window" in ft and has(ft, "--amp", "bf16")
    args = finetune.get_args(ft[2:])
    finetune.resolve_args(args, None, None, world=1)
    assert args.sliding_window and args.window == [64, 64] and args.stride == [42, 42]
    assert G.worker_cmd("ddp")[:5] == G.TORCHRUN and G.worker_cmd("ddp")[-2:] == ["--worker", "ddp"]


def test_the_finetune_check_really_slides(tmp_path: Path) -> None:
    """On toy Cityscapes at the check's --base-size the window slides 2 x 5 times per image."""
    from datasets import MultiDataset, build_reader, eval_transform
    from evaluation import slide_inference
    from toy import make_toy

    make_toy(tmp_path, n_train=1, n_val=1, datasets=("cityscapes",))
    args = finetune.get_args(G.finetune_cmd(str(tmp_path), str(tmp_path / "ft"))[2:])
    finetune.resolve_args(args, None, None, world=1)
    val = MultiDataset([build_reader("cityscapes", tmp_path, "val")],
                       eval_transform(tuple(args.base_size)))
    image = val[0][0][None]  # (1, 3, 96, 192)
    calls = []
    slide_inference(lambda x: calls.append(x.shape) or {"out": x[:, :2]}, image, args.window,
                    args.stride)
    assert image.shape[-2:] == (96, 192) and len(calls) == 10


def test_a_failing_check_is_a_fail_line_and_the_others_still_run(capsys) -> None:
    def broken() -> str:
        raise ValueError("first line\nthe last line")

    def crashes() -> str:
        raise RuntimeError("exit 1: boom")

    results = G.run_checks([("a", "path a", broken), ("b", "path b", lambda: "fine"),
                            ("c", "path c", crashes)])
    assert [(r.name, r.ok) for r in results] == [("a", False), ("b", True), ("c", False)]
    assert results[0].detail.startswith("ValueError: the last line (at test_gpu_check.py:")
    assert results[1].detail == "fine"
    assert results[2].detail.startswith("RuntimeError: exit 1: boom")
    lines = capsys.readouterr().out.splitlines()
    assert [l.split(":")[0] for l in lines] == ["FAIL a", "PASS b", "FAIL c"]


def test_run_cmd_reports_the_error_line_not_torchruns_summary() -> None:
    assert G.run_cmd([sys.executable, "-c", "print('ok')"]) == "ok\n"
    with pytest.raises(RuntimeError, match=r"^exit 1: ValueError: bad flag$"):
        G.run_cmd([sys.executable, "-c", "raise ValueError('bad flag')"])
    stderr = "\n".join(["Traceback (most recent call last):", '  File "x.py", line 1',
                        "RuntimeError: the child's error",
                        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: ",
                        "=" * 20, "train_pretrain.py FAILED", "  exitcode  : 1 (pid: 7)",
                        "  error_file: <N/A>", "=" * 20])
    assert G.error_line(stderr) == "RuntimeError: the child's error"
    assert G.error_line("progress\nerror: --iters must be >= 1\n") == "error: --iters must be >= 1"
    assert G.error_line("just text\nlast\n") == "last"


EXPECTED_PAGE = """\
# GPU check

NVIDIA H100 80GB HBM3; torch 2.9.0, CUDA 12.8; 2025-01-02: \
`python tools/gpu_check.py --data-root DATA`

**1/2 checks passed.**

| check | GPU-only path | result | s | detail |
|---|---|---|---:|---|
| pretrain torchrun | bf16 autocast | PASS | 12 | 2 steps |
| sync-free step | sync debug mode | **FAIL** | 3 | \
RuntimeError: synchronizing / bank (at TMP/x.py:1) |

## Speed: ResNet-50, output stride 8, 16 x 512x512, bf16 + channels_last

One pretraining step as tools/bench.py times it (mix -> forward -> compute_loss -> backward -> \
SGD) on synthetic two-dataset batches, C = 171 (VOC + ADE20K), MDP's bank full; 3 warm-up steps \
excluded, median of 10, torch.cuda.synchronize around each.

| method | ms / step | images / s | peak memory GiB | MDP/CE time |
|---|---:|---:|---:|---:|
| mdp | 160.0 | 100.0 | 30.1 | **1.032** |
| ce | 155.0 | 103.2 | 29.9 |  |
"""


def test_page_from_fake_results_has_no_machine_paths() -> None:
    results = [G.Result("pretrain torchrun", "bf16 autocast", True, "2 steps", 12.3),
               G.Result("sync-free step", "sync debug mode", False,
                        "RuntimeError: synchronizing | bank (at /tmp/gpu_check_x/x.py:1)", 2.6)]
    speed = [["mdp", "160.0", "100.0", "30.1", "**1.032**"], ["ce", "155.0", "103.2", "29.9", ""]]
    page = G.format_page(results, speed, "NVIDIA H100 80GB HBM3", "torch 2.9.0, CUDA 12.8",
                         "python tools/gpu_check.py --data-root /work/data", "2025-01-02", 16)
    page = G.scrub(page, {"/tmp/gpu_check_x": "TMP", "/work/data": "DATA", f"{G.ROOT}/": ""})
    assert page == EXPECTED_PAGE
    assert not any(p in page for p in ("/root", "/work", "/home", "/tmp"))
    assert "| not measured |" in G.format_page(results[:1], [], "d", "v", "c", "t", 16)


def test_speed_rows_through_bench_on_the_cpu() -> None:
    rows = G.speed_rows(torch.device("cpu"), batch=2, crop=32, arch="resnet14", reps=1,
                        warmup=1, amp=None)
    assert [r[0] for r in rows] == ["mdp", "ce"] and all(len(r) == 5 for r in rows)
    assert rows[0][4].startswith("**") and rows[1][4] == "" and float(rows[0][2]) > 0


@pytest.mark.parametrize("variant", list(G.VARIANTS))
def test_the_sync_check_step_trains_on_the_cpu(variant: str) -> None:
    step = G.small_step(G.VARIANTS[variant] + ["--amp", "none"], torch.device("cpu"))
    losses = torch.stack([step(i) for i in range(2)])
    assert torch.isfinite(losses).all()


def test_ddp_worker_under_torchrun_with_gloo_on_the_cpu() -> None:
    r = subprocess.run(G.worker_cmd("ddp"), cwd=G.ROOT, env=CPU_ONLY, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, G.error_line(r.stderr)
    assert r.stdout.strip().splitlines()[-1].endswith("over gloo")
