"""How well does a pretraining checkpoint solve its own task on held-out images? Its pixels on a
dataset's val split, classified by the checkpoint itself: nearest prototype for MDP (the argmax of
the M4 softmax over that dataset's filled prototypes), the 1x1 classifier for ce / multihead.

    python scripts/pretrain_eval.py runs/pretrain/last.pth --dataset voc --data-root data

A pretraining that scores well here but gives features no better than random ones downstream has
learned its task without learning transferable features; one that scores badly here has not
learned its task. pix2pix checkpoints have neither prototypes nor classifier: not applicable.
Prints the mIoU and writes it to --out (JSON) when given; whole-image inference at --base-size.

`--stats` adds measures of representation collapse on the val pixels: the effective rank of the
backbone features and of the unit embeddings (how many directions they really use), and for MDP
the mean and largest cosine between two prototypes (near 1: the classes share one direction).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import utils  # noqa: E402
from datasets import LabelSpace, MultiDataset, build_reader, eval_transform  # noqa: E402
from evaluation import evaluate  # noqa: E402
from losses import downsample_labels  # noqa: E402
from mdp import MDPNet  # noqa: E402


class OwnTaskClassifier(nn.Module):
    """A pretraining network as a classifier over dataset d's classes of its label space.
    forward: (B, 3, H, W) -> {"out": scores (B, K_d, H, W)}, unfilled prototypes never chosen."""

    def __init__(self, model: MDPNet, classes: slice, prototypes: torch.Tensor | None = None,
                 filled: torch.Tensor | None = None):
        super().__init__()
        self.model, self.classes = model, classes
        self.prototypes, self.filled = prototypes, filled  # (C, D), (C,) or None (classifier)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.model(x).float()  # (B, D, h, w) unit embeddings, or (B, C, h, w) logits
        if self.prototypes is not None:
            out = torch.einsum("bdhw,cd->bchw", out, self.prototypes)  # cosine to each prototype
            # below any cosine, and finite: bilinear upsampling turns -inf * 0 into NaN
            out = out.masked_fill(~self.filled[None, :, None, None], -2.0)
        out = out[:, self.classes]  # (B, K_d, h, w): the dataset's own slice of the label space
        return {"out": F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)}


def own_task_classifier(state: dict, dataset: str) -> tuple[OwnTaskClassifier, str]:
    """(classifier, method) from a train_pretrain.py checkpoint, for one of its datasets."""
    args, space = state["args"], LabelSpace.from_state_dict(state["label_space"])
    if dataset not in args["datasets"]:
        raise ValueError(f"{dataset} is not one of the checkpoint's datasets {args['datasets']}")
    if space.label_map is not None:  # merged / dropped classes: a dataset is no slice of C
        raise ValueError("a checkpoint pretrained with --label-map is not supported here")
    d = args["datasets"].index(dataset)
    classes = slice(space.offsets[d], space.offsets[d] + space.num_classes_per_dataset[d])
    method = args["method"]
    if method == "pix2pix":
        raise ValueError("a pix2pix checkpoint has neither prototypes nor a classifier")
    model = MDPNet(args["arch"], args["output_stride"], args["embed_dim"],
                   num_classes=space.num_classes if method in ("ce", "multihead") else 0)
    model.load_state_dict(state["model"])
    if method != "mdp":
        return OwnTaskClassifier(model, classes), method
    bank = state["bank"]
    return OwnTaskClassifier(model, classes, bank["prototypes"], bank["count"] > 0), method


def effective_rank(x: torch.Tensor) -> float:
    """Effective rank (Roy & Vetterli, 2007) of the rows of x (N, F) about their mean:
    exp(entropy of the singular values normalised to sum 1). k equal directions give k; 1 for
    points on a line; 0 when all rows are equal."""
    s = torch.linalg.svdvals((x - x.mean(0)).double())  # (min(N, F),)
    if s.sum() == 0:
        return 0.0
    p = s / s.sum()
    return float(torch.exp(-(p * p.clamp(min=1e-300).log()).sum()))


def prototype_cosines(prototypes: torch.Tensor, filled: torch.Tensor) -> tuple[float, float]:
    """(mean, max) cosine between two different filled prototypes, (C, D) unit rows."""
    p = prototypes[filled]  # (C', D)
    if len(p) < 2:
        raise ValueError("fewer than two filled prototypes: no pair to compare")
    cos = p @ p.t()  # (C', C')
    off = cos[~torch.eye(len(p), dtype=torch.bool)]
    return float(off.mean()), float(off.max())


def class_mean_lengths(z: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per class, the length of the mean of its pixels' unit embeddings z (N, D) (labels (N,),
    negative = ignore): 1 when they all coincide, near 0 when spread over the sphere, where the
    normalised mean (an M3 prototype) is mostly noise. NaN for a class without pixels. (K,)"""
    keep = labels >= 0
    sums = z.new_zeros(num_classes, z.shape[1]).index_add_(0, labels[keep], z[keep])  # (K, D)
    counts = torch.bincount(labels[keep], minlength=num_classes).to(z.dtype)  # (K,)
    return (sums / counts[:, None]).norm(dim=1)  # 0 / 0 = NaN for an absent class


@torch.no_grad()
def embedding_stats(classifier: OwnTaskClassifier, dataset, num_classes: int,
                    max_images: int = 50) -> dict:
    """Collapse measures over the feature-resolution pixels of up to max_images images (evenly
    spaced): effective rank of the backbone features and of the unit embeddings (for ce, its head
    output normalised the same way), the classes' mean resultant length (mean over classes), and
    the prototypes' cosines (MDP only)."""
    model = classifier.model.eval()
    feats, embs, labs = [], [], []
    for i in range(0, len(dataset), max(1, -(-len(dataset) // max_images))):
        image, label, _ = dataset[i]
        f = model.forward_features(image[None])  # (1, 2048, h, w)
        z = F.normalize(model.head(f).float(), dim=1)  # (1, D, h, w)
        feats.append(f[0].flatten(1).t())  # (h*w, 2048)
        embs.append(z[0].flatten(1).t())  # (h*w, D)
        labs.append(downsample_labels(label[None], tuple(z.shape[-2:])).flatten())  # (h*w,)
    z, labels = torch.cat(embs), torch.cat(labs)
    out = {"backbone_effective_rank": effective_rank(torch.cat(feats)),
           "embedding_effective_rank": effective_rank(z),
           "class_mean_length": float(class_mean_lengths(z, labels, num_classes).nanmean())}
    if classifier.prototypes is not None:
        out["prototype_cos_mean"], out["prototype_cos_max"] = prototype_cosines(
            classifier.prototypes[classifier.classes], classifier.filled[classifier.classes])
    return out


def main(argv: list[str] | None = None) -> None:
    p = utils.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("ckpt", help="a train_pretrain.py checkpoint")
    p.add_argument("--dataset", required=True, help="one of the checkpoint's --datasets")
    p.add_argument("--data-root", default="data")
    p.add_argument("--base-size", nargs=2, type=int, default=[2048, 512], metavar=("W", "H"))
    p.add_argument("--out", type=Path, help="write {'mIoU': ..., 'IoU': {...}} here")
    p.add_argument("--stats", action="store_true",
                   help="also the collapse measures (effective ranks, prototype cosines)")
    args = p.parse_args(argv)
    state = utils.load_checkpoint(args.ckpt, required=("model", "args", "label_space"))
    if state.get("task") != "pretrain":
        raise utils.CheckpointError(f"{args.ckpt} is not a pretraining checkpoint")
    classifier, method = own_task_classifier(state, args.dataset)
    reader = build_reader(args.dataset, args.data_root, "val")
    val = MultiDataset([reader], eval_transform(tuple(args.base_size)))
    with torch.no_grad():
        m = evaluate(classifier, val, len(reader.classes), torch.device("cpu"))
    iou = {n: None if v != v else 100 * v for n, v in zip(reader.classes, m["iou"].tolist())}
    res = {"ckpt": str(args.ckpt), "method": method, "mIoU": 100 * m["miou"], "IoU": iou}
    print(f"{method} checkpoint on its own task, {args.dataset} val: mIoU {res['mIoU']:.2f}")
    if args.stats:
        res["stats"] = embedding_stats(classifier, val, len(reader.classes))
        print("  " + ", ".join(f"{k} {v:.3f}" for k, v in res["stats"].items()))
    if args.out:
        args.out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    utils.run_cli(main)
