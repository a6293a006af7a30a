"""MDP pretraining (M1-M8, M10): one process with `python`, DDP with `torchrun`.

    python train_pretrain.py --datasets voc ade20k --data-root data
    torchrun --nproc_per_node=8 train_pretrain.py --datasets voc ade20k --data-root data

One step (M7):  mix the batch (M6) -> embed (M2) -> update the prototype bank from the hard-labelled
pixels of the whole global batch (M3) -> L = L_con (M4) + csc_weight * L_csc (M5).
`--unlabelled SRC ...` (M10, mine.py): after a warm-up, unlabelled images join the forward pass;
their confidently mined pixels add mine_weight * L_con(pseudo-labels), feeding neither bank nor CSC.
`--method ce|multihead|pix2pix` trains the M8 baselines with the same data, network and schedule.

Randomness is keyed, not streamed: augmentation by (seed, epoch, sample index), mixing and pixel
sampling by (seed, rank, step). So `--resume` continues bit-for-bit (on CPU) whatever the number of
data-loader workers and wherever the run was interrupted.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from tqdm import tqdm

import mine
import utils
from datasets import (IGNORE, DatasetMixSampler, LabelSpace, MultiDataset, build_multidataset,
                      train_transform)
from losses import (ce_loss, csc_loss, downsample_labels, multihead_loss, pix2pix_loss,
                    prototype_contrast_loss)
from mdp import ARCHS, MDPNet, init_from_imagenet
from mixing import hard_labels, mix_batch
from prototypes import LogitScale, PrototypeBank, build_prototypes


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
    p.add_argument("--mix", default=None, choices=["none", "region", "pixel", "both"],
                   help="cross-dataset mixing (default: both for mdp, none for the baselines)")
    p.add_argument("--label-purity", type=float, default=0.0, metavar="P",
                   help="keep a feature's label only if >= P of its cell's pixels share it "
                        "(M4; default 0: plain nearest sampling)")
    p.add_argument("--prototypes", default="bank", choices=["bank", "anchors", "learned"],
                   help="M3: the two-step bank of the source; [ours] anchors = fixed random "
                        "orthonormal class anchors, learned = free prototypes (cosine classifier)")
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
    return args


def step_generator(seed: int, rank: int, step: int) -> torch.Generator:
    """CPU generator for the mixing / pixel-sampling draws of one step on one rank."""
    return torch.Generator().manual_seed(hash((seed, rank, step)) % 2**63)  # int tuples hash stably


def sample_pixels(valid: torch.Tensor, max_pixels: int, gen: torch.Generator) -> torch.Tensor:
    """Keeps at most `max_pixels` random valid pixels per image (M4 --max-pixels).

    valid: (B, P) bool -> (B, P) bool subset.
    """
    if max_pixels <= 0 or max_pixels >= valid.shape[1]:
        return valid
    score = torch.rand(valid.shape, generator=gen).to(valid.device)
    score = score.masked_fill(~valid, -1.0)
    top = score.topk(max_pixels, dim=1).indices  # (B, max_pixels)
    keep = torch.zeros_like(valid).scatter_(1, top, True)
    return keep & valid


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
    (--learn-tau, a () tensor) or None for args.tau. Returns the loss and its detached parts (device scalars: read them only when logging)."""
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
        loss_csc = csc_loss(feats, protos, filled, hard, class_dataset, tau=tau, topk=args.topk)
        loss = loss_con + args.csc_weight * loss_csc
        parts["csc"] = loss_csc.detach()
    if out_u is not None:  # M10
        valid_u = downsample_labels(y_u, out_u.shape[-2:]) != IGNORE  # (B_u, h, w)
        loss_u, frac = mine.mined_loss(out_u, valid_u, bank.prototypes, filled, tau,
                                       args.mine_threshold)
        loss = loss + args.mine_weight * loss_u
        parts.update(mined=loss_u.detach(), mined_frac=frac)
    return loss, {"loss": loss.detach(), **parts}


def prototype_cosine(protos: torch.Tensor, filled: torch.Tensor) -> torch.Tensor:
    """Mean cosine between two different filled prototypes, a () tensor (0 with fewer than two):
    logged during training to follow the prototypes apart or together. protos (C, D) unit rows."""
    pair = (filled[:, None] & filled[None, :]).float().fill_diagonal_(0)  # (C, C)
    return ((protos @ protos.t()) * pair).sum() / pair.sum().clamp(min=1)


def build_model(args: argparse.Namespace, num_classes: int, device: torch.device) -> MDPNet:
    with_classifier = args.method in ("ce", "multihead")
    model = MDPNet(args.arch, args.output_stride, args.embed_dim,
                   num_classes=num_classes if with_classifier else 0)
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


def build_data(args: argparse.Namespace) -> MultiDataset:
    return build_multidataset(args.datasets, args.data_root, "train",
                              train_transform(tuple(args.base_size), tuple(args.crop_size)),
                              args.label_map)


def describe_space(sd: dict) -> str:
    """A LabelSpace.state_dict in words, for the resume error."""
    m = sd.get("label_map")
    return f"{sd['names']}" + (f" with a label map ({len(m['merge'])} merged groups, "
                               f"{len(m['ignore'])} dropped classes)" if m else "")


def class_colours(num_classes: int) -> list[tuple[int, int, int]]:
    """Fixed, distinct colours per global class (show_batch, mine.py)."""
    gen = torch.Generator().manual_seed(0)
    return [tuple(c) for c in torch.randint(40, 256, (num_classes, 3), generator=gen).tolist()]


def show_batch(args: argparse.Namespace, dataset: MultiDataset) -> None:
    """Writes OUT_DIR/batch.png: N augmented, mixed images beside their label overlays (M6 made
    visible: region boxes drawn in white, pixel-level "intermediate class" areas hatched)."""
    from torchvision.utils import draw_bounding_boxes, make_grid, save_image

    from datasets import denormalize, draw_labels
    from mixing import REGION

    n = args.show_batch
    sampler = DatasetMixSampler(dataset.sizes, args.dataset_weights, 1, 0, seed=args.seed)
    _, loader = utils.epoch_loader(dataset, sampler, 0, n, args.seed, workers=0)  # first batch
    images, labels, didx = next(iter(loader))
    images, y_a, _, w, info = mix_batch(images, labels, didx, args.mix,
                                        step_generator(args.seed, 0, 0), return_info=True)
    colours = class_colours(dataset.label_space.num_classes)
    tiles = []
    for i, img in enumerate(denormalize(images)):
        img8 = (img * 255).round().to(torch.uint8)  # (3, H, W)
        over = draw_labels(img8, y_a[i], colours)
        ys, xs = torch.meshgrid(torch.arange(w.shape[1]), torch.arange(w.shape[2]), indexing="ij")
        hatch = (w[i] < 1) & ((ys + xs) % 4 == 0)  # (H, W) intermediate-class pixels
        over = torch.where(hatch, torch.full_like(over, 255), over)
        if info["mode"][i] == REGION:
            over = draw_bounding_boxes(over, info["boxes"][i:i + 1], colors="white", width=1)
        tiles += [img8, over]
    grid = make_grid(torch.stack(tiles).float() / 255, nrow=2, padding=2, pad_value=1.0)
    out = Path(args.out_dir) / "batch.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, out)
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> None:
    args = get_args(argv)
    rank, world, device = utils.init_distributed()
    out_dir = Path(args.out_dir)
    dataset = build_data(args)
    label_space: LabelSpace = dataset.label_space
    if args.show_batch:
        if utils.is_main():
            show_batch(args, dataset)
        return utils.cleanup_distributed()

    torch.manual_seed(args.seed)  # identical initial weights on every rank
    model = build_model(args, label_space.num_classes, device)
    bank = logit_scale = None
    if args.method == "mdp":  # M3, or an [ours] prototype source
        bank = build_prototypes(args.prototypes, label_space.num_classes, args.embed_dim,
                                args.bank_size, args.seed).to(device)
    if args.learn_tau:
        logit_scale = LogitScale(args.tau).to(device)
    # learned prototypes and temperature live outside DDP: gradients averaged by hand, no decay
    extra = [q for m in (bank, logit_scale) if m is not None for q in m.parameters()]
    use_cuda = device.type == "cuda"
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

    sampler = DatasetMixSampler(dataset.sizes, args.dataset_weights, world, rank, seed=args.seed)
    iters_per_epoch = utils.batches_per_epoch(dataset, sampler, args.batch_size)
    total = args.iters or args.epochs * iters_per_epoch
    if args.unlabelled:  # M10: a second keyed stream, sharded like the labelled one
        data_u = mine.build_unlabelled(args.unlabelled, args.data_root, train_transform(
            tuple(args.base_size), tuple(args.crop_size)))
        seed_u, batch_u = mine.unlabelled_seed(args.seed), round(args.mine_ratio * args.batch_size)
        sampler_u = DatasetMixSampler(data_u.sizes, None, world, rank, seed=seed_u)
        utils.batches_per_epoch(data_u, sampler_u, batch_u)  # too few images: fail now
        if args.mine_warmup is None:
            args.mine_warmup = total // 10
    scheduler = utils.build_scheduler(optimizer, args.schedule, total, args.warmup_iters,
                                      min_lr=args.min_lr)
    amp = utils.amp_dtype(args.amp, device)
    args.amp_dtype = utils.amp_name(amp)  # what `auto` chose, recorded in config.json
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    if args.compile:
        ddp = torch.compile(ddp)  # `model` stays the plain module: checkpoints keep their keys

    step = 0
    resume = args.resume
    if resume == "auto":  # pre-emptible jobs: resume if a checkpoint exists, else start
        resume = out_dir / "last.pth" if (out_dir / "last.pth").is_file() else None
    if resume:
        ckpt = utils.load_checkpoint(resume)  # on CPU: the RNG states must stay CPU tensors
        if ckpt.get("task") != "pretrain":
            raise utils.CheckpointError(f"{resume} is not a pretraining checkpoint")
        if ckpt["label_space"] != label_space.state_dict():
            old, new = describe_space(ckpt["label_space"]), describe_space(label_space.state_dict())
            maps_differ = ckpt["label_space"].get("label_map") != label_space.label_map
            raise utils.CheckpointError(f"{resume} was trained on {old}, not {new}"
                                        + (" (the label maps differ)" if old == new and maps_differ else ""))
        model.load_state_dict(ckpt["model"])
        if bank is not None:
            bank.load_state_dict(ckpt["bank"])
        if logit_scale is not None:
            logit_scale.load_state_dict(ckpt["logit_scale"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        utils.set_rng_state(ckpt["rng"])
        step = ckpt["step"]
        if utils.is_main():
            print(f"resumed from {resume} at step {step}")
    utils.save_config(args, out_dir)
    logger = utils.JsonlLogger(out_dir / "log.jsonl", append=step > 0)
    class_dataset = label_space.membership.to(device)  # (C, num_datasets): merged classes (M1, M5)
    stop = utils.StopFlag()

    def checkpoint() -> None:
        utils.save_checkpoint({
            "task": "pretrain", "model": model.state_dict(),
            "bank": bank.state_dict() if bank is not None else None,
            "logit_scale": logit_scale.state_dict() if logit_scale is not None else None,
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "step": step, "rng": utils.rng_state(),
            "label_space": label_space.state_dict(), "args": vars(args)}, out_dir / "last.pth")

    if utils.is_main():
        print(f"{args.method} on {describe_space(label_space.state_dict())}: "
              f"C={label_space.num_classes} classes, "
              f"{sum(dataset.sizes)} images, {world} process(es) x {args.batch_size}, "
              f"{total} steps ({iters_per_epoch}/epoch) on {device}, {args.amp_dtype}")
        if args.unlabelled:
            print(f"mining {sum(data_u.sizes)} unlabelled images ({' '.join(args.unlabelled)}), "
                  f"{batch_u} per process and step from step {args.mine_warmup}")
    # No host sync in a step: loss parts stay on the device, and the finite-loss check and the
    # SIGTERM broadcast run only where the loop logs or saves anyway.
    first_bad = torch.zeros((), dtype=torch.long, device=device)  # utils.note_non_finite
    with tqdm(total=total, initial=step, disable=not utils.is_main(), dynamic_ncols=True) as bar:
        ddp.train()
        t0, seen = time.time(), 0
        stream_u = None  # unlabelled batches, made at the first mining step (none in the warm-up)
        while step < total:
            epoch, loader = utils.epoch_loader(dataset, sampler, step, args.batch_size, args.seed,
                                               args.workers, pin_memory=use_cuda)
            for images, labels, didx in loader:
                gen = step_generator(args.seed, rank, step)
                images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                images, y_a, y_b, w = mix_batch(images, labels, didx, args.mix, gen,
                                                num_classes=label_space.num_classes)
                n_lab, y_u = images.shape[0], None
                if args.unlabelled and step >= args.mine_warmup:
                    if stream_u is None:  # unlabelled batch k goes with step warm-up + k
                        stream_u = mine.unlabelled_batches(
                            data_u, sampler_u, step - args.mine_warmup, batch_u, seed_u,
                            args.workers, use_cuda)
                    images_u, y_u = (t.to(device, non_blocking=True) for t in next(stream_u))
                    images = torch.cat([images, images_u])  # one forward pass (M10), no mixing
                if use_cuda:
                    images = images.contiguous(memory_format=torch.channels_last)
                with utils.autocast(device, amp):
                    out = ddp(images)
                out, out_u = out.float(), None
                if y_u is not None:
                    out, out_u = out[:n_lab], out[n_lab:]
                loss, parts = compute_loss(args, out, y_a, y_b, w, bank, class_dataset, gen,
                                           out_u, y_u, logit_scale and logit_scale.tau)
                first_bad = utils.note_non_finite(first_bad, loss, step)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                utils.average_gradients(extra)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                step += 1
                seen += images.shape[0] * world
                bar.update(1)
                log_now = step % args.log_interval == 0 or step == total
                save_now = step % args.save_interval == 0 or step == total
                if not (log_now or save_now):
                    continue
                utils.stop_if_non_finite(first_bad, out_dir / "last.pth")
                if log_now:
                    ips = seen / (time.time() - t0)
                    lr = optimizer.param_groups[0]["lr"]
                    parts = {k: v.item() for k, v in parts.items()}
                    mined = {k: f"{parts[k]:.2f}" for k in ("mined_frac",) if k in parts}
                    bar.set_postfix(loss=f"{parts['loss']:.3f}", lr=f"{lr:.2e}", img_s=f"{ips:.1f}",
                                    **mined)
                    logger.log(step=step, epoch=epoch, lr=lr, img_per_s=ips, **parts)
                preempted = utils.broadcast_flag(stop.requested, device)
                if save_now or preempted:
                    checkpoint()
                if preempted:
                    utils.exit_preempted(out_dir / "last.pth", step, "auto")
                if step >= total:
                    break
    if utils.is_main():
        print(f"done: {out_dir / 'last.pth'} (export the backbone with "
              f"`python mdp.py export --ckpt {out_dir / 'last.pth'} --out resnet50_mdp.pth`)")
    utils.cleanup_distributed()


if __name__ == "__main__":
    utils.run_cli(main)
