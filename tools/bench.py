"""Speed benchmarks (not tests), written to results/speed/bench.md.

  step      one full pretraining step (M7) through train_pretrain.compute_loss, MDP vs CE at equal
            ResNet-50 MDPNet OS8, batch and crop, C = 171 (VOC + ADE20K): images/s, peak memory,
            FLOP utilisation. Headline: the MDP/CE step-time ratio (target <= 1.05).
  overhead  mixing (M6) + bank update (M3) + MDP loss (M4 + CSC M5) as a fraction of the network's
            forward + backward + SGD step, for C = 21, 171, 1000 (target < 3% at C = 171 on GPU).
  loader    augmented training samples/s per DataLoader worker (toy sets, full-size 500x375 JPEGs).
  precision the project's own MDP step (batch x crop of --batch/--crop) under fp32, fp32 +
            channels_last, bf16 autocast, bf16 + channels_last and torch.compile, per arch and
            output stride, with the MDP/CE ratio under the precision --amp auto picks; on CUDA also
            the host syncs per step (torch.cuda.set_sync_debug_mode warnings counted).
  datacheck the data check both scripts run before step 1 (utils.check_data), images/s with 0
            and 2 workers, and what that means for ADE20K's training split.

Each table keeps the rows of the other device from the previous file, so a GPU run adds its rows
beside the CPU ones; a device never run shows 'not measured'.

    python tools/bench.py                                    # all sections, CUDA if available
    python tools/bench.py --device cpu --threads 1 --reps 5
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import platform
import re
import resource
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import datasets as D  # noqa: E402
import train_pretrain as T  # noqa: E402
import utils  # noqa: E402
from losses import csc_loss, downsample_labels, prototype_contrast_loss  # noqa: E402
from mdp import MDPNet  # noqa: E402
from mixing import hard_labels, mix_batch  # noqa: E402
from prototypes import PrototypeBank  # noqa: E402
from toy import make_toy  # noqa: E402

BF16_PEAK_TFLOPS = [("H100 PCIe", 756), ("H100", 989), ("H200", 989), ("A100", 312)]  # dense
VOC_ADE = [21, 150]  # classes per dataset of the step section: C = 171
Rows = list[list[str]]


def median_ms(fns: dict[str, Callable[[], object]], device: torch.device, reps: int,
              warmup: int) -> dict[str, float]:
    """Median ms of each fn; the fns run interleaved (in dict order) so load drift hits all
    alike."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    for r in range(warmup + reps):
        for k, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            if r >= warmup:
                times[k].append(1e3 * (time.perf_counter() - t0))
    return {k: statistics.median(v) for k, v in times.items()}


def fake_batch(B: int, S: int, sizes: list[int], g: torch.Generator, classes_per_image: int = 8
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images of the len(sizes) datasets in turn; each label map is a blocky 8x8 layout of
    `classes_per_image` classes of the image's own dataset (global ids), ~10% IGNORE.
    Returns images (B, 3, S, S), labels (B, S, S), dataset index (B,), class_dataset (C,)."""
    K = torch.tensor(sizes)
    didx = torch.arange(B) % len(sizes)  # (B,)
    lo = (K.cumsum(0) - K)[didx]  # (B,) offset of each image's dataset
    picks = lo[:, None] + (torch.rand(B, classes_per_image, generator=g) * K[didx, None]).long()
    layout = torch.randint(classes_per_image, (B, 8, 8), generator=g)
    coarse = picks.gather(1, layout.flatten(1)).view(B, 1, 8, 8).float()
    labels = F.interpolate(coarse, size=(S, S), mode="nearest")[:, 0].long()  # (B, S, S)
    labels[torch.rand(B, S, S, generator=g) < 0.1] = D.IGNORE
    class_dataset = torch.repeat_interleave(torch.arange(len(sizes)), K)  # (C,)
    return torch.randn(B, 3, S, S, generator=g), labels, didx, class_dataset


def full_bank(C: int, dim: int, device: torch.device, bank_size: int = 1024) -> PrototypeBank:
    """A bank with every class filled, so all C prototypes enter the softmax (steady state)."""
    bank = PrototypeBank(C, dim, bank_size).to(device)
    bank.write(F.normalize(torch.randn(C, dim, device=device), dim=1),
               torch.arange(C, device=device))
    return bank


def make_step(method: str, device: torch.device, B: int, S: int, arch: str = "resnet50",
              output_stride: int = 8, amp: torch.dtype | None | str = "default",
              channels_last: bool | None = None, compile: bool = False) -> Callable[[], None]:
    """One training step exactly as train_pretrain.main runs it: mix -> forward -> compute_loss
    (bank update + loss) -> backward -> SGD step. Defaults: bf16 autocast + channels_last on CUDA,
    fp32 on CPU (the step and overhead sections); the precision section sets each explicitly."""
    args = T.get_args(["--method", method, "--batch-size", str(B), "--crop-size", str(S), str(S),
                       "--arch", arch, "--output-stride", str(output_stride)])
    C, cuda = sum(VOC_ADE), device.type == "cuda"
    amp = (torch.bfloat16 if cuda else None) if amp == "default" else amp
    channels_last = cuda if channels_last is None else channels_last
    torch.manual_seed(0)  # the same backbone weights for both methods
    model = T.build_model(args, C, device).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = torch.compile(model) if compile else model
    bank = full_bank(C, args.embed_dim, device, args.bank_size) if method == "mdp" else None
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                          weight_decay=args.weight_decay, foreach=True)
    images, labels, didx, class_dataset = fake_batch(B, S, VOC_ADE,
                                                     torch.Generator().manual_seed(0))
    images, labels, class_dataset = (t.to(device) for t in (images, labels, class_dataset))

    def step() -> None:
        gen = T.step_generator(0, 0, 0)
        # didx stays on the CPU, as the loader gives it: mixing then reads nothing from the device
        x, y_a, y_b, w = mix_batch(images, labels, didx, args.mix, gen, num_classes=C)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with utils.autocast(device, amp):
            out = net(x)  # (B, D, h, w) embeddings or (B, C, h, w) logits
        loss, _ = T.compute_loss(args, out.float(), y_a, y_b, w, bank, class_dataset, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def count_syncs(step: Callable[[], None]) -> int:
    """Host synchronisations in one CUDA step: torch warns once per sync in debug mode 'warn'."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
            torch.cuda.current_stream().synchronize()  # a stream sync is not a caught op
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def bench_precision(a: argparse.Namespace, device: torch.device) -> Rows:
    """ms per MDP step for each precision setting, per arch and output stride; then MDP vs CE
    under the precision --amp auto picks on this device."""
    settings = {"fp32": (None, False, False), "fp32 + channels_last": (None, True, False),
                "bf16": (torch.bfloat16, False, False),
                "bf16 + channels_last": (torch.bfloat16, True, False),
                "compile (--amp auto)": ("auto", False, True)}
    auto = utils.amp_dtype("auto", device)
    rows = []
    for arch in a.precision_archs:
        for os_ in (8, 16):
            steps = {k: make_step("mdp", device, a.batch, a.crop, arch, os_,
                                  auto if amp == "auto" else amp, cl, comp)
                     for k, (amp, cl, comp) in settings.items()}
            for fn in steps.values():  # compile and first-call costs stay out of the timing
                fn()
            ms = median_ms(steps, device, a.reps, warmup=1)
            rows += [[arch, str(os_), k, f"{ms[k]:.1f}", f"{1e3 * a.batch / ms[k]:.2f}",
                      f"{ms['fp32'] / ms[k]:.2f}x"] for k in steps]
    for arch in a.precision_archs:
        steps = {m: make_step(m, device, a.batch, a.crop, arch, 8, auto) for m in ("ce", "mdp")}
        ms = median_ms(steps, device, a.reps, warmup=1)
        syncs = {m: count_syncs(fn) for m, fn in steps.items()} if device.type == "cuda" else {}
        for m in steps:
            rows.append([arch, "8", f"{m}, --amp auto = {utils.amp_name(auto)}", f"{ms[m]:.1f}",
                         f"{1e3 * a.batch / ms[m]:.2f}", f"MDP/CE {ms['mdp'] / ms['ce']:.3f}"
                         if m == "mdp" else "", str(syncs.get(m, "n/a (CPU)"))])
    return [r + [""] * (7 - len(r)) for r in rows]


def max_rss_kib() -> int:
    """Peak RSS of this process image. /proc's VmHWM restarts at exec; ru_maxrss would carry the
    spawning parent's peak over into the child (Linux keeps it across execve)."""
    status = Path("/proc/self/status")
    m = re.search(r"VmHWM:\s+(\d+) kB", status.read_text()) if status.exists() else None
    return int(m.group(1)) if m else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def peak_memory_mib(method: str, device_str: str, B: int, S: int, threads: int) -> float:
    """Run in a fresh process: CUDA max_memory_allocated, or on CPU the growth of the process's
    peak RSS over building the model and two steps (rough: RSS counts allocator caching)."""
    torch.set_num_threads(threads)
    device = torch.device(device_str)
    base = max_rss_kib()
    step = make_step(method, device, B, S)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(2):
        step()
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return (max_rss_kib() - base) / 1024


def bench_step(a: argparse.Namespace, device: torch.device) -> Rows:
    cuda = device.type == "cuda"
    steps = {m: make_step(m, device, a.batch, a.crop) for m in ("ce", "mdp")}
    flops = {}
    for m, step in steps.items():  # counting also warms up
        with FlopCounterMode(display=False) as fc:
            step()
        flops[m] = fc.get_total_flops()
    ms = median_ms(steps, device, a.reps, warmup=2 if cuda else 1)
    name = torch.cuda.get_device_name(device) if cuda else ""
    peak = next((p for key, p in BF16_PEAK_TFLOPS if key in name), None)
    rows = []
    for m in steps:
        with mp.get_context("spawn").Pool(1) as pool:  # a fresh process: max RSS is per process
            mem = pool.apply(peak_memory_mib,
                             (m, str(device), a.batch, a.crop, torch.get_num_threads()))
        tflops = flops[m] / ms[m] / 1e9
        frac = "n/a (CPU)" if not cuda else f"{100 * tflops / peak:.1f}%" if peak else "unknown"
        ratio = f"**{ms['mdp'] / ms['ce']:.3f}**" if m == "mdp" else ""
        rows.append([m, f"{a.batch}x{a.crop}², {'bf16 + channels_last' if cuda else 'fp32'}",
                     f"{ms[m]:.1f}", f"{1e3 * a.batch / ms[m]:.2f}", f"{mem:.0f}",
                     f"{flops[m] / 1e9:.1f}", f"{tflops:.3f}", frac, ratio])
    return rows


def bench_overhead(a: argparse.Namespace, device: torch.device) -> Rows:
    cuda, dim, g = device.type == "cuda", 256, torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = MDPNet("resnet50", output_stride=8, embed_dim=dim).to(device)
    x = torch.randn(a.batch, 3, a.crop, a.crop, device=device)
    if cuda:
        cl = torch.channels_last
        model, x = model.to(memory_format=cl), x.contiguous(memory_format=cl)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4,
                          foreach=True)

    def net_step() -> None:  # the backward cost does not depend on the gradient's values
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            z = model(x)
        opt.zero_grad(set_to_none=True)
        z.float().sum().backward()
        opt.step()

    t_net = median_ms({"net": net_step}, device, a.reps, warmup=2 if cuda else 1)["net"]
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
        z0 = model(x).float()  # (B, D, h, w) a real embedding for the MDP parts
    del model, opt
    rows = []
    for C in a.classes:
        images, labels, didx, class_dataset = (t.to(device) for t in
                                               fake_batch(a.batch, a.crop, [C // 2, C - C // 2], g))
        bank, s = full_bank(C, dim, device), {}

        def mix() -> None:
            _, s["y_a"], s["y_b"], s["w"] = mix_batch(images, labels, didx, "both", g)

        def bank_update() -> None:
            s["small"] = [downsample_labels(s[k], z0.shape[-2:]) for k in ("y_a", "y_b", "w")]
            s["hard"] = hard_labels(*s["small"])  # (B, h, w)
            bank.update(z0, s["hard"])

        def loss_fwd_bwd() -> None:  # the network's backward below z is in t_net
            z = z0.detach().requires_grad_()
            feats = z.permute(0, 2, 3, 1).reshape(-1, dim)  # (N, D), all pixels
            y_a, y_b, w = (t.flatten() for t in s["small"])
            loss = prototype_contrast_loss(feats, bank.prototypes, bank.filled, y_a, y_b, w)
            loss = loss + 0.1 * csc_loss(feats, bank.prototypes, bank.filled, s["hard"].flatten(),
                                         class_dataset)
            loss.backward()

        t = median_ms({"mix": mix, "bank": bank_update, "loss": loss_fwd_bwd}, device, a.reps,
                      warmup=1)
        total = sum(t.values())
        rows.append([f"{a.batch}x{a.crop}²", str(C), f"{t_net:.1f}", f"{t['mix']:.2f}",
                     f"{t['bank']:.2f}", f"{t['loss']:.2f}", f"{total:.2f}",
                     f"{100 * total / t_net:.2f}%"])
        del bank
    return rows


def bench_loader(a: argparse.Namespace, device: torch.device) -> Rows:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what a DataLoader worker uses
    rows = []

    def rate(fn: Callable[[int], object], n: int) -> float:
        for i in range(3):
            fn(i)
        t0 = time.perf_counter()
        for i in range(n):
            fn(i)
        return n / (time.perf_counter() - t0)

    with tempfile.TemporaryDirectory() as tmp:
        toy = make_toy(Path(tmp) / "toy", n_train=64, n_val=1, datasets=("voc", "ade20k"))
        full = make_toy(Path(tmp) / "full", n_train=32, n_val=1, size=500, datasets=("voc",))
        for label, root, names, base, crop in [  # base (W, H), crop (H, W)
                ("toy VOC+ADE20K (~128 px)", toy, ["voc", "ade20k"], (256, 128), (128, 128)),
                ("full-size 500x375 JPEG, VOC recipe", full, ["voc"], (2048, 512), (512, 512))]:
            ds = D.build_multidataset(names, root, "train", D.train_transform(base, crop))
            read = rate(lambda i: ds.readers[0][i % ds.sizes[0]], a.loader_samples)
            train = rate(lambda i: ds[i % len(ds)], a.loader_samples)
            rows.append([label, f"{base[0]}x{base[1]}", f"{crop[0]}x{crop[1]}", f"{read:.0f}",
                         f"{train:.0f}", f"{1000 / train:.1f}"])
    torch.set_num_threads(threads)
    return rows


ADE20K_TRAIN = 20210  # training images: the extrapolation of the data check


def bench_datacheck(a: argparse.Namespace, device: torch.device) -> Rows:
    """utils.check_data (what both scripts run before step 1) over the train split of each
    --check-datasets (default: 64 toy VOC images), with 0 and 2 loader workers."""
    import utils
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(a.data_root) if a.data_root else make_toy(
            Path(tmp) / "toy", n_train=64, n_val=1, datasets=("voc",))
        for name in a.check_datasets:
            reader = D.build_reader(name, root, "train")
            for workers in (0, 2):
                t0 = time.perf_counter()
                utils.check_data([reader], workers)
                rate = len(reader) / (time.perf_counter() - t0)
                rows.append([name.split("/")[-1], str(len(reader)), str(workers), f"{rate:.0f}",
                             f"{ADE20K_TRAIN / rate:.0f}"])
    return rows


SECTIONS = {  # name: (function, title and notes, column headers after "run")
    "step": (bench_step, "One pretraining step, MDP vs CE (C = 171, VOC + ADE20K)\n\n"
             "ResNet-50 MDPNet OS8, same batch and crop; synthetic two-dataset batch, bank full. "
             "The step is train_pretrain's: mix_batch (mdp: both, ce: none) -> forward -> "
             "compute_loss -> backward -> SGD. Median over --reps, methods interleaved. "
             "Peak memory: CUDA max_memory_allocated; CPU growth of the process peak RSS (VmHWM; "
             "rough). FLOPs: FlopCounterMode over one step; bf16 dense peak from a device-name "
             "table.",
             ["method", "batch x crop", "ms / step", "images / s", "peak memory MiB",
              "GFLOP / step", "TFLOP/s", "% of bf16 peak", "MDP/CE time"]),
    "overhead": (bench_overhead, "MDP overhead per training step\n\n"
                 "Mixing (M6) + bank update (M3, incl. label downsampling) + MDP loss "
                 "(M4 + 0.1 CSC M5, fwd + bwd to the embedding), all classes filled, against the "
                 "network step (ResNet-50 MDPNet OS8 forward + backward + SGD) at the same batch.",
                 ["batch x crop", "C", "net step ms", "mixing ms", "bank update ms",
                  "loss fwd+bwd ms", "overhead ms", "overhead / step"]),
    "precision": (bench_precision,
                  "Precision, memory layout and compile, per arch and output stride"
                  "\n\nThe MDP step of the step section (VOC + ADE20K, C = 171, bank full) at "
                  "--batch x --crop; speed-up against fp32 of the same arch and stride. CPU bf16 "
                  "is fast only with native support (avx512_bf16 / AMX); --amp auto uses it only "
                  "there. Last rows: MDP vs CE under --amp auto, and host syncs per step on CUDA.",
                  ["arch", "output stride", "setting", "ms / step", "images / s", "vs fp32",
                   "host syncs / step"]),
    "loader": (bench_loader, "Loader throughput per DataLoader worker\n\n"
               "One process on one thread, on the CPU of the run's machine. read = reader alone "
               "(decode + label checks); augmented = read + M9 train pipeline + M1 global mapping.",
               ["data", "base scale", "crop", "read only samples/s", "augmented samples/s",
                "ms / sample"]),
    "datacheck": (bench_datacheck, "The data check before step 1\n\n"
                  "utils.check_data over a train split: every image decoded, every mask value "
                  "checked, by the readers' own loading; the last column extrapolates the rate to "
                  "ADE20K's 20,210 training images.",
                  ["data", "images", "workers", "images / s", "s for ADE20K train"]),
}


def previous(path: Path) -> dict[str, list[str]]:
    """Lines of the old file per section: table rows ('| cpu | ...') and run lines
    ('- cpu: ...')."""
    kept: dict[str, list[str]] = {s: [] for s in SECTIONS}
    section = None
    for line in path.read_text().splitlines() if path.exists() else []:
        if line.startswith("## "):
            section = line[3:].split(":")[0]
        elif (section in kept and re.match(r"(\| |- )(cpu|cuda)\b", line)
              and "not measured" not in line):
            kept[section].append(line)
    return kept


def report(kept: dict[str, list[str]], header: str) -> str:
    """The markdown file: header, MDP/CE headline, one table (+ its runs) per section."""
    text = [f"# Benchmarks\n\n{header}\n"]
    for s, (_, title, cols) in SECTIONS.items():
        rows = sorted((l for l in kept[s] if l.startswith("|")), key=lambda l: l.split("|")[1])
        runs = sorted(l for l in kept[s] if l.startswith("-"))
        for dev in ("cpu", "cuda") if s not in ("loader", "datacheck") else ():  # CPU work
            if not any(l.startswith(f"| {dev} ") for l in rows):
                rows.append("| " + " | ".join([dev] + ["not measured"] * len(cols)) + " |")
                runs.append(f"- {dev}: not measured (no such device in any run so far)")
        if s == "step":
            ratio = {l.split("|")[1].strip(): l.split("|")[-2].strip(" *")
                     for l in rows if "| mdp |" in l}
            text.append("**MDP/CE step-time ratio (target <= 1.05): " + "; ".join(
                f"{d} {ratio.get(d, 'not measured')}" for d in ("cpu", "cuda")) + "**\n")
        text += [f"## {s}: {title}\n", "| run | " + " | ".join(cols) + " |",
                 "|---|" + "---|" * len(cols), *rows, "", "Measured on:", *runs, ""]
    return "\n".join(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    p.add_argument("--device", choices=["cpu", "cuda"],
                   default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (1 is steadier when shared)")
    p.add_argument("--reps", type=int, default=None,
                   help="timed repetitions (default: 20 CUDA, 5 CPU)")
    p.add_argument("--batch", type=int, default=None,
                   help="step/overhead batch (default: 8 CUDA, 4 CPU)")
    p.add_argument("--crop", type=int, default=None,
                   help="square crop (default: 512 CUDA, 128 CPU)")
    p.add_argument("--classes", type=int, nargs="+", default=[21, 171, 1000],
                   help="overhead section")
    p.add_argument("--loader-samples", type=int, default=150)
    p.add_argument("--precision-archs", nargs="+", default=["resnet14", "resnet50"],
                   help="precision section: archs to time (each at output stride 8 and 16)")
    p.add_argument("--check-datasets", nargs="+", default=["voc"],
                   help="datacheck section: train splits to check (toy VOC unless --data-root)")
    p.add_argument("--data-root", default=None, help="datacheck section: where they are")
    p.add_argument("--out", default=str(ROOT / "results" / "speed" / "bench.md"))
    a = p.parse_args()
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    device, cuda = torch.device(a.device), a.device == "cuda"
    if a.threads:
        torch.set_num_threads(a.threads)
    a.batch, a.crop = a.batch or (8 if cuda else 4), a.crop or (512 if cuda else 128)
    a.reps = a.reps or (20 if cuda else 5)
    cpuinfo = Path("/proc/cpuinfo")
    cpu = (re.findall(r"model name\s*:\s*(.+)", cpuinfo.read_text()) if cpuinfo.exists() else []) \
        or [platform.machine()]
    name = (torch.cuda.get_device_name(device) if cuda
            else f"{cpu[0]}, {torch.get_num_threads()} thread(s)")
    cmd = shlex.join(["python", *sys.argv])
    cmd = cmd.replace(a.data_root, "DATA") if a.data_root else cmd  # no machine's paths
    out, kept = Path(a.out), previous(Path(a.out))
    for s in a.sections:
        print(f"[{s}] ...", flush=True)
        rows = SECTIONS[s][0](a, device)
        kept[s] = [l for l in kept[s] if not re.match(rf"(\| |- ){a.device}\b", l)]  # replaced
        kept[s] += ["| " + " | ".join([a.device, *r]) + " |" for r in rows]
        kept[s].append(f"- {a.device}: {name}; torch {torch.__version__}; "
                       f"{time.strftime('%Y-%m-%d')}; `{cmd}`")
    text = report(kept, f"Last run on {name}, torch {torch.__version__}: `{cmd}`")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
