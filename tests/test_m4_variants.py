"""The [ours] M4 variants of the mechanism study (--prototypes anchors|learned, --learn-tau,
--proto-grad) against naive computations written here, their wiring in compute_loss, their
refusals, and a run + resume bit for bit with learned prototypes and temperature."""
from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_train_pretrain import (ROOT, TINY, assert_resume_equals, assert_same_state, load,
                                 one_error_line, run)

from prototypes import (FixedAnchors, LearnedPrototypes, LogitScale, PrototypeBank,
                        build_prototypes, prototype_cosine, prototypes_from_state,
                        random_orthonormal)
from train_pretrain import compute_loss

IGNORE = -1


def test_random_orthonormal_anchors() -> None:
    a = random_orthonormal(5, 8, seed=3)
    assert a.shape == (5, 8)
    torch.testing.assert_close(a @ a.t(), torch.eye(5), atol=1e-6, rtol=0)
    assert torch.equal(a, random_orthonormal(5, 8, seed=3))
    assert not torch.equal(a, random_orthonormal(5, 8, seed=4))
    with pytest.raises(ValueError, match="--embed-dim 4"):
        random_orthonormal(5, 4)


def test_fixed_anchors_never_move_and_learned_start_there() -> None:
    anchors = FixedAnchors(4, 6, seed=1)
    before = anchors.prototypes.clone()
    z = F.normalize(torch.randn(2, 6, 3, 3), dim=1)
    anchors.update(z, torch.randint(0, 4, (2, 3, 3)))
    assert torch.equal(anchors.prototypes, before) and anchors.filled.all()
    assert list(anchors.parameters()) == []  # nothing for the optimiser
    learned = LearnedPrototypes(4, 6, seed=1)
    torch.testing.assert_close(learned.prototypes, before)
    assert [p.shape for p in learned.parameters()] == [(4, 6)]
    for src in (anchors, learned):  # what pretrain_eval / mine read back from a checkpoint
        protos, filled = prototypes_from_state(src.state_dict())
        torch.testing.assert_close(protos, src.prototypes.detach())
        assert filled.all()
    with pytest.raises(ValueError, match="expected bank, centred, anchors or learned"):
        build_prototypes("kmeans", 4, 6, 8, 0)


def test_learned_prototypes_are_a_cosine_classifier() -> None:
    """M4 on LearnedPrototypes == cross-entropy of cos(z, w_c) / tau written out by hand, in value
    and in the gradients of the weights and of the embeddings."""
    torch.manual_seed(0)
    C, D, N, tau = 5, 7, 30, 0.1
    learned = LearnedPrototypes(C, D, seed=2).double()
    with torch.no_grad():
        learned.weight.mul_(torch.rand(C, 1, dtype=torch.float64) + 0.5)  # rows not unit
    z = F.normalize(torch.randn(N, D, dtype=torch.float64), dim=1).requires_grad_()
    y = torch.randint(0, C, (N,))
    y[:3] = IGNORE
    args = Namespace(method="mdp", max_pixels=0, tau=tau, no_csc=True, topk=1, csc_weight=0.0,
                     label_purity=0.0, proto_grad=False)
    ones = torch.ones(1, 5, 6, dtype=torch.float64)
    loss, _ = compute_loss(args, z.t().reshape(1, D, 5, 6), y.view(1, 5, 6), y.view(1, 5, 6),
                           ones, learned, torch.zeros(C, dtype=torch.long), torch.Generator())
    loss.backward()
    w2 = learned.weight.detach().clone().requires_grad_()
    z2 = z.detach().clone().requires_grad_()
    terms = []
    for i in range(N):
        if y[i] == IGNORE:
            continue
        logits = torch.stack([z2[i] @ w2[c] / w2[c].norm() / tau for c in range(C)])
        terms.append(-(logits[y[i]] - torch.logsumexp(logits, 0)))
    naive = torch.stack(terms).mean()
    naive.backward()
    torch.testing.assert_close(loss, naive)
    torch.testing.assert_close(learned.weight.grad, w2.grad)
    torch.testing.assert_close(z.grad, z2.grad)


def test_logit_scale() -> None:
    s = LogitScale(0.07)
    torch.testing.assert_close(s.tau, torch.tensor(0.07))
    (s.tau * 3).backward()  # d(tau)/d(log_scale) = -tau
    torch.testing.assert_close(s.log_scale.grad, torch.tensor(-3 * 0.07))
    with torch.no_grad():
        s.log_scale.fill_(math.log(1000.0))
    torch.testing.assert_close(s.tau, torch.tensor(0.01))  # kept at tau >= 0.01


def test_proto_grad_keeps_the_values_and_gives_the_naive_gradient() -> None:
    """prototypes_with_grad: bit-for-bit the bank's prototypes; its gradient is that of
    p_c = normalise(mean over the class's image means), the older means fixed and this batch's
    written as differentiable per-image loops."""
    g = torch.Generator().manual_seed(5)
    C, D, Q = 5, 4, 16
    bank = PrototypeBank(C, D, Q).double()

    def batch(B: int, classes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        z = F.normalize(torch.randn(B, D, 3, 4, generator=g, dtype=torch.float64), dim=1)
        lab = torch.tensor(classes)[torch.randint(len(classes), (B, 3, 4), generator=g)]
        lab[torch.rand(B, 3, 4, generator=g) < 0.2] = IGNORE
        return z, lab

    z0, l0 = batch(3, [0, 1, 2, 3])
    z1, l1 = batch(2, [0, 2, 4])  # classes 1 and 3 only in the bank, 4 only in this batch
    bank.update(z0, l0)
    bank.update(z1, l1)
    z = z1.clone().requires_grad_()
    p = bank.prototypes_with_grad(z, l1)
    assert torch.equal(p.detach(), bank.prototypes)
    r = torch.randn(C, D, generator=g, dtype=torch.float64)
    (p * r).sum().backward()

    zn = z1.clone().requires_grad_()
    means: list[list[torch.Tensor]] = [[] for _ in range(C)]
    for zz, lab in ((z0, l0), (zn, l1)):
        for b in range(zz.shape[0]):
            for c in range(C):
                pix = [zz[b, :, i, j] for i in range(3) for j in range(4) if lab[b, i, j] == c]
                if pix:
                    m = torch.stack(pix).mean(0)
                    means[c].append(m / m.norm())
    naive = sum((torch.stack(ms).mean(0) / torch.stack(ms).mean(0).norm() * r[c]).sum()
                for c, ms in enumerate(means) if ms)
    naive.backward()
    torch.testing.assert_close(z.grad, zn.grad, atol=1e-5, rtol=0)  # the bank sums in float32
    assert z.grad.abs().sum() > 0


def test_compute_loss_wiring() -> None:
    """--proto-grad leaves the loss value and the bank unchanged and changes the gradient;
    a learned temperature tensor is used as tau; proto_cos is the mean off-diagonal cosine."""
    C, D = 3, 4
    y = torch.randint(0, C, (2, 4, 4), generator=torch.Generator().manual_seed(0))
    w = torch.ones(2, 4, 4, dtype=torch.float64)
    z0 = F.normalize(torch.randn(2, D, 4, 4, dtype=torch.float64), dim=1)
    kw = dict(method="mdp", max_pixels=0, tau=0.2, no_csc=True, topk=1, csc_weight=0.0,
              label_purity=0.0)
    runs = []
    for proto_grad, tau in ((False, None), (True, None),
                            (False, torch.tensor(0.2, dtype=torch.float64))):
        bank, z = PrototypeBank(C, D, 4).double(), z0.clone().requires_grad_()
        loss, parts = compute_loss(Namespace(proto_grad=proto_grad, **kw), z, y, y, w, bank,
                                   torch.zeros(C, dtype=torch.long), torch.Generator(), tau=tau)
        loss.backward()
        runs.append((loss, z.grad, bank.state_dict(), parts))
    (l0, g0, b0, p0), (l1, g1, b1, _), (l2, g2, _, p2) = runs
    assert torch.equal(l0, l1) and not torch.allclose(g0, g1)
    assert_same_state(b0, b1)
    torch.testing.assert_close(l2, l0) and torch.testing.assert_close(g2, g0)
    assert "tau" in p2 and "tau" not in p0
    protos = b0["prototypes"]
    cos = protos @ protos.t()
    want = (cos.sum() - cos.diagonal().sum()) / (C * (C - 1))
    torch.testing.assert_close(p0["proto_cos"], want)
    torch.testing.assert_close(prototype_cosine(protos, torch.tensor([True, False, True])),
                               cos[0, 2])


def test_refusals(toy_root: Path, tmp_path: Path) -> None:
    base = ["--datasets", "voc", "--data-root", str(toy_root), "--iters", "1", "--out-dir",
            str(tmp_path / "x"), *TINY]
    one_error_line(run([*base, "--method", "ce", "--prototypes", "anchors"]), "--method ce")
    one_error_line(run([*base, "--method", "pix2pix", "--learn-tau"]), "--method pix2pix")
    one_error_line(run([*base, "--prototypes", "learned", "--proto-grad"]), "--proto-grad")


def test_learned_prototypes_and_tau_resume_bit_for_bit(toy_root: Path, tmp_path: Path) -> None:
    """Learned prototypes and temperature train (they move), are checkpointed and come back on
    --resume: an interrupted run ends equal to an uninterrupted one."""
    common = ["--datasets", "voc", "--data-root", str(toy_root), "--iters", "6",
              "--prototypes", "learned", "--learn-tau", *TINY, "--embed-dim", "32"]  # 21 anchors
    ref = tmp_path / "ref"
    assert run(common + ["--out-dir", str(ref)]).returncode == 0
    out = tmp_path / "interrupted"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_pretrain.py"), *common,
                             "--out-dir", str(out)], cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    log = out / "log.jsonl"
    while not (log.exists() and len(log.read_text().splitlines()) >= 2):
        assert proc.poll() is None, "run ended before it was interrupted"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=300)
    stopped_at = load(out / "last.pth")["step"]
    assert 2 <= stopped_at < 6
    a = assert_resume_equals(run(common + ["--out-dir", str(out), "--resume", "auto"]), out, ref,
                             stopped_at, 6)
    assert_same_state(a["logit_scale"], load(out / "last.pth")["logit_scale"])
    start = LearnedPrototypes(21, 32, seed=0).weight
    assert not torch.allclose(a["bank"]["weight"], start)  # the prototypes were trained
    assert a["logit_scale"]["log_scale"] != pytest.approx(-math.log(0.07))
