"""Toy data of MDP: small synthetic VOC, ADE20K, COCO-Stuff and Cityscapes in their real layouts.

`make_toy` draws every image from one procedural world (below) and writes it with each set's real
class list, file names and folders, so the readers of datasets.py read the toy sets back unchanged.
It is deterministic: one generator per image, keyed by (seed, set, split, index), so a smaller toy
set is a prefix of a bigger one.

    python toy.py make-toy --root data/toy
"""
import argparse
import time
from pathlib import Path

import numpy as np
from PIL import Image

from datasets import (ADE20K_CLASSES, COCO_STUFF_CLASSES, RAW_IGNORE, VOC_CLASSES, CityscapesReader,
                      dataset_root, voc_palette)


# -------------------------------------------------------------------------------------------- world
# One procedural world: each kind has one texture (and each thing one shape) in every toy set, so
# features transfer between sets; each set labels the kinds with its REAL class names and merges,
# splits or drops them the way the real label spaces disagree (e.g. ADE20K "animal" vs cat/dog/bird,
# COCO-Stuff wall-brick/wall-concrete vs "wall", clutter = ADE20K "other"; pole, traffic sign and
# traffic light appear in Cityscapes only).
_TEX = {  # kind: (rgb, pattern, period in px at size 128, amplitude)
    "sky": ((120, 170, 235), "smooth", 24, 18), "road": ((70, 70, 75), "grain", 1, 14),
    "sidewalk": ((165, 160, 150), "check", 8, 20), "grass": ((70, 150, 50), "vstripe", 3, 25),
    "sand": ((210, 190, 130), "dots", 5, 25), "tree": ((30, 95, 35), "smooth", 5, 35),
    "water_calm": ((40, 90, 160), "hstripe", 8, 12), "water_rough": ((25, 65, 140), "waves", 5, 35),
    "building": ((170, 140, 110), "windows", 9, 45), "wall_brick": ((160, 70, 50), "brick", 8, 40),
    "wall_plain": ((200, 200, 185), "smooth", 16, 10),
    "floor_wood": ((140, 95, 55), "hstripe", 4, 25),
    "floor_tile": ((185, 185, 205), "check", 12, 30), "mountain": ((115, 100, 95), "diag", 7, 25),
    "clutter": ((128, 128, 128), "confetti", 4, 70), "ego": ((25, 25, 30), "smooth", 20, 5),
    "person": ((200, 60, 140), "hstripe", 5, 35), "car": ((200, 30, 30), "smooth", 12, 25),
    "bus": ((235, 200, 40), "windows", 8, 50), "cat": ((230, 140, 40), "vstripe", 4, 45),
    "dog": ((120, 80, 40), "dots", 6, 40), "bird": ((60, 120, 230), "diag", 3, 35),
    "bicycle": ((25, 25, 25), "smooth", 8, 8), "chair": ((95, 60, 120), "vstripe", 6, 25),
    "boat": ((240, 240, 240), "hstripe", 6, 20), "pole": ((125, 125, 135), "smooth", 8, 8),
    "sign": ((220, 30, 40), "dots", 3, 70), "tlight": ((20, 30, 20), "dots", 3, 90),
}
KINDS = list(_TEX)
_SHAPES = {
    # thing: (height relative to a person, parts in units of its height around the bottom centre)
    # e: ellipse (y, x, ry, rx); r: rect (y0, x0, y1, x1); o: ring (y, x, r, width);
    # t: triangle (y0, x0, y1, x1)
    "person": (1.0, [("e", -.89, 0, .1, .08), ("r", -.78, -.13, -.4, .13),
                     ("r", -.4, -.12, 0, -.02), ("r", -.4, .02, 0, .12),
                     ("r", -.76, -.19, -.45, -.13), ("r", -.76, .13, -.45, .19)]),
    "car": (.55, [("r", -.65, -1.1, -.15, 1.1), ("r", -1, -.55, -.6, .5), ("e", -.2, -.65, .2, .2),
                  ("e", -.2, .65, .2, .2)]),
    "bus": (1.1, [("r", -1, -1.8, -.12, 1.8), ("e", -.12, -1.2, .12, .12),
                  ("e", -.12, 1.2, .12, .12)]),
    "cat": (.35, [("e", -.45, 0, .22, .45), ("e", -.72, .5, .18, .16), ("r", -.3, -.35, 0, -.25),
                  ("r", -.3, .25, 0, .35), ("r", -.95, -.55, -.45, -.47)]),
    "dog": (.5, [("e", -.55, 0, .2, .55), ("e", -.8, .6, .17, .22), ("r", -.4, -.45, 0, -.35),
                 ("r", -.4, -.25, 0, -.15), ("r", -.4, .2, 0, .3), ("r", -.4, .38, 0, .48)]),
    "bird": (.3, [("e", -.45, 0, .22, .38), ("e", -.7, .38, .14, .14), ("t", -.55, -.3, -.35, -.75),
                  ("r", -.25, -.04, 0, 0), ("r", -.25, .08, 0, .12)]),
    "bicycle": (.55, [("o", -.35, -.55, .35, .07), ("o", -.35, .55, .35, .07),
                      ("r", -.72, -.5, -.64, .45), ("r", -.75, .4, -.35, .48),
                      ("r", -.72, -.2, -.35, -.12)]),
    "chair": (.5, [("r", -.55, -.3, -.45, .3), ("r", -1.1, -.3, -.55, -.2),
                   ("r", -.45, -.3, 0, -.22), ("r", -.45, .22, 0, .3)]),
    "boat": (.6, [("r", -.3, -.9, -.1, .9), ("e", -.1, 0, .1, .8), ("r", -1.3, -.04, -.3, .04),
                  ("t", -1.25, .08, -.38, .7)]),
    "pole": (1.0, [("r", -1, -.025, 0, .025)]),
    "sign": (1.0, [("e", -.5, 0, .5, .5)]),
    "tlight": (1.0, [("r", -1, -.22, 0, .22)]),
}
_VOC_THINGS = ("person", "car", "bus", "cat", "dog", "bird", "bicycle", "chair", "boat")
_ADE_COCO_NAMES = {
    # kind -> (ade20k, coco_stuff) class; kinds missing here are ADE20K "other" / COCO-Stuff 255
    "sky": ("sky", "sky-other"), "road": ("road", "road"), "sidewalk": ("sidewalk", "pavement"),
    "grass": ("grass", "grass"), "sand": ("sand", "sand"), "tree": ("tree", "tree"),
    "water_calm": ("water", "river"), "water_rough": ("water", "sea"),
    "building": ("building", "building-other"), "wall_brick": ("wall", "wall-brick"),
    "wall_plain": ("wall", "wall-concrete"), "floor_wood": ("floor", "floor-wood"),
    "floor_tile": ("floor", "floor-tile"), "mountain": ("mountain", "mountain"),
    "clutter": (None, "solid-other"),
    **{t: ("animal" if t in ("cat", "dog", "bird") else t, t) for t in _VOC_THINGS}}
# cityscapes labelIds (grass+sand merged into terrain; clutter=static, ego=1)
_CS_IDS = {"sky": 23, "road": 7, "sidewalk": 8, "grass": 22, "sand": 22, "tree": 21, "building": 11,
           "wall_brick": 12, "wall_plain": 12, "clutter": 4, "ego": 1, "person": 24, "car": 26,
           "bus": 28, "bicycle": 33, "pole": 17, "sign": 20, "tlight": 19}


def _raw_lut(name: str) -> np.ndarray:
    """kind index -> the raw value written into that set's label files."""
    if name == "voc":
        return np.array([VOC_CLASSES.index(k) if k in _VOC_THINGS else 0 for k in KINDS], np.uint8)
    if name == "cityscapes":
        return np.array([_CS_IDS.get(k, 0) for k in KINDS], np.uint8)
    j, classes, other = ((0, ADE20K_CLASSES, 0) if name == "ade20k"
                         else (1, COCO_STUFF_CLASSES, RAW_IGNORE))
    names = [_ADE_COCO_NAMES.get(k, (None, None))[j] for k in KINDS]
    return np.array([other if n is None else classes.index(n) + (name == "ade20k") for n in names],
                    np.uint8)


_TOY = {
    # scene types, things, things per image, thing height / H, colour cast, noise, texture scale,
    # JPEG quality
    "voc": dict(scenes=("outdoor", "indoor"), things=_VOC_THINGS, n=(1, 3), h=(.7, 1.1),
                cast=(1.08, 1.0, .9), noise=4.0, scale=1.25, clutter=0.0, quality=90),
    "ade20k": dict(scenes=("outdoor", "indoor"), things=_VOC_THINGS, n=(0, 4), h=(.4, .75),
                   cast=(.95, 1.0, 1.05), noise=8.0, scale=1.0, clutter=0.5, quality=80),
    "coco_stuff": dict(scenes=("outdoor", "indoor"), things=_VOC_THINGS, n=(1, 5), h=(.3, .6),
                       cast=(.9, .97, 1.12), noise=6.0, scale=.8, clutter=0.4, quality=75),
    "cityscapes": dict(scenes=("street",), things=("person", "car", "car", "bus", "bicycle"),
                       n=(2, 6), h=(.25, .5), cast=(.92, 1.04, .95), noise=3.0, scale=.9,
                       clutter=0.2, quality=None),
}
# ground kinds a thing may stand on; others: any non-water ground
_SUPPORT = {"boat": ("water_calm", "water_rough"), "car": ("road", "grass", "sand"),
            "bus": ("road",), "pole": ("sidewalk",)}
_GROUND = ("road", "sidewalk", "grass", "sand", "floor_wood", "floor_tile")
_INDOOR_THINGS = ("person", "chair", "cat", "dog")


def _noise(rng, shape, per, nearest=False) -> np.ndarray:
    """Value noise in [-1, 1] with cells of about `per` px."""
    h, w = shape
    low = rng.uniform(-1, 1, (int(h / per) + 2, int(w / per) + 2)).astype(np.float32)
    return np.asarray(Image.fromarray(low, "F").resize(
        (w, h), Image.NEAREST if nearest else Image.BILINEAR))


def _pattern(p, yy, xx, per, rng) -> np.ndarray:
    """Texture in about [-1, 1]: (H, W), or (H, W, 3) for the multicoloured clutter."""
    a, b = rng.uniform(0, 2 * np.pi, 2)
    sin = lambda u, c=a: np.sin(2 * np.pi * u / per + c)  # noqa: E731
    # mortar lines
    brick = lambda u: (u % 1 < .15) | ((xx / (2 * per) + .5 * np.floor(u)) % 1 < .08)  # noqa: E731
    return {
        "smooth": lambda: _noise(rng, yy.shape, per),
        "grain": lambda: rng.uniform(-1, 1, yy.shape),
        "hstripe": lambda: sin(yy),
        "vstripe": lambda: sin(xx),
        "diag": lambda: sin(xx + yy),
        "waves": lambda: sin(yy + .5 * per * np.sin(2 * np.pi * xx / (3 * per) + b)),
        "check": lambda: np.sign(sin(xx / 2) * sin(yy / 2, b)),
        "dots": lambda: np.where(sin(xx) * sin(yy, b) > .5, 1.0, -.3),
        "windows": lambda: np.where((sin(xx) > .2) & (sin(yy, b) > .2), -1.0, .3),
        "brick": lambda: np.where(brick(yy / per + a), 1.0, -.3) + .2 * _noise(rng, yy.shape, 2),
        "confetti": lambda: np.stack([_noise(rng, yy.shape, per, nearest=True)
                                      for _ in range(3)], -1),
    }[p]()


def _shape(kind, yy, xx, cy, cx, h, f) -> np.ndarray:
    """(H, W) bool mask of a thing of height h standing at (cy, cx), facing f = +-1."""
    m = np.zeros(yy.shape, bool)
    for part, *v in _SHAPES[kind][1]:
        y, x = (yy - cy) / h, f * (xx - cx) / h  # object coordinates
        if part == "e":
            m |= ((y - v[0]) / v[2]) ** 2 + ((x - v[1]) / v[3]) ** 2 <= 1
        elif part == "r":
            m |= (y >= v[0]) & (y < v[2]) & (x >= v[1]) & (x < v[3])
        elif part == "o":
            m |= np.abs(np.hypot(y - v[0], x - v[1]) - v[2]) < v[3] / 2
        else:  # right triangle: vertical edge at x0 from y0 to y1, widening towards x1
            frac = (y - v[0]) / (v[2] - v[0])
            u = (x - v[1]) * np.sign(v[3] - v[1])  # distance from the vertical edge towards x1
            m |= (frac >= 0) & (frac <= 1) & (u >= 0) & (u <= frac * abs(v[3] - v[1]))
    return m


def _scene(name, rng, H, W) -> tuple[np.ndarray, np.ndarray]:
    """(H, W) kind map and instance map (0 = stuff) of one procedural scene."""
    cfg, K = _TOY[name], KINDS.index
    yy, xx = np.mgrid[:H, :W].astype(np.float32)
    def wave(y0, amp, per):  # a wavy horizontal boundary around row y0
        return y0 + amp * H * np.sin(2 * np.pi * xx / (per * W) + rng.uniform(0, 2 * np.pi))

    scene = cfg["scenes"][rng.integers(len(cfg["scenes"]))]
    pool = _INDOOR_THINGS if scene == "indoor" else cfg["things"]
    if scene == "indoor":
        hor = rng.uniform(.5, .72) * H
        wall, floor = (rng.choice(["wall_brick", "wall_plain"]),
                       rng.choice(["floor_wood", "floor_tile"]))
        km = np.where(yy < hor, K(wall), K(floor))
    elif scene == "outdoor":
        hor = rng.uniform(.3, .55) * H
        g = rng.choice(["grass", "sand", "road", "sidewalk", "water_calm", "water_rough", "grass"],
                       size=2)
        split = rng.uniform(.2, .8) * W + .1 * W * np.sin(yy / (.2 * H) + rng.uniform(0, 6))
        km = np.where(yy >= wave(hor, .02, 1.5), np.where(xx < split, K(g[0]), K(g[1])), K("sky"))
        if rng.random() < .5:
            km[(yy < hor) & (yy >= wave(hor - rng.uniform(.08, .25) * H, .05, .7))] = K("mountain")
        for _ in range(rng.integers(0, 4)):  # buildings and trees on the horizon
            x0, w, top = (rng.uniform(-.1, .9) * W, rng.uniform(.1, .3) * W,
                          rng.uniform(.05, .8) * hor)
            box = (xx >= x0) & (xx < x0 + w) & (yy >= top) & (yy < hor + 2)
            if rng.random() < .5:
                km[box] = K("building")
            else:  # blobby crown
                r2 = ((xx - x0 - w / 2) / (w / 2)) ** 2 + ((yy - hor) / (hor - top)) ** 2
                km[box & (r2 + .4 * _noise(rng, (H, W), 4) < 1)] = K("tree")
    else:  # street: buildings, sidewalks either side of a road vanishing at the horizon,
        # terrain beyond
        hor = rng.uniform(.35, .5) * H
        km = np.full((H, W), K("sky"))
        x0 = 0.0
        while x0 < W:
            w, top = rng.uniform(.1, .3) * W, rng.uniform(.05, .8) * hor
            kind = rng.choice(["building", "building", "tree", "wall_plain"])
            top = hor - .15 * H if kind == "wall_plain" else top
            km[(xx >= x0) & (xx < x0 + w) & (yy >= top) & (yy < hor + 1)] = K(kind)
            x0 += w + rng.uniform(0, .1) * W
        t = np.clip((yy - hor) / (H - hor), 0, 1)
        off = np.abs(xx - W * rng.uniform(.35, .65))
        rw = rng.uniform(.5, .8)
        km = np.where(yy >= hor, np.where(off < t * W * rw, K("road"),
                                          np.where(off < t * W * (rw + .3), K("sidewalk"),
                                                   K(rng.choice(["grass", "sand"])))), km)
    if rng.random() < cfg["clutter"]:  # an unlabelled / "other" blob
        cy, cx, r = rng.uniform(.3, .9) * H, rng.uniform(0, W), rng.uniform(.05, .15) * H
        km[np.hypot(yy - cy, xx - cx) + 3 * _noise(rng, (H, W), 4) < r] = K("clutter")
    # things: sample standing points on supporting ground, draw far to near so near ones occlude
    things = list(rng.choice(pool, size=rng.integers(*cfg["n"])))
    things += ["pole"] * rng.integers(1, 4) if scene == "street" else []
    placed = []
    for kind in things:
        support = _SUPPORT.get(kind, _GROUND)
        ys, xs = np.nonzero(np.isin(km, [K(s) for s in support]) & (yy > hor))
        if len(ys):
            j = rng.integers(len(ys))
            depth = np.clip((ys[j] - hor) / (H - hor), .5, 1)
            h = (rng.uniform(.55, .8) if kind == "pole"
                 else rng.uniform(*cfg["h"]) * _SHAPES[kind][0]) * H * depth
            placed.append((ys[j] + 1, xs[j], kind, h, rng.choice([-1, 1])))
    inst = np.zeros((H, W), np.int32)
    for n, (cy, cx, kind, h, f) in enumerate(sorted(placed, key=lambda p: p[0])):
        parts = [(kind, cy, h)]
        if kind == "pole" and rng.random() < .8:  # sign or traffic light on top
            top = rng.choice(["sign", "tlight"])
            parts.append((top, cy - h * (.75 if top == "sign" else .8),
                          h * (.15 if top == "sign" else .22)))
        for i, (k, y, s) in enumerate(parts):
            m = _shape(k, yy, xx, y, cx, s, f)
            km[m], inst[m] = K(k), 2 * n + i + 1
    if scene == "street" and rng.random() < .5:  # ego-vehicle bonnet (Cityscapes id 1, ignored)
        km[yy > wave(.92 * H, .02, 2) + 2 * np.abs(xx - W / 2) / W * .05 * H] = K("ego")
    return km, inst


def _render(name, km, rng, s) -> np.ndarray:
    """(H, W) kind map -> (H, W, 3) uint8 image with the set's colour cast and noise
    (domain gap)."""
    cfg = _TOY[name]
    H, W = km.shape
    yy, xx = np.mgrid[:H, :W].astype(np.float32)
    img = np.zeros((H, W, 3), np.float32)
    for k in np.unique(km):
        rgb, pat, per, amp = _TEX[KINDS[k]]
        v = _pattern(pat, yy, xx, max(per * s, 1.0), rng)
        tex = (np.asarray(rgb, np.float32) + rng.normal(0, 6, 3)
               + amp * (v[..., None] if v.ndim == 2 else v))
        m = km == k
        img[m] = tex[m]
    light = 1 + rng.uniform(-.15, .15) * (yy / H - .5)  # vertical illumination gradient
    img = (img * light[..., None] * np.asarray(cfg["cast"], np.float32)
           + rng.normal(0, cfg["noise"], img.shape))
    return np.clip(img, 0, 255).astype(np.uint8)


def _band(inst: np.ndarray, r: int) -> np.ndarray:
    """Pixels within r of a contour between two regions one of which is an object
    (VOC's 255 bands)."""
    H, W = inst.shape
    p, band = np.pad(inst, r, mode="edge"), np.zeros(inst.shape, bool)
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            nb = p[r + dy: r + dy + H, r + dx: r + dx + W]
            band |= (nb != inst) & ((nb > 0) | (inst > 0))
    return band


def _toy_sample(name: str, rng, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One toy image (H, W, 3) uint8 and its raw label as written to disk (H, W) uint8."""
    if name == "cityscapes":
        H, W = 3 * size // 4, 3 * size // 2  # 2:1 like 1024x2048
    elif name == "ade20k":
        H, W = size, int(size * rng.uniform(1.0, 1.34)) // 2 * 2
    else:
        H, W = (3 * size // 4, size) if rng.random() < .75 else (size, 3 * size // 4)
    km, inst = _scene(name, rng, H, W)
    img = _render(name, km, rng, _TOY[name]["scale"] * size / 128)
    raw = _raw_lut(name)[km]
    if name == "voc":
        raw[_band(inst, max(1, size // 128))] = RAW_IGNORE  # ~5 px bands at VOC resolution
    return img, raw


def make_toy(root: str | Path, n_train: int = 240, n_val: int = 60, seed: int = 0, size: int = 128,
             datasets: tuple[str, ...] = ("voc", "ade20k", "coco_stuff", "cityscapes")) -> Path:
    """Write toy VOC / ADE20K / COCO-Stuff / Cityscapes under root in their real layouts
    (deterministic)."""
    root = Path(root)
    for name in datasets:
        if name not in _TOY:
            raise ValueError(f"no toy version of {name!r}: toy datasets are {', '.join(_TOY)}")
        base = dataset_root(root, name)
        for si, (split, n) in enumerate((("train", n_train), ("val", n_val))):
            ids = []
            for i in range(n):
                # one generator per image: a smaller toy set is a prefix of a bigger one
                img, raw = _toy_sample(
                    name, np.random.default_rng([seed, list(_TOY).index(name), si, i]), size)
                if name == "voc":
                    ids.append(f"20{12 - si:02d}_{i:06d}")
                    _save(base / "JPEGImages" / f"{ids[-1]}.jpg", img,
                          quality=_TOY[name]["quality"])
                    lbl = Image.fromarray(raw, "P")
                    lbl.putpalette(voc_palette())
                    _save(base / "SegmentationClass" / f"{ids[-1]}.png", lbl)
                elif name == "ade20k":
                    stem = f"ADE_{'train' if split == 'train' else 'val'}_{i + 1:08d}"
                    sub = "training" if split == "train" else "validation"
                    _save(base / "images" / sub / f"{stem}.jpg", img, quality=_TOY[name]["quality"])
                    _save(base / "annotations" / sub / f"{stem}.png", raw)
                elif name == "coco_stuff":
                    stem, sub = f"{(si + 1) * 1000000 + i:012d}", f"{split}2017"
                    _save(base / "images" / sub / f"{stem}.jpg", img, quality=_TOY[name]["quality"])
                    _save(base / "annotations" / sub / f"{stem}_labelTrainIds.png", raw)
                else:
                    cities = (("aachen", "bochum", "bremen") if split == "train"
                              else ("frankfurt", "lindau"))
                    city = cities[i % len(cities)]
                    stem, gt = f"{city}_{i // 3:06d}_{i:06d}", base / "gtFine" / split / city
                    _save(base / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", img)
                    _save(gt / f"{stem}_gtFine_labelIds.png", raw)
                    # val keeps only labelIds so both reader paths are exercised
                    if split == "train":
                        _save(gt / f"{stem}_gtFine_labelTrainIds.png",
                              CityscapesReader.ID_TABLE[0][raw])
            if name == "voc":
                (base / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
                (base / "ImageSets" / "Segmentation" / f"{split}.txt").write_text(
                    "\n".join(ids) + "\n")
    return root


def _save(path: Path, img, quality: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(img) if isinstance(img, np.ndarray) else img
    img.save(path, **({"quality": quality} if quality else {}))


# ---------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    mk = sub.add_parser("make-toy",
                        help="write toy VOC/ADE20K/COCO-Stuff/Cityscapes in their real layouts")
    mk.add_argument("--root", default="data/toy")
    mk.add_argument("--n-train", type=int, default=240)
    mk.add_argument("--n-val", type=int, default=60)
    mk.add_argument("--seed", type=int, default=0)
    mk.add_argument("--size", type=int, default=128)
    mk.add_argument("--datasets", nargs="+", default=list(_TOY), choices=list(_TOY))
    args = ap.parse_args(argv)
    t0 = time.time()
    make_toy(args.root, args.n_train, args.n_val, args.seed, args.size, tuple(args.datasets))
    print(f"wrote {', '.join(args.datasets)} ({args.n_train} train / {args.n_val} val each) "
          f"under {args.root} in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    from utils import run_cli  # the project's one-line errors

    run_cli(main)
