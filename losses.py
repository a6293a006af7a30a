"""MDP losses (METHOD.md M4, M5, M8) on flattened pixels.

The pretraining step embeds a batch, brings the (y_a, y_b, w) targets of M6 to the feature
resolution with `downsample_labels`, flattens everything to N pixels (optionally sub-sampling them,
M4 `--max-pixels`) and calls:

- `prototype_contrast_loss` (M4 with the soft targets of M6): pixel-to-prototype contrast;
- `csc_loss` (M5): cross-dataset sparse coding towards the top-k prototypes of the other datasets;
- `ce_loss`, `multihead_loss`, `pix2pix_loss` (M8 baselines).

Soft targets: a pixel's loss is w * CE(y_a) + (1 - w) * CE(y_b). A term is dropped when its label
is IGNORE, its weight is 0, or (prototype losses) its class has no prototype yet; the remaining
terms are NOT renormalised (an own-IGNORE pixel under a pixel mix keeps only lambda * CE(partner)).
Losses are means over the pixels that keep at least one term; with none they return a zero that
still back-propagates (zero, finite gradients), so an all-ignore batch never breaks DDP.
All softmaxes run in at least float32 (safe under autocast; float64 inputs stay float64).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

IGNORE = -1  # == datasets.IGNORE; local copy so the losses depend on nothing but torch


def _f32(x: torch.Tensor) -> torch.Tensor:
    # half / bfloat16 (autocast) -> float32 for the softmaxes; float32 / float64 unchanged
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _masked_logits(z: torch.Tensor, prototypes: torch.Tensor, filled: torch.Tensor,
                   tau: float) -> torch.Tensor:
    """s_pc = z_p . p_c / tau (M4), (N, C) in >= float32. Empty prototypes get the most negative
    finite float: no probability mass, yet a row is never all -inf (NaN in log_softmax)."""
    s = _f32(z @ prototypes.t()) / tau  # (N, C)
    return s.masked_fill(~filled[None, :], torch.finfo(s.dtype).min)


def _soft_target_mean(nll: Callable[[torch.Tensor], torch.Tensor], y_a: torch.Tensor,
                      y_b: torch.Tensor, w: torch.Tensor,
                      allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over pixels of sum_terms weight * nll(target), dropping IGNORE / zero-weight /
    not-allowed terms. nll(y) -> (N,) takes labels already clamped to valid indices."""
    total, valid = 0.0, torch.zeros_like(y_a, dtype=torch.bool)
    for y, wt in ((y_a, w), (y_b, 1 - w)):
        keep = (y != IGNORE) & (wt > 0)  # (N,)
        y0 = y.clamp(min=0)  # any index for dropped terms; masked below
        if allowed is not None:
            keep = keep & allowed[y0]
        # where() (not multiply) so a dropped term contributes exactly 0 and a zero gradient
        total = total + torch.where(keep, wt * nll(y0), 0.0)
        valid = valid | keep
    # no valid pixel: 0 / 1 = 0, still attached to the graph with zero gradients (== z.sum() * 0)
    return total.sum() / valid.sum().clamp(min=1)


def prototype_contrast_loss(z: torch.Tensor, prototypes: torch.Tensor, filled: torch.Tensor,
                            y_a: torch.Tensor, y_b: torch.Tensor, w: torch.Tensor,
                            tau: float = 0.07) -> torch.Tensor:
    """M4 with M6 targets: mean_p [ w CE(s_p, y_a) + (1 - w) CE(s_p, y_b) ], softmax over filled
    prototypes only; a term whose class is empty (or IGNORE, or weight 0) is dropped.

    z (N, D) L2-normalised embeddings, prototypes (C, D), filled (C,) bool, y_a/y_b (N,) int64
    global ids or IGNORE, w (N,) float in [0, 1]. Returns a scalar.
    """
    logp = _masked_logits(z, prototypes, filled, tau).log_softmax(1)  # (N, C)
    nll = lambda y: -logp.gather(1, y[:, None])[:, 0]  # noqa: E731
    return _soft_target_mean(nll, y_a, y_b, w, allowed=filled)


def _membership(class_dataset: torch.Tensor) -> torch.Tensor:
    """(C,) int64 dataset of each class -> (C, num_datasets) bool; a (C, num_datasets) bool
    membership (classes merged by --label-map belong to several datasets) passes through."""
    if class_dataset.dim() == 2:
        return class_dataset
    return F.one_hot(class_dataset, int(class_dataset.max()) + 1).bool()  # host sync on a GPU


def _shares_dataset(class_dataset: torch.Tensor) -> torch.Tensor:
    """(C, C) bool: classes i and j have a dataset in common. Takes (C,) int64 or (C, D) bool."""
    if class_dataset.dim() == 1:  # no host sync on this path
        return class_dataset[:, None] == class_dataset[None, :]
    return (class_dataset[:, None, :] & class_dataset[None, :, :]).any(-1)


def csc_loss(z: torch.Tensor, prototypes: torch.Tensor, filled: torch.Tensor, labels: torch.Tensor,
             class_dataset: torch.Tensor, tau: float = 0.07, topk: int = 3,
             similarity: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """M5 cross-dataset sparse coding.

    For a hard-labelled pixel p of dataset d = class_dataset[label], the candidates are the filled
    prototypes of the other datasets; take its top-k (k = min(topk, #candidates)) by s_pc, sparse
    code alpha = softmax of those k s_pc (detached) and loss_p = -sum_j alpha_j log softmax_j(s_p),
    the softmax being M4's (over all filled prototypes). Mean over pixels with >= 1 candidate;
    a single dataset has no candidates and gives 0. With classes merged by --label-map (a
    membership matrix), a class is a candidate only if it shares no dataset with the pixel's
    label: a class of any dataset the label belongs to is one that label excludes (METHOD.md M5).

    [ours] `similarity` = (prototypes (C, D), filled (C,)) of another source, e.g. the two-step
    bank kept beside learned prototypes (`--csc-similarity bank`): the top-k and alpha are read
    from z . those / tau instead, the loss's softmax stays over `prototypes`. None: the source's.

    z (N, D), prototypes (C, D), filled (C,) bool, labels (N,) hard labels / IGNORE,
    class_dataset (C,) int64, or (C, num_datasets) bool membership. Returns a scalar.
    """
    s = _masked_logits(z, prototypes, filled, tau)  # (N, C)
    logp = s.log_softmax(1)
    if similarity is not None:
        filled = filled & similarity[1]
        s = _masked_logits(z, similarity[0], filled, tau)  # (N, C): who is similar, and how much
    # (N, C): class shares the pixel's dataset
    same = _shares_dataset(class_dataset)[labels.clamp(min=0)]
    cand = filled[None, :] & ~same & (labels != IGNORE)[:, None]
    k = min(topk, s.shape[1])
    top_s, top_i = s.detach().masked_fill(~cand, float("-inf")).topk(k, dim=1)  # (N, k)
    in_top = torch.isfinite(top_s)  # False in slots beyond a pixel's number of candidates
    # finite fill so a pixel without candidates gets a harmless uniform row (masked right after)
    alpha = top_s.masked_fill(~in_top, torch.finfo(top_s.dtype).min).softmax(1)  # (N, k) detached
    loss = -torch.where(in_top, alpha * logp.gather(1, top_i), 0.0).sum(1)  # (N,)
    return loss.sum() / in_top.any(1).sum().clamp(min=1)


def ce_loss(logits: torch.Tensor, y_a: torch.Tensor, y_b: torch.Tensor,
            w: torch.Tensor) -> torch.Tensor:
    """M8 `ce`: cross-entropy over the concatenated label space with (y_a, y_b, w) targets.
    logits (N, C) -> scalar."""
    logp = _f32(logits).log_softmax(1)  # (N, C)
    return _soft_target_mean(lambda y: -logp.gather(1, y[:, None])[:, 0], y_a, y_b, w)


def multihead_loss(logits: torch.Tensor, y_a: torch.Tensor, y_b: torch.Tensor, w: torch.Tensor,
                   class_dataset: torch.Tensor) -> torch.Tensor:
    """M8 `multihead`: each term's softmax runs over the classes of its target's own dataset
    (class_dataset == class_dataset[target]), i.e. one 1x1 classifier per dataset on a shared
    backbone, written as slices of one (N, C) logit map. A class merged by --label-map is one
    output shared by the heads of its datasets: its term is the mean of its CE in each of those
    heads (exactly the single-head CE without merges). class_dataset (C,) int64 or
    (C, num_datasets) bool membership; logits (N, C) -> scalar."""
    x = _f32(logits)  # (N, C)
    neg = torch.finfo(x.dtype).min
    member = _membership(class_dataset)  # (C, num_datasets)
    # per-dataset log-sum-exp, (N, num_datasets); a loop over the (few) datasets keeps memory at N*C
    lse = torch.stack([x.masked_fill(~member[None, :, d], neg).logsumexp(1)
                       for d in range(member.shape[1])], 1)

    def nll(y: torch.Tensor) -> torch.Tensor:  # mean own-dataset log-sum-exp minus the target logit
        own = member[y]  # (N, num_datasets)
        return torch.where(own, lse, 0.0).sum(1) / own.sum(1) - x.gather(1, y[:, None])[:, 0]
    return _soft_target_mean(nll, y_a, y_b, w)


def pix2pix_loss(z: torch.Tensor, labels: torch.Tensor, tau: float = 0.07, max_pixels: int = 1024,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """M8 `pix2pix`: supervised pixel-to-pixel contrast inside each image (SupCon form).

    Per image, up to `max_pixels` labelled pixels are sampled (torch.randperm on the CPU from
    `generator`, or torch's global CPU RNG when None, so the sample is the same on any device).
    Each sampled pixel i is an anchor; positives P(i) = the other sampled pixels with its label:
        loss_i = -mean_{p in P(i)} log( exp(s_ip / tau) / sum_{a != i} exp(s_ia / tau) ).
    Anchors without positives are skipped; mean over all anchors of the batch.

    z (B, D, h, w) L2-normalised embeddings, labels (B, h, w) hard labels / IGNORE -> scalar.
    """
    feats = z.flatten(2).transpose(1, 2)  # (B, hw, D)
    lab = labels.flatten(1)  # (B, hw)
    total = _f32(z.sum()) * 0  # stays attached to the graph when no image has an anchor
    count = torch.zeros((), dtype=torch.long, device=z.device)
    for b in range(z.shape[0]):  # images have different numbers of labelled pixels
        idx = (lab[b] != IGNORE).nonzero()[:, 0]  # (n,)
        if idx.numel() > max_pixels:
            idx = idx[torch.randperm(idx.numel(), generator=generator)[:max_pixels].to(idx.device)]
        n = idx.numel()
        if n < 2:
            continue
        f, y = feats[b, idx], lab[b, idx]  # (n, D), (n,)
        eye = torch.eye(n, dtype=torch.bool, device=z.device)
        s = _f32(f @ f.t()) / tau  # (n, n); matmul may run in half under autocast
        s = s.masked_fill(eye, torch.finfo(s.dtype).min)  # denominator over a != i
        logp = s.log_softmax(1)  # (n, n)
        pos = (y[:, None] == y[None, :]) & ~eye  # (n, n)
        npos = pos.sum(1)
        anchor = npos > 0
        loss_i = -torch.where(pos, logp, 0.0).sum(1) / npos.clamp(min=1)  # (n,)
        total = total + loss_i[anchor].sum()
        count = count + anchor.sum()
    return total / count.clamp(min=1)


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


def downsample_labels(y: torch.Tensor, size: tuple[int, int],
                      min_purity: float = 0.0) -> torch.Tensor:
    """Nearest-neighbour resize of label maps (B, H, W) to (B, h, w) (M4); int64 labels or float
    weight maps, dtype kept.

    Convention: PyTorch 'nearest', source index floor(i * H / h); with an integer stride s this is
    y[:, ::s, ::s], the top-left pixel of each s x s cell, which is where a ResNet feature is
    centred (its stride-2 convs pad k // 2, so output j sits on input s * j). Labels go through
    float32, exact for ids below 2**24.

    min_purity > 0 (int64 labels only; `--label-purity`): a feature keeps its label only when at
    least that fraction of its cell's pixels carry the same label, else IGNORE. The cell of feature
    i is the input rows that nearest resizing maps onto it ([s*i, s*i + s) for an integer stride),
    averaged by adaptive pooling.
    """
    if tuple(y.shape[-2:]) == tuple(size):
        return y
    src = y if y.is_floating_point() else y.float()  # interpolate needs floats
    out = F.interpolate(src[:, None], size=tuple(size), mode="nearest")[:, 0]
    out = out.to(y.dtype)
    if min_purity > 0:
        if y.is_floating_point():
            raise ValueError("min_purity applies to integer label maps, not weight maps")
        # each input pixel compared with its own cell's label: up-sampling back by 'nearest' maps
        # pixel r to cell floor(r * h / H), the inverse of the sampling above
        back = F.interpolate(out[:, None].float(), size=tuple(y.shape[-2:]), mode="nearest")[:, 0]
        same = (back == src).float()  # (B, H, W)
        purity = F.adaptive_avg_pool2d(same[:, None], tuple(size))[:, 0]  # (B, h, w)
        out = out.masked_fill(purity < min_purity, IGNORE)
    return out
