"""MDP pretraining (M1-M8, M10): one process with `python`, DDP with `torchrun`.

    python train_pretrain.py --datasets voc ade20k --data-root data
    torchrun --nproc_per_node=8 train_pretrain.py --datasets voc ade20k --data-root data

One step (M7):  mix the batch (M6) -> embed (M2) -> update the prototype bank from the hard-labelled
pixels of the whole global batch (M3) -> L = L_con (M4) + csc_weight * L_csc (M5).
`--unlabelled SRC ...` (M10, mine.py): after a warm-up, unlabelled images join the forward pass;
their confidently mined pixels add mine_weight * L_con(pseudo-labels), feeding neither bank nor CSC.
`--method ce|multihead|pix2pix` trains the M8 baselines with the same data, network and schedule.

Every image and mask the run reads is read once before step 1 (utils.check_data): a bad file stops
it there, named (`--skip-data-check` skips this). `--resume` refuses a flag that changes what is
trained (FREE_ON_RESUME lists those that may change).

Randomness is keyed, not streamed: augmentation by (seed, epoch, sample index), mixing and pixel
sampling by (seed, rank, step). So `--resume` continues bit-for-bit (on CPU) whatever the number of
data-loader workers and wherever the run was interrupted.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.utils.data import Sampler
from tqdm import tqdm

import mine
import utils
from datasets import (IGNORE, DatasetMixSampler, LabelSpace, MultiDataset, build_multidataset,
                      train_transform)
from losses import (ce_loss, csc_loss, downsample_labels, multihead_loss, pix2pix_loss,
                    prototype_contrast_loss, sample_pixels)
from mdp import ARCHS, MDPNet, init_from_imagenet
from mixing import hard_labels, mix_batch, show_batch
from prototypes import LogitScale, PrototypeBank, build_prototypes, prototype_cosine


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = utils.ArgumentParser(description=__doc__.splitlines()[0],
                             formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # data (M1)
    p.add_argument("--datasets", nargs="+", default=["voc", "ade20k"],
                   help="voc ade20k cityscapes coco_stuff folder:PATH; label spaces concatenated")
    p.add_argument("--data-root", default="data")
    p.add_argument("--dataset-weights", nargs="+", type=float, default=None,
                   help="sampling weight per dataset (default: in proportion to size)")
    p.add_argument("--label-map", default=None, metavar="FILE",
                   help="M1 ablation: merge classes named equal ('voc:person = ade20k:person'), "
                        "drop those '= ignore' (format: label_map.py, README)")
    p.add_argument("--base-size", nargs=2, type=int, default=[2048, 512], metavar=("W", "H"))
    p.add_argument("--crop-size", nargs=2, type=int, default=[512, 512], metavar=("H", "W"))
    # network (M2)
    p.add_argument("--arch", default="resnet50", choices=sorted(ARCHS))
    p.add_argument("--output-stride", type=int, default=8, choices=[8, 16])
    p.add_argument("--embed-dim", type=int, default=256)
    p.add_argument("--embed-norm", default="none", choices=["none", "bn"],
                   help="[ours] bn: standardise each embedding dimension over the batch before "
                        "the L2 norm (takes out the component every pixel shares)")
    p.add_argument("--init", default=None,
                   help="imagenet:PATH (torchvision ResNet weights) or PATH (a pretraining "
                        "checkpoint: sequential baseline)")
    # method (M3-M8)
    p.add_argument("--method", default="mdp", choices=["mdp", "ce", "multihead", "pix2pix"])
    p.add_argument("--tau", type=float, default=0.07)
    p.add_argument("--bank-size", type=int, default=1024)
    p.add_argument("--topk", type=int, default=3)
    p.add_argument("--csc-weight", type=float, default=0.1)
    p.add_argument("--no-csc", action="store_true")
    p.add_argument("--csc-similarity", default="prototypes", choices=["prototypes", "bank"],
                   help="[ours] bank: with --prototypes learned, CSC picks the similar classes "
                        "(and their weights) by a two-step bank of the same embeddings")
    p.add_argument("--mix", default=None, choices=["none", "region", "pixel", "both"],
                   help="cross-dataset mixing (default: both for mdp, none for the baselines)")
    p.add_argument("--label-purity", type=float, default=0.0, metavar="P",
                   help="keep a feature's label only if >= P of its cell's pixels share it "
                        "(M4; default 0: plain nearest sampling)")
    p.add_argument("--prototypes", default="bank",
                   choices=["bank", "centred", "anchors", "learned"],
                   help="M3: the two-step bank of the source; [ours] centred = the bank's "
                        "prototypes minus their mean, anchors = fixed random orthonormal class "
                        "anchors, learned = free prototypes (cosine classifier)")
    p.add_argument("--proto-grad", action="store_true",
                   help="[ours] the batch's share of each bank prototype carries its gradient "
                        "(values unchanged)")
    p.add_argument("--learn-tau", action="store_true",
                   help="[ours] learn the temperature (started at --tau, kept >= 0.01)")
    p.add_argument("--tau-lr", type=float, default=0.1,
                   help="--learn-tau: learning rate of log(1/tau), on the same schedule (an "
                        "Adam step moves a parameter by about its lr: at --lr 1e-3 the "
                        "temperature could hardly move in a short run)")
    p.add_argument("--max-pixels", type=int, default=0,
                   help="labelled pixels sampled per image for the loss (0 = all; pix2pix: 1024)")
    # unlabelled images (M10, mine.py)
    p.add_argument("--unlabelled", nargs="+", default=None, metavar="SRC",
                   help="images whose labels are not used: a dataset name (its train split) or "
                        "images:PATH (*.jpg/*.jpeg/*.png below PATH, relative to --data-root)")
    p.add_argument("--mine-ratio", type=float, default=1.0,
                   help="unlabelled images per labelled one: round(ratio * batch size) per process")
    p.add_argument("--mine-threshold", type=float, default=0.9,
                   help="a pixel is mined when its top prototype probability reaches this")
    p.add_argument("--mine-weight", type=float, default=1.0, help="weight of the mined L_con")
    p.add_argument("--mine-warmup", type=int, default=None, metavar="N",
                   help="labelled-only steps first (default: 10%% of the steps)")
    # optimisation
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--iters", type=int, default=0, help="total steps; overrides --epochs")
    p.add_argument("--batch-size", type=int, default=8, help="images per process")
    p.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"])
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--schedule", default="poly", choices=["poly", "cosine"])
    p.add_argument("--warmup-iters", type=int, default=0)
    p.add_argument("--min-lr", type=float, default=1e-4)
    # run
    p.add_argument("--out-dir", default="runs/pretrain")
    p.add_argument("--resume", default=None, help="PATH, or 'auto' for OUT_DIR/last.pth if present")
    p.add_argument("--save-interval", type=int, default=1000, help="steps between checkpoints")
    p.add_argument("--log-interval", type=int, default=20)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "none"],
                   help="autocast: auto = bf16 on CUDA and on CPUs with native bf16, else fp32")
    p.add_argument("--compile", action="store_true", help="torch.compile the network")
    p.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm under DDP on CUDA")
    p.add_argument("--show-batch", type=int, default=0, metavar="N",
                   help="write OUT_DIR/batch.png with N augmented, mixed images and exit")
    p.add_argument("--skip-data-check", action="store_true",
                   help="skip reading every training image, mask and --unlabelled image once "
                        "before step 1 (a bad file then stops the run when a step reads it)")
    args = p.parse_args(argv)
    if args.mix is None:
        args.mix = "both" if args.method == "mdp" else "none"
    if args.method == "pix2pix" and args.max_pixels == 0:
        args.max_pixels = 1024  # all-pairs within an image is quadratic in pixels
    for name, value in (("--batch-size", args.batch_size), ("--bank-size", args.bank_size),
                        ("--topk", args.topk), ("--embed-dim", args.embed_dim)):
        if value < 1:
            p.error(f"{name} must be >= 1, got {value}")
    if args.tau <= 0:
        p.error(f"--tau must be > 0, got {args.tau}")
    if not 0 <= args.label_purity <= 1:
        p.error(f"--label-purity must lie in [0, 1], got {args.label_purity}")
    if (args.prototypes != "bank" or args.learn_tau or args.proto_grad) and args.method != "mdp":
        p.error(f"--prototypes {args.prototypes} / --learn-tau / --proto-grad change MDP's loss; "
                f"--method {args.method} has none")
    if args.csc_similarity == "bank" and (args.prototypes != "learned" or args.no_csc):
        p.error("--csc-similarity bank adds a bank beside --prototypes learned for CSC; it needs "
                f"both, got --prototypes {args.prototypes}" + (" and --no-csc" * args.no_csc))
    if args.embed_norm != "none" and args.method != "mdp":
        p.error(f"--embed-norm acts on MDP's embedding; --method {args.method} has a classifier")
    if args.proto_grad and args.prototypes != "bank":
        p.error(f"--proto-grad acts on the bank's prototypes, not --prototypes {args.prototypes}")
    if args.unlabelled and args.method != "mdp":
        p.error(f"--unlabelled needs --method mdp (the prototypes label the pixels), "
                f"not --method {args.method}")
    if round(args.mine_ratio * args.batch_size) < 1:
        p.error(f"--mine-ratio {args.mine_ratio} gives no unlabelled image per batch of "
                f"{args.batch_size}")
    if not 0 <= args.mine_threshold <= 1 or args.mine_weight < 0 or (args.mine_warmup or 0) < 0:
        p.error("--mine-threshold must lie in [0, 1], --mine-weight and --mine-warmup be >= 0")
    if args.dataset_weights is not None and len(args.dataset_weights) != len(args.datasets):
        p.error(f"--dataset-weights needs one weight per dataset ({len(args.datasets)}), "
                f"got {len(args.dataset_weights)}")
    if Path(args.out_dir).exists() and not Path(args.out_dir).is_dir():
        p.error(f"--out-dir {args.out_dir} is a file, not a folder")  # before any work
    return args


def step_generator(seed: int, rank: int, step: int) -> torch.Generator:
    """CPU generator for the mixing / pixel-sampling draws of one step on one rank."""
    return torch.Generator().manual_seed(hash((seed, rank, step)) % 2**63)  # int tuples hash stably


def compute_loss(args: argparse.Namespace, out: torch.Tensor, y_a: torch.Tensor, y_b: torch.Tensor,
                 w: torch.Tensor, bank: PrototypeBank | None, class_dataset: torch.Tensor,
                 gen: torch.Generator, out_u: torch.Tensor | None = None,
                 y_u: torch.Tensor | None = None, tau: torch.Tensor | float | None = None
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """out: (B, D, h, w) embeddings or (B, C, h, w) logits; targets (B, H, W) at input resolution;
    class_dataset: (C,) int64 dataset of each class, or the (C, num_datasets) bool membership.
    out_u (B_u, D, h, w): unlabelled embeddings (M10, MDP only), y_u (B_u, H, W): IGNORE on crop
    padding; they are mined after the bank update, which sees the labelled pixels only.
    bank: any prototype source of prototypes.build_prototypes; tau: the learned temperature
    (--learn-tau, a () tensor) or None for args.tau. Returns the loss and its detached parts
    (device scalars: read them only when logging)."""
    size = out.shape[-2:]
    y_a, y_b = (downsample_labels(y, size, args.label_purity) for y in (y_a, y_b))  # (B, h, w)
    w = downsample_labels(w, size)
    hard = hard_labels(y_a, y_b, w)  # (B, h, w): mixed pixels -> IGNORE
    if args.method == "pix2pix":
        loss = pix2pix_loss(out, hard, tau=args.tau, max_pixels=args.max_pixels, generator=gen)
        return loss, {"loss": loss.detach()}
    if bank is not None:
        bank.update(out.detach(), hard)  # M3: before this step's loss
        protos = bank.prototypes_with_grad(out, hard) if args.proto_grad else bank.prototypes
    B, K = out.shape[:2]
    feats = out.permute(0, 2, 3, 1).reshape(B, -1, K)  # (B, h*w, K)
    valid = (y_a.flatten(1) != IGNORE) | (y_b.flatten(1) != IGNORE)  # (B, h*w)
    keep = sample_pixels(valid, args.max_pixels, gen).flatten()  # (B*h*w,)
    feats = feats.reshape(-1, K)[keep]  # (N, K)
    y_a, y_b, w, hard = (t.flatten()[keep] for t in (y_a, y_b, w, hard))  # (N,)
    if args.method == "ce":
        loss = ce_loss(feats, y_a, y_b, w)
        return loss, {"loss": loss.detach()}
    if args.method == "multihead":
        loss = multihead_loss(feats, y_a, y_b, w, class_dataset)
        return loss, {"loss": loss.detach()}
    tau = args.tau if tau is None else tau
    filled = bank.filled
    loss = loss_con = prototype_contrast_loss(feats, protos, filled, y_a, y_b, w, tau=tau)
    parts = {"con": loss_con.detach(), "proto_cos": prototype_cosine(protos.detach(), filled)}
    if torch.is_tensor(tau):
        parts["tau"] = tau.detach()
    if not args.no_csc:
        similar = getattr(bank, "bank", None)  # --csc-similarity bank: learned + its own bank
        loss_csc = csc_loss(feats, protos, filled, hard, class_dataset, tau=tau, topk=args.topk,
                            similarity=None if similar is None else (similar.prototypes,
                                                                     similar.filled))
        loss = loss_con + args.csc_weight * loss_csc
        parts["csc"] = loss_csc.detach()
    if out_u is not None:  # M10
        valid_u = downsample_labels(y_u, out_u.shape[-2:]) != IGNORE  # (B_u, h, w)
        loss_u, frac = mine.mined_loss(out_u, valid_u, bank.prototypes, filled, tau,
                                       args.mine_threshold)
        loss = loss + args.mine_weight * loss_u
        parts.update(mined=loss_u.detach(), mined_frac=frac)
    return loss, {"loss": loss.detach(), **parts}


def build_model(args: argparse.Namespace, num_classes: int, device: torch.device) -> MDPNet:
    with_classifier = args.method in ("ce", "multihead")
    model = MDPNet(args.arch, args.output_stride, args.embed_dim,
                   num_classes=num_classes if with_classifier else 0, embed_norm=args.embed_norm)
    if args.init and args.init.startswith("imagenet:"):
        init_from_imagenet(model, args.init.split(":", 1)[1])
    elif args.init:  # sequential baseline: every tensor of the previous stage whose shape fits
        prev = utils.load_checkpoint(args.init)["model"]
        own = model.state_dict()
        fit = {k: v for k, v in prev.items() if k in own and own[k].shape == v.shape}
        if not any(k.startswith("backbone.") for k in fit):
            raise utils.CheckpointError(f"--init {args.init}: no backbone tensor fits {args.arch}")
        model.load_state_dict(fit, strict=False)
        if utils.is_main():
            print(f"initialised {len(fit)}/{len(own)} tensors from {args.init}")
    return model.to(device)


def build_data(args: argparse.Namespace) -> tuple[MultiDataset, MultiDataset | None]:
    """The labelled training set (M1) and the --unlabelled images (M10), None without."""
    dataset = build_multidataset(args.datasets, args.data_root, "train",
                                 train_transform(tuple(args.base_size), tuple(args.crop_size)),
                                 args.label_map)
    data_u = None
    if args.unlabelled:
        data_u = mine.build_unlabelled(args.unlabelled, args.data_root, train_transform(
            tuple(args.base_size), tuple(args.crop_size)))
    return dataset, data_u


def unlabelled_batch_size(args: argparse.Namespace) -> int:
    return round(args.mine_ratio * args.batch_size)  # per process


def build_samplers(args: argparse.Namespace, dataset: MultiDataset, data_u: MultiDataset | None,
                   world: int, rank: int) -> tuple[Sampler, Sampler | None, int, int]:
    """(sampler, unlabelled sampler or None, steps per epoch, total steps); the unlabelled stream is
    sharded like the labelled one, from its own seed. Sets --mine-warmup's default, 10% of it."""
    sampler = DatasetMixSampler(dataset.sizes, args.dataset_weights, world, rank, seed=args.seed)
    iters_per_epoch = utils.batches_per_epoch(dataset, sampler, args.batch_size)
    total = args.iters or args.epochs * iters_per_epoch
    sampler_u = None
    if data_u is not None:
        sampler_u = DatasetMixSampler(data_u.sizes, None, world, rank,
                                      seed=mine.unlabelled_seed(args.seed))
        utils.batches_per_epoch(data_u, sampler_u, unlabelled_batch_size(args))  # too few: now
        if args.mine_warmup is None:
            args.mine_warmup = total // 10
    return sampler, sampler_u, iters_per_epoch, total


def build_optimization(args: argparse.Namespace, model: MDPNet, num_classes: int, total: int,
                       device: torch.device) -> tuple[torch.nn.Module, dict, torch.dtype | None]:
    """(the module to run forward through: DDP / compiled, or the model; the training states by
    checkpoint key; the autocast dtype). The prototype source (M3 bank or [ours]) for MDP and the
    learned temperature sit in optimizer groups of their own, without weight decay."""
    bank = logit_scale = None
    if args.method == "mdp":
        bank = build_prototypes(args.prototypes, num_classes, args.embed_dim, args.bank_size,
                                args.seed, args.csc_similarity == "bank").to(device)
    if args.learn_tau:
        logit_scale = LogitScale(args.tau).to(device)
    model, ddp = utils.wrap_model(model, device, args.sync_bn)
    groups = [{"params": list(model.parameters())}]
    if bank is not None and list(bank.parameters()):
        groups.append({"params": list(bank.parameters()), "weight_decay": 0.0})
    if logit_scale is not None:
        groups.append({"params": list(logit_scale.parameters()), "weight_decay": 0.0,
                       "lr": args.tau_lr})
    if args.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum,
                                    weight_decay=args.weight_decay, foreach=True)
    else:
        optimizer = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay,
                                      foreach=True)
    scheduler = utils.build_scheduler(optimizer, args.schedule, total, args.warmup_iters,
                                      min_lr=args.min_lr)
    amp = utils.amp_dtype(args.amp, device)
    args.amp_dtype = utils.amp_name(amp)  # what `auto` chose, recorded in config.json
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    if args.compile:
        ddp = torch.compile(ddp)  # `model` stays the plain module: checkpoints keep their keys
    return ddp, dict(model=model, bank=bank, logit_scale=logit_scale, optimizer=optimizer,
                     scheduler=scheduler, scaler=scaler), amp


def describe_space(sd: dict) -> str:
    """A LabelSpace.state_dict in words, for the resume error."""
    m = sd.get("label_map")
    return f"{sd['names']}" + (f" with a label map ({len(m['merge'])} merged groups, "
                               f"{len(m['ignore'])} dropped classes)" if m else "")


# What a resumed run may change: where and how it runs, not what it trains. --iters / --epochs may
# grow, to continue a run (with a constant lr that equals one longer run; tests/test_mine.py and
# test_label_map.py do so). --datasets, --label-map and --data-root are compared through the label
# space (dataset names, classes, merged map), not as paths, so data may move; --amp through the
# precision it chose (amp_dtype). Every other flag must equal the checkpoint's.
FREE_ON_RESUME = ("out_dir", "resume", "workers", "log_interval", "save_interval",
                  "skip_data_check", "compile", "show_batch", "iters", "epochs", "amp", "datasets",
                  "label_map", "data_root")


def maybe_resume(args: argparse.Namespace, states: dict, label_space: LabelSpace) -> int:
    """--resume PATH, or auto (OUT_DIR/last.pth if present): loads every non-None entry of
    `states` and the RNG state; returns the step to continue from (0: a fresh run). Refuses another
    label space and other training flags (FREE_ON_RESUME)."""
    out_dir, resume = Path(args.out_dir), args.resume
    if resume == "auto":  # pre-emptible jobs: resume if a checkpoint exists, else start
        resume = out_dir / "last.pth" if (out_dir / "last.pth").is_file() else None
    if not resume:
        return 0
    ckpt = utils.load_checkpoint(resume)  # on CPU: the RNG states must stay CPU tensors
    if ckpt.get("task") != "pretrain":
        raise utils.CheckpointError(f"{resume} is not a pretraining checkpoint")
    if ckpt["label_space"] != label_space.state_dict():
        old, new = describe_space(ckpt["label_space"]), describe_space(label_space.state_dict())
        maps_differ = ckpt["label_space"].get("label_map") != label_space.label_map
        raise utils.CheckpointError(f"{resume} was trained on {old}, not {new}"
                                    + (" (the label maps differ)" if old == new and maps_differ
                                       else ""))
    utils.check_same_flags(resume, ckpt.get("args") or {}, vars(args), FREE_ON_RESUME,
                           vars(get_args([])), {"amp_dtype": "--amp"})
    for k, m in states.items():  # model, bank, logit_scale, optimizer, scheduler, scaler
        if m is not None:
            m.load_state_dict(ckpt[k])
    utils.set_rng_state(ckpt["rng"])
    if utils.is_main():
        print(f"resumed from {resume} at step {ckpt['step']}")
    return ckpt["step"]


def run_step(args: argparse.Namespace, ddp: torch.nn.Module, states: dict,
             amp: torch.dtype | None, batch: tuple, batch_u: tuple | None, step: int,
             class_dataset: torch.Tensor, extra: list[torch.nn.Parameter], device: torch.device
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One step (M7) on this rank: mix (M6) -> embed (M2) -> loss (M3-M5, M10) -> update.
    batch: images (B, 3, H, W), labels (B, H, W), dataset index (B,); batch_u: unlabelled images
    (B_u, 3, H, W) and labels (B_u, H, W), or None; class_dataset: (C, num_datasets) membership.
    Returns the loss and its parts, device scalars."""
    bank, logit_scale = states["bank"], states["logit_scale"]
    optimizer, scaler = states["optimizer"], states["scaler"]
    gen = step_generator(args.seed, utils.get_rank(), step)
    images, labels, didx = batch
    images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
    images, y_a, y_b, w = mix_batch(images, labels, didx, args.mix, gen,
                                    num_classes=class_dataset.shape[0])
    n_lab, y_u, out_u = images.shape[0], None, None
    if batch_u is not None:
        images_u, y_u = (t.to(device, non_blocking=True) for t in batch_u)
        images = torch.cat([images, images_u])  # one forward pass (M10), no mixing
    if device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    with utils.autocast(device, amp):
        out = ddp(images)
    out = out.float()
    if y_u is not None:
        out, out_u = out[:n_lab], out[n_lab:]
    loss, parts = compute_loss(args, out, y_a, y_b, w, bank, class_dataset, gen, out_u, y_u,
                               logit_scale and logit_scale.tau)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    utils.average_gradients(extra)
    scaler.step(optimizer)
    scaler.update()
    states["scheduler"].step()
    return loss, parts


def train_loop(args: argparse.Namespace, ddp: torch.nn.Module, states: dict,
               amp: torch.dtype | None, dataset: MultiDataset, sampler: Sampler,
               data_u: MultiDataset | None, sampler_u: Sampler | None, step: int, total: int,
               device: torch.device) -> None:
    """Steps `step` to `total`: logs every --log-interval steps, saves OUT_DIR/last.pth every
    --save-interval steps and at the end; on SIGTERM saves and exits (utils.exit_preempted)."""
    out_dir, world, use_cuda = Path(args.out_dir), utils.get_world_size(), device.type == "cuda"
    logger = utils.JsonlLogger(out_dir / "log.jsonl", append=step > 0)
    class_dataset = dataset.label_space.membership.to(device)  # (C, num_datasets): merged (M1, M5)
    # learned prototypes and temperature live outside DDP: gradients averaged by hand
    extra = [q for k in ("bank", "logit_scale") if states[k] is not None
             for q in states[k].parameters()]
    stop = utils.StopFlag()
    # No host sync in a step: loss parts stay on the device, and the finite-loss check and the
    # SIGTERM broadcast run only where the loop logs or saves anyway.
    first_bad = torch.zeros((), dtype=torch.long, device=device)  # utils.note_non_finite
    with tqdm(total=total, initial=step, disable=not utils.is_main(), dynamic_ncols=True) as bar:
        ddp.train()
        t0, seen = time.time(), 0  # labelled images, all processes: the throughput's unit
        stream_u = None  # unlabelled batches, made at the first mining step (none in the warm-up)
        while step < total:
            epoch, loader = utils.epoch_loader(dataset, sampler, step, args.batch_size, args.seed,
                                               args.workers, pin_memory=use_cuda)
            for images, labels, didx in loader:
                batch_u = None
                if data_u is not None and step >= args.mine_warmup:
                    if stream_u is None:  # unlabelled batch k goes with step warm-up + k
                        stream_u = mine.unlabelled_batches(
                            data_u, sampler_u, step - args.mine_warmup, unlabelled_batch_size(args),
                            mine.unlabelled_seed(args.seed), args.workers, use_cuda)
                    batch_u = next(stream_u)
                loss, parts = run_step(args, ddp, states, amp, (images, labels, didx), batch_u,
                                       step, class_dataset, extra, device)
                first_bad = utils.note_non_finite(first_bad, loss, step)
                step += 1
                seen += images.shape[0] * world  # the unlabelled images are not counted
                bar.update(1)
                log_now = step % args.log_interval == 0 or step == total
                save_now = step % args.save_interval == 0 or step == total
                if not (log_now or save_now):
                    continue
                utils.stop_if_non_finite(first_bad, out_dir / "last.pth")
                if log_now:
                    ips = seen / (time.time() - t0)
                    lr = states["optimizer"].param_groups[0]["lr"]
                    parts = {k: v.item() for k, v in parts.items()}
                    mined = {k: f"{parts[k]:.2f}" for k in ("mined_frac",) if k in parts}
                    bar.set_postfix(loss=f"{parts['loss']:.3f}", lr=f"{lr:.2e}",
                                    labelled_img_s=f"{ips:.1f}", **mined)
                    logger.log(step=step, epoch=epoch, lr=lr, labelled_img_per_s=ips, **parts)
                preempted = utils.broadcast_flag(stop.requested, device)
                if save_now or preempted:
                    utils.save_checkpoint({"task": "pretrain", **{
                        k: None if m is None else m.state_dict() for k, m in states.items()},
                        "step": step, "rng": utils.rng_state(),
                        "label_space": dataset.label_space.state_dict(), "args": vars(args)},
                        out_dir / "last.pth")
                if preempted:
                    utils.exit_preempted(out_dir / "last.pth", step, "auto")
                if step >= total:
                    break


def main(argv: list[str] | None = None) -> None:
    args = get_args(argv)
    rank, world, device = utils.init_distributed()
    dataset, data_u = build_data(args)
    space: LabelSpace = dataset.label_space
    if args.show_batch:
        if utils.is_main():
            show_batch(dataset, args.show_batch, args.mix, step_generator(args.seed, 0, 0),
                       Path(args.out_dir) / "batch.png", args.seed, args.dataset_weights)
        return utils.cleanup_distributed()

    torch.manual_seed(args.seed)  # identical initial weights on every rank
    model = build_model(args, space.num_classes, device)
    sampler, sampler_u, iters_per_epoch, total = build_samplers(args, dataset, data_u, world, rank)
    ddp, states, amp = build_optimization(args, model, space.num_classes, total, device)
    step = maybe_resume(args, states, space)
    if not args.skip_data_check:  # a bad file ends the run here, named, not when a step reads it
        utils.check_data(dataset.readers + (data_u.readers if data_u else []), args.workers)
    utils.save_config(args, args.out_dir)

    if utils.is_main():
        print(f"{args.method} on {describe_space(space.state_dict())}: C={space.num_classes} "
              f"classes, {sum(dataset.sizes)} images, {world} process(es) x {args.batch_size}, "
              f"{total} steps ({iters_per_epoch}/epoch) on {device}, {args.amp_dtype}")
        if data_u is not None:
            print(f"mining {sum(data_u.sizes)} unlabelled images ({' '.join(args.unlabelled)}), "
                  f"{unlabelled_batch_size(args)} per process and step from step "
                  f"{args.mine_warmup}")
    train_loop(args, ddp, states, amp, dataset, sampler, data_u, sampler_u, step, total, device)
    if utils.is_main():
        last = Path(args.out_dir) / "last.pth"
        print(f"done: {last} (export the backbone with `python mdp.py export --ckpt {last} "
              f"--out {args.arch}_{args.method}.pth`)")
    utils.cleanup_distributed()


if __name__ == "__main__":
    utils.run_cli(main)
