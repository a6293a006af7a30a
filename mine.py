"""Mining unlabelled images with the prototypes (METHOD.md M10).

Pretraining (`train_pretrain.py --unlabelled SRC ...`) adds, after a labelled-only warm-up, a batch
of unlabelled images to every step: same augmentation (no mixing), same forward pass. Each of their
pixels takes the class of its most probable prototype under M4's softmax when that probability
reaches a threshold, and IGNORE otherwise (`pseudo_labels`); the mined pixels add a weighted M4 term
(`mined_loss`) but feed neither the prototype bank nor CSC. This module also writes a checkpoint's
pseudo-labels as PNGs for a person to look at:

    python mine.py --ckpt runs/pretrain/last.pth --images coco_stuff --data-root data \
        --out runs/mined

Unlabelled sources: a dataset name the readers know (`voc`, `coco_stuff`, `folder:PATH`, ...; its
images only, labels never read), or `images:PATH`, every *.jpg / *.jpeg / *.png below PATH, sorted
(a relative PATH is under --data-root, as for folder:PATH).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

import utils
from datasets import (IGNORE, READERS, LabelSpace, MultiDataset, _open, build_reader,
                      class_colours, denormalize, draw_labels, eval_transform)
from losses import _masked_logits, downsample_labels, prototype_contrast_loss
from mdp import MDPNet
from prototypes import LogitScale, prototypes_from_state

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


# ---------------------------------------------------------------------------------------- the rule
@torch.no_grad()
def pseudo_labels(z: torch.Tensor, prototypes: torch.Tensor, filled: torch.Tensor, tau: float,
                  threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """M10: q_p = softmax_c(z_p . p_c / tau) over the filled prototypes (M4's masked logits);
    label_p = argmax_c q_pc if max_c q_pc >= threshold, else IGNORE. A tie goes to the first
    (lowest) class index, as torch.max. Computed without gradient: the target is a constant.

    z (N, D), prototypes (C, D), filled (C,) bool -> labels (N,) int64, confidence (N,) = max_c q_pc
    (0 where no prototype is filled: every label is then IGNORE, whatever the threshold). Fixed
    shapes, nothing read back from the device.
    """
    q = _masked_logits(z.detach(), prototypes, filled, tau).softmax(1)  # (N, C); empty ones get 0
    conf, labels = q.max(1)  # (N,), (N,): first index among equal maxima
    any_filled = filled.any()  # a 0-d device tensor, not a host bool
    conf = torch.where(any_filled, conf, 0.0)
    return torch.where(any_filled & (conf >= threshold), labels, IGNORE), conf


def mined_loss(z: torch.Tensor, valid: torch.Tensor, prototypes: torch.Tensor, filled: torch.Tensor,
               tau: float, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """M10's loss term on unlabelled embeddings: M4's contrast (one-hot targets) towards each
    mined pixel's pseudo-label, averaged over the mined pixels (0 with zero gradients when none).

    z (B, D, h, w), valid (B, h, w) bool (image pixels, not crop padding) -> (loss, fraction of the
    valid pixels mined), two device scalars. No masked indexing: unmined pixels travel as IGNORE.
    """
    feats = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])  # (B*h*w, D)
    labels, _ = pseudo_labels(feats, prototypes, filled, tau, threshold)
    labels = torch.where(valid.flatten(), labels, IGNORE)  # (B*h*w,)
    one = torch.ones(labels.shape, dtype=feats.dtype, device=feats.device)  # w = 1: y_a only
    loss = prototype_contrast_loss(feats, prototypes, filled, labels, labels, one, tau)
    return loss, (labels != IGNORE).sum() / valid.sum().clamp(min=1)


def threshold_for_precision(conf: torch.Tensor, correct: torch.Tensor,
                            precision: float = 0.9) -> float | None:
    """[ours] The lowest threshold t at which the pixels whose confidence reaches it (conf >= t)
    are at least `precision` correct, i.e. the most pixels a threshold can mine while its
    pseudo-labels stay that good; t is one of the confidences, None when no t gives `precision`.
    conf (N,) top prototype probabilities, correct (N,) bool: the top class is the pixel's label."""
    if conf.numel() == 0:
        return None
    c, order = conf.double().sort(descending=True)  # (N,)
    hits = correct[order].double().cumsum(0) / torch.arange(1, len(c) + 1, dtype=torch.float64)
    # a threshold takes every pixel of its confidence: read each tie group at its last pixel
    ends = torch.cat([c[:-1] != c[1:], torch.tensor([True])])  # (N,)
    ok = (ends & (hits >= precision)).nonzero()
    return float(c[ok.max()]) if len(ok) else None


# -------------------------------------------------------------------------------------------- data
class UnlabelledImages(Dataset):
    """Images as a reader for datasets.MultiDataset: items (PIL image, (H, W) uint8 zeros). The
    zeros are no class: through the train augmentation they mark the image's pixels, and the crop's
    padding (255, then IGNORE) the pixels that are not the image (never mined)."""
    classes = ["image"]

    def __init__(self, name: str, files: list[Path]):
        self.name, self.files = name, files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Image.Image, np.ndarray]:
        image = _open(self.files[i]).convert("RGB")
        return image, np.zeros((image.height, image.width), np.uint8)


def unlabelled_source(spec: str, data_root: str | Path, split: str = "train") -> UnlabelledImages:
    """`images:PATH` (every *.jpg / *.jpeg / *.png below PATH, sorted; relative to data_root), or a
    dataset name of datasets.build_reader, its `split` without its labels."""
    if spec.startswith("images:"):
        path = Path(spec[len("images:"):])
        path = path if path.is_absolute() else Path(data_root) / path
        if not path.is_dir():
            raise FileNotFoundError(f"unlabelled source {spec}: {path} is not a directory")
        files = sorted(p for p in path.rglob("*")
                       if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise ValueError(f"unlabelled source {spec}: no *.jpg, *.jpeg or *.png under {path}")
        return UnlabelledImages(spec, files)
    if spec not in READERS and not spec.startswith("folder:"):
        raise ValueError(f"unknown unlabelled source {spec!r}: expected a dataset "
                         f"({', '.join(READERS)}, folder:PATH) or images:PATH")
    return UnlabelledImages(spec, [img for img, _ in build_reader(spec, data_root, split).files])


def build_unlabelled(specs: list[str], data_root: str | Path, transform) -> MultiDataset:
    """The unlabelled sources as one MultiDataset; items (image, label: 0 on the image and IGNORE on
    crop padding, source index)."""
    if len(set(specs)) != len(specs):
        raise ValueError(f"--unlabelled names a source twice: {' '.join(specs)}")
    return MultiDataset([unlabelled_source(s, data_root) for s in specs], transform)


def unlabelled_seed(seed: int) -> int:
    """The unlabelled stream's seed: not --seed itself, so its sample i does not repeat the
    augmentation draws of labelled sample i (KeyedAugmentation keys by (seed, epoch, i))."""
    return hash((seed, -1)) % 2**31  # int tuples hash stably


def unlabelled_batches(dataset: MultiDataset, sampler: torch.utils.data.Sampler, start: int,
                       batch_size: int, seed: int, workers: int,
                       pin_memory: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (images (B, 3, H, W), labels (B, H, W)) batches from batch `start` on. Batch k is
    utils.epoch_loader's (epoch_u, first = divmod(k, batches per epoch)), a function of k alone,
    so a stream started at k continues one started at 0 bit for bit (resume); a new epoch's loader
    is made when one runs out. Under DDP the sampler shards as the labelled one does."""
    k = start
    while True:
        _, loader = utils.epoch_loader(dataset, sampler, k, batch_size, seed, workers, pin_memory)
        for images, labels, _ in loader:
            yield images, labels
            k += 1


# ----------------------------------------------------------------------------------- looking at it
def legend_panel(rows: list[tuple[str, tuple[int, int, int], float]], height: int) -> Image.Image:
    """A white panel naming classes: a colour square, the name, the pixel share, one row each."""
    from PIL import ImageDraw

    panel = Image.new("RGB", (230, max(height, 14 * len(rows) + 4)), "white")
    draw = ImageDraw.Draw(panel)
    for j, (name, colour, frac) in enumerate(rows):
        y = 2 + 14 * j
        draw.rectangle([4, y + 1, 14, y + 11], fill=colour)
        draw.text((18, y), f"{name[:30]} {100 * frac:.0f}%", fill="black")
    return panel


def picture(x: torch.Tensor, labels: torch.Tensor, conf: torch.Tensor,
            colours: list[tuple[int, int, int]], rows: list) -> Image.Image:
    """The image | its pseudo-labels (IGNORE left clear) | the confidence (white = 1) | the legend.
    x (3, H, W) normalised; labels, conf (1, h, w) at feature resolution, upsampled nearest: each
    feature paints its stride x stride cell (M4's convention)."""
    size = tuple(x.shape[1:])
    img8 = (denormalize(x) * 255).round().to(torch.uint8)  # (3, H, W)
    over = draw_labels(img8, downsample_labels(labels, size)[0], colours)
    conf8 = (downsample_labels(conf, size) * 255).round().to(torch.uint8).expand(3, -1, -1)
    tiles = [Image.fromarray(t.permute(1, 2, 0).numpy()) for t in (img8, over, conf8)]
    tiles.append(legend_panel(rows, size[0]))
    canvas = Image.new("RGB", (sum(t.width + 2 for t in tiles), max(t.height for t in tiles)),
                       "white")
    for k, t in enumerate(tiles):
        canvas.paste(t, (sum(u.width + 2 for u in tiles[:k]), 0))
    return canvas


def quantiles(conf: torch.Tensor) -> dict[str, float]:
    """Median, 90th percentile and max of features' top probabilities (N,): what a threshold
    would mine, e.g. why the default 0.9 mines nothing from prototypes that are close together."""
    q = torch.quantile(conf.float(), torch.tensor([0.5, 0.9, 1.0]))
    return {"median": q[0].item(), "p90": q[1].item(), "max": q[2].item()}


def main(argv: list[str] | None = None) -> None:
    p = utils.ArgumentParser(description="write the pseudo-labels that a pretraining checkpoint's "
                                         "prototypes give unlabelled images (METHOD.md M10)")
    p.add_argument("--ckpt", required=True, help="a train_pretrain.py checkpoint of --method mdp")
    p.add_argument("--images", required=True,
                   help="a dataset name (voc, coco_stuff, folder:PATH, ...), images:PATH, "
                        "or a folder")
    p.add_argument("--data-root", default="data")
    p.add_argument("--split", default="train", choices=["train", "val"], help="of a dataset name")
    p.add_argument("--out", required=True, type=Path, help="folder for the PNGs and legend.json")
    p.add_argument("--num", type=int, default=8, help="first N images of the source")
    p.add_argument("--base-size", nargs=2, type=int, default=[2048, 512], metavar=("W", "H"),
                   help="each image is resized to fit (keep ratio), as in evaluation")
    p.add_argument("--threshold", type=float, default=None,
                   help="default: the checkpoint's --mine-threshold (0.9 if it has none)")
    p.add_argument("--top", type=int, default=5, help="largest mined classes named per image")
    args = p.parse_args(argv)
    if args.num < 1 or args.top < 1:
        p.error(f"--num and --top must be >= 1, got {args.num} and {args.top}")
    state = utils.load_checkpoint(args.ckpt, required=("model", "args", "label_space"))
    train_args = state["args"]
    is_mdp = train_args.get("method") == "mdp" and state.get("bank")
    if state.get("task") != "pretrain" or not is_mdp:
        raise utils.CheckpointError(f"{args.ckpt} is not an MDP pretraining checkpoint "
                                    f"(mining needs its prototype bank)")
    threshold = args.threshold
    if threshold is None:
        threshold = train_args.get("mine_threshold")
        threshold = 0.9 if threshold is None else threshold  # checkpoints from before M10
    space = LabelSpace.from_state_dict(state["label_space"])  # carries a --label-map's merges
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = MDPNet(train_args["arch"], train_args["output_stride"], train_args["embed_dim"],
                   embed_norm=train_args.get("embed_norm", "none"))
    model.load_state_dict(state["model"])
    model.to(device).eval()
    protos, filled = (t.to(device) for t in prototypes_from_state(state["bank"]))  # (C, D), (C,)
    colours = class_colours(space.num_classes)

    src = args.images
    if src not in READERS and ":" not in src:  # a bare folder
        src = f"images:{Path(src).resolve()}"
    reader = unlabelled_source(src, args.data_root, args.split)
    data = MultiDataset([reader], eval_transform(tuple(args.base_size)))
    args.out.mkdir(parents=True, exist_ok=True)
    tau = train_args["tau"]
    if state.get("logit_scale"):  # --learn-tau: the temperature training ended with
        tau = float(LogitScale.tau_of(state["logit_scale"]["log_scale"]))
    legend = {"ckpt": str(args.ckpt), "threshold": threshold, "tau": tau, "images": []}
    confidences = []  # every feature's top probability: where the threshold falls among them
    for i in range(min(args.num, len(reader))):
        x = data[i][0]  # (3, H, W) normalised
        with torch.no_grad():
            z = model(x[None].to(device)).float()[0]  # (D, h, w)
        h, w = z.shape[1:]
        labels, conf = pseudo_labels(z.flatten(1).t(), protos, filled, tau, threshold)
        labels, conf = labels.cpu().view(1, h, w), conf.cpu().view(1, h, w)
        # shares at feature resolution: the pixels training would mine
        counts = torch.bincount(labels[labels != IGNORE], minlength=space.num_classes)
        order = counts.argsort(descending=True, stable=True).tolist()  # ties: lower id first
        top = [c for c in order[:args.top] if counts[c]]
        rows = [(space.class_names[c], colours[c], counts[c].item() / (h * w)) for c in top]
        name = f"{i:03d}_{Path(reader.files[i]).stem}.png"
        picture(x, labels, conf, colours, rows).save(args.out / name)
        mined = (labels != IGNORE).float().mean().item()
        confidences.append(conf.flatten())
        legend["images"].append({"png": name, "image": str(reader.files[i]), "mined_frac": mined,
                                 "confidence": quantiles(confidences[-1]),
                                 "classes": [{"id": c, "name": n, "frac": f}
                                             for c, (n, _, f) in zip(top, rows)]})
        print(f"{args.out / name}: {100 * mined:.0f}% mined; "
              + ", ".join(f"{n} {100 * f:.0f}%" for n, _, f in rows))
    legend["confidence"] = quantiles(torch.cat(confidences))
    print(f"top prototype probability of the {len(confidences)} images' features: "
          + ", ".join(f"{k} {v:.3f}" for k, v in legend["confidence"].items())
          + f"; the threshold is {threshold}")
    (args.out / "legend.json").write_text(json.dumps(legend, indent=1))
    print(f"wrote {args.out / 'legend.json'} (panels: image | pseudo-labels, below the threshold "
          f"{threshold} left clear | confidence, white = 1 | the largest mined classes)")


if __name__ == "__main__":
    utils.run_cli(main)
