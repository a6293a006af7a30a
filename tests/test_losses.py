"""losses.py against naive per-pixel loops (values and gradients) and hand-worked cases
(M4, M5, M8)."""
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import losses  # noqa: E402
from losses import IGNORE  # noqa: E402

TOL = dict(atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- naive references
def naive_contrast(z, protos, filled, y_a, y_b, w, tau):
    """Per-pixel loop: softmax over the filled prototypes only, terms dropped as in M4/M6."""
    fidx = [c for c in range(protos.shape[0]) if filled[c]]
    losses_p = []
    for p in range(z.shape[0]):
        s = {c: (z[p] * protos[c]).sum() / tau for c in fidx}
        lse = torch.logsumexp(torch.stack(list(s.values())), 0) if fidx else None
        terms = []
        for y, wt in ((int(y_a[p]), float(w[p])), (int(y_b[p]), 1.0 - float(w[p]))):
            if y != IGNORE and wt > 0 and bool(filled[y]):
                terms.append(wt * (lse - s[y]))
        if terms:
            losses_p.append(sum(terms))
    return sum(losses_p) / len(losses_p) if losses_p else z.sum() * 0


def naive_csc(z, protos, filled, labels, class_dataset, tau, topk, other=None):
    """Per-pixel loop of M5; other(c, y): may class c code a pixel labelled y (default: c is of
    another dataset than y; tests/test_label_map.py passes the rule for merged classes)."""
    other = other or (lambda c, y: int(class_dataset[c]) != int(class_dataset[y]))
    fidx = [c for c in range(protos.shape[0]) if filled[c]]
    out = []
    for p in range(z.shape[0]):
        y = int(labels[p])
        if y == IGNORE:
            continue
        s = {c: (z[p] * protos[c]).sum() / tau for c in fidx}
        cands = [c for c in fidx if other(c, y)]
        if not cands:
            continue
        top = sorted(cands, key=lambda c: -float(s[c].detach()))[:topk]
        alpha = torch.softmax(torch.stack([s[c].detach() for c in top]), 0)
        lse = torch.logsumexp(torch.stack([s[c] for c in fidx]), 0)
        out.append(-sum(alpha[j] * (s[c] - lse) for j, c in enumerate(top)))
    return sum(out) / len(out) if out else z.sum() * 0


def naive_soft_ce(logits, y_a, y_b, w, class_dataset=None, heads=None):
    """ce (class_dataset None) or multihead (softmax over the target's own dataset's classes).
    heads(y): the class lists of the softmaxes a target y enters, its CE averaged over them
    (tests/test_label_map.py: merged classes); default one, as class_dataset says."""
    out = []
    for p in range(logits.shape[0]):
        terms = []
        for y, wt in ((int(y_a[p]), float(w[p])), (int(y_b[p]), 1.0 - float(w[p]))):
            if y == IGNORE or wt <= 0:
                continue
            cls = [range(logits.shape[1]) if class_dataset is None else
                   [c for c in range(logits.shape[1]) if class_dataset[c] == class_dataset[y]]]
            lse = [torch.logsumexp(torch.stack([logits[p, c] for c in h]), 0)
                   for h in (heads(y) if heads else cls)]
            terms.append(wt * (sum(lse) / len(lse) - logits[p, y]))
        if terms:
            out.append(sum(terms))
    return sum(out) / len(out) if out else logits.sum() * 0


def naive_pix2pix(z, labels, tau, max_pixels, seed):
    g = torch.Generator().manual_seed(seed)  # same draws, same order as the library
    B, D, H, W = z.shape
    anchors = []
    for b in range(B):
        pix = [(i, j) for i in range(H) for j in range(W) if labels[b, i, j] != IGNORE]  # row-major
        if len(pix) > max_pixels:
            perm = torch.randperm(len(pix), generator=g)[:max_pixels]
            pix = [pix[int(k)] for k in perm]
        for a, (i, j) in enumerate(pix):
            pos = [q for q, (k, l) in enumerate(pix)
                   if q != a and labels[b, k, l] == labels[b, i, j]]
            if not pos:
                continue
            s = [(z[b, :, i, j] * z[b, :, k, l]).sum() / tau for (k, l) in pix]
            lse = torch.logsumexp(torch.stack([s[q] for q in range(len(pix)) if q != a]), 0)
            anchors.append(-sum(s[q] - lse for q in pos) / len(pos))
    return sum(anchors) / len(anchors) if anchors else z.sum() * 0


# ----------------------------------------------------------------------------- helpers
def unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def grads(fn, *tensors):
    ts = [t.detach().clone().requires_grad_(True) for t in tensors]
    loss = fn(*ts)
    loss.backward()
    return loss.detach(), [t.grad for t in ts]


def assert_same(fast, naive, *tensors):
    lf, gf = grads(fast, *tensors)
    ln, gn = grads(naive, *tensors)
    torch.testing.assert_close(lf, ln, **TOL)
    for a, b in zip(gf, gn):
        torch.testing.assert_close(a, b, **TOL)


def setup(n=14, d=6, c=7, seed=0):
    g = torch.Generator().manual_seed(seed + 100)
    z, protos = unit(n, d, seed=seed), unit(c, d, seed=seed + 1)
    filled = torch.tensor([True, True, False, True, True, False, True])[:c]
    y_a = torch.randint(-1, c, (n,), generator=g)
    y_b = torch.randint(-1, c, (n,), generator=g)
    w = torch.rand(n, generator=g, dtype=torch.float64)
    w[:3] = 1.0
    w[3:5] = 0.0
    return z, protos, filled, y_a, y_b, w


# ----------------------------------------------------------------------------- M4
@pytest.mark.parametrize("soft", [False, True])
def test_contrast_matches_naive(soft):
    z, protos, filled, y_a, y_b, w = setup()
    if not soft:
        y_b, w = y_a, torch.ones_like(w)
    assert (~filled[y_a.clamp(min=0)]).any() and (y_a == IGNORE).any()  # the cases are exercised
    for tau in (0.07, 0.5):
        assert_same(lambda z_, p_: losses.prototype_contrast_loss(z_, p_, filled, y_a, y_b, w, tau),
                    lambda z_, p_: naive_contrast(z_, p_, filled, y_a, y_b, w, tau), z, protos)


def test_contrast_tau_scales_logits():
    # all filled, one-hot: the loss is plain cross-entropy on (z @ P^T) / tau
    z, protos, _, y, _, _ = setup()
    y = y.clamp(min=0)
    filled = torch.ones(protos.shape[0], dtype=torch.bool)
    for tau in (0.07, 0.3):
        got = losses.prototype_contrast_loss(z, protos, filled, y, y, torch.ones(len(y)), tau)
        torch.testing.assert_close(got, F.cross_entropy(z @ protos.T / tau, y), **TOL)


def test_contrast_unfilled_class_excluded_from_softmax():
    # hand-worked: 2 filled prototypes out of 3; the empty one must not enter the denominator
    z = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    protos = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    filled = torch.tensor([True, True, False])
    y = torch.tensor([0])
    tau = 0.5
    want = -(2.0 - math.log(math.exp(2.0) + math.exp(0.0)))
    got = losses.prototype_contrast_loss(z, protos, filled, y, y,
                                         torch.ones(1, dtype=torch.float64), tau)
    assert abs(got.item() - want) < 1e-9


@pytest.mark.parametrize("case", ["all_ignore", "unfilled_targets", "nothing_filled", "empty"])
def test_contrast_no_valid_pixel_is_zero_with_finite_grads(case):
    z, protos, filled, y_a, _, _ = setup()
    w = torch.ones(len(y_a), dtype=torch.float64)
    if case == "all_ignore":
        y_a = torch.full_like(y_a, IGNORE)
    elif case == "unfilled_targets":
        y_a = torch.where(torch.arange(len(y_a)) % 2 == 0, 2, 5)  # both empty classes
    elif case == "nothing_filled":
        filled = torch.zeros_like(filled)
    else:
        z, y_a, w = z[:0], y_a[:0], w[:0]
    zz, pp = z.clone().requires_grad_(True), protos.clone().requires_grad_(True)
    loss = losses.prototype_contrast_loss(zz, pp, filled, y_a, y_a, w)
    loss.backward()
    assert loss.item() == 0.0
    for g in (zz.grad, pp.grad):
        assert g is not None and torch.isfinite(g).all() and (g == 0).all()


# ----------------------------------------------------------------------------- M5
def test_csc_matches_naive():
    z, protos, filled, labels, _, _ = setup(n=16, seed=3)
    cd = torch.tensor([0, 0, 0, 1, 1, 2, 2])  # three datasets; dataset 2 has one filled class
    for topk in (1, 3, 10):  # 10 > any number of candidates
        assert_same(lambda z_, p_: losses.csc_loss(z_, p_, filled, labels, cd, 0.07, topk),
                    lambda z_, p_: naive_csc(z_, p_, filled, labels, cd, 0.07, topk), z, protos)


def test_csc_candidates_never_from_own_dataset():
    # z equals its own dataset's prototype p0; the top-1 candidate must be p1 (dataset 1), not p0
    z = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)
    protos = torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.0, 0.8], [0.0, 0.0, 1.0]], dtype=torch.float64)
    cd = torch.tensor([0, 1, 1])
    filled = torch.ones(3, dtype=torch.bool)
    tau = 0.5
    s = torch.tensor([1.0, 0.6, 0.0], dtype=torch.float64) / tau
    logp = s.log_softmax(0)
    got = losses.csc_loss(z, protos, filled, torch.tensor([0]), cd, tau, topk=1)
    torch.testing.assert_close(got, -logp[1])
    # topk larger than the 2 candidates: alpha spreads over p1, p2 only
    alpha = s[1:].softmax(0)
    got = losses.csc_loss(z, protos, filled, torch.tensor([0]), cd, tau, topk=5)
    torch.testing.assert_close(got, -(alpha * logp[1:]).sum())
    # an empty prototype of the other dataset is never a candidate
    got = losses.csc_loss(z, protos, torch.tensor([True, False, True]), torch.tensor([0]), cd, tau,
                          topk=1)
    torch.testing.assert_close(got, -torch.stack([s[0], s[2]]).log_softmax(0)[1])


def test_csc_single_dataset_is_zero():
    z, protos, filled, labels, _, _ = setup()
    zz = z.clone().requires_grad_(True)
    loss = losses.csc_loss(zz, protos, filled, labels,
                           torch.zeros(protos.shape[0], dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(zz.grad).all() and (zz.grad == 0).all()


# ----------------------------------------------------------------------------- M8
def test_ce_and_multihead_match_naive():
    _, _, _, y_a, y_b, w = setup(n=12, c=7, seed=5)
    logits = torch.randn(12, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(7)) * 3
    cd = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    assert_same(lambda l_: losses.ce_loss(l_, y_a, y_b, w),
                lambda l_: naive_soft_ce(l_, y_a, y_b, w), logits)
    assert_same(lambda l_: losses.multihead_loss(l_, y_a, y_b, w, cd),
                lambda l_: naive_soft_ce(l_, y_a, y_b, w, cd), logits)
    # all-ignore: zero that back-propagates
    ign = torch.full_like(y_a, IGNORE)
    for fn in (lambda l_: losses.ce_loss(l_, ign, ign, w),
               lambda l_: losses.multihead_loss(l_, ign, ign, w, cd)):
        loss, (g,) = grads(fn, logits)
        assert loss.item() == 0.0 and (g == 0).all()


def test_multihead_is_per_dataset_cross_entropy():
    # one-hot targets: identical to CE of each dataset's own logit slice (one classifier per
    # dataset)
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(10, 5, dtype=torch.float64, generator=g)
    cd = torch.tensor([0, 0, 1, 1, 1])
    y = torch.tensor([0, 1, 2, 3, 4, 0, 4, 2, 1, 3])
    want = torch.stack([F.cross_entropy(logits[i:i + 1, :2], y[i:i + 1]) if y[i] < 2 else
                        F.cross_entropy(logits[i:i + 1, 2:], y[i:i + 1] - 2)
                        for i in range(10)]).mean()
    got = losses.multihead_loss(logits, y, y, torch.ones(10, dtype=torch.float64), cd)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("max_pixels", [1000, 9])
def test_pix2pix_matches_naive(max_pixels):
    g = torch.Generator().manual_seed(2)
    z = F.normalize(torch.randn(2, 4, 4, 5, dtype=torch.float64, generator=g), dim=1)
    labels = torch.randint(-1, 3, (2, 4, 5), generator=g)
    labels[1, 0, 0], labels[1, 0, 1] = 7, IGNORE  # class 7: a lone pixel, anchor without positive
    assert_same(lambda z_: losses.pix2pix_loss(z_, labels, 0.1, max_pixels,
                                               torch.Generator().manual_seed(11)),
                lambda z_: naive_pix2pix(z_, labels, 0.1, max_pixels, 11), z)
    # no labelled pixel: zero that back-propagates
    loss, (gz,) = grads(lambda z_: losses.pix2pix_loss(z_, torch.full_like(labels, IGNORE)), z)
    assert loss.item() == 0.0 and (gz == 0).all()


# ----------------------------------------------------------------------------- downsample (M4)
def test_downsample_labels_nearest_convention():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(-1, 300, (2, 16, 24), generator=g)  # ids above 255 survive
    out = losses.downsample_labels(y, (4, 3))
    assert out.dtype == torch.int64
    assert torch.equal(out, y[:, ::4, ::8])  # integer stride: the top-left pixel of each cell
    wmap = torch.rand(2, 16, 24, generator=g)
    assert torch.equal(losses.downsample_labels(wmap, (4, 3)), wmap[:, ::4, ::8])
    # non-integer ratio: source index floor(i * H / h)
    y = torch.randint(-1, 5, (1, 10, 10), generator=g)
    out = losses.downsample_labels(y, (4, 4))
    for i in range(4):
        for j in range(4):
            assert out[0, i, j] == y[0, (i * 10) // 4, (j * 10) // 4]
    assert losses.downsample_labels(y, (10, 10)) is y


def test_downsample_labels_purity_against_a_cell_loop():
    g = torch.Generator().manual_seed(1)
    # blocky labels, so that cells range from pure to mixed, plus some IGNORE pixels
    y = torch.randint(0, 3, (2, 8, 12), generator=g).repeat_interleave(2, 1).repeat_interleave(2, 2)
    y[0, :3, :5] = IGNORE
    s = 4  # (2, 16, 24) -> (2, 4, 6)
    for p in (0.5, 0.75, 1.0):
        out = losses.downsample_labels(y, (4, 6), min_purity=p)
        for b in range(2):
            for i in range(4):
                for j in range(6):
                    label = y[b, s * i, s * j]  # the nearest (top-left) pixel's label
                    cell = y[b, s * i:s * i + s, s * j:s * j + s]
                    purity = (cell == label).float().mean()  # IGNORE pixels count as other labels
                    want = label if purity >= p else IGNORE
                    assert out[b, i, j] == want, (p, b, i, j)
    # hand-worked: one 2x2 cell with 3 of 4 pixels of class 5
    y = torch.tensor([[[5, 5], [5, 7]]])
    assert losses.downsample_labels(y, (1, 1), 0.75).item() == 5
    assert losses.downsample_labels(y, (1, 1), 0.76).item() == IGNORE
    assert torch.equal(losses.downsample_labels(y, (1, 1), 0.0), y[:, :1, :1])
    with pytest.raises(ValueError, match="integer label maps"):
        losses.downsample_labels(torch.rand(1, 2, 2), (1, 1), 0.5)
