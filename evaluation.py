"""Evaluation for fine-tuning (METHOD.md M9): whole-image or sliding-window inference over the full
validation set and confusion-matrix mIoU, summed over ranks with no padded duplicates.

IoU_c = TP / (TP + FP + FN); a class absent from both ground truth and prediction is NaN and left
out of the mean; IGNORE pixels never count.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

import utils
from datasets import denormalize



def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K, K) int64, rows = ground truth, columns = prediction; IGNORE (any label outside [0, K))
    never counts."""
    keep = (target >= 0) & (target < num_classes)
    idx = target[keep].long() * num_classes + pred[keep].long()
    return torch.bincount(idx, minlength=num_classes**2).reshape(num_classes, num_classes)


def iou_from_confusion(cm: torch.Tensor) -> tuple[torch.Tensor, float]:
    """IoU_c = TP / (TP + FP + FN), NaN where the class is in neither GT nor prediction;
    mIoU = nanmean (NaN only when no class has a union)."""
    cm = cm.double()
    tp = cm.diag()
    union = cm.sum(0) + cm.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, math.nan))  # (K,)
    return iou, iou.nanmean().item()


def slide_inference(model: nn.Module, image: torch.Tensor, window: list[int],
                    stride: list[int]) -> torch.Tensor:
    """MMSeg 'slide': window logits summed and divided by the window count per pixel.
    image (1, 3, H, W) -> logits (1, K, H, W)."""
    (hc, wc), (hs, ws), (H, W) = window, stride, image.shape[-2:]
    out = count = None
    for i in range(max(H - hc + hs - 1, 0) // hs + 1):
        for j in range(max(W - wc + ws - 1, 0) // ws + 1):
            y2, x2 = min(i * hs + hc, H), min(j * ws + wc, W)
            y1, x1 = max(y2 - hc, 0), max(x2 - wc, 0)  # last window flush with the border
            logits = model(image[..., y1:y2, x1:x2])["out"].float()  # (1, K, y2-y1, x2-x1)
            if out is None:
                out = logits.new_zeros(1, logits.shape[1], H, W)
                count = logits.new_zeros(1, 1, H, W)
            out[..., y1:y2, x1:x2] += logits
            count[..., y1:y2, x1:x2] += 1
    return out / count


def save_overlay(path: Path, image: torch.Tensor, label: torch.Tensor, pred: torch.Tensor,
                 num_classes: int) -> None:
    """PNG: image | ground truth | prediction, palette colours over the image.
    image (3, h, w) normalised; label, pred (H, W)."""
    from torchvision.io import write_png
    from torchvision.utils import make_grid

    from datasets import draw_labels, voc_palette

    flat = voc_palette()  # 256 RGB triples, the PASCAL colour map
    colours = [tuple(flat[3 * (c % 256): 3 * (c % 256) + 3]) for c in range(num_classes)]
    img = F.interpolate(denormalize(image[None].float().cpu()), size=label.shape[-2:],
                        mode="bilinear", align_corners=False)[0]
    img = (img.clamp(0, 1) * 255).round().to(torch.uint8)  # (3, H, W)
    grid = make_grid([img, draw_labels(img, label.cpu(), colours),
                      draw_labels(img, pred.cpu(), colours)], nrow=3, padding=2, pad_value=255)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_png(grid, str(path))


def predict(model: nn.Module, image: torch.Tensor, size: torch.Size, window: list[int] | None,
            stride: list[int] | None, amp: torch.dtype | None = None) -> torch.Tensor:
    """image (1, 3, h, w) -> class map (1, H, W) at `size`, the label's original size (M9)."""
    with utils.autocast(image.device, amp):
        logits = slide_inference(model, image, window, stride) if window else model(image)["out"]
    logits = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)
    return logits.argmax(1)


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, num_classes: int, device: torch.device,
             window: list[int] | None = None, stride: list[int] | None = None,
             amp: torch.dtype | None = None,
             workers: int = 0, overlay_dir: Path | None = None, num_overlays: int = 0) -> dict:
    """Whole-image (or sliding-window when `window` is set) inference over the full validation set.

    Rank r takes images r, r + world, ... (no padded duplicates); batch 1 since sizes differ.
    `model` must be the unwrapped module (DDP's forward would sync on uneven shards).
    dataset[i] -> (image (3, h, w) normalised, label (H, W) int64 at original size, _).
    Returns {"cm" (K, K) summed over ranks, "iou" (K,), "miou", "aacc"} identical on every rank.
    """
    rank, world = utils.get_rank(), utils.get_world_size()
    was_training = model.training
    model.eval()
    loader = DataLoader(Subset(dataset, range(rank, len(dataset), world)), batch_size=1,
                        num_workers=workers, generator=torch.Generator())  # spares the global RNG
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    # eval transforms may draw: keep training's stream; the bar closes before an error prints
    with torch.random.fork_rng(devices=[]), tqdm(loader, desc="eval", leave=False,
                                                 disable=not utils.is_main()) as bar:
        for n, (image, label, _) in enumerate(bar):
            image, label = image.to(device), label.to(device)  # (1, 3, h, w), (1, H, W)
            pred = predict(model, image, label.shape[-2:], window, stride, amp)  # (1, H, W)
            cm += confusion_matrix(pred, label, num_classes)
            if overlay_dir is not None and n < num_overlays and utils.is_main():
                save_overlay(overlay_dir / f"val_{n * world:05d}.png", image[0], label[0],
                             pred[0], num_classes)
    utils.all_reduce_sum(cm)
    model.train(was_training)
    cm = cm.cpu()
    iou, miou = iou_from_confusion(cm)
    aacc = (cm.diag().sum() / cm.sum().clamp(min=1)).item()
    return {"cm": cm, "iou": iou, "miou": miou, "aacc": aacc}


def summarise(metrics: dict, names: list[str], step: int) -> dict:
    """Percent values, JSON-safe (absent classes -> null), as written to results.json."""
    pct = lambda v: None if math.isnan(v) else 100 * v  # noqa: E731
    return {"step": step, "mIoU": pct(metrics["miou"]), "aAcc": pct(metrics["aacc"]),
            "IoU": {n: pct(v) for n, v in zip(names, metrics["iou"].tolist())}}


def print_table(res: dict) -> None:
    width = max(len(n) for n in res["IoU"])
    print(f"{'class':<{width}}  IoU")
    for name, v in res["IoU"].items():
        print(f"{name:<{width}}  {'nan' if v is None else f'{v:.2f}'}")
    print(f"mIoU {res['mIoU']:.2f}  aAcc {res['aAcc']:.2f}  (step {res['step']})")


def write_results(res: dict, out_dir: Path) -> None:
    if utils.is_main():
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "results.json").write_text(json.dumps(res, indent=2))
