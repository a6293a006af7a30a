"""mixing.py against a naive per-image / per-pixel loop that consumes the same generator draws in
the documented order, plus property tests of M6."""
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import mixing  # noqa: E402
from mixing import IGNORE  # noqa: E402


def naive_mix(images, labels, ds, mode, seed, p_region=0.5):
    """Per-image, per-pixel M6 from the draws documented in mix_batch, in the same order."""
    g = torch.Generator().manual_seed(seed)
    B, _, H, W = images.shape
    rand = lambda *s: torch.rand(*s, generator=g, dtype=torch.float64)  # noqa: E731
    keys = rand(B, B)
    partner = []
    for i in range(B):
        others = [j for j in range(B) if ds[j] != ds[i]] or [j for j in range(B) if j != i]
        partner.append(max(others, key=lambda j: float(keys[i, j])) if others else i)
    u, lam, rx, ry = rand(B), rand(B), rand(B) * W, rand(B) * H
    ckeys = rand(B, max(int(labels.max()) + 1, 1))
    x, ya, yb = images.clone(), labels.clone(), labels.clone()
    w = torch.ones(labels.shape, dtype=images.dtype)
    modes = []
    for i in range(B):
        p, l_ = partner[i], float(lam[i])
        if p != i and mode in ("both", "region") and u[i] < p_region:
            modes.append(1)
            cw, ch = round(W * math.sqrt(1 - l_)), round(H * math.sqrt(1 - l_))
            x0, y0 = math.floor(rx[i]), math.floor(ry[i])
            for r in range(H):
                for c in range(W):
                    if x0 <= c < min(W, x0 + cw) and y0 <= r < min(H, y0 + ch):
                        x[i, :, r, c] = images[p, :, r, c]
                        ya[i, r, c] = yb[i, r, c] = labels[p, r, c]
        elif p != i and mode in ("both", "pixel") and u[i] >= p_region:
            modes.append(2)
            present = sorted(set(labels[p].flatten().tolist()) - {IGNORE})
            prio = ckeys[i].argsort()  # documented: class priority = argsort of the class keys
            chosen = sorted(present, key=lambda c: -int(prio[c]))[:math.ceil(len(present) / 2)]
            for r in range(H):
                for c in range(W):
                    if int(labels[p, r, c]) in chosen:
                        x[i, :, r, c] = l_ * images[p, :, r, c] + (1 - l_) * images[i, :, r, c]
                        ya[i, r, c], yb[i, r, c], w[i, r, c] = labels[p, r, c], labels[i, r, c], l_
        else:
            modes.append(0)
    return x, ya, yb, w, torch.tensor(modes), torch.tensor(partner)


def batch(b=6, h=7, w=9, c=8, seed=0, ds=(0, 0, 1, 1, 2, 0)):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(b, 3, h, w, generator=g)
    labels = torch.randint(-1, c, (b, h, w), generator=g)
    # image i uses at most i + 2 classes, so partners have odd and even numbers of present classes
    labels = torch.where(labels >= 0, labels % (torch.arange(b)[:, None, None] + 2), IGNORE)
    return images, labels, torch.tensor(ds[:b])


# ----------------------------------------------------------------------------- region boxes
def test_region_boxes_formula_and_area():
    B, H, W, seed = 64, 300, 500, 3
    lam = torch.rand(B, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    boxes = mixing.region_boxes(lam, H, W, torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed)
    rx = torch.rand(B, generator=g, dtype=torch.float64) * W
    ry = torch.rand(B, generator=g, dtype=torch.float64) * H
    for i in range(B):
        c = math.sqrt(1 - float(lam[i]))
        cw, ch = round(W * c), round(H * c)  # sides before clipping
        assert boxes[i].tolist() == [math.floor(rx[i]), math.floor(ry[i]),
                                     min(W, math.floor(rx[i]) + cw), min(H, math.floor(ry[i]) + ch)]
        # area ratio = 1 - lambda up to rounding each side by <= 0.5 pixel
        assert abs(cw * ch - (1 - float(lam[i])) * W * H) <= 0.5 * (W * c + H * c) + 0.25


def test_region_boxes_stay_inside_image():
    g = torch.Generator().manual_seed(0)
    for H, W in ((1, 1), (5, 3), (32, 48)):
        lam = torch.cat([torch.rand(500, generator=g), torch.tensor([0.0, 1.0])])
        x0, y0, x1, y1 = mixing.region_boxes(lam, H, W, g).T
        assert ((0 <= x0) & (x0 < W) & (x0 <= x1) & (x1 <= W)).all()
        assert ((0 <= y0) & (y0 < H) & (y0 <= y1) & (y1 <= H)).all()


# ----------------------------------------------------------------------------- partners
def test_choose_partners():
    g = torch.Generator().manual_seed(0)
    ds = torch.tensor([0, 0, 1, 2, 2])
    seen = [set() for _ in range(5)]
    for _ in range(200):
        p = mixing.choose_partners(ds, g)
        assert (ds[p] != ds).all()  # another dataset whenever the batch has one
        for i, j in enumerate(p.tolist()):
            seen[i].add(j)
    # every candidate drawn
    assert seen == [{2, 3, 4}, {2, 3, 4}, {0, 1, 3, 4}, {0, 1, 2}, {0, 1, 2}]
    p = mixing.choose_partners(torch.zeros(4, dtype=torch.long), g)
    assert (p != torch.arange(4)).all()  # single dataset: any other image
    assert mixing.choose_partners(torch.tensor([3]), g).tolist() == [0]  # B == 1: itself


# ----------------------------------------------------------------------------- mix_batch
@pytest.mark.parametrize("mode", ["both", "region", "pixel"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mix_batch_matches_naive_loop(mode, seed):
    images, labels, ds = batch(seed=seed)
    x, ya, yb, w, info = mixing.mix_batch(images, labels, ds, mode,
                                          torch.Generator().manual_seed(seed), return_info=True)
    nx, nya, nyb, nw, nmode, npartner = naive_mix(images, labels, ds, mode, seed)
    assert torch.equal(info["mode"], nmode) and torch.equal(info["partner"], npartner)
    assert torch.equal(ya, nya) and torch.equal(yb, nyb)
    torch.testing.assert_close(x, nx, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w, nw, atol=1e-6, rtol=0)
    assert ya.dtype == yb.dtype == torch.int64 and w.dtype == images.dtype


def test_pixel_mixing_targets():
    images, labels, ds = batch(seed=4)
    x, ya, yb, w, info = mixing.mix_batch(images, labels, ds, "pixel",
                                          torch.Generator().manual_seed(4),
                                          p_region=0.0, return_info=True)  # every image pixel-mixed
    assert (info["mode"] == mixing.PIXEL).all()
    hard = mixing.hard_labels(ya, yb, w)
    for i in range(len(ds)):
        p, lam = int(info["partner"][i]), float(info["lam"][i])
        assert ds[p] != ds[i]  # partner from another dataset
        lp = labels[p]
        present = set(lp.flatten().tolist()) - {IGNORE}
        chosen = set(info["classes"][i].nonzero()[:, 0].tolist())
        assert chosen <= present and len(chosen) == math.ceil(len(present) / 2) >= 1
        m = torch.isin(lp, torch.tensor(sorted(chosen)))  # M: partner pixels of the chosen classes
        # on M: weight lambda on the partner's class (y_a), 1 - lambda on the own class (y_b)
        assert torch.equal(ya[i][m], lp[m]) and torch.equal(yb[i][m], labels[i][m])
        torch.testing.assert_close(w[i][m], torch.full_like(w[i][m], lam))
        torch.testing.assert_close(x[i][:, m], lam * images[p][:, m] + (1 - lam) * images[i][:, m])
        assert (hard[i][m] == IGNORE).all()  # mixed pixels never update the bank
        # outside M: untouched
        assert torch.equal(x[i][:, ~m], images[i][:, ~m])
        assert torch.equal(ya[i][~m], labels[i][~m]) and torch.equal(yb[i][~m], labels[i][~m])
        assert (w[i][~m] == 1).all() and torch.equal(hard[i][~m], labels[i][~m])


def test_region_mixing_targets():
    images, labels, ds = batch(seed=5)
    x, ya, yb, w, info = mixing.mix_batch(images, labels, ds, "region",
                                          torch.Generator().manual_seed(5),
                                          p_region=1.0, return_info=True)
    assert (info["mode"] == mixing.REGION).all()
    assert (w == 1).all() and torch.equal(ya, yb) and torch.equal(mixing.hard_labels(ya, yb, w), ya)
    for i in range(len(ds)):
        p = int(info["partner"][i])
        x0, y0, x1, y1 = info["boxes"][i].tolist()
        box = torch.zeros(labels.shape[1:], dtype=torch.bool)
        box[y0:y1, x0:x1] = True
        assert (torch.equal(x[i][:, box], images[p][:, box])
                and torch.equal(ya[i][box], labels[p][box]))
        assert (torch.equal(x[i][:, ~box], images[i][:, ~box])
                and torch.equal(ya[i][~box], labels[i][~box]))


def test_mix_batch_reproducible_and_none_identity():
    images, labels, ds = batch(seed=6)
    a = mixing.mix_batch(images, labels, ds, "both", torch.Generator().manual_seed(1))
    b = mixing.mix_batch(images, labels, ds, "both", torch.Generator().manual_seed(1))
    c = mixing.mix_batch(images, labels, ds, "both", torch.Generator().manual_seed(2))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not all(torch.equal(u, v) for u, v in zip(a, c))
    x, ya, yb, w = mixing.mix_batch(images, labels, ds, "none", torch.Generator().manual_seed(1))
    assert torch.equal(x, images) and torch.equal(ya, labels) and torch.equal(yb, labels)
    assert (w == 1).all()
    # B == 1: the partner is the image itself, so nothing is mixed
    x, ya, yb, w = mixing.mix_batch(images[:1], labels[:1], ds[:1], "both",
                                    torch.Generator().manual_seed(0))
    assert torch.equal(x, images[:1]) and torch.equal(ya, labels[:1]) and (w == 1).all()
    # an all-IGNORE partner: pixel mixing pastes nothing
    lab = labels.clone()
    lab[ds == 1] = IGNORE
    x, ya, yb, w = mixing.mix_batch(images[:3], lab[:3], ds[:3], "pixel",
                                    torch.Generator().manual_seed(0), p_region=0.0)
    assert torch.equal(x[:2], images[:2]) and torch.equal(ya[:2], lab[:2]) and (w[:2] == 1).all()
    with pytest.raises(ValueError):
        mixing.mix_batch(images, labels, ds, "cutmix", torch.Generator())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_mix_batch_same_on_cuda():
    images, labels, ds = batch(b=8, h=33, w=41, c=40, seed=7, ds=(0, 1, 2, 0, 1, 2, 0, 0))
    cpu = mixing.mix_batch(images, labels, ds, "both", torch.Generator().manual_seed(3))
    gpu = mixing.mix_batch(images.cuda(), labels.cuda(), ds.cuda(), "both",
                           torch.Generator().manual_seed(3))
    for u, v in zip(cpu, gpu):
        assert v.device.type == "cuda"
        torch.testing.assert_close(v.cpu(), u, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- num_classes: no sync
@pytest.mark.parametrize("mode", ["both", "region", "pixel"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mix_batch_num_classes_bound_changes_no_output(mode, seed):
    """Any bound on the label ids gives the mix of the old call (num_classes=None), bit for bit,
    and so the naive loop's; it only sets how many class keys are drawn."""
    images, labels, ds = batch(seed=seed)
    B, c_used = len(ds), int(labels.max()) + 1
    ref = mixing.mix_batch(images, labels, ds, mode, torch.Generator().manual_seed(seed),
                           return_info=True)
    _, nya, nyb, _, nmode, npartner = naive_mix(images, labels, ds, mode, seed)
    for bound in (c_used, c_used + 1, 171):
        g = torch.Generator().manual_seed(seed)
        out = mixing.mix_batch(images, labels, ds, mode, g, return_info=True, num_classes=bound)
        assert all(torch.equal(u, v) for u, v in zip(ref[:4], out[:4]))
        for k in ("mode", "partner", "lam", "boxes"):
            assert torch.equal(ref[4][k], out[4][k]), k
        classes = out[4]["classes"]  # (B, bound): the old (B, c_used) padded with absent classes
        assert classes.shape == (B, bound) and torch.equal(classes[:, :c_used], ref[4]["classes"])
        assert not classes[:, c_used:].any()
        assert torch.equal(out[4]["mode"], nmode) and torch.equal(out[4]["partner"], npartner)
        assert torch.equal(out[1], nya) and torch.equal(out[2], nyb)
        # the generator moved past B*B + 4*B draws and B * bound class keys
        after = torch.Generator().manual_seed(seed)
        torch.rand(B * B + 4 * B + B * bound, generator=after, dtype=torch.float64)
        assert torch.equal(g.get_state(), after.get_state())


def test_mix_batch_label_beyond_num_classes():
    images, labels, ds = batch(seed=8)
    with pytest.raises(ValueError, match="out of range"):
        mixing.mix_batch(images, labels, ds, "both", torch.Generator(),
                         num_classes=int(labels.max()))


def test_mix_batch_reads_nothing_back_from_the_device():
    """On the meta device any host read of a tensor value (.item(), nonzero, a boolean-mask index,
    a value-dependent shape) raises: the stand-in, on the CPU, for sync debug mode on a GPU. The
    draws and dataset_index stay on the CPU, as in the training loop."""
    images = torch.empty(5, 3, 6, 7, device="meta")
    labels = torch.empty(5, 6, 7, dtype=torch.long, device="meta")
    ds = torch.tensor([0, 1, 0, 2, 1])
    for mode in mixing.MODES:
        x, ya, yb, w, info = mixing.mix_batch(images, labels, ds, mode,
                                              torch.Generator().manual_seed(0),
                                              return_info=True, num_classes=9)
        assert x.shape == images.shape and ya.shape == yb.shape == w.shape == labels.shape
        assert info["mode"].device.type == "meta"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_mix_batch_without_host_sync_on_cuda():
    images, labels, ds = batch(b=8, h=33, w=41, c=40, seed=7, ds=(0, 1, 2, 0, 1, 2, 0, 0))
    cpu = mixing.mix_batch(images, labels, ds, "both", torch.Generator().manual_seed(3))
    images_d, labels_d = images.cuda(), labels.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        gpu = mixing.mix_batch(images_d, labels_d, ds, "both", torch.Generator().manual_seed(3),
                               num_classes=171)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for u, v in zip(cpu, gpu):
        torch.testing.assert_close(v.cpu(), u, atol=1e-6, rtol=0)
