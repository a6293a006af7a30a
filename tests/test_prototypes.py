"""PrototypeBank (M3) against a deliberately naive per-image / per-class loop re-implementation."""
from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gloo import free_port, gloo_group
from prototypes import PrototypeBank

IGNORE = -1


class NaiveBank:
    """Keeps every image mean ever written per class; the ring buffer is replayed from it."""

    def __init__(self, C: int, D: int, Q: int):
        self.C, self.D, self.Q = C, D, Q
        self.history: list[list[torch.Tensor]] = [[] for _ in range(C)]

    def update(self, z: torch.Tensor, labels: torch.Tensor) -> None:
        B, D, h, w = z.shape
        for b in range(B):
            for c in range(self.C):
                pix = [z[b, :, y, x] for y in range(h) for x in range(w) if labels[b, y, x] == c]
                if pix:
                    m = torch.stack(pix).double().mean(0)
                    self.history[c].append(m / m.norm())

    @property
    def count(self) -> torch.Tensor:
        return torch.tensor([len(hc) for hc in self.history])

    @property
    def memory(self) -> torch.Tensor:
        mem = torch.zeros(self.C, self.Q, self.D, dtype=torch.float64)
        for c, hc in enumerate(self.history):
            for k, m in enumerate(hc):  # the k-th mean ever goes to slot k mod Q
                mem[c, k % self.Q] = m
        return mem

    @property
    def prototypes(self) -> torch.Tensor:
        p = torch.zeros(self.C, self.D, dtype=torch.float64)
        for c, hc in enumerate(self.history):
            if hc:
                m = torch.stack(hc[-self.Q:]).mean(0)
                p[c] = m / m.norm()
        return p


def assert_same(bank: PrototypeBank, ref: NaiveBank) -> None:
    assert torch.equal(bank.count, ref.count)
    assert torch.equal(bank.filled, ref.count > 0)
    torch.testing.assert_close(bank.memory.double(), ref.memory, atol=1e-5, rtol=0)
    torch.testing.assert_close(bank.prototypes.double(), ref.prototypes, atol=1e-5, rtol=0)


def random_batch(g: torch.Generator, B: int, D: int, h: int, w: int, classes: list[int],
                 p_ignore: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    z = F.normalize(torch.randn(B, D, h, w, generator=g), dim=1)
    cl = torch.tensor(classes)
    labels = cl[torch.randint(len(cl), (B, h, w), generator=g)]
    labels[torch.rand(B, h, w, generator=g) < p_ignore] = IGNORE
    z.permute(0, 2, 3, 1)[labels == IGNORE] = 1e3  # would spoil every mean if an ignored pixel were counted
    return z, labels


def test_hand_worked_mean() -> None:
    bank = PrototypeBank(num_classes=3, dim=2, bank_size=4)
    z = torch.tensor([[1.0, 0.0, 5.0], [0.0, 1.0, 5.0]]).reshape(1, 2, 1, 3)  # pixels (1,0) (0,1) (5,5)
    labels = torch.tensor([[[1, 1, IGNORE]]])
    bank.update(z, labels)
    s = 2 ** -0.5
    assert bank.count.tolist() == [0, 1, 0]
    torch.testing.assert_close(bank.memory[1, 0], torch.tensor([s, s]))
    torch.testing.assert_close(bank.prototypes, torch.tensor([[0.0, 0.0], [s, s], [0.0, 0.0]]))
    assert bank.filled.tolist() == [False, True, False]


def test_updates_with_wraparound_match_naive() -> None:
    g = torch.Generator().manual_seed(0)
    C, D, Q = 6, 4, 3
    bank, ref = PrototypeBank(C, D, Q), NaiveBank(C, D, Q)
    # class 5 never appears; classes 0-1 are in nearly every image (4-5 images > Q in one update)
    for step, (B, classes) in enumerate([(2, [0, 1]), (5, [0, 1, 2]), (4, [0, 1, 3, 4]), (1, [2]),
                                         (5, [0, 1, 2, 3, 4]), (3, [4])]):
        z, labels = random_batch(g, B, D, 3, 4, classes)
        bank.update(z, labels)
        ref.update(z, labels)
        assert_same(bank, ref)
    assert (ref.count[:5] > Q).all(), "the test must wrap every seen ring buffer"
    assert not bank.filled[5]
    assert (bank.prototypes[5] == 0).all() and (bank.memory[5] == 0).all()


def test_all_ignore_batch_changes_nothing() -> None:
    g = torch.Generator().manual_seed(1)
    bank = PrototypeBank(4, 3, 2)
    z, labels = random_batch(g, 2, 3, 2, 2, [0, 1])
    bank.update(z, labels)
    before = {k: v.clone() for k, v in bank.state_dict().items()}
    bank.update(torch.randn(2, 3, 2, 2), torch.full((2, 2, 2), IGNORE))
    for k, v in bank.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_state_dict_round_trip() -> None:
    g = torch.Generator().manual_seed(2)
    C, D, Q = 5, 4, 3
    bank, ref = PrototypeBank(C, D, Q), NaiveBank(C, D, Q)
    for B in (3, 4):
        z, labels = random_batch(g, B, D, 3, 3, [0, 1, 2])
        bank.update(z, labels)
        ref.update(z, labels)
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(bank.state_dict(), Path(tmp) / "bank.pth")
        fresh = PrototypeBank(C, D, Q)
        fresh.load_state_dict(torch.load(Path(tmp) / "bank.pth", weights_only=True))
    assert_same(fresh, ref)
    # the restored bank continues exactly like the original
    z, labels = random_batch(g, 4, D, 3, 3, [0, 1, 2, 3])
    for b in (bank, fresh, ref):
        b.update(z, labels)
    assert_same(fresh, ref)
    for k, v in bank.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k]), k


def test_bad_input() -> None:
    bank = PrototypeBank(3, 2, 4)
    with pytest.raises(ValueError, match="out of range"):
        bank.update(torch.randn(1, 2, 2, 2), torch.full((1, 2, 2), 3))
    with pytest.raises(ValueError, match="shape"):
        bank.update(torch.randn(1, 2, 2, 2), torch.zeros(1, 4, 4, dtype=torch.long))


# ----------------------------------------------------------------------------------------------
# two processes, gloo: every rank holds the same bank, equal to one process seeing the union batch

C_DIST, D_DIST, Q_DIST = 5, 3, 3
# per step: (rank-0 images, rank-1 images, p_ignore of rank 0); rank 0 sometimes contributes nothing
STEPS = [(2, 3, 0.2), (1, 4, 0.2), (3, 1, 1.0), (2, 2, 0.2)]


def dist_batches(step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(100 + step)
    b0, b1, p0 = STEPS[step]
    return [random_batch(g, b0, D_DIST, 3, 3, [0, 1, 2, 3], p_ignore=p0),
            random_batch(g, b1, D_DIST, 3, 3, [1, 2, 3], p_ignore=0.2)]


def _dist_worker(rank: int, port: int, out_dir: str) -> None:
    with gloo_group(rank, 2, port):
        bank = PrototypeBank(C_DIST, D_DIST, Q_DIST)
        for step in range(len(STEPS)):
            z, labels = dist_batches(step)[rank]
            bank.update(z, labels)
        torch.save(bank.state_dict(), Path(out_dir) / f"rank{rank}.pth")


def test_two_ranks_gloo_identical_and_equal_to_union_batch() -> None:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_dist_worker, args=(free_port(), tmp), nprocs=2, join=True)
        sd = [torch.load(Path(tmp) / f"rank{r}.pth", weights_only=True) for r in range(2)]
    for k in sd[0]:
        assert torch.equal(sd[0][k], sd[1][k]), f"ranks differ in {k}"

    single, ref = PrototypeBank(C_DIST, D_DIST, Q_DIST), NaiveBank(C_DIST, D_DIST, Q_DIST)
    for step in range(len(STEPS)):
        (z0, l0), (z1, l1) = dist_batches(step)
        z, labels = torch.cat([z0, z1]), torch.cat([l0, l1])  # rank order
        single.update(z, labels)
        ref.update(z, labels)
    gathered = PrototypeBank(C_DIST, D_DIST, Q_DIST)
    gathered.load_state_dict(sd[0])
    assert_same(gathered, ref)
    for k, v in single.state_dict().items():
        torch.testing.assert_close(sd[0][k], v, atol=1e-6, rtol=0)
