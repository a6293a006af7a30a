"""Class prototypes with the two-step average (METHOD.md M3).

Per class c a ring buffer holds the last Q per-image class means:
  step one  m_ic = normalise(mean of image i's detached embeddings labelled c)   (hard labels only)
  step two  p_c  = normalise(mean of the filled slots of memory c)
The bank is updated from the whole global batch before the loss of the step: every rank's image
means are gathered in rank order, so every rank writes the same means in the same order and holds a
bit-identical bank. A class never seen is empty (`filled` False, prototype zero) and must be left out
of every softmax (M4). All updates are batched tensor ops; nothing loops over classes or images.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_gather_varlen(x: torch.Tensor) -> torch.Tensor:
    """Concatenates every rank's (n_r, K) rows in rank order; n_r may differ between ranks."""
    if not _dist_on() or dist.get_world_size() == 1:
        return x
    world = dist.get_world_size()
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s.item()) for s in sizes]
    if max(sizes) == 0:
        return x
    # all_gather needs equal shapes: pad to the largest rank, then trim
    padded = x.new_zeros(max(sizes), x.shape[1])
    padded[: x.shape[0]] = x
    out = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded)
    return torch.cat([o[:s] for o, s in zip(out, sizes)])


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
        self.register_buffer("count", torch.zeros(num_classes, dtype=torch.long))  # (C,) ever written
        self.register_buffer("prototypes", torch.zeros(num_classes, dim))  # (C, D)

    @property
    def filled(self) -> torch.Tensor:
        return self.count > 0  # (C,) bool

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, dim={self.dim}, bank_size={self.bank_size}"

    @torch.no_grad()
    def image_means(self, z: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Step one. z (B, D, h, w), labels (B, h, w) int64, negative = ignore.
        Returns means (N, D) L2-normalised and their classes (N,), ordered by (image, class)."""
        B, D, h, w = z.shape
        C = self.num_classes
        if labels.shape != (B, h, w):
            raise ValueError(f"labels must have shape {(B, h, w)} (the embedding's), got "
                             f"{tuple(labels.shape)}; downsample them to the feature size first")
        if D != self.dim:
            raise ValueError(f"embedding dim {D} does not match the bank's {self.dim}")
        if labels.numel() and int(labels.max()) >= C:
            raise ValueError(f"label {int(labels.max())} out of range for {C} classes")
        zf = z.detach().float().permute(0, 2, 3, 1).reshape(B * h * w, D)  # (B*h*w, D)
        lab = labels.reshape(B, h * w)
        # one bucket per (image, class): index b*C + c; ignored pixels are dropped
        idx = (torch.arange(B, device=z.device).unsqueeze(1) * C + lab).reshape(-1)  # (B*h*w,)
        keep = lab.reshape(-1) >= 0
        idx, zf = idx[keep], zf[keep]
        sums = zf.new_zeros(B * C, D).index_add_(0, idx, zf)  # (B*C, D)
        counts = torch.bincount(idx, minlength=B * C)  # (B*C,)
        present = counts.nonzero().squeeze(1)  # (N,) sorted: image, then class
        means = F.normalize(sums[present] / counts[present].unsqueeze(1), dim=1)  # (N, D)
        return means, present % C

    @torch.no_grad()
    def update(self, z: torch.Tensor, labels: torch.Tensor) -> None:
        """One M3 update from this rank's batch (and, under DDP, every other rank's).
        z (B, D, h, w) embeddings (detached here), labels (B, h, w) hard labels, IGNORE (-1) skipped."""
        means, cls = self.image_means(z, labels)  # (n, D), (n,)
        # one all_gather carries both; class ids are exact in float32 (C < 2**24)
        packed = _all_gather_varlen(torch.cat([means, cls.unsqueeze(1).to(means.dtype)], dim=1))
        if packed.shape[0] == 0:
            return
        self.write(packed[:, :-1].to(self.memory.dtype), packed[:, -1].long())

    @torch.no_grad()
    def write(self, means: torch.Tensor, cls: torch.Tensor) -> None:
        """Appends means (N, D) of classes cls (N,) to the ring buffers in the given order, then
        recomputes the prototypes of the classes touched (step two)."""
        C, Q = self.num_classes, self.bank_size
        N = cls.shape[0]
        n_c = torch.bincount(cls, minlength=C)  # (C,) new means per class
        # rank of each mean among the new means of its class, in arrival order
        order = torch.sort(cls, stable=True).indices  # (N,)
        first = torch.cumsum(n_c, 0) - n_c  # (C,) start of each class's run in sorted order
        pos = torch.empty_like(cls)
        pos[order] = torch.arange(N, device=cls.device) - first[cls[order]]  # (N,)
        slot = (self.count[cls] + pos) % Q
        # more than Q new means of a class: only its last Q survive; dropping the rest keeps the
        # (class, slot) indices unique, so index_put_ is deterministic
        keep = pos >= n_c[cls] - Q
        self.memory.index_put_((cls[keep], slot[keep]), means[keep])
        self.count += n_c
        # step two, for the touched classes only; empty slots are zero, so the full sum over Q is
        # the sum over the filled slots
        upd = (n_c > 0).nonzero().squeeze(1)  # (U,)
        n_filled = self.count[upd].clamp(max=Q).unsqueeze(1).to(self.memory.dtype)  # (U, 1)
        self.prototypes[upd] = F.normalize(self.memory[upd].sum(1) / n_filled, dim=1)
