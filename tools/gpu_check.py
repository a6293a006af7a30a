"""GPU readiness: runs every path only a CUDA GPU takes, then times MDP vs CE; writes a page.

    python tools/gpu_check.py [--out results/speed/gpu.md] [--data-root DIR] [--batch 16]

Each check prints PASS or FAIL with the error's line; a failure never stops the others; exit 1 if
any failed. Script checks run on toy data in a temp folder, or on --data-root (VOC, ADE20K,
Cityscapes; the data check is then skipped). Without CUDA: one line, exit 0, nothing run.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]  # project modules: imported lazily (seconds)
NO_GPU = "no CUDA GPU here: nothing to check (run this on a machine with one)"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
# small runs: the GPU paths do not depend on the network's size; only the speed rows do
PRE = ["--datasets", "voc", "ade20k", "--arch", "resnet14", "--crop-size", "64", "64",
       "--base-size", "128", "64", "--batch-size", "4", "--bank-size", "16", "--workers", "2",
       "--log-interval", "1", "--save-interval", "1", "--amp", "bf16"]
RUNS = {"first": ["--sync-bn", "--iters", "2"],  # a checkpoint after each step
        "resume": ["--sync-bn", "--iters", "4", "--resume", "auto"],
        "compile": ["--compile", "--iters", "2"]}
# toy Cityscapes is 96x192: at --base-size 192 96 a 64x64 window slides 2 x 5 times per image
FT = ["--ckpt", "none", "--dataset", "cityscapes", "--arch", "resnet14", "--crop-size", "64", "128",
      "--base-size", "192", "96", "--batch-size", "2", "--iters", "2", "--eval-interval", "2",
      "--workers", "2", "--num-overlays", "1", "--amp", "bf16", "--sliding-window", "--window",
      "64", "64", "--stride", "42", "42"]
VARIANTS = {"bank": [], "learned": ["--prototypes", "learned"], "mining": ["--unlabelled", "voc"]}


@dataclass
class Result:
    name: str
    path: str  # the GPU-only path the check exercises
    ok: bool
    detail: str
    seconds: float


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "results" / "speed" / "gpu.md"))
    p.add_argument("--data-root", default=None, help="real data instead of toy sets")
    p.add_argument("--batch", type=int, default=16, help="speed rows: images per step")
    p.add_argument("--worker", choices=["ddp"], help=argparse.SUPPRESS)  # run under torchrun
    return p.parse_args(argv)


def pretrain_cmd(run: str, data: str, out: str, skip_check: bool = False) -> list[str]:
    return [*TORCHRUN, "train_pretrain.py", *PRE, "--data-root", data, "--out-dir", out,
            *RUNS[run]] + ["--skip-data-check"] * skip_check


def finetune_cmd(data: str, out: str, skip_check: bool = False) -> list[str]:
    return [sys.executable, "finetune.py", *FT, "--data-root", data, "--out-dir", out] \
        + ["--skip-data-check"] * skip_check


def worker_cmd(name: str) -> list[str]:
    return [*TORCHRUN, str(Path(__file__).resolve()), "--worker", name]


def error_line(text: str) -> str:
    """The last `error: ...` / `XError: ...` line: torchrun's summary (ChildFailedError, host,
    rank) follows the child's traceback; else the last line."""
    lines = [l.strip() for l in str(text).splitlines() if l.strip()]
    hits = [l for l in lines if re.match(r"(error: |[\w.]*(Error|Exception)\b)", l)
            and "ChildFailedError" not in l]
    return (hits or lines or [""])[-1]


def run_cmd(cmd: list[str], timeout: float = 240) -> str:
    """stdout of cmd run in the repository; a non-zero exit raises with its error line."""
    try:
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"timed out after {timeout:.0f} s") from None
    if r.returncode:
        raise RuntimeError(f"exit {r.returncode}: {error_line(r.stderr + r.stdout)}")
    return r.stdout


def where(e: BaseException) -> str:
    """The innermost project frame of an error (what to fix), e.g. ' (at train_pretrain.py:204)'."""
    frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename.startswith(str(ROOT))
              and "site-packages" not in f.filename and f.filename != __file__]
    return f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""


def run_checks(checks: list[tuple[str, str, Callable[[], str]]]) -> list[Result]:
    """Every check runs, whatever the ones before did; each returns a detail or raises."""
    results = []
    for name, path, fn in checks:
        t0 = time.perf_counter()
        try:
            ok, detail = True, fn()
        except Exception as e:  # noqa: BLE001 - a failed check is a result, not the end
            ok, detail = False, f"{type(e).__name__}: {error_line(str(e))}{where(e)}"
        results.append(Result(name, path, ok, detail, time.perf_counter() - t0))
        print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)
    return results


def scrub(text: str, paths: dict[str, str]) -> str:
    """Machine paths out of the page, longest first (a temp folder under ROOT maps whole)."""
    for p, alias in sorted(paths.items(), key=lambda kv: -len(kv[0])):
        text = text.replace(p, alias)
    return text


def format_page(results: list[Result], speed: list[list[str]], device: str, versions: str,
                command: str, date: str, batch: int) -> str:
    rows = [f"| {r.name} | {r.path} | {'PASS' if r.ok else '**FAIL**'} | {r.seconds:.0f} | "
            f"{r.detail.replace('|', '/')} |" for r in results]
    return "\n".join([
        "# GPU check", "", f"{device}; {versions}; {date}: `{command}`", "",
        f"**{sum(r.ok for r in results)}/{len(results)} checks passed.**", "",
        "| check | GPU-only path | result | s | detail |", "|---|---|---|---:|---|", *rows, "",
        f"## Speed: ResNet-50, output stride 8, {batch} x 512x512, bf16 + channels_last", "",
        "One pretraining step as tools/bench.py times it (mix -> forward -> compute_loss -> "
        "backward -> SGD) on synthetic two-dataset batches, C = 171 (VOC + ADE20K), MDP's bank "
        "full; 3 warm-up steps excluded, median of 10, torch.cuda.synchronize around each.", "",
        "| method | ms / step | images / s | peak memory GiB | MDP/CE time |",
        "|---|---:|---:|---:|---:|",
        *([f"| {' | '.join(r)} |" for r in speed] or ["| not measured | | | | |"]), ""])


# ---------------------------------------------------------------------------- GPU checks
def small_step(flags: list[str], device: torch.device, ddp: bool = False
               ) -> Callable[[int], torch.Tensor]:
    """step -> loss of train_pretrain.run_step on a synthetic batch, pinned as the loader's."""
    import bench
    import train_pretrain as T
    args, C = T.get_args(PRE + flags), sum(bench.VOC_ADE)
    torch.manual_seed(0)
    model = T.build_model(args, C, device)
    if ddp and device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    net, states, amp = T.build_optimization(args, model, C, 10, device)
    if ddp:  # build_optimization wraps only when world > 1
        net = torch.nn.parallel.DistributedDataParallel(
            states["model"], device_ids=[device] if device.type == "cuda" else None)
    g = torch.Generator().manual_seed(0)
    images, labels, didx, cd = bench.fake_batch(4, 64, bench.VOC_ADE, g)
    pin = (lambda t: t.pin_memory()) if device.type == "cuda" else (lambda t: t)
    batch = (pin(images), pin(labels), didx)
    batch_u = (pin(images.flip(0)), pin(torch.zeros_like(labels))) if args.unlabelled else None
    extra = [q for k in ("bank", "logit_scale") if states[k] is not None
             for q in states[k].parameters()]
    member = torch.nn.functional.one_hot(cd).bool().to(device)  # (C, 2), as train_loop passes it
    return lambda step: T.run_step(args, net, states, amp, batch, batch_u, step, member, extra,
                                   device)[0]


def ddp_worker() -> None:
    """Under torchrun --nproc_per_node=1 utils.init_distributed starts no process group (world 1),
    so this starts one: DDP's gradient all-reduce and average_gradients then go through nccl (gloo
    on a CPU, for the test). At world 1 the bank's all_gather and SyncBN's cross-rank statistics
    are skipped by their own code: those need two GPUs (nccl refuses two ranks on one)."""
    import torch.distributed as dist
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        for name in ("bank", "learned"):
            fp32 = [] if cuda else ["--amp", "none"]  # emulated bf16 is slow on most CPUs
            step = small_step(VARIANTS[name] + fp32, device, ddp=True)
            losses = torch.stack([step(i) for i in range(2)])
            if not torch.isfinite(losses).all():
                raise RuntimeError(f"{name}: non-finite loss {losses.tolist()}")
        print(f"2 DDP steps each with bank and learned prototypes over {dist.get_backend()}")
    finally:
        dist.destroy_process_group()


def check_sync_free() -> str:
    """train_pretrain.train_loop says a step has no host sync: in mode 'error' a sync raises."""
    failed = []
    for name, flags in VARIANTS.items():
        try:
            step = small_step(flags, torch.device("cuda"))
            step(0)  # first-call set-up (cuDNN, allocator) is not the steady state
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                step(1)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        except Exception as e:  # noqa: BLE001 - the other variants still run
            failed.append(f"{name}: {error_line(str(e))}{where(e)}")
    if failed:
        raise RuntimeError("; ".join(failed))
    return f"no host sync in a step: {', '.join(VARIANTS)}"


def check_channels_last() -> str:
    """utils.wrap_model's CUDA path (channels_last weights and input) against NCHW, both bf16."""
    import train_pretrain as T
    import utils
    device, cl = torch.device("cuda"), torch.channels_last
    torch.manual_seed(0)
    model = T.build_model(T.get_args(["--arch", "resnet14"]), 0, device).eval()
    x = torch.randn(2, 3, 128, 128, device=device)
    with torch.no_grad(), utils.autocast(device, torch.bfloat16):
        ref = model(x)  # NCHW
        model, _ = utils.wrap_model(model, device)
        out = model(x.contiguous(memory_format=cl))
    conv = next(p for p in model.parameters() if p.dim() == 4)
    cos = torch.nn.functional.cosine_similarity(out.flatten(1), ref.flatten(1)).min().item()
    if not conv.is_contiguous(memory_format=cl) or cos < 0.99:
        raise AssertionError(f"conv weights channels_last: {conv.is_contiguous(memory_format=cl)},"
                             f" cosine to NCHW {cos:.4f} (want >= 0.99)")
    return f"bf16 embeddings, channels_last vs NCHW: cosine {cos:.4f}"


def speed_rows(device: torch.device, batch: int, crop: int = 512, arch: str = "resnet50",
               reps: int = 10, warmup: int = 3, amp: torch.dtype | None = torch.bfloat16
               ) -> list[list[str]]:
    """images/s of MDP and CE through bench.make_step, one method at a time (own peak memory)."""
    import bench
    ms, mem, cuda = {}, {}, device.type == "cuda"
    for method in ("mdp", "ce"):
        step = bench.make_step(method, device, batch, crop, arch, 8, amp, True)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        ms[method] = bench.median_ms({method: step}, device, reps, warmup)[method]
        mem[method] = f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f}" if cuda else "n/a"
        del step
        if cuda:
            torch.cuda.empty_cache()
    return [[m, f"{ms[m]:.1f}", f"{1e3 * batch / ms[m]:.1f}", mem[m],
             f"**{ms['mdp'] / ms['ce']:.3f}**" if m == "mdp" else ""] for m in ms]


def run_all(a: argparse.Namespace, tmp: str, argv: list[str]) -> int:
    data, skip, speed = a.data_root or tmp, a.data_root is not None, []
    if not skip:
        from toy import make_toy
        make_toy(tmp, n_train=8, n_val=2, datasets=("voc", "ade20k", "cityscapes"))

    def pretrain() -> str:
        out = Path(tmp, "pre")
        run_cmd(pretrain_cmd("first", data, str(out), skip), 180)
        if "resumed from" not in run_cmd(pretrain_cmd("resume", data, str(out), skip), 180):
            raise RuntimeError("--resume auto did not resume")
        step = torch.load(out / "last.pth", map_location="cpu", weights_only=False)["step"]
        amp = json.loads((out / "config.json").read_text())["amp_dtype"]
        if (step, amp) != (4, "bf16"):
            raise RuntimeError(f"last.pth at step {step} (want 4), amp {amp} (want bf16)")
        return "2 steps, a checkpoint each, 2 more after --resume auto; bf16"

    def compiled() -> str:
        run_cmd(pretrain_cmd("compile", data, str(Path(tmp, "compile")), skip), 360)
        return "2 steps"

    def finetune() -> str:
        run_cmd(finetune_cmd(data, str(Path(tmp, "ft")), skip), 180)
        return f"mIoU {json.loads(Path(tmp, 'ft', 'results.json').read_text())['mIoU']:.2f}"

    def timed() -> str:
        speed.extend(speed_rows(torch.device("cuda"), a.batch))
        return f"{speed[0][2]} (MDP) / {speed[1][2]} (CE) images/s"

    results = run_checks([
        ("pretrain torchrun", "torchrun on CUDA: LOCAL_RANK device, bf16 autocast, pinned loader, "
         "--sync-bn (a no-op alone), CUDA RNG in last.pth + --resume auto", pretrain),
        ("pretrain --compile", "torch.compile of the network on CUDA, bf16", compiled),
        ("nccl DDP", "torchrun + a 1-rank nccl group: DDP all-reduce, average_gradients (learned "
         "prototypes), SyncBN modules (world 1: no bank all_gather, no cross-rank BN)",
         lambda: run_cmd(worker_cmd("ddp"), 180).strip().splitlines()[-1]),
        ("sync-free step", 'run_step (bank, learned, mining) under set_sync_debug_mode("error")',
         check_sync_free),
        ("finetune", "bf16 fine-tuning, sliding-window evaluation (toy Cityscapes)", finetune),
        ("channels_last", "wrap_model's channels_last + bf16 forward", check_channels_last),
        ("speed", "ResNet-50 OS8 bf16 step, MDP and CE", timed)])
    page = format_page(results, speed, torch.cuda.get_device_name(0),
                       f"torch {torch.__version__}, CUDA {torch.version.cuda}",
                       shlex.join(["python", "tools/gpu_check.py", *argv]),
                       time.strftime("%Y-%m-%d"), a.batch)
    machine = {tmp: "TMP", str(ROOT) + "/": "", str(Path.home()): "~"}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(scrub(page, {**machine, **({a.data_root: "DATA"} if skip else {})}))
    print(f"{sum(r.ok for r in results)}/{len(results)} passed; wrote {scrub(a.out, machine)}")
    return 0 if all(r.ok for r in results) else 1


def main(argv: list[str] | None = None) -> int:
    a = get_args(argv)
    if a.worker:
        ddp_worker()
        return 0
    if not torch.cuda.is_available():  # before any work: importing the project takes seconds
        print(NO_GPU)
        return 0
    tmp = tempfile.mkdtemp(prefix="gpu_check_")
    try:
        return run_all(a, tmp, sys.argv[1:] if argv is None else argv)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
