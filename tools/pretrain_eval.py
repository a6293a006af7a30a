"""How well does a pretraining checkpoint solve its own task on held-out images? Its pixels on a
dataset's val split, classified by the checkpoint itself: nearest prototype for MDP (the argmax of
the M4 softmax over that dataset's filled prototypes), the 1x1 classifier for ce / multihead.

    python tools/pretrain_eval.py runs/pretrain/last.pth --dataset voc --data-root data

A pretraining that scores well here but gives features no better than random ones downstream has
learned its task without learning transferable features; one that scores badly here has not
learned its task. pix2pix checkpoints have neither prototypes nor classifier: not applicable.
Prints the mIoU and writes it to --out (JSON) when given; whole-image inference at --base-size.

`--stats` adds measures of representation collapse on the val pixels: the effective rank of the
backbone features and of the unit embeddings (how many directions they really use), the mean and
largest cosine between two classes' mean embeddings (any method) and, for MDP, between two
prototypes (near 1: those classes share one direction). `pixel_probe` (used by
studies/real_diagnosis.py) fits a logistic regression on frozen pixel features. A checkpoint
pretrained with --label-map is scored through its map: merged classes share one score, dropped
classes are never predicted.
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
from evaluation import evaluate, iou_from_confusion  # noqa: E402
from losses import downsample_labels  # noqa: E402
from mdp import MDPNet  # noqa: E402
from mine import pseudo_labels, threshold_for_precision  # noqa: E402
from prototypes import prototypes_from_state  # noqa: E402


class OwnTaskClassifier(nn.Module):
    """A pretraining network as a classifier over dataset d's classes of its label space.
    classes (K_d,) int64: the global id of each of the dataset's classes, or IGNORE (-1) for one
    that a --label-map dropped. forward: (B, 3, H, W) -> {"out": scores (B, K_d, H, W)}; a dropped
    class or an unfilled prototype is never chosen."""

    def __init__(self, model: MDPNet, classes: torch.Tensor, prototypes: torch.Tensor | None = None,
                 filled: torch.Tensor | None = None):
        super().__init__()
        self.model, self.classes = model, classes
        self.prototypes, self.filled = prototypes, filled  # (C, D), (C,) or None (classifier)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.model(x).float()  # (B, D, h, w) unit embeddings, or (B, C, h, w) logits
        if self.prototypes is not None:
            out = torch.einsum("bdhw,cd->bchw", out, self.prototypes)  # cosine to each prototype
        # a score below every real one, and finite: bilinear upsampling turns -inf * 0 into NaN
        low = out.amin(1, keepdim=True) - 1  # (B, 1, h, w)
        if self.prototypes is not None:
            out = torch.where(self.filled[None, :, None, None], out, low)
        out = torch.cat([out, low], 1)  # (B, C + 1, h, w): index C stands for "no output"
        idx = torch.where(self.classes >= 0, self.classes, out.shape[1] - 1)
        out = out[:, idx]  # (B, K_d, h, w): the dataset's own classes
        return {"out": F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)}


def own_task_classifier(state: dict, dataset: str) -> tuple[OwnTaskClassifier, str]:
    """(classifier, method) from a train_pretrain.py checkpoint, for one of its datasets."""
    args, space = state["args"], LabelSpace.from_state_dict(state["label_space"])
    if dataset not in args["datasets"]:
        raise ValueError(f"{dataset} is not one of the checkpoint's datasets {args['datasets']}")
    d = args["datasets"].index(dataset)
    # the dataset's local ids 0..K_d-1 -> global ids (merged by a --label-map) or IGNORE (dropped)
    classes = space.to_global(torch.arange(space.num_classes_per_dataset[d]), d)  # (K_d,)
    method = args["method"]
    if method == "pix2pix":
        raise ValueError("a pix2pix checkpoint has neither prototypes nor a classifier")
    model = MDPNet(args["arch"], args["output_stride"], args["embed_dim"],
                   num_classes=space.num_classes if method in ("ce", "multihead") else 0,
                   embed_norm=args.get("embed_norm", "none"))
    model.load_state_dict(state["model"])
    if method != "mdp":
        return OwnTaskClassifier(model, classes), method
    return OwnTaskClassifier(model, classes, *prototypes_from_state(state["bank"])), method


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
    """(mean, max) cosine between two different filled prototypes, (C, D) unit rows (or any
    unit vectors, e.g. normalised class means)."""
    p = prototypes[filled]  # (C', D)
    if len(p) < 2:
        raise ValueError("fewer than two filled prototypes: no pair to compare")
    cos = p @ p.t()  # (C', C')
    off = cos[~torch.eye(len(p), dtype=torch.bool)]
    return float(off.mean()), float(off.max())


def class_means(z: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per class, the mean of its pixels' unit embeddings z (N, D) (labels (N,), negative =
    ignore); NaN rows for a class without pixels. (K, D). Its length is the class's mean resultant
    length: 1 when its embeddings coincide, near 0 when spread over the sphere."""
    keep = labels >= 0
    sums = z.new_zeros(num_classes, z.shape[1]).index_add_(0, labels[keep], z[keep])  # (K, D)
    counts = torch.bincount(labels[keep], minlength=num_classes).to(z.dtype)  # (K,)
    return sums / counts[:, None]  # 0 / 0 = NaN for an absent class


@torch.no_grad()
def pixel_features(model: MDPNet, dataset, max_images: int) -> tuple[torch.Tensor, ...]:
    """Backbone features (N, 2048), unit embeddings (N, D) and labels (N,) of the labelled
    feature-resolution pixels of up to max_images images (evenly spaced), eval mode."""
    model.eval()
    feats, embs, labs = [], [], []
    for i in range(0, len(dataset), max(1, -(-len(dataset) // max_images))):
        image, label, _ = dataset[i]
        f = model.forward_features(image[None])  # (1, 2048, h, w)
        z = F.normalize(model.head(f).float(), dim=1)  # (1, D, h, w)
        y = downsample_labels(label[None], tuple(z.shape[-2:])).flatten()  # (h*w,)
        keep = y >= 0
        feats.append(f[0].flatten(1).t()[keep])  # (n, 2048)
        embs.append(z[0].flatten(1).t()[keep])  # (n, D)
        labs.append(y[keep])
    return torch.cat(feats), torch.cat(embs), torch.cat(labs)


def embedding_stats(classifier: OwnTaskClassifier, dataset, num_classes: int,
                    max_images: int = 50) -> dict:
    """Collapse measures over the labelled feature-resolution pixels of up to max_images images
    (evenly spaced): effective rank of the backbone features and of the unit embeddings (for ce,
    its head output normalised the same way); the classes' mean embeddings: their mean resultant
    length (mean over classes) and the cosines between two of them (any method: are the classes
    apart?); the prototypes' cosines (MDP only)."""
    feats, embs, labels = pixel_features(classifier.model, dataset, max_images)
    means = class_means(embs, labels, num_classes)  # (K, D)
    present = ~means.isnan().any(1)  # (K,)
    cos_mean, cos_max = prototype_cosines(F.normalize(means.nan_to_num()), present)
    out = {"backbone_effective_rank": effective_rank(feats),
           "embedding_effective_rank": effective_rank(embs),
           "class_mean_length": float(means[present].norm(dim=1).mean()),
           "class_mean_cos_mean": cos_mean, "class_mean_cos_max": cos_max}
    if classifier.prototypes is not None:
        own = classifier.classes[classifier.classes >= 0].unique()  # the dataset's global ids
        out["prototype_cos_mean"], out["prototype_cos_max"] = prototype_cosines(
            classifier.prototypes[own], classifier.filled[own])
    return out


@torch.no_grad()
def mining_confidence(classifier: OwnTaskClassifier, dataset, tau: float,
                      max_images: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """M10's view of labelled pixels (up to max_images val images, feature resolution): each
    pixel's top prototype probability over every filled prototype of every dataset, as mining
    reads it (mine.pseudo_labels), and whether that top class is the pixel's label. (N,), (N,)."""
    _, embs, labels = pixel_features(classifier.model, dataset, max_images)  # local labels
    top, conf = pseudo_labels(embs, classifier.prototypes, classifier.filled, tau, 0.0)
    return conf, top == classifier.classes[labels]


def pixel_probe(x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor,
                y_val: torch.Tensor, num_classes: int, iters: int = 100) -> float:
    """Multinomial logistic regression on frozen pixel features (N, F), standardised with the
    training pixels' statistics, fitted full-batch by L-BFGS; returns the val mIoU (%) at feature
    resolution (nanmean over the classes present in either labels or predictions)."""
    mean, std = x_train.mean(0), x_train.std(0).clamp(min=1e-6)
    xt, xv = (x_train - mean) / std, (x_val - mean) / std
    lin = nn.Linear(xt.shape[1], num_classes)
    nn.init.zeros_(lin.weight), nn.init.zeros_(lin.bias)  # a convex problem: start anywhere fixed
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=iters, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(lin(xt), y_train)
        loss.backward()
        return loss
    opt.step(closure)
    with torch.no_grad():
        pred = lin(xv).argmax(1)
    cm = torch.bincount(y_val * num_classes + pred, minlength=num_classes ** 2)
    _, miou = iou_from_confusion(cm.view(num_classes, num_classes))
    return 100 * float(miou)


def main(argv: list[str] | None = None) -> None:
    p = utils.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("ckpt", help="a train_pretrain.py checkpoint")
    p.add_argument("--dataset", required=True, help="one of the checkpoint's --datasets")
    p.add_argument("--data-root", default="data")
    p.add_argument("--base-size", nargs=2, type=int, default=[2048, 512], metavar=("W", "H"))
    p.add_argument("--out", type=Path, help="write {'mIoU': ..., 'IoU': {...}} here")
    p.add_argument("--stats", action="store_true",
                   help="also the collapse measures (effective ranks, prototype cosines)")
    p.add_argument("--mine-precision", type=float, default=None, metavar="P",
                   help="MDP: also the lowest mining threshold whose pseudo-labels of val pixels "
                        "are at least P correct (mine.threshold_for_precision)")
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
    if args.mine_precision is not None:
        if method != "mdp":
            raise SystemExit(f"error: --mine-precision needs an MDP checkpoint, not {method}")
        conf, correct = mining_confidence(classifier, val, state["args"]["tau"])
        res["mining"] = {"precision": args.mine_precision, "max_confidence": float(conf.max()),
                         "threshold": threshold_for_precision(conf, correct, args.mine_precision)}
        print(f"  mining: top probability at most {res['mining']['max_confidence']:.3f}; "
              f"threshold for {args.mine_precision:g} correct: {res['mining']['threshold']}")
    if args.out:
        args.out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    utils.run_cli(main)
