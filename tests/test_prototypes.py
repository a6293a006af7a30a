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
    # would spoil every mean if an ignored pixel were counted
    z.permute(0, 2, 3, 1)[labels == IGNORE] = 1e3
    return z, labels


def test_hand_worked_mean() -> None:
    bank = PrototypeBank(num_classes=3, dim=2, bank_size=4)
    # pixels (1,0) (0,1) (5,5)
    z = torch.tensor([[1.0, 0.0, 5.0], [0.0, 1.0, 5.0]]).reshape(1, 2, 1, 3)
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


def dist_batches(step: int, steps: list = STEPS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(100 + step)
    b0, b1, p0 = steps[step]
    return [random_batch(g, b0, D_DIST, 3, 3, [0, 1, 2, 3], p_ignore=p0),
            random_batch(g, b1, D_DIST, 3, 3, [1, 2, 3], p_ignore=0.2)]


# equal batch sizes on both ranks, updated with equal_batches=True (the accelerator default: no
# exchange of batch sizes), for the bit-for-bit test further down
EQUAL_STEPS = [(3, 3, 0.2), (2, 2, 1.0), (4, 4, 0.2)]


def _dist_worker(rank: int, port: int, out_dir: str) -> None:
    with gloo_group(rank, 2, port):
        bank = PrototypeBank(C_DIST, D_DIST, Q_DIST)
        for step in range(len(STEPS)):
            z, labels = dist_batches(step)[rank]
            bank.update(z, labels)
        equal = PrototypeBank(C_DIST, D_DIST, Q_DIST)
        for step in range(len(EQUAL_STEPS)):
            equal.update(*dist_batches(step, EQUAL_STEPS)[rank], equal_batches=True)
        torch.save({"default": bank.state_dict(), "equal": equal.state_dict()},
                   Path(out_dir) / f"rank{rank}.pth")


@pytest.fixture(scope="module")
def gloo_states() -> list[dict]:
    """One two-process gloo run for the tests below: per rank, the state dicts of its banks."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_dist_worker, args=(free_port(), tmp), nprocs=2, join=True)
        return [torch.load(Path(tmp) / f"rank{r}.pth", weights_only=True) for r in range(2)]


def test_two_ranks_gloo_identical_and_equal_to_union_batch(gloo_states: list[dict]) -> None:
    sd = [states["default"] for states in gloo_states]
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


# ----------------------------------------------------------------------------------------------
# the fixed-shape (host-sync free) bank against the compacted form it replaced, bit for bit


class CompactBank:
    """The previous PrototypeBank update, kept as the bit-for-bit reference: it compacts the
    present (image, class) pairs with bincount / nonzero / boolean masks (data-dependent shapes)."""

    def __init__(self, C: int, D: int, Q: int):
        self.C, self.Q = C, Q
        self.memory, self.prototypes = torch.zeros(C, Q, D), torch.zeros(C, D)
        self.count = torch.zeros(C, dtype=torch.long)

    def update(self, z: torch.Tensor, labels: torch.Tensor) -> None:
        B, D, h, w = z.shape
        zf = z.float().permute(0, 2, 3, 1).reshape(B * h * w, D)
        idx = (torch.arange(B).unsqueeze(1) * self.C + labels.reshape(B, h * w)).reshape(-1)
        keep = labels.reshape(-1) >= 0
        idx, zf = idx[keep], zf[keep]
        sums = zf.new_zeros(B * self.C, D).index_add_(0, idx, zf)
        counts = torch.bincount(idx, minlength=B * self.C)
        present = counts.nonzero().squeeze(1)  # (image, class) order
        means = F.normalize(sums[present] / counts[present].unsqueeze(1), dim=1)
        self.write(means, present % self.C)

    def write(self, means: torch.Tensor, cls: torch.Tensor) -> None:
        N = cls.shape[0]
        n_c = torch.bincount(cls, minlength=self.C)
        order = torch.sort(cls, stable=True).indices
        first = torch.cumsum(n_c, 0) - n_c
        pos = torch.empty_like(cls)
        pos[order] = torch.arange(N) - first[cls[order]]
        slot = (self.count[cls] + pos) % self.Q
        keep = pos >= n_c[cls] - self.Q
        self.memory.index_put_((cls[keep], slot[keep]), means[keep])
        self.count += n_c
        upd = (n_c > 0).nonzero().squeeze(1)
        n_filled = self.count[upd].clamp(max=self.Q).unsqueeze(1).float()
        self.prototypes[upd] = F.normalize(self.memory[upd].sum(1) / n_filled, dim=1)


def assert_bits_equal(bank: PrototypeBank, ref: CompactBank) -> None:
    for k in ("memory", "count", "prototypes"):
        a, b = getattr(bank, k), getattr(ref, k)
        assert a.dtype == b.dtype and torch.equal(a, b), k
        if a.is_floating_point():  # torch.equal does not see the sign of a zero
            assert torch.equal(a.view(torch.int32), b.view(torch.int32)), k


def test_fixed_shapes_bit_identical_to_compacted_form() -> None:
    g = torch.Generator().manual_seed(3)
    draw = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=g))  # noqa: E731
    n_updates, overfull = 0, 0
    for _ in range(60):
        C, D, Q = draw(1, 10), draw(1, 6), draw(1, 5)
        bank, ref = PrototypeBank(C, D, Q), CompactBank(C, D, Q)
        for _ in range(draw(1, 8)):
            # empty and all-ignore batches, absent classes, wrap-around, more than Q means of a
            # class in one update (up to 6 images, Q up to 4); two "ranks" joined in rank order
            classes = torch.randperm(C, generator=g)[:draw(1, C + 1)].tolist()
            p_ignore = [0.0, 0.3, 1.0][draw(0, 3)]
            h, w = draw(1, 4), draw(1, 4)
            parts = [random_batch(g, draw(0, 4), D, h, w, classes, p_ignore) for _ in range(2)]
            z, labels = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
            z = z * float(torch.rand(1, generator=g) * 4 + 0.01)
            bank.update(z, labels)
            ref.update(z, labels)
            assert_bits_equal(bank, ref)
            n_updates += 1
            in_image = (labels.flatten(1).unsqueeze(2) == torch.arange(C)).any(1)  # (B, C)
            overfull += bool((in_image.sum(0) > Q).any())
    assert n_updates > 200 and overfull > 20


def test_write_rows_bit_identical_to_compacted_form() -> None:
    """write(means, cls[, valid]) with arbitrary rows, as tools/bench.py fills a bank."""
    g = torch.Generator().manual_seed(4)
    C, D, Q = 6, 5, 3
    bank, ref = PrototypeBank(C, D, Q), CompactBank(C, D, Q)
    for _ in range(30):
        N = int(torch.randint(0, 12, (1,), generator=g))
        means = F.normalize(torch.randn(N, D, generator=g), dim=1)
        cls = torch.randint(C, (N,), generator=g)
        valid = torch.rand(N, generator=g) < 0.7
        bank.write(means, cls, valid)
        ref.write(means[valid], cls[valid])
        assert_bits_equal(bank, ref)
    bank.write(means, cls)  # valid defaults to every row
    ref.write(means, cls)
    assert_bits_equal(bank, ref)


def test_update_reads_nothing_back_from_the_device() -> None:
    """On the meta device any host read of a tensor value (.item(), nonzero, a boolean-mask index,
    a value-dependent shape) raises: the stand-in, on the CPU, for sync debug mode on a GPU."""
    bank = PrototypeBank(5, 4, 3).to("meta")
    for _ in range(2):
        bank.update(torch.empty(3, 4, 2, 2, device="meta"),
                    torch.empty(3, 2, 2, dtype=torch.long, device="meta"))
    assert bank.prototypes.shape == (5, 4) and bank.memory.shape == (5, 3, 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_update_without_host_sync_on_cuda() -> None:
    g = torch.Generator().manual_seed(5)
    C, D, Q = 7, 8, 4
    batches = [random_batch(g, 4, D, 5, 6, [0, 2, 3, 5]) for _ in range(5)]
    batches.append((torch.randn(2, D, 5, 6), torch.full((2, 5, 6), IGNORE)))
    bank, ref = PrototypeBank(C, D, Q).cuda(), CompactBank(C, D, Q)
    on_gpu = [(z.cuda(), labels.cuda()) for z, labels in batches]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for z, labels in on_gpu:
            bank.update(z, labels)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for z, labels in batches:
        ref.update(z, labels)
    assert torch.equal(bank.count.cpu(), ref.count)
    torch.testing.assert_close(bank.memory.cpu(), ref.memory, atol=1e-6, rtol=0)
    torch.testing.assert_close(bank.prototypes.cpu(), ref.prototypes, atol=1e-6, rtol=0)


def test_two_ranks_gloo_bit_identical_to_compacted_union(gloo_states: list[dict]) -> None:
    """Both gloo runs: unequal batch sizes (exchanged: the CPU default) and equal ones
    (equal_batches=True: one fixed-shape all_gather, as on an accelerator)."""
    for name, steps in (("default", STEPS), ("equal", EQUAL_STEPS)):
        ref = CompactBank(C_DIST, D_DIST, Q_DIST)
        for step in range(len(steps)):
            (z0, l0), (z1, l1) = dist_batches(step, steps)
            ref.update(torch.cat([z0, z1]), torch.cat([l0, l1]))  # rank order
        for states in gloo_states:
            bank = PrototypeBank(C_DIST, D_DIST, Q_DIST)
            bank.load_state_dict(states[name])
            assert_bits_equal(bank, ref)
