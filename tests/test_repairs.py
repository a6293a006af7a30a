"""The [ours] repairs that keep more of MDP (issue: is the repaired MDP better than CE?) against
naive computations written here: CSC's similar classes read from a bank kept beside learned
prototypes (--csc-similarity bank), the centred bank (--prototypes centred), the standardised
embedding (--embed-norm bn), and the mining threshold chosen by the precision of its
pseudo-labels (mine.threshold_for_precision); their refusals, and one run with each."""
from __future__ import annotations

import json
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_train_pretrain import ROOT, TINY, load, one_error_line, run

import losses
from mdp import MDPNet
from mine import threshold_for_precision
from prototypes import CentredBank, LearnedPrototypes, PrototypeBank, build_prototypes
from train_pretrain import compute_loss

IGNORE = -1


def unit(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def naive_csc_by(z, protos, similar, filled, sim_filled, labels, dataset, tau, topk):
    """M5 per pixel, the top-k and alpha read from z . similar (not z . protos) among the classes
    filled in both; the softmax over the filled prototypes, as M4's."""
    out = []
    for p in range(z.shape[0]):
        y = int(labels[p])
        if y == IGNORE:
            continue
        cands = [c for c in range(len(protos))
                 if filled[c] and sim_filled[c] and dataset[c] != dataset[y]]
        if not cands:
            continue
        sim = {c: float(z[p].detach() @ similar[c]) / tau for c in cands}
        top = sorted(cands, key=lambda c: -sim[c])[:topk]
        alpha = torch.softmax(torch.tensor([sim[c] for c in top], dtype=z.dtype), 0)
        s = torch.stack([z[p] @ protos[c] / tau for c in range(len(protos)) if filled[c]])
        lse = torch.logsumexp(s, 0)
        out.append(-sum(alpha[j] * (z[p] @ protos[c] / tau - lse) for j, c in enumerate(top)))
    return sum(out) / len(out)


def test_csc_similarity_from_another_source_matches_naive() -> None:
    z, protos, similar = unit(12, 5, seed=0), unit(6, 5, seed=1), unit(6, 5, seed=2)
    labels = torch.tensor([0, 1, 2, 3, 4, 5, -1, 0, 3, 5, 2, 1])
    dataset = torch.tensor([0, 0, 1, 1, 2, 2])
    filled = torch.tensor([True, True, True, False, True, True])
    sim_filled = torch.tensor([True, False, True, True, True, True])  # class 1 not in the bank
    for topk in (1, 2, 5):
        zf, zn = z.clone().requires_grad_(), z.clone().requires_grad_()
        fast = losses.csc_loss(zf, protos, filled, labels, dataset, 0.1, topk,
                               similarity=(similar, sim_filled))
        naive = naive_csc_by(zn, protos, similar, filled, sim_filled, labels, dataset, 0.1,
                             topk)
        fast.backward(), naive.backward()
        torch.testing.assert_close(fast, naive)
        torch.testing.assert_close(zf.grad, zn.grad)
    # the source's rule is the similarity of the prototypes themselves
    torch.testing.assert_close(
        losses.csc_loss(z, protos, filled, labels, dataset, 0.1, 2, similarity=(protos, filled)),
        losses.csc_loss(z, protos, filled, labels, dataset, 0.1, 2))


def fill(banks: list, steps: int = 5, C: int = 5, D: int = 4) -> None:
    """The same random updates to every bank (class 4 never appears: stays empty)."""
    g = torch.Generator().manual_seed(7)
    for _ in range(steps):
        z = F.normalize(torch.randn(3, D, 2, 2, generator=g) + 2.0, dim=1)  # a common component
        y = torch.randint(-1, C - 1, (3, 2, 2), generator=g)
        for b in banks:
            b.update(z, y)


def test_centred_bank_is_the_bank_minus_the_mean_prototype() -> None:
    plain, centred = PrototypeBank(5, 4, bank_size=3), CentredBank(5, 4, bank_size=3)
    fill([plain, centred])
    assert torch.equal(plain.memory, centred.memory) and torch.equal(plain.count, centred.count)
    b, filled = plain.prototypes, plain.filled
    want = torch.zeros_like(b)
    for c in range(5):  # by hand: the filled rows' mean taken out, then back to unit length
        if filled[c]:
            want[c] = F.normalize(b[c] - b[filled].mean(0), dim=0)
    torch.testing.assert_close(centred.prototypes, want)
    assert not filled[4] and centred.prototypes[4].abs().sum() == 0
    mean_cos = lambda p: float((p[:4] @ p[:4].t()).sum() - 4) / 12  # noqa: E731
    assert mean_cos(b) > 0.5 > mean_cos(centred.prototypes)  # the common lean is gone
    assert isinstance(build_prototypes("centred", 5, 4, 3, 0), CentredBank)


def test_learned_prototypes_keep_the_sources_bank_for_csc() -> None:
    plain = PrototypeBank(5, 6, bank_size=3)
    learned = build_prototypes("learned", 5, 6, 3, seed=0, csc_bank=True)
    start = learned.prototypes.detach().clone()
    fill([plain, learned], D=6)
    for k in ("memory", "count", "prototypes"):
        assert torch.equal(getattr(plain, k), getattr(learned.bank, k))
    torch.testing.assert_close(learned.prototypes.detach(), start)  # the optimiser moves those
    assert LearnedPrototypes(5, 6).bank is None
    assert {"weight", "bank.memory"} <= set(learned.state_dict())


def test_compute_loss_reads_csc_similarity_from_the_bank() -> None:
    C, D = 4, 4
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, C, (2, 4, 4), generator=g)
    w = torch.ones(2, 4, 4, dtype=torch.float64)
    z0 = F.normalize(torch.randn(2, D, 4, 4, generator=g, dtype=torch.float64), dim=1)
    dataset = torch.tensor([0, 0, 1, 1])
    args = Namespace(method="mdp", max_pixels=0, tau=0.1, no_csc=False, topk=1, csc_weight=0.5,
                     label_purity=0.0, proto_grad=False)
    learned = LearnedPrototypes(C, D, seed=0, bank_size=4).double()
    loss, parts = compute_loss(args, z0.clone(), y, y, w, learned, dataset, torch.Generator())
    feats, labels = z0.permute(0, 2, 3, 1).reshape(-1, D), y.flatten()
    want = losses.csc_loss(feats, learned.prototypes, learned.filled, labels, dataset, 0.1, 1,
                           similarity=(learned.bank.prototypes, learned.bank.filled))
    torch.testing.assert_close(parts["csc"], want)
    other = losses.csc_loss(feats, learned.prototypes, learned.filled, labels, dataset, 0.1, 1)
    assert not torch.allclose(want, other)  # the bank chose other classes than the prototypes


def test_embed_norm_bn_standardises_each_dimension_before_the_l2_norm() -> None:
    torch.manual_seed(0)
    net = MDPNet("resnet14", 16, embed_dim=8, embed_norm="bn").train()
    x = torch.randn(2, 3, 64, 64)
    h = net.head[:4](net.forward_features(x))  # (B, D, h, w): the head without the new BN
    mean = h.mean((0, 2, 3), keepdim=True)
    var = h.var((0, 2, 3), unbiased=False, keepdim=True)
    want = F.normalize((h - mean) / torch.sqrt(var + 1e-5), dim=1)
    torch.testing.assert_close(net(x), want, rtol=1e-4, atol=1e-5)
    assert not net.head[4].affine and len(net.head) == 5
    assert len(MDPNet("resnet14", 16, embed_dim=8).head) == 4  # default: the source's head
    with pytest.raises(ValueError, match="embed_norm"):
        MDPNet("resnet14", 16, embed_norm="ln")


def brute_threshold(conf: list[float], correct: list[bool], precision: float) -> float | None:
    best = None
    for t in sorted(set(conf)):  # every candidate threshold, lowest first
        kept = [ok for c, ok in zip(conf, correct) if c >= t]
        if sum(kept) / len(kept) >= precision:
            return t
    return best


def test_threshold_for_precision_by_hand_and_against_brute_force() -> None:
    # by hand: sorted 0.95 ok, 0.9 ok, 0.8 wrong, 0.7 ok, 0.6 wrong: precision of conf >= t is
    # 1, 1, 2/3, 3/4, 3/5; at 0.75 wanted the lowest is 0.7
    conf = torch.tensor([0.6, 0.9, 0.7, 0.95, 0.8])
    correct = torch.tensor([False, True, True, True, False])
    assert threshold_for_precision(conf, correct, 0.75) == pytest.approx(0.7)
    assert threshold_for_precision(conf, correct, 0.9) == pytest.approx(0.9)
    assert threshold_for_precision(conf, correct, 0.5) == pytest.approx(0.6)
    assert threshold_for_precision(conf, ~torch.ones(5, dtype=torch.bool), 0.9) is None
    # ties: a threshold keeps its whole tie group (0.8 twice, one wrong: 3 of 4 at 0.8)
    tied = torch.tensor([0.9, 0.9, 0.8, 0.8])
    assert threshold_for_precision(tied, torch.tensor([True, True, True, False]), 0.8) == \
        pytest.approx(0.9)
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        c = (torch.rand(30, generator=g) * 10).round() / 10  # many ties
        ok = torch.rand(30, generator=g) < c  # confident pixels are right more often
        for precision in (0.5, 0.8, 0.9):
            want = brute_threshold(c.tolist(), ok.tolist(), precision)
            got = threshold_for_precision(c, ok, precision)
            assert (got is None) == (want is None) and (want is None or got == pytest.approx(want))


def test_refusals(toy_root: Path, tmp_path: Path) -> None:
    base = ["--datasets", "voc", "--data-root", str(toy_root), "--iters", "1", "--out-dir",
            str(tmp_path / "x"), *TINY]
    one_error_line(run([*base, "--csc-similarity", "bank"]), "--prototypes bank")
    one_error_line(run([*base, "--prototypes", "learned", "--csc-similarity", "bank", "--no-csc"]),
                   "--no-csc")
    one_error_line(run([*base, "--method", "ce", "--embed-norm", "bn"]), "--method ce")


def test_repairs_train_and_their_checkpoints_evaluate(toy_root: Path, tmp_path: Path) -> None:
    """A few steps with each repair; the checkpoint's own task and the mining threshold read back
    by tools/pretrain_eval.py (which must rebuild the standardised head)."""
    common = ["--data-root", str(toy_root), "--iters", "3", *TINY]
    two = ["--datasets", "voc", "ade20k", "--embed-dim", "176"]  # 171 learned anchors
    for name, flags in (("f", two + ["--prototypes", "learned", "--csc-similarity", "bank"]),
                        ("h1", ["--datasets", "voc", "--embed-norm", "bn"]),
                        ("h2", ["--datasets", "voc", "--prototypes", "centred"])):
        r = run(common + flags + ["--out-dir", str(tmp_path / name)])
        assert r.returncode == 0, r.stderr
        state = load(tmp_path / name / "last.pth")
        assert state["args"]["csc_similarity"] == flags[-1] if name == "f" else True
        out = tmp_path / f"{name}.json"
        r = subprocess.run([sys.executable, str(ROOT / "tools" / "pretrain_eval.py"),
                            str(tmp_path / name / "last.pth"), "--dataset", "voc", "--data-root",
                            str(toy_root), "--base-size", "64", "32", "--mine-precision", "0.5",
                            "--out", str(out)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        mining = json.loads(out.read_text())["mining"]
        assert 0 < mining["max_confidence"] <= 1
        assert mining["threshold"] is None or mining["threshold"] <= mining["max_confidence"]
    assert "head.4.running_mean" in load(tmp_path / "h1" / "last.pth")["model"]
    assert "bank.memory" in load(tmp_path / "f" / "last.pth")["bank"]
