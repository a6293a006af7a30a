"""Cross-dataset mixing (METHOD.md M6) for a whole batch, on the batch's device.

Each image is mixed with a partner from a different dataset of the same batch when there is one
(else any other image), read from the ORIGINAL (unmixed) batch:
- region-level: lambda ~ U(0,1), box start r_x ~ U(0,W), r_y ~ U(0,H), sides W sqrt(1-lambda),
  H sqrt(1-lambda), clipped to the image; inside it image and hard labels come from the partner;
- pixel-level: half of the partner's present classes (ceil, so at least one; as in ClassMix),
  M = partner pixels of those classes, x' = M (lambda x_p + (1-lambda) x) + (1-M) x; on M the target
  is lambda on the partner's class and 1-lambda on the image's own class ("intermediate class").
Targets are (y_a, y_b, w) maps: loss = w CE(y_a) + (1-w) CE(y_b) (see losses.py).

Reproducibility: every random number is drawn in float64 from the given CPU torch.Generator, in a
fixed order (see `mix_batch`); everything else is deterministic tensor ops, so a seeded generator
gives the same mix on CPU and GPU.

No host synchronisation on an accelerator when the caller passes `num_classes` and a CPU
`dataset_index`: the draws stay on the CPU (drawing there does not wait for the GPU), reach the
device in two asynchronous copies, and every shape is fixed by (B, H, W, num_classes), never by the
labels, so a CUDA step runs under `torch.cuda.set_sync_debug_mode("error")`.
"""
from __future__ import annotations

from pathlib import Path

import torch

IGNORE = -1  # == datasets.IGNORE; local copy so mixing depends on nothing but torch
MODES = ("both", "region", "pixel", "none")
NONE, REGION, PIXEL = 0, 1, 2  # per-image mode codes returned in info["mode"]


def region_boxes(lam: torch.Tensor, height: int, width: int,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """M6 region boxes: (B,) lambda -> (B, 4) int64 [x0, y0, x1, y1) on the CPU.

    Draws r_x ~ U(0, W) then r_y ~ U(0, H) (B each, float64) from `generator`. Rounding: the start
    is floored, each side is W sqrt(1-lambda) (H sqrt(1-lambda)) rounded to the nearest pixel, and
    the end is clipped to the image, so the unclipped area is (1-lambda) H W up to rounding.
    """
    b = lam.shape[0]
    r_x = torch.rand(b, generator=generator, dtype=torch.float64) * width
    r_y = torch.rand(b, generator=generator, dtype=torch.float64) * height
    cut = (1 - lam.detach().cpu().double()).clamp(min=0).sqrt()  # (B,)
    x0 = r_x.floor().long().clamp(max=width - 1)
    y0 = r_y.floor().long().clamp(max=height - 1)
    x1 = (x0 + (width * cut).round().long()).clamp(max=width)
    y1 = (y0 + (height * cut).round().long()).clamp(max=height)
    return torch.stack([x0, y0, x1, y1], 1)


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on `device` without a host sync: a blocking host-to-device copy waits for the
    stream (and fails under sync debug mode "error"), so CUDA gets an asynchronous copy from pinned
    memory (the pinned block is not reused before the copy has run)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def choose_partners(dataset_index: torch.Tensor,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """(B,) dataset index -> (B,) int64 partner index (on dataset_index's device).

    Uniform among the images of other datasets when the batch has any, else among the other
    images; B == 1 gives the image itself (i.e. unmixed). Draws a (B, B) float64 key matrix.
    """
    ds = dataset_index.cpu()
    b = ds.numel()
    keys = torch.rand(b, b, generator=generator, dtype=torch.float64)
    other_ds = ds[:, None] != ds[None, :]  # (B, B)
    not_self = ~torch.eye(b, dtype=torch.bool)
    cand = torch.where(other_ds.any(1, keepdim=True), other_ds, not_self)
    # argmax of iid keys over the candidates = a uniform pick; with no candidate (B == 1) all keys
    # are -1 and argmax returns index 0, the image itself
    return keys.masked_fill(~cand, -1.0).argmax(1).to(dataset_index.device)


def mix_batch(images: torch.Tensor, labels: torch.Tensor, dataset_index: torch.Tensor,
              mode: str = "both", generator: torch.Generator | None = None, p_region: float = 0.5,
              return_info: bool = False, num_classes: int | None = None):
    """M6 mixing of a batch -> (images, y_a, y_b, w) [, info].

    images (B, 3, H, W) float, labels (B, H, W) int64 global ids / IGNORE, dataset_index (B,).
    Returns mixed images (B, 3, H, W), y_a, y_b (B, H, W) int64, w (B, H, W) images.dtype.
    Per image: mode "both" -> region w.p. p_region else pixel; "region" -> region w.p. p_region
    else unmixed; "pixel" -> pixel w.p. 1 - p_region (0.5 by default) else unmixed; "none" ->
    identity (w = 1, y_b = y_a, no random draw). An image whose partner is itself is unmixed.
    With return_info, a 5th output dict (for tests / visualisation) holds "mode" (B,) int64
    (0 none, 1 region, 2 pixel), "partner" (B,), "lam" (B,), "boxes" (B, 4) and
    "classes" (B, C) bool (the partner classes pasted by pixel mixing, C = num_classes).

    num_classes: a bound on the label ids (labels < num_classes), e.g. the label space's size. With
    it and a CPU dataset_index nothing is read back from the device, so mixing a CUDA batch needs no
    host sync. None (the old call) takes labels.max() + 1: a host sync on an accelerator. The mix
    itself is the same for every bound (see the class keys below); only the generator's state
    afterwards depends on it, as num_classes sets the number of class keys drawn.

    Draw order on `generator` (float64): partner keys (B, B); mode u (B,); lambda (B,);
    r_x (B,), r_y (B,); B * num_classes class keys, read as torch.rand(B, C') with
    C' = max(labels.max() + 1, 1) would give them: the key of image i's class c is draw i * C' + c.
    """
    if mode not in MODES:
        raise ValueError(f"mix_batch: unknown mode {mode!r}; expected one of {MODES}")
    if images.dim() != 4 or labels.shape != (images.shape[0],) + images.shape[2:]:
        raise ValueError(f"mix_batch: images (B,3,H,W) and labels (B,H,W) expected, got "
                         f"{tuple(images.shape)} and {tuple(labels.shape)}")
    b, _, h, w_ = images.shape
    dev = images.device
    if mode == "none":
        ones = torch.ones(b, h, w_, dtype=images.dtype, device=dev)
        out = (images, labels, labels, ones)
        if return_info:
            info = {"mode": torch.zeros(b, dtype=torch.long, device=dev),
                    "partner": torch.arange(b, device=dev)}
            return out + (info,)
        return out

    # --- small random draws on the CPU generator (fixed order, see docstring) ---
    # a device dataset_index is read back here (a sync); train_pretrain passes the loader's CPU one
    partner = choose_partners(dataset_index.cpu(), generator)  # (B,)
    u = torch.rand(b, generator=generator, dtype=torch.float64)
    lam = torch.rand(b, generator=generator, dtype=torch.float64)
    boxes = region_boxes(lam, h, w_, generator)  # (B, 4)
    if num_classes is None:
        num_classes = max(int(labels.max()) + 1, 1)  # host sync on an accelerator
    elif labels.device.type == "cpu" and labels.numel() and int(labels.max()) >= num_classes:
        raise ValueError(f"mix_batch: label {int(labels.max())} out of range for "
                         f"{num_classes} classes")
    keys = torch.rand(b * num_classes, generator=generator, dtype=torch.float64)  # (B*C,)

    is_region = (u < p_region) & (mode in ("both", "region"))
    is_pixel = (u >= p_region) & (mode in ("both", "pixel"))
    kind = torch.where(is_region, REGION, torch.where(is_pixel, PIXEL, NONE))
    kind = kind.masked_fill(partner == torch.arange(b), NONE)  # mixing with oneself is a no-op

    # --- masks and blending on the batch's device: two asynchronous copies carry every draw ---
    ints = _to_device(torch.cat([partner[:, None], kind[:, None], boxes], 1), dev)  # (B, 6)
    floats = _to_device(torch.cat([lam, keys]), dev)  # (B + B*C,) float64
    partner, kind, boxes = ints[:, 0], ints[:, 1], ints[:, 2:]
    lam_d = floats[:b].to(images.dtype)  # (B,)
    # class priorities from the keys as torch.rand(B, C') would lay them out (see the docstring), so
    # the mix does not depend on num_classes; C' stays on the device. Classes >= C' are absent from
    # the batch: an infinite key sorts them last, leaving the first C' priorities as before
    c_used = (labels.max() + 1).clamp(min=1)  # () on the device
    cls = torch.arange(num_classes, device=dev)  # (C,)
    used = cls < c_used  # (C,)
    ckeys = floats[b:][torch.where(used, torch.arange(b, device=dev)[:, None] * c_used + cls, 0)]
    ckeys = ckeys.masked_fill(~used, float("inf"))  # (B, C)
    # argsort of iid keys: a uniform random permutation, used as distinct class priorities
    # (integers, so picking the top ones has no ties and is identical on every device)
    prio = ckeys.argsort(dim=1, stable=True)  # (B, C)
    xp, lp = images[partner], labels[partner]  # (B, 3, H, W), (B, H, W) from the original batch

    # region: box mask (B, H, W)
    ys = torch.arange(h, device=dev)[None, :, None]
    xs = torch.arange(w_, device=dev)[None, None, :]
    x0, y0, x1, y1 = (boxes[:, i, None, None] for i in range(4))
    region_m = (ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1) & (kind == REGION)[:, None, None]

    # pixel: present-class bitmap of each partner (IGNORE -> spare column C, dropped)
    flat = lp.flatten(1)  # (B, HW)
    present = torch.zeros(b, num_classes + 1, dtype=torch.bool, device=dev)
    present.scatter_(1, torch.where(flat >= 0, flat, num_classes), True)
    present = present[:, :num_classes]  # (B, C)
    n_pick = (present.sum(1) + 1) // 2  # ceil(half), >= 1 whenever a class is present
    pr = prio.masked_fill(~present, -1)
    kth = pr.sort(1, descending=True).values.gather(1, (n_pick - 1).clamp(min=0)[:, None])  # (B, 1)
    chosen = present & (pr >= kth)  # (B, C) the n_pick present classes of highest priority
    pixel_m = chosen.gather(1, flat.clamp(min=0)).view(b, h, w_) & (lp >= 0)
    pixel_m = pixel_m & (kind == PIXEL)[:, None, None]

    lam4 = lam_d[:, None, None, None]
    blend = lam4 * xp + (1 - lam4) * images
    out_x = torch.where(region_m[:, None], xp, torch.where(pixel_m[:, None], blend, images))
    y_a = torch.where(region_m | pixel_m, lp, labels)  # partner's class on every mixed pixel
    y_b = torch.where(region_m, lp, labels)  # own class on pixel-mixed pixels
    w = torch.where(pixel_m, lam_d[:, None, None], torch.ones((), dtype=images.dtype, device=dev))
    if return_info:
        info = {"mode": kind, "partner": partner, "lam": lam_d, "boxes": boxes,
                "classes": chosen & (kind == PIXEL)[:, None]}
        return out_x, y_a, y_b, w, info
    return out_x, y_a, y_b, w


def hard_labels(y_a: torch.Tensor, y_b: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """(B, H, W) hard labels for the prototype bank (M3, M6): y_a where w == 1 (then y_b == y_a or
    carries no weight), IGNORE on pixel-mixed pixels, which never update prototypes."""
    return torch.where(w == 1, y_a, torch.full_like(y_a, IGNORE))


def show_batch(dataset, n: int, mix: str, gen: torch.Generator, out: Path, seed: int = 0,
               dataset_weights: list[float] | None = None) -> None:
    """Writes `out` (a PNG): the first n augmented, mixed training images beside their label
    overlays (`train_pretrain.py --show-batch N`; M6 made visible: region boxes drawn in white,
    pixel-level "intermediate class" areas hatched). dataset: a datasets.MultiDataset."""
    from torchvision.utils import draw_bounding_boxes, make_grid, save_image

    import utils
    from datasets import DatasetMixSampler, class_colours, denormalize, draw_labels

    sampler = DatasetMixSampler(dataset.sizes, dataset_weights, 1, 0, seed=seed)
    _, loader = utils.epoch_loader(dataset, sampler, 0, n, seed, workers=0)  # first batch
    images, labels, didx = next(iter(loader))
    images, y_a, _, w, info = mix_batch(images, labels, didx, mix, gen, return_info=True)
    colours = class_colours(dataset.label_space.num_classes)
    tiles = []
    for i, img in enumerate(denormalize(images)):
        img8 = (img * 255).round().to(torch.uint8)  # (3, H, W)
        over = draw_labels(img8, y_a[i], colours)
        ys, xs = torch.meshgrid(torch.arange(w.shape[1]), torch.arange(w.shape[2]), indexing="ij")
        hatch = (w[i] < 1) & ((ys + xs) % 4 == 0)  # (H, W) intermediate-class pixels
        over = torch.where(hatch, torch.full_like(over, 255), over)
        if info["mode"][i] == REGION:
            over = draw_bounding_boxes(over, info["boxes"][i:i + 1], colors="white", width=1)
        tiles += [img8, over]
    grid = make_grid(torch.stack(tiles).float() / 255, nrow=2, padding=2, pad_value=1.0)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, out)
    print(f"wrote {out}")
