"""Run plumbing shared by train_pretrain.py and finetune.py: DDP set-up, the data check,
checkpoints, logging, RNG.

`python script.py` is one process; `torchrun --nproc_per_node=N script.py` gives DDP (env:// init,
gloo on CPU, nccl on CUDA). Every collective is guarded so a single process never touches
torch.distributed.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import signal
import sys
from pathlib import Path
from typing import Any, Callable, NoReturn

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm


# ----------------------------------------------------------------------------------------------
# distributed


def dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if dist_on() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist_on() else 1


def is_main() -> bool:
    return get_rank() == 0


def init_distributed() -> tuple[int, int, torch.device]:
    """Returns (rank, world_size, device). Initialises the process group only under torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist_on():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://")
    return get_rank(), get_world_size(), device


def cleanup_distributed() -> None:
    if dist_on():
        dist.destroy_process_group()


def barrier() -> None:
    if dist_on():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sums `t` over ranks in place (a no-op in one process) and returns it."""
    if dist_on():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Averages the gradients of parameters that live outside DDP over ranks (no-op alone)."""
    if dist_on() and params:
        grads = [q.grad if q.grad is not None else torch.zeros_like(q) for q in params]
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= get_world_size()
        for q, g in zip(params, flat.split([g.numel() for g in grads])):
            q.grad = g.view_as(q).clone()


def wrap_model(model: torch.nn.Module, device: torch.device,
               sync_bn: bool = False) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(model, ddp): SyncBN when asked and world > 1 (CUDA only), channels_last on CUDA, and the
    DDP wrapper to run forward through (the model itself in one process). Freeze parameters
    before this: DDP records the ones that require gradients."""
    use_cuda, world = device.type == "cuda", get_world_size()
    if sync_bn and world > 1:
        if not use_cuda:
            raise ValueError("--sync-bn needs CUDA (torch's SyncBatchNorm has no CPU kernel)")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if use_cuda:
        model = model.to(memory_format=torch.channels_last)
    ddp = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device] if use_cuda else None) if world > 1 else model
    return model, ddp


def broadcast_flag(flag: bool, device: torch.device) -> bool:
    """True on every rank when any rank says True (e.g. SIGTERM reached one of them). A host sync
    under DDP: the training loops call it only at log intervals."""
    if not dist_on():
        return flag
    t = torch.tensor([float(flag)], device=device)
    return bool(all_reduce_sum(t).item() > 0)


# ----------------------------------------------------------------------------------------------
# mixed precision


def cpu_has_native_bf16() -> bool:
    """avx512_bf16 or AMX: oneDNN then runs bf16 convolutions natively. Elsewhere (AVX2 only) CPU
    bf16 is emulated and an order of magnitude slower than fp32 (results/speed/bench.md)."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(cpu, name, lambda: False)() for name in checks)


def amp_dtype(choice: str, device: torch.device) -> torch.dtype | None:
    """--amp auto|bf16|fp16|none -> the autocast dtype, None for fp32. `auto`: bf16 on CUDA (if the
    card has it) and on a CPU with native bf16, fp32 elsewhere."""
    if choice == "auto":
        native = (torch.cuda.is_bf16_supported() if device.type == "cuda"
                  else cpu_has_native_bf16())
        return torch.bfloat16 if native else None
    if choice == "fp16" and device.type != "cuda":
        raise ValueError("--amp fp16 needs CUDA (use bf16 or none on a CPU)")
    if choice not in ("bf16", "fp16", "none"):
        raise ValueError(f"--amp {choice!r}: expected auto, bf16, fp16 or none")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[choice]


def autocast(device: torch.device, dtype: torch.dtype | None) -> torch.autocast:
    """Autocast to `dtype` on `device`; fp32 (disabled) when dtype is None."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def amp_name(dtype: torch.dtype | None) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


# ----------------------------------------------------------------------------------------------
# errors and command-line entry


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or not what the script expects."""


class WriteError(OSError):
    """A file the run writes could not be written (disk full, no permission, a file where a folder
    should be); the message names the file and the cause."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (the full usage stays available through --help)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def run_cli(main: Callable[[], Any]) -> None:
    """Runs `main`; bad input ends with one `error: ...` line on stderr and exit code 2, the last
    thing printed: progress bars still open are closed first (else one redraws itself after it)."""
    try:
        main()
    except (ValueError, FileNotFoundError, NotADirectoryError, WriteError) as e:
        if isinstance(e, OSError) and e.strerror:  # the OS's own: args are (errno, words)
            say_error(f"{e.filename}: {e.strerror}" if e.filename else e.strerror)
        else:
            say_error(e.args[0] if e.args else repr(e))
        cleanup_distributed()
        sys.exit(2)


def say_error(msg: str) -> None:
    """The one `error: ...` line, the last thing printed: progress bars still open are closed
    first (else one redraws itself after it)."""
    for bar in list(getattr(tqdm, "_instances", [])):  # tqdm's registry of open bars
        bar.close()
    print(f"error: {msg}", file=sys.stderr, flush=True)


def exit_every_rank(msg: str) -> NoReturn:
    """Under DDP, for an error every rank knows of: rank 0 prints the `error:` line (as run_cli
    would) and every rank exits with code 2."""
    if is_main():
        say_error(msg)
    barrier()  # no rank exits before rank 0 has said why (torchrun then stops the others)
    cleanup_distributed()
    sys.exit(2)


# ----------------------------------------------------------------------------------------------
# data check


class _ReadItem(torch.utils.data.Dataset):
    """Item k of the readers, concatenated -> (k, None) when reader[i] reads, else (k, the error
    in one line)."""

    def __init__(self, readers: list):
        self.readers = readers
        self.items = [(r, i) for r, reader in enumerate(readers) for i in range(len(reader))]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, k: int) -> tuple[int, str | None]:
        r, i = self.items[k]
        try:
            self.readers[r][i]  # the readers' own loading: decode, mode, size, mask values
        except (ValueError, FileNotFoundError) as e:  # the readers' errors name the file
            return k, str(e)
        except Exception as e:  # what else training would die of, e.g. a decompression bomb
            f = self.readers[r].files[i]
            return k, f"{f[0] if isinstance(f, tuple) else f}: {type(e).__name__}: {e}"
        return k, None


def check_data(readers: list, workers: int) -> None:
    """Reads every item of `readers` (datasets.SegReader, mine.UnlabelledImages) once, in `workers`
    loader processes, so that an unreadable image or a mask value that is no class id of its
    dataset ends the run before step 1, naming the file, and not hours into it. The readers'
    own __getitem__ decides: what training accepts passes, what would crash or mislabel fails.
    The first bad item in reader order is a ValueError; under DDP each rank reads every world-th
    item, rank 0 prints the `error:` line (as run_cli would) and every rank exits with code 2."""
    rank, world = get_rank(), get_world_size()
    items = _ReadItem(readers)
    share = range(rank, len(items), world)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(items, share), batch_size=8, num_workers=workers,
        collate_fn=list, generator=torch.Generator())  # in order; spares the global RNG
    first = None  # (item index, error): the first bad item of this rank's share
    with tqdm(total=len(share), desc="data check", unit="img", disable=not is_main(),
              dynamic_ncols=True) as bar:
        for batch in loader:
            first = next(((k, e) for k, e in batch if e is not None), None)
            if first is not None:
                break  # the bar closes before the error is printed
            bar.update(len(batch))
    if dist_on():
        found: list = [None] * world
        dist.all_gather_object(found, first)
        first = min((f for f in found if f is not None), default=None)
    if first is None:
        return
    if not dist_on():
        raise ValueError(first[1])  # run_cli says it
    exit_every_rank(first[1])


# ----------------------------------------------------------------------------------------------
# checkpoints


def note_non_finite(first_bad: torch.Tensor, loss: torch.Tensor, step: int) -> torch.Tensor:
    """first_bad: a device scalar, 0 while every loss was finite, else the first bad step (1-based).
    No host sync: `stop_if_non_finite` reads it at log / checkpoint time."""
    return torch.where((first_bad == 0) & ~torch.isfinite(loss.detach()), step + 1, first_bad)


def stop_if_non_finite(first_bad: torch.Tensor, last_ckpt: str | Path) -> None:
    """Stops every rank together when any rank saw a NaN / inf loss since the start. Called before
    every checkpoint, so non-finite weights never replace the last good one."""
    bad = first_bad.detach().clone()
    if dist_on():
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if bad.item() > 0:
        raise ValueError(f"loss became non-finite at step {bad.item()}; the last good checkpoint "
                         f"{last_ckpt} is left as it was")


def check_same_flags(ckpt: str | Path, old: dict, new: dict, free: tuple[str, ...],
                     defaults: dict, names: dict[str, str] | None = None) -> None:
    """Refuses to resume `ckpt`, trained with the args `old`, under args `new` that differ in a key
    outside `free`: one line naming the flag (`names`, else --key) and both values. A key the
    checkpoint predates counts as its default; one neither has nor knows is skipped."""
    def show(v: Any) -> str:
        return "(unset)" if v is None else " ".join(map(str, v)) if isinstance(v, list) else str(v)

    for k, value in new.items():
        if k in free or (k not in old and k not in defaults):
            continue
        before = old.get(k, defaults.get(k))
        if before != value:
            flag = (names or {}).get(k, "--" + k.replace("_", "-"))
            raise CheckpointError(f"{ckpt} was trained with {flag} {show(before)}, not "
                                  f"{show(value)}: resume it unchanged, or start a new run in "
                                  f"another --out-dir")


def save_checkpoint(state: dict, path: str | Path) -> None:
    """Atomic write on rank 0: a crash mid-write never replaces the last good checkpoint, and
    neither do non-finite weights (checked on every rank: DDP keeps their weights identical)."""
    path = Path(path)
    model = state.get("model", {})
    if not all(torch.isfinite(t).all() for t in model.values() if t.is_floating_point()):
        raise ValueError(f"weights became non-finite at step {state.get('step')}; the last good "
                         f"checkpoint {path} is left as it was")
    write_on_rank0(lambda: atomic_save(state, path))


def write_on_rank0(write: Callable[[], None]) -> None:
    """Runs `write` on rank 0. Its WriteError ends the run with one `error:` line and exit code 2:
    alone through run_cli; under DDP rank 0 shares the outcome (one collective per write) and
    every rank exits together, rather than the others waiting in their next collective."""
    failed = None
    try:
        if is_main():
            write()
    except WriteError as e:
        if not dist_on():
            raise
        failed = str(e)
    if dist_on():
        box = [failed]
        dist.broadcast_object_list(box, src=0)
        if box[0] is not None:
            exit_every_rank(box[0])


def write_cause(e: BaseException) -> str:
    """The OS's words for a failed write. torch's writer reports a disk-full as "unexpected pos
    ..."; the OSError of the Python file it wrote to is its __context__."""
    for x in (e, e.__cause__, e.__context__):
        if isinstance(x, OSError) and x.strerror:
            return x.strerror
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def make_dir(path: str | Path) -> Path:
    """mkdir -p; what stands in the way (a file of that name, no permission) is a WriteError."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        why = "a file of that name exists" if isinstance(e, FileExistsError) else write_cause(e)
        raise WriteError(f"cannot create the folder {path}: {why}") from None
    return path


def atomic_save(obj: Any, path: str | Path, dump: Callable[[Any, Any], None] | None = None) -> None:
    """`dump(obj, file)` (torch.save unless given, e.g. pickle.dump) to a temp file, then rename:
    `path` is always the old file or the new one. A failed write (disk full, no permission)
    removes the temp file and raises WriteError naming `path` and the cause."""
    path = Path(path)
    tmp = make_dir(path.parent) / f".{path.name}.tmp"
    try:
        with open(tmp, "wb") as f:  # a Python file: its OSError names the cause (write_cause)
            (dump or torch.save)(obj, f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename; NFS / quota errors show up here
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(e, (OSError, RuntimeError)):  # RuntimeError: torch's writer
            raise WriteError(f"cannot write {path}: {write_cause(e)}; the previous {path.name}, "
                             f"if any, is left as it was") from e
        raise


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu",
                    required: tuple[str, ...] = ("model",)) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # torch raises many kinds for a truncated / foreign file
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}") from None
    missing = [k for k in required if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{path} is not a training checkpoint of this project "
                              f"(missing key(s) {missing})")
    return state


def save_config(args: Any, out_dir: str | Path) -> None:
    def write() -> None:
        path = make_dir(out_dir) / "config.json"
        try:
            path.write_text(json.dumps(vars(args), indent=2, default=str))
        except OSError as e:
            raise WriteError(f"cannot write {path}: {write_cause(e)}") from None

    write_on_rank0(write)


class JsonlLogger:
    """One JSON object per line; rank 0 only, flushed so a crash loses nothing. A resumed run
    appends to its log; a fresh run in the same folder starts a new one. A log that cannot be
    opened ends every rank (write_on_rank0); one that fails later (disk full) ends rank 0 with
    a WriteError, and torchrun the others."""

    def __init__(self, path: str | Path, append: bool = False):
        self.path, self.file = Path(path), None

        def open_log() -> None:
            try:
                self.file = open(self.path, "a" if append else "w")
            except OSError as e:
                raise WriteError(f"cannot write {self.path}: {write_cause(e)}") from None
        write_on_rank0(open_log)

    def log(self, **fields: Any) -> None:
        if self.file is not None:
            try:
                self.file.write(json.dumps(fields) + "\n")
                self.file.flush()
            except OSError as e:
                raise WriteError(f"cannot write {self.path}: {write_cause(e)}") from None


# ----------------------------------------------------------------------------------------------
# randomness


def seed_everything(seed: int, rank: int = 0) -> None:
    """Different streams per rank (augmentation), identical model init (seeded before rank
    offset)."""
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)


class KeyedAugmentation(torch.utils.data.Dataset):
    """Seeds the augmentation of sample i in epoch e from (seed, e, i) alone, whatever the worker
    or rank that loads it: `--resume` replays exactly the crops an uninterrupted run would have
    seen."""

    def __init__(self, dataset: torch.utils.data.Dataset, seed: int, epoch: int):
        self.dataset, self.seed, self.epoch = dataset, seed, epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash((self.seed, self.epoch, i)) % 2**63)  # int tuples hash stably
            return self.dataset[i]


def batches_per_epoch(dataset: torch.utils.data.Dataset, sampler: torch.utils.data.Sampler,
                      batch_size: int) -> int:
    """Full batches per epoch on each rank (the last partial one is dropped); 0 is an error."""
    per_epoch = len(sampler) // batch_size
    if per_epoch == 0:
        raise ValueError(f"{len(dataset)} training images cannot fill one batch of {batch_size} "
                         f"on each of {get_world_size()} process(es)")
    return per_epoch


def epoch_loader(dataset: torch.utils.data.Dataset, sampler: torch.utils.data.Sampler, step: int,
                 batch_size: int, seed: int, workers: int,
                 pin_memory: bool = False) -> tuple[int, torch.utils.data.DataLoader]:
    """(epoch, loader over the batches left in the epoch that `step` falls in). Sampler order and
    augmentation depend only on (seed, epoch, sample), so a resumed run picks up mid-epoch exactly;
    the loader's own generator keeps it from drawing on the global RNG stream."""
    per_epoch = batches_per_epoch(dataset, sampler, batch_size)
    epoch, first = divmod(step, per_epoch)
    sampler.set_epoch(epoch)
    indices = list(sampler)[first * batch_size: per_epoch * batch_size]
    return epoch, torch.utils.data.DataLoader(
        KeyedAugmentation(dataset, seed, epoch), batch_size, sampler=indices, num_workers=workers,
        pin_memory=pin_memory, drop_last=True, generator=torch.Generator())


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------
# schedules


def build_scheduler(optimizer: torch.optim.Optimizer, kind: str, total_steps: int,
                    warmup_steps: int = 0, power: float = 0.9,
                    min_lr: float = 1e-4) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then poly (MMSeg: (1 - t)^power down to min_lr) or cosine down to min_lr.

    Stepped once per iteration. `min_lr` is absolute, as in MMSeg's poly policy.
    """
    if kind not in ("poly", "cosine"):
        raise ValueError(f"unknown schedule {kind!r}; expected 'poly' or 'cosine'")
    base_lr = optimizer.param_groups[0]["lr"]
    floor = min(min_lr / base_lr, 1.0) if base_lr > 0 else 0.0

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
        decay = (1 - t) ** power if kind == "poly" else 0.5 * (1 + math.cos(math.pi * t))
        return floor + (1 - floor) * decay

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ----------------------------------------------------------------------------------------------
# SIGTERM


# 128 + SIGTERM, the shell's code for "ended by SIGTERM": a scheduler that requeues, or the
# study runner (studies/reproduce.py), must not take a pre-empted run for a finished one.
PREEMPTED_EXIT = 128 + int(signal.SIGTERM)


class StopFlag:
    """Set by SIGTERM (cluster pre-emption): the training loop saves a checkpoint and exits."""

    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True


def exit_preempted(last_ckpt: Path, step: int, resume: str) -> NoReturn:
    """After the SIGTERM checkpoint: says how to continue, ends with exit code PREEMPTED_EXIT."""
    if is_main():
        print(f"\nSIGTERM: saved {last_ckpt} at step {step}; continue with --resume {resume}",
              flush=True)
    cleanup_distributed()
    sys.exit(PREEMPTED_EXIT)
