"""Class prototypes with the two-step average (METHOD.md M3).

Per class c a ring buffer holds the last Q per-image class means:
  step one  m_ic = normalise(mean of image i's detached embeddings labelled c)   (hard labels only)
  step two  p_c  = normalise(mean of the filled slots of memory c)
The bank is updated from the whole global batch before the loss of the step: every rank's image
means are gathered in rank order, so every rank writes the same means in the same order and holds a
bit-identical bank. A class never seen is empty (`filled` False, prototype zero) and must be left
out of every softmax (M4). All updates are batched tensor ops; nothing loops over classes or images.

No host synchronisation on an accelerator: every shape is fixed by (B, C, D, Q, world), never by
the labels, and nothing reads a device value on the host, so a CUDA step runs under
`torch.cuda.set_sync_debug_mode("error")`. Absent (image, class) pairs travel as masked rows
instead of being compacted away. Two consequences:
- label ids are range-checked with a ValueError on the CPU only; on an accelerator an asynchronous
  device-side assertion (`torch._assert_async`) aborts the process at its next sync instead;
- under DDP on an accelerator every rank must pass the same batch size (train_pretrain's loader
  drops the last incomplete batch); CPU (gloo) ranks may differ. See `update`.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def _gather_ranks(x: torch.Tensor, equal_batches: bool | None = None) -> torch.Tensor:
    """Stacks every rank's (B_r, ...) rows in rank order -> (world * B_max, ...); the rows a rank
    pads beyond its B_r are zero.

    equal_batches (default: True unless x is on the CPU) skips the exchange of the B_r: one
    fixed-shape all_gather and no host sync, but the ranks must agree on B (a mismatch is undefined
    behaviour for NCCL; TORCH_DISTRIBUTED_DEBUG=DETAIL makes torch check collective shapes). False
    exchanges them first: free on the CPU, a host sync on an accelerator.
    """
    if not _dist_on() or dist.get_world_size() == 1:
        return x
    world = dist.get_world_size()
    if equal_batches is None:
        equal_batches = x.device.type != "cpu"
    if not equal_batches:
        n = torch.tensor([x.shape[0]], device=x.device)
        sizes = [torch.zeros_like(n) for _ in range(world)]
        dist.all_gather(sizes, n)
        b_max = max(int(s) for s in sizes)
        x = torch.cat([x, x.new_zeros((b_max - x.shape[0],) + x.shape[1:])])
    if x.shape[0] == 0:  # every rank is empty (B equal, or b_max == 0)
        return x
    out = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(out, x)
    return torch.cat(out)


class PrototypeBank(nn.Module):
    """Memory (C, Q, D) of per-image class means, fill counts (C,) and prototypes (C, D) (M3).

    All three are buffers: they follow `.to(device)` and are saved in / restored from `state_dict`.
    """

    def __init__(self, num_classes: int, dim: int, bank_size: int = 1024):
        super().__init__()
        if num_classes <= 0 or dim <= 0 or bank_size <= 0:
            raise ValueError(f"PrototypeBank needs positive sizes, got num_classes={num_classes}, "
                             f"dim={dim}, bank_size={bank_size}")
        self.num_classes, self.dim, self.bank_size = num_classes, dim, bank_size
        self.register_buffer("memory", torch.zeros(num_classes, bank_size, dim))  # (C, Q, D)
        self.register_buffer("count",
                             torch.zeros(num_classes, dtype=torch.long))  # (C,) ever written
        self.register_buffer("prototypes", torch.zeros(num_classes, dim))  # (C, D)

    @property
    def filled(self) -> torch.Tensor:
        return self.count > 0  # (C,) bool

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, dim={self.dim}, bank_size={self.bank_size}"

    def _check_labels(self, labels: torch.Tensor) -> None:
        """Label ids must be < C: a ValueError on the CPU; on an accelerator reading the maximum
        would be a host sync, so a device-side assertion fails the process asynchronously."""
        C = self.num_classes
        if not labels.numel():
            return
        if labels.device.type == "cpu":
            if int(labels.max()) >= C:
                raise ValueError(f"label {int(labels.max())} out of range for {C} classes")
        else:
            torch._assert_async((labels < C).all(), f"PrototypeBank: a label is >= {C} classes")

    @torch.no_grad()
    def image_means(self, z: torch.Tensor, labels: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Step one. z (B, D, h, w), labels (B, h, w) int64, negative = ignore.
        Returns means (B, C, D), L2-normalised and zero where absent, and present (B, C) bool."""
        return self._image_means(z.detach(), labels)

    def _image_means(self, z: torch.Tensor, labels: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """image_means, differentiable in z (for --proto-grad)."""
        B, D, h, w = z.shape
        C = self.num_classes
        if labels.shape != (B, h, w):
            raise ValueError(f"labels must have shape {(B, h, w)} (the embedding's), got "
                             f"{tuple(labels.shape)}; downsample them to the feature size first")
        if D != self.dim:
            raise ValueError(f"embedding dim {D} does not match the bank's {self.dim}")
        self._check_labels(labels)
        zf = z.float().permute(0, 2, 3, 1).reshape(B * h * w, D)  # (B*h*w, D)
        lab = labels.reshape(B, h * w)
        # one bucket per (image, class): index b*C + c. Ignored pixels go to a spare bucket B*C
        # instead of being masked out: the shapes stay fixed, and every real bucket still sums its
        # own pixels in pixel order (index_add adds in index order on the CPU)
        idx = torch.where(lab >= 0, torch.arange(B, device=z.device).unsqueeze(1) * C + lab, B * C)
        idx = idx.reshape(-1)  # (B*h*w,)
        sums = zf.new_zeros(B * C + 1, D).index_add(0, idx, zf)[:-1]  # (B*C, D)
        # integer counts by index_add_: torch.bincount would read the maximum index on the host
        counts = torch.zeros(B * C + 1, dtype=torch.long, device=z.device)
        counts = counts.index_add_(0, idx, torch.ones_like(idx))[:-1]  # (B*C,)
        # absent buckets: 0 / 1 -> normalise(0) = 0, and `present` keeps them out of the bank
        means = F.normalize(sums / counts.clamp(min=1).unsqueeze(1), dim=1)  # (B*C, D)
        return means.view(B, C, D), (counts > 0).view(B, C)

    def prototypes_with_grad(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """[ours] `--proto-grad`: the prototypes after this step's `update(z, labels)`, the same
        values bit for bit, but carrying the gradient of this rank's share of them: in
        p_c = normalise(mean of memory c) the batch's own image means enter with their gradient, so
        the loss moves the class means directly (as in prototypical networks) instead of only
        through the pixels that later fill the bank. Other ranks' means and older slots stay
        detached. z (B, D, h, w) with grad, labels (B, h, w) as given to `update`. -> (C, D)"""
        means, _ = self._image_means(z, labels)  # (B, C, D), zero rows where absent
        batch = means.sum(0)  # (C, D)
        n = self.count.clamp(min=1, max=self.bank_size).unsqueeze(1).to(batch.dtype)  # (C, 1)
        q = F.normalize(self.memory.sum(1) / n + (batch - batch.detach()) / n, dim=1)  # (C, D)
        return self.prototypes + (q - q.detach())  # values: the bank's; gradient: q's

    @torch.no_grad()
    def update(self, z: torch.Tensor, labels: torch.Tensor,
               equal_batches: bool | None = None) -> None:
        """One M3 update from this rank's batch (and, under DDP, every other rank's).
        z (B, D, h, w) embeddings (detached here), labels (B, h, w) hard labels, IGNORE skipped.

        equal_batches: under DDP, whether every rank passes the same B. The default assumes so on an
        accelerator (no host sync) and exchanges the batch sizes on the CPU (no device to sync);
        False on an accelerator allows unequal batches at the cost of one host sync.
        """
        means, present = self.image_means(z, labels)  # (B, C, D), (B, C)
        if _dist_on() and dist.get_world_size() > 1:
            # one all_gather carries both: `present` as a 0/1 column
            packed = torch.cat([means, present.unsqueeze(2).to(means.dtype)], dim=2)  # (B, C, D+1)
            packed = _gather_ranks(packed, equal_batches)  # (G, C, D+1), rank order
            means, present = packed[..., :-1], packed[..., -1] > 0
        G, C, D = means.shape
        # rows in (image, class) order: per class, the images arrive in rank, then batch order
        self.write(means.reshape(G * C, D).to(self.memory.dtype),
                   torch.arange(C, device=means.device).repeat(G), present.reshape(G * C))

    @torch.no_grad()
    def write(self, means: torch.Tensor, cls: torch.Tensor,
              valid: torch.Tensor | None = None) -> None:
        """Appends means (N, D) of classes cls (N,) to the ring buffers in the given order, then
        recomputes the prototypes of the classes touched (step two). Rows whose `valid` (N,) bool
        is False are skipped (their cls must still lie in [0, C)); all shapes are fixed by N."""
        C, Q = self.num_classes, self.bank_size
        N = cls.shape[0]
        if N == 0:
            return
        dev = cls.device
        if valid is None:
            valid = torch.ones_like(cls, dtype=torch.bool)
        key = torch.where(valid, cls, C)  # (N,) skipped rows -> spare class C
        # per-class counts by index_add_: torch.bincount would read the largest class on the host
        n = torch.zeros(C + 1, dtype=torch.long, device=dev)
        n = n.index_add_(0, key, torch.ones_like(key))  # (C+1,)
        n_c = n[:C]  # (C,) new means per class
        # rank of each mean among the new means of its class, in arrival order
        order = torch.sort(key, stable=True).indices  # (N,)
        first = torch.cumsum(n, 0) - n  # (C+1,) start of each class's run in sorted order
        pos = torch.empty_like(cls)
        pos[order] = torch.arange(N, device=dev) - first[key[order]]  # (N,)
        slot = (self.count[cls] + pos) % Q
        # more than Q new means of a class: only its last Q survive, so the (class, slot) pairs kept
        # are unique
        keep = valid & (pos >= n_c[cls] - Q)
        # the other rows are written too (fixed shape), each as a copy of a write that happens
        # anyway: the class's last new mean (always kept) at its slot, or for a class without new
        # means its slot 0's current value. Duplicate indices then all carry identical bits, so
        # index_put_'s unspecified order among them cannot change the result
        last = torch.full((C + 1,), -1, dtype=torch.long, device=dev)
        last = last.scatter_reduce_(0, key, torch.arange(N, device=dev), "amax")[:C]  # (C,) -1 none
        has = n_c > 0  # (C,)
        fb_slot = torch.where(has, (self.count + n_c - 1) % Q, 0)  # (C,)
        fb_val = torch.where(has.unsqueeze(1), means[last.clamp(min=0)], self.memory[:, 0])
        slot = torch.where(keep, slot, fb_slot[cls])
        self.memory.index_put_((cls, slot), torch.where(keep.unsqueeze(1), means, fb_val[cls]))
        self.count += n_c
        # step two for every class (a fixed shape), kept for the touched ones. Empty slots are
        # zero, so the full sum over Q is the sum over the filled slots; a class's sum and
        # normalise do not depend on the other classes, so its bits are those of a per-class update
        n_filled = self.count.clamp(min=1, max=Q).unsqueeze(1).to(self.memory.dtype)  # (C, 1)
        fresh = F.normalize(self.memory.sum(1) / n_filled, dim=1)  # (C, D), zero rows where empty
        self._set_prototypes(fresh, has)

    def _set_prototypes(self, two_step: torch.Tensor, touched: torch.Tensor) -> None:
        """M3: the touched classes' prototypes become their two-step averages (C, D)."""
        self.prototypes.copy_(torch.where(touched.unsqueeze(1), two_step, self.prototypes))


# ----------------------------------------------------------------------------------------------
# Diagnostic / opt-in prototype sources [ours, not the source's]: the same interface as the bank
# (`prototypes` (C, D) unit rows, `filled` (C,) bool, `update`), so M4/M5 run on them unchanged.


def random_orthonormal(num_classes: int, dim: int, seed: int = 0) -> torch.Tensor:
    """(C, D) orthonormal rows (QR of a seeded Gaussian): C class anchors, pairwise cosine 0."""
    if num_classes > dim:
        raise ValueError(f"{num_classes} orthonormal anchors need an embedding of at least that "
                         f"many dimensions, got --embed-dim {dim}")
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, num_classes, generator=g, dtype=torch.float64))
    return q.t().float().contiguous()  # (C, D)


class FixedAnchors(nn.Module):
    """`--prototypes anchors`: one fixed random orthonormal anchor per class, never updated.
    The embeddings must move to the targets; the targets never follow the embeddings."""

    def __init__(self, num_classes: int, dim: int, seed: int = 0):
        super().__init__()
        self.register_buffer("prototypes", random_orthonormal(num_classes, dim, seed))  # (C, D)
        self.register_buffer("count", torch.ones(num_classes, dtype=torch.long))  # all filled

    @property
    def filled(self) -> torch.Tensor:
        return self.count > 0  # (C,) bool

    def update(self, z: torch.Tensor, labels: torch.Tensor, **_) -> None:
        pass  # fixed


class LearnedPrototypes(nn.Module):
    """`--prototypes learned`: M4 with free prototypes, i.e. a cosine classifier at the same tau
    (unit weight rows, unit embeddings), trained by the loss's gradient. Starts at the anchors that
    `--prototypes anchors` would keep fixed (same seed), so the two differ only in the learning.

    bank_size > 0 (`--csc-similarity bank`) also keeps the source's two-step bank of the same
    embeddings, updated as M3 and used by nothing but CSC's choice of similar classes: learned
    prototypes stay nearly orthogonal, so they say nothing about which classes are alike."""

    def __init__(self, num_classes: int, dim: int, seed: int = 0, bank_size: int = 0):
        super().__init__()
        self.weight = nn.Parameter(random_orthonormal(num_classes, dim, seed))  # (C, D)
        self.bank = PrototypeBank(num_classes, dim, bank_size) if bank_size else None

    @property
    def prototypes(self) -> torch.Tensor:
        return F.normalize(self.weight, dim=1)  # (C, D), differentiable

    @property
    def filled(self) -> torch.Tensor:
        return torch.ones(self.weight.shape[0], dtype=torch.bool, device=self.weight.device)

    def update(self, z: torch.Tensor, labels: torch.Tensor, **kw) -> None:
        if self.bank is not None:  # the prototypes themselves are learned by the optimiser
            self.bank.update(z, labels, **kw)


class LogitScale(nn.Module):
    """`--learn-tau`: a learned temperature, 1 / tau = exp(log_scale), started at the given tau and
    kept at tau >= 0.01 (CLIP's clamp of the logit scale at 100)."""

    def __init__(self, tau: float):
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(-math.log(tau)))

    @property
    def tau(self) -> torch.Tensor:
        return self.tau_of(self.log_scale)  # () tensor

    @staticmethod
    def tau_of(log_scale: torch.Tensor) -> torch.Tensor:
        return torch.exp(-log_scale.clamp(max=math.log(100.0)))


class CentredBank(PrototypeBank):
    """`--prototypes centred`: the M3 bank, each prototype re-centred on the mean of the filled
    ones, p_c = normalise(b_c - mean_k b_k) with b the bank's two-step prototypes. The embeddings
    keep a component common to every class, so the bank's class means all lean the same way
    (cosine 0.75-0.85 on real images); the contrast then pulls every pixel further along it. The
    centred prototypes keep what tells the classes apart and leave the common part out."""

    def _set_prototypes(self, two_step: torch.Tensor, touched: torch.Tensor) -> None:
        # every class, touched or not: the common part moves with any class's update
        common = two_step.sum(0) / self.filled.sum().clamp(min=1)  # (D,) mean of the filled rows
        self.prototypes.copy_(torch.where(self.filled.unsqueeze(1),
                                          F.normalize(two_step - common, dim=1), 0.0))


def build_prototypes(kind: str, num_classes: int, dim: int, bank_size: int, seed: int,
                     csc_bank: bool = False) -> nn.Module:
    """The prototype source of `--prototypes`: the M3 bank (the source's rule) or an [ours]
    variant; csc_bank: learned prototypes also keep a bank for CSC (`--csc-similarity bank`)."""
    if kind == "bank":
        return PrototypeBank(num_classes, dim, bank_size)
    if kind == "centred":
        return CentredBank(num_classes, dim, bank_size)
    if kind == "anchors":
        return FixedAnchors(num_classes, dim, seed)
    if kind == "learned":
        return LearnedPrototypes(num_classes, dim, seed, bank_size if csc_bank else 0)
    raise ValueError(f"unknown prototype source {kind!r}; expected bank, centred, anchors or "
                     f"learned")


def prototypes_from_state(state: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(prototypes (C, D), filled (C,) bool) from any prototype source's state_dict."""
    if "weight" in state:  # LearnedPrototypes
        w = state["weight"]
        return F.normalize(w, dim=1), torch.ones(w.shape[0], dtype=torch.bool)
    return state["prototypes"], state["count"] > 0


def prototype_cosine(protos: torch.Tensor, filled: torch.Tensor) -> torch.Tensor:
    """Mean cosine between two different filled prototypes, a () tensor (0 with fewer than two):
    logged during training to follow the prototypes apart or together. protos (C, D) unit rows."""
    pair = (filled[:, None] & filled[None, :]).float().fill_diagonal_(0)  # (C, C)
    return ((protos @ protos.t()) * pair).sum() / pair.sum().clamp(min=1)
