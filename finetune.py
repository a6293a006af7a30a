"""Fine-tuning and evaluation on a pretrained backbone (METHOD.md M9).

    python finetune.py --ckpt runs/pretrain/last.pth --dataset voc --data-root data
    torchrun --nproc_per_node=8 finetune.py --ckpt imagenet:resnet50.pth --dataset ade20k
    python finetune.py --ckpt runs/finetune/last.pth --eval-only   # re-evaluates a fine-tuned model
    python finetune.py --ckpt runs/pretrain/last.pth --model linear --dataset voc   # linear probe
    python finetune.py --ckpt ... --dataset voc --train-fraction 0.125  # 1/8 of the labelled images

torchvision DeepLabV3 (or FCN) on a dilated ResNet (output stride 8), no auxiliary head; only the
backbone comes from the checkpoint (M2). The heads are torchvision's (ASPP 256 channels), not
MMSeg's (512), so absolute numbers may differ slightly from the source's. MMSegmentation's recipe
per dataset (RECIPES), every value overridable by a flag; --eval-only and --resume take the
unset flags from the fine-tuning checkpoint. `--model linear` is the standard probe of a
representation: the backbone frozen (BN statistics too), a BN + 1x1 classifier trained on its
features. mIoU and inference: evaluation.py.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.segmentation.deeplabv3 import DeepLabHead, DeepLabV3
from torchvision.models.segmentation.fcn import FCN, FCNHead
from tqdm import tqdm

import utils
from datasets import (IGNORE, DatasetMixSampler, MultiDataset, build_reader, eval_transform,
                      train_transform)
from evaluation import evaluate, print_table, summarise, write_results
from mdp import ARCHS, backbone_state_dict, build_resnet, init_from_imagenet, load_backbone

# M9 / MMSegmentation schedules: iterations, crop (H, W), base scale (W, H), total batch.
RECIPES = {
    "voc": dict(iters=40_000, crop_size=[512, 512], base_size=[2048, 512], total_batch=16),
    "ade20k": dict(iters=80_000, crop_size=[512, 512], base_size=[2048, 512], total_batch=16),
    "cityscapes": dict(iters=40_000, crop_size=[512, 1024], base_size=[2048, 1024], total_batch=8),
    "coco_stuff": dict(iters=80_000, crop_size=[512, 512], base_size=[2048, 512], total_batch=16),
}
# Taken from a fine-tuning checkpoint (--eval-only / --resume) when the flag is not given;
# the first four define the network and must agree with it.
INHERITED = ("dataset", "model", "arch", "output_stride", "iters", "crop_size", "base_size",
             "batch_size", "eval_interval", "sliding_window", "window", "stride", "freeze_backbone",
             "train_fraction", "train_images", "subset_seed", "lr")


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = utils.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", help="PATH (pretraining or fine-tuning checkpoint), none, or "
                                  "imagenet:PATH (torchvision ResNet state_dict)")
    p.add_argument("--dataset", help="voc ade20k cityscapes coco_stuff folder:PATH")
    p.add_argument("--data-root", default="data")
    p.add_argument("--model", choices=["deeplabv3", "fcn", "linear"],
                   help="default deeplabv3; linear = linear probe: frozen backbone (BN statistics "
                        "included) and a BN + 1x1 classifier on its output-stride features")
    p.add_argument("--arch", choices=sorted(ARCHS), help="default: the checkpoint's, else resnet50")
    p.add_argument("--output-stride", type=int, choices=[8, 16], help="default 8")
    p.add_argument("--iters", type=int, help="default: the dataset's recipe")
    p.add_argument("--crop-size", type=int, nargs=2, metavar=("H", "W"))
    p.add_argument("--base-size", type=int, nargs=2, metavar=("W", "H"),
                   help="rescale base scale (MMSeg img_scale), train and eval")
    p.add_argument("--batch-size", type=int, help="per process (default: recipe total / world)")
    p.add_argument("--train-fraction", type=float,
                   help="label-efficient fine-tuning: train on this fraction of the training "
                        "images (drawn once from --subset-seed, listed in "
                        "OUT_DIR/train_subset.txt)")
    p.add_argument("--train-images", type=int, help="the same as a count of images")
    p.add_argument("--subset-seed", type=int, help="seed of the training subset (default 0)")
    p.add_argument("--lr", type=float, help="default 0.01 (linear probe: 0.1)")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--min-lr", type=float, default=1e-4)
    p.add_argument("--power", type=float, default=0.9, help="poly schedule exponent")
    p.add_argument("--eval-interval", type=int, help="steps between evaluations (default iters/10)")
    p.add_argument("--log-interval", type=int, default=20)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--out-dir", help="default runs/finetune; with --eval-only CKPT_DIR/eval")
    p.add_argument("--resume", help="a fine-tuning checkpoint (last.pth) to continue")
    p.add_argument("--eval-only", action="store_true")
    p.add_argument("--eval-split", default="val", choices=["val", "test"],
                   help="with --eval-only: test scores a split nothing was tuned on (e.g. CamVid's "
                        "from tools/prepare_data.py); training always evaluates on val")
    p.add_argument("--sliding-window", action=argparse.BooleanOptionalAction,
                   help="MMSeg 'slide' inference (default: whole image)")
    p.add_argument("--window", type=int, nargs=2, metavar=("H", "W"), help="default: crop size")
    p.add_argument("--stride", type=int, nargs=2, metavar=("H", "W"), help="default: 2/3 window")
    p.add_argument("--freeze-backbone", action=argparse.BooleanOptionalAction,
                   help="train the head only (backbone weights get no gradient; BN statistics "
                        "still follow the target): a probe of what the initialisation gives")
    p.add_argument("--num-overlays", type=int, default=4, help="prediction PNGs at the final eval")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "none"],
                   help="autocast: auto = bf16 on CUDA and on CPUs with native bf16, else fp32")
    p.add_argument("--compile", action="store_true", help="torch.compile the network")
    p.add_argument("--sync-bn", action=argparse.BooleanOptionalAction,
                   help="SyncBatchNorm (default on under DDP on CUDA)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-data-check", action="store_true",
                   help="skip reading every val and training image and mask (only the subset of "
                        "--train-fraction / --train-images) once before step 1")
    args = p.parse_args(argv)
    if args.out_dir and Path(args.out_dir).exists() and not Path(args.out_dir).is_dir():
        p.error(f"--out-dir {args.out_dir} is a file, not a folder")  # before any work
    return args


def resolve_args(args: argparse.Namespace, prev: dict | None, pre_arch: str | None,
                 world: int) -> None:
    """Fills unset flags from `prev` (a fine-tuning run's args), then the recipe; checks values."""
    for k in INHERITED:
        if prev is None or k not in prev:
            continue
        if getattr(args, k) is None:
            setattr(args, k, prev[k])
        elif k in INHERITED[:4] and getattr(args, k) != prev[k]:
            raise ValueError(f"--{k.replace('_', '-')} {getattr(args, k)} disagrees with the "
                             f"checkpoint's {prev[k]}")
    if pre_arch is not None and args.arch not in (None, pre_arch):
        raise ValueError(f"--arch {args.arch} disagrees with the checkpoint's arch {pre_arch}")
    if args.dataset is None:
        raise ValueError("--dataset is required (voc, ade20k, cityscapes, coco_stuff, folder:PATH)")
    recipe = RECIPES.get(args.dataset, RECIPES["voc"])  # folder:PATH datasets get the VOC recipe
    linear = args.model == "linear"
    if linear and args.freeze_backbone is False:
        raise ValueError("--model linear is a linear probe: its backbone is always frozen")
    defaults = dict(model="deeplabv3", arch=pre_arch or "resnet50", output_stride=8,
                    iters=recipe["iters"], crop_size=recipe["crop_size"],
                    base_size=recipe["base_size"], sliding_window=False, freeze_backbone=linear,
                    lr=0.1 if linear else 0.01, subset_seed=0)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.batch_size is None:
        if recipe["total_batch"] % world:
            raise ValueError(f"total batch {recipe['total_batch']} does not split over {world} "
                             f"processes; give --batch-size (per process)")
        args.batch_size = recipe["total_batch"] // world
    if args.eval_interval is None:
        args.eval_interval = max(args.iters // 10, 1)  # MMSeg: 4k of 40k
    args.window = args.window or args.crop_size
    args.stride = args.stride or [max(w * 2 // 3, 1) for w in args.window]  # MMSeg 512 -> 341
    for name in ("iters", "batch_size", "eval_interval", "log_interval", "crop_size", "base_size",
                 "window", "stride"):
        v = getattr(args, name)
        if min(v if isinstance(v, list) else [v]) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if args.train_fraction is not None and args.train_images is not None:
        raise ValueError("give --train-fraction or --train-images, not both")
    if args.train_fraction is not None and not 0 < args.train_fraction <= 1:
        raise ValueError(f"--train-fraction must be in (0, 1], got {args.train_fraction}")
    if args.train_images is not None and args.train_images < 1:
        raise ValueError(f"--train-images must be >= 1, got {args.train_images}")
    if args.lr <= 0 or args.workers < 0 or args.num_overlays < 0:
        raise ValueError("--lr must be > 0, --workers and --num-overlays >= 0")


# ----------------------------------------------------------------------------------------------
# model and checkpoints


class LinearProbe(nn.Module):
    """The standard measure of a representation: the backbone frozen, BN statistics included (it
    stays in eval mode), and a linear classifier on its output-stride features, with the
    parameter-free BN a linear probe usually carries (as MAE's). Returns {"out": (B, K, H, W)}."""

    def __init__(self, backbone: nn.Module, width: int, num_classes: int):
        super().__init__()
        self.backbone = backbone.requires_grad_(False)
        self.classifier = nn.Sequential(nn.BatchNorm2d(width, affine=False),
                                        nn.Conv2d(width, num_classes, 1))

    def train(self, mode: bool = True) -> "LinearProbe":
        super().train(mode)
        self.backbone.eval()  # its BN running statistics are part of what is probed
        return self

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            feats = self.backbone(x)["out"]  # (B, 2048, H/os, W/os)
        logits = self.classifier(feats)  # (B, K, H/os, W/os)
        return {"out": F.interpolate(logits, size=x.shape[-2:], mode="bilinear",
                                     align_corners=False)}


def build_model(name: str, arch: str, num_classes: int, output_stride: int = 8) -> nn.Module:
    """torchvision DeepLabV3 / FCN on mdp.build_resnet, no auxiliary head (M9), or LinearProbe.
    Returns {"out": logits (B, K, H, W)} at the input size."""
    resnet = build_resnet(arch, output_stride)
    width = resnet.fc.in_features  # 2048 for every Bottleneck ResNet
    backbone = IntermediateLayerGetter(resnet, return_layers={"layer4": "out"})  # drops avgpool, fc
    if name == "linear":
        return LinearProbe(backbone, width, num_classes)
    if name == "fcn":
        return FCN(backbone, FCNHead(width, num_classes), None)
    return DeepLabV3(backbone, DeepLabHead(width, num_classes), None)


FINETUNE_KEYS = ("model", "optimizer", "scheduler", "step", "rng", "args", "class_names",
                 "best_miou", "best_step")


def read_init(spec: str) -> tuple[str, dict | None]:
    """--ckpt -> (kind, checkpoint): kind is none | imagenet | pretrain | finetune."""
    if spec == "none":
        return "none", None
    if spec.startswith("imagenet:"):
        return "imagenet", None  # read by mdp.init_from_imagenet
    state = utils.load_checkpoint(spec)
    if state.get("task") != "finetune":
        return "pretrain", state
    missing = [k for k in FINETUNE_KEYS if k not in state]
    if missing:
        raise utils.CheckpointError(f"{spec}: incomplete fine-tuning checkpoint, missing {missing}")
    return "finetune", state


def load_init(model: nn.Module, spec: str, kind: str, state: dict | None) -> None:
    """Backbone weights only (M2); refuses a checkpoint from which no backbone key loads."""
    say = print if utils.is_main() else (lambda *a: None)
    if kind == "none":
        say("backbone: random initialisation (from scratch)")
        return
    if kind == "imagenet":
        loaded, missing = init_from_imagenet(model, spec.split(":", 1)[1])
        unexpected: list[str] = []
    else:
        try:
            sd = backbone_state_dict(state)
        except ValueError as e:
            raise utils.CheckpointError(f"{spec}: {e}") from None
        loaded, missing, unexpected = load_backbone(model.backbone, sd)
        if not loaded:
            raise utils.CheckpointError(f"{spec}: no backbone key matches a torchvision ResNet "
                                        f"(e.g. 'conv1.weight'); nothing would be loaded")
    total = len(model.backbone.state_dict())
    say(f"backbone: loaded {len(loaded)}/{total} tensors from {spec}; missing {len(missing)} "
        f"{missing[:3]}; unexpected {len(unexpected)} {unexpected[:3]}")


def broadcast_buffers(module: nn.Module) -> None:
    """BN running stats drift apart per rank without SyncBN; evaluate rank 0's (the saved) ones."""
    if utils.dist_on():
        for b in module.buffers():
            dist.broadcast(b, 0)


# ----------------------------------------------------------------------------------------------
# main


def open_checkpoints(args: argparse.Namespace) -> tuple[str, dict | None]:
    """--resume / --ckpt / --eval-only -> (kind, checkpoint) with the combinations checked."""
    if args.eval_only and args.resume:
        raise ValueError("--eval-only and --resume exclude each other")
    if args.eval_split != "val" and not args.eval_only:
        raise ValueError(f"--eval-split {args.eval_split} needs --eval-only: training selects on "
                         f"val, and a test split must stay out of that")
    if args.resume:  # the whole run comes back; --ckpt only names its initialisation
        kind, state = read_init(args.resume)
        if kind != "finetune":
            raise utils.CheckpointError(f"--resume {args.resume} is not a fine-tuning checkpoint")
        args.ckpt = args.ckpt or state["args"].get("ckpt")
        return kind, state
    if args.ckpt is None:
        raise ValueError("--ckpt is required: PATH, none or imagenet:PATH")
    kind, state = read_init(args.ckpt)
    if args.eval_only and kind != "finetune":
        raise utils.CheckpointError(f"--eval-only needs a fine-tuning checkpoint (task 'finetune'),"
                                    f" got --ckpt {args.ckpt}")
    return kind, state


def load_finetuned(model: nn.Module, state: dict, names: list[str], where: str) -> None:
    if state["class_names"] != names:
        raise utils.CheckpointError(f"{where} was fine-tuned on other classes than the "
                                    f"{len(names)} of this dataset")
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise utils.CheckpointError(f"{where} does not fit the model: "
                                    f"{str(e).splitlines()[0]}") from None


def main(argv: list[str] | None = None) -> None:
    args = get_args(argv)
    _, world, device = utils.init_distributed()
    kind, state = open_checkpoints(args)
    restored = args.eval_only or bool(args.resume)  # the whole fine-tuned model comes back
    ckpt_args = (state or {}).get("args")
    ckpt_args = ckpt_args if isinstance(ckpt_args, dict) else {}
    resolve_args(args, ckpt_args if restored else None,
                 None if restored else ckpt_args.get("arch"), world)
    val_reader = build_reader(args.dataset, args.data_root, args.eval_split)
    names = list(val_reader.classes)
    val_set = MultiDataset([val_reader], eval_transform(tuple(args.base_size)))

    torch.manual_seed(args.seed)  # identical head initialisation on every rank
    model = build_model(args.model, args.arch, len(names), args.output_stride)
    utils.seed_everything(args.seed, utils.get_rank())  # then per-rank streams (dropout)
    if restored:
        load_finetuned(model, state, names, args.resume or args.ckpt)
    else:
        load_init(model, args.ckpt, kind, state)
    model.to(device)
    if args.eval_only:
        if not args.skip_data_check:
            utils.check_data([val_reader], args.workers)
        out_dir = Path(args.out_dir or Path(args.ckpt).parent / "eval")
        res = summarise(evaluate(model, val_set, len(names), device, **eval_options(args, device),
                                 overlay_dir=out_dir / "overlays",
                                 num_overlays=args.num_overlays), names, state["step"])
        if utils.is_main():
            print_table(res)
            if state.get("miou") is not None:
                print(f"mIoU recorded in the checkpoint: {100 * state['miou']:.2f}")
        write_results(res, out_dir)
    else:
        train(args, model, val_set, names, device, state if args.resume else None)
    utils.cleanup_distributed()


def keep_subset(reader, args: argparse.Namespace, out_dir: Path) -> None:
    """Label-efficient fine-tuning: keeps a subset of the reader's training images, drawn from
    --subset-seed alone (so every pretraining row is fine-tuned on the same images) and listed in
    OUT_DIR/train_subset.txt; a resumed run must find the same list there."""
    n = len(reader.files)
    k = args.train_images or max(1, round(args.train_fraction * n))
    if k > n:
        raise ValueError(f"--train-images {k}: {args.dataset} has only {n} training images")
    index = train_subset(n, k, args.subset_seed)
    reader.files = [reader.files[i] for i in index]
    listing = "".join(f"{img.relative_to(reader.root)}\n" for img, _ in reader.files)
    path = out_dir / "train_subset.txt"
    if args.resume and path.is_file() and path.read_text() != listing:
        raise ValueError(f"{path} lists other training images than --subset-seed "
                         f"{args.subset_seed} gives now")
    if utils.is_main():
        utils.make_dir(out_dir)
        path.write_text(listing)


def train_subset(n: int, k: int, seed: int) -> list[int]:
    """k of the indices 0..n-1, sorted, drawn without replacement from `seed` alone."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return sorted(perm[:k].tolist())


def eval_options(args: argparse.Namespace, device: torch.device) -> dict:
    slide = dict(window=args.window, stride=args.stride) if args.sliding_window else {}
    return dict(amp=utils.amp_dtype(args.amp, device), workers=args.workers, **slide)


def train(args: argparse.Namespace, model: nn.Module, val_set: Dataset, names: list[str],
          device: torch.device, prev: dict | None) -> None:
    """SGD + poly per iteration (M9); evaluation every --eval-interval steps and at the end,
    last.pth then, best.pth on a new best mIoU; `prev` is the checkpoint of --resume."""
    rank, world = utils.get_rank(), utils.get_world_size()
    out_dir = Path(args.out_dir or (Path(args.resume).parent if args.resume else "runs/finetune"))
    reader = build_reader(args.dataset, args.data_root, "train")
    if args.train_fraction is not None or args.train_images is not None:
        keep_subset(reader, args, out_dir)
    train_set = MultiDataset([reader], train_transform(tuple(args.base_size),
                                                       tuple(args.crop_size)))
    if not args.skip_data_check:  # the images this run reads: a bad one ends it here, named
        utils.check_data([reader, *val_set.readers], args.workers)
    use_cuda = device.type == "cuda"
    amp = utils.amp_dtype(args.amp, device)
    args.amp_dtype = utils.amp_name(amp)  # what `auto` chose, recorded in config.json
    model.backbone.requires_grad_(not args.freeze_backbone)  # before DDP records its parameters
    model, ddp = utils.wrap_model(model, device,
                                  args.sync_bn if args.sync_bn is not None else use_cuda)
    if args.compile:
        ddp = torch.compile(ddp)  # `model` stays the plain module: checkpoints keep their keys
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                                momentum=args.momentum, weight_decay=args.weight_decay)
    scheduler = utils.build_scheduler(optimizer, "poly", args.iters, power=args.power,
                                      min_lr=args.min_lr)
    sampler = DatasetMixSampler([len(train_set)], None, world, rank, seed=args.seed)
    utils.batches_per_epoch(train_set, sampler, args.batch_size)  # an error before any work
    step, best, best_step = 0, -1.0, -1
    if prev is not None:
        optimizer.load_state_dict(prev["optimizer"])
        scheduler.load_state_dict(prev["scheduler"])
        scaler.load_state_dict(prev.get("scaler", {}))
        utils.set_rng_state(prev["rng"])
        step, best, best_step = prev["step"], prev["best_miou"], prev["best_step"]
    utils.save_config(args, out_dir)
    logger = utils.JsonlLogger(out_dir / "log.jsonl", append=prev is not None)
    stop = utils.StopFlag()
    first_bad = torch.zeros((), dtype=torch.long, device=device)  # utils.note_non_finite

    def checkpoint(path: Path, miou: float | None) -> None:
        utils.save_checkpoint({
            "task": "finetune", "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "scheduler": scheduler.state_dict(), "step": step, "rng": utils.rng_state(),
            "args": vars(args), "class_names": names, "miou": miou, "best_miou": best,
            "best_step": best_step}, path)

    def validate() -> None:
        nonlocal best, best_step
        broadcast_buffers(model)
        final = step == args.iters
        metrics = evaluate(model, val_set, len(names), device, **eval_options(args, device),
                           overlay_dir=out_dir / "overlays" if final else None,
                           num_overlays=args.num_overlays)
        res = summarise(metrics, names, step)
        logger.log(step=step, mIoU=res["mIoU"], aAcc=res["aAcc"])
        if metrics["miou"] > best:
            best, best_step = metrics["miou"], step
            checkpoint(out_dir / "best.pth", metrics["miou"])
        checkpoint(out_dir / "last.pth", metrics["miou"])
        write_results({**res, "best_mIoU": 100 * best, "best_step": best_step}, out_dir)
        if utils.is_main():
            bar.write(f"step {step}: mIoU {res['mIoU']:.2f} (best {100 * best:.2f})")
            if final:
                print_table(res)

    if utils.is_main():
        print(f"{'resuming at step %d: ' % step if step else ''}{args.model}/{args.arch} on "
              f"{args.dataset}: {len(names)} classes, {len(train_set)} train / {len(val_set)} "
              f"val images, {world} x {args.batch_size} per step, {args.iters} steps, crop "
              f"{args.crop_size}, on {device}, {args.amp_dtype}")
    with tqdm(total=args.iters, initial=step, disable=not utils.is_main(),
              dynamic_ncols=True) as bar:  # closed before an error is printed
        ddp.train()
        while step < args.iters:
            epoch, loader = utils.epoch_loader(train_set, sampler, step, args.batch_size, args.seed,
                                               args.workers, pin_memory=use_cuda)
            for images, labels, _ in loader:
                images, labels = images.to(device), labels.to(device)  # (B, 3, H, W), (B, H, W)
                if use_cuda:
                    images = images.contiguous(memory_format=torch.channels_last)
                with utils.autocast(device, amp):
                    logits = ddp(images)["out"]  # (B, K, H, W) at the input size
                logits = F.interpolate(logits.float(), size=labels.shape[-2:], mode="bilinear",
                                       align_corners=False)
                # sum / count: an all-IGNORE batch gives 0, not the NaN of a mean over nothing
                valid = (labels != IGNORE).sum().clamp(min=1)
                loss = F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum") / valid
                first_bad = utils.note_non_finite(first_bad, loss, step)  # read at log / eval
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                step += 1
                bar.update(1)
                log_now = step % args.log_interval == 0 or step == args.iters
                eval_now = step % args.eval_interval == 0 or step == args.iters
                if not (log_now or eval_now):
                    continue
                utils.stop_if_non_finite(first_bad, out_dir / "last.pth")
                if log_now:
                    lr = optimizer.param_groups[0]["lr"]
                    bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}")
                    logger.log(step=step, epoch=epoch, loss=loss.item(), lr=lr)
                if eval_now:
                    validate()
                if utils.broadcast_flag(stop.requested, device):
                    checkpoint(out_dir / "last.pth", None)
                    utils.exit_preempted(out_dir / "last.pth", step, str(out_dir / "last.pth"))
                if step >= args.iters:
                    break


if __name__ == "__main__":
    utils.run_cli(main)
