"""Data layer of MDP: dataset readers, the concatenated label space (M1), augmentation (M9) and toy data.

Readers read the layouts of MMSegmentation's dataset-preparation guide and return a PIL image and a
uint8 label in the dataset's own train-id space (0..K_d-1, 255 = ignore). `LabelSpace` concatenates
the label spaces without any manual mapping (M1): global id = o_d + l, ignore -> IGNORE = -1 (int64).
`train_transform` / `eval_transform` are the MMSegmentation-style pipelines of M9 on
(tv_tensors.Image, tv_tensors.Mask). `make_toy` writes small synthetic copies of VOC, ADE20K,
COCO-Stuff and Cityscapes in the real layouts; they are read back by the same readers.

    python datasets.py make-toy --root data/toy
    python datasets.py info --datasets voc ade20k --data-root data/toy
"""
import argparse
import bisect
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import Dataset, Sampler
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

IGNORE = -1  # global ignore label (labels are int64 once global, M1)
RAW_IGNORE = 255  # readers' local ignore value (uint8)
MEAN = (0.485, 0.456, 0.406)  # ImageNet, 0..1 scale
STD = (0.229, 0.224, 0.225)

VOC_CLASSES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
               "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
               "train", "tvmonitor"]
ADE20K_CLASSES = [
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
    "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
    "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray",
    "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass",
    "clock", "flag"]
CITYSCAPES_CLASSES = ["road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                      "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
                      "motorcycle", "bicycle"]
COCO_STUFF_CLASSES = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush", "banner", "blanket", "branch", "bridge", "building-other",
    "bush", "cabinet", "cage", "cardboard", "carpet", "ceiling-other", "ceiling-tile", "cloth", "clothes",
    "clouds", "counter", "cupboard", "curtain", "desk-stuff", "dirt", "door-stuff", "fence", "floor-marble",
    "floor-other", "floor-stone", "floor-tile", "floor-wood", "flower", "fog", "food-other", "fruit",
    "furniture-other", "grass", "gravel", "ground-other", "hill", "house", "leaves", "light", "mat", "metal",
    "mirror-stuff", "moss", "mountain", "mud", "napkin", "net", "paper", "pavement", "pillow", "plant-other",
    "plastic", "platform", "playingfield", "railing", "railroad", "river", "road", "rock", "roof", "rug",
    "salad", "sand", "sea", "shelf", "sky-other", "skyscraper", "snow", "solid-other", "stairs", "stone",
    "straw", "structural-other", "table", "tent", "textile-other", "towel", "tree", "vegetable", "wall-brick",
    "wall-concrete", "wall-other", "wall-panel", "wall-stone", "wall-tile", "wall-wood", "water-other",
    "waterdrops", "window-blind", "window-other", "wood"]
# Official cityscapesScripts labels.py: labelId -> trainId (everything not listed is 255).
CITYSCAPES_ID_TO_TRAINID = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
                            24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}


# ---------------------------------------------------------------------------------------------- readers
def _table(raw_to_local: dict[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(256,) uint8 raw->local lookup and (256,) bool legal raw values; raw 255 is always ignore."""
    lut, valid = np.full(256, RAW_IGNORE, np.uint8), np.zeros(256, bool)
    for raw, local in raw_to_local.items():
        lut[raw], valid[raw] = local, True
    valid[RAW_IGNORE] = True
    return lut, valid


def _pairs(img_dir: Path, lbl_dir: Path, img_suffixes: tuple[str, ...], lbl_suffixes: tuple[str, ...],
           layout: str, pattern: str = "*") -> list[tuple[Path, Path]]:
    """Images under img_dir (glob pattern + suffix) paired with the first existing label candidate."""
    for d in (img_dir, lbl_dir):
        if not d.is_dir():
            raise FileNotFoundError(f"{d} not found: expected the {layout} layout")
    pairs = []
    for img in sorted(p for s in img_suffixes for p in img_dir.glob(pattern + s)):
        stem = img.name[: -len(next(s for s in img_suffixes if img.name.endswith(s)))]
        cands = [lbl_dir / img.parent.relative_to(img_dir) / (stem + s) for s in lbl_suffixes]
        lbl = next((c for c in cands if c.is_file()), None)
        if lbl is None:
            raise FileNotFoundError(f"{cands[-1]} not found: no label for image {img}")
        pairs.append((img, lbl))
    return pairs


class SegReader(Dataset):
    """Base reader: `files` [(image, label)] listed at construction, every item validated when read."""
    name: str = ""
    classes: list[str] = []

    def __init__(self, root: str | Path, split: str):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        self.root, self.split = Path(root), split
        self.table = _table(self._raw_to_local())
        self.files = self._list()
        if not self.files:
            raise ValueError(f"{self.name} {split}: empty split, no images found under {self.root}")

    def _list(self) -> list[tuple[Path, Path]]:
        raise NotImplementedError

    def _raw_to_local(self) -> dict[int, int]:
        return {i: i for i in range(len(self.classes))}

    def _table_for(self, lbl_path: Path) -> tuple[np.ndarray, np.ndarray]:
        return self.table

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Image.Image, np.ndarray]:
        img_path, lbl_path = self.files[i]
        image = _open(img_path).convert("RGB")
        lbl = _open(lbl_path)
        if lbl.mode not in ("P", "L"):
            raise ValueError(f"{lbl_path}: expected a palette or grayscale label PNG, got mode {lbl.mode}")
        raw = np.asarray(lbl)  # (H, W) uint8; palette PNGs give their indices
        if raw.shape != (image.height, image.width):
            raise ValueError(f"{lbl_path}: label size {raw.shape[::-1]} != image size {image.size} of {img_path}")
        lut, valid = self._table_for(lbl_path)
        bad = raw[~valid[raw]]
        if bad.size:
            k = len(self.classes)
            raise ValueError(f"{lbl_path}: label value {bad[0]} is not a {self.name} class id (0..{k - 1}) or 255")
        return image, lut[raw]


def _open(path: Path) -> Image.Image:
    try:
        img = Image.open(path)
        img.load()  # decode now so a corrupt file fails here, naming its path
        return img
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found") from None
    except OSError as e:
        raise ValueError(f"{path}: unreadable image ({e.__class__.__name__})") from None


class VOCReader(SegReader):
    """VOCdevkit/VOC2012; train uses SegmentationClassAug + trainaug.txt when both exist (SBD aug)."""
    name, classes = "voc", VOC_CLASSES

    def _list(self):
        layout = "VOCdevkit/VOC2012 layout (JPEGImages, SegmentationClass, ImageSets/Segmentation)"
        if not (self.root / "JPEGImages").is_dir():
            raise FileNotFoundError(f"{self.root / 'JPEGImages'} not found: expected the {layout}")
        sets = self.root / "ImageSets" / "Segmentation"
        aug = (self.split == "train" and (self.root / "SegmentationClassAug").is_dir()
               and (sets / "trainaug.txt").is_file())
        list_file = sets / ("trainaug.txt" if aug else f"{self.split}.txt")
        if not list_file.is_file():
            raise FileNotFoundError(f"{list_file} not found: expected the split list of the {layout}")
        labels = self.root / ("SegmentationClassAug" if aug else "SegmentationClass")
        return [(self.root / "JPEGImages" / f"{i}.jpg", labels / f"{i}.png") for i in list_file.read_text().split()]


class ADE20KReader(SegReader):
    """ADEChallengeData2016: raw 0 ("other") -> 255, classes 1..150 -> 0..149 (MMSeg reduce_zero_label)."""
    name, classes = "ade20k", ADE20K_CLASSES

    def _raw_to_local(self):
        return {0: RAW_IGNORE, **{i: i - 1 for i in range(1, len(self.classes) + 1)}}

    def _list(self):
        sub = {"train": "training", "val": "validation"}[self.split]
        return _pairs(self.root / "images" / sub, self.root / "annotations" / sub, (".jpg",), (".png",),
                      "ADEChallengeData2016/{images,annotations}/{training,validation}")


class CityscapesReader(SegReader):
    """cityscapes/{leftImg8bit,gtFine}/{split}/{city}; *_labelTrainIds.png, else *_labelIds.png mapped to trainIds."""
    name, classes = "cityscapes", CITYSCAPES_CLASSES
    # labelIds 0..33 (license plate, -1, reads as 255 = ignore)
    ID_TABLE = _table({i: CITYSCAPES_ID_TO_TRAINID.get(i, RAW_IGNORE) for i in range(34)})

    def _list(self):
        return _pairs(self.root / "leftImg8bit" / self.split, self.root / "gtFine" / self.split, ("_leftImg8bit.png",),
                      ("_gtFine_labelTrainIds.png", "_gtFine_labelIds.png"),
                      "cityscapes/{leftImg8bit,gtFine}/{split}/{city}", pattern="*/*")

    def _table_for(self, lbl_path):
        return self.ID_TABLE if lbl_path.name.endswith("_labelIds.png") else self.table


class COCOStuffReader(SegReader):
    """coco_stuff164k/{images,annotations}/{train2017,val2017} with 171-class *_labelTrainIds.png."""
    name, classes = "coco_stuff", COCO_STUFF_CLASSES

    def _list(self):
        sub = f"{self.split}2017"
        return _pairs(self.root / "images" / sub, self.root / "annotations" / sub, (".jpg",), ("_labelTrainIds.png",),
                      "coco_stuff164k/{images,annotations}/{train2017,val2017}")


class FolderReader(SegReader):
    """Any dataset as images/{split}/*.jpg|png + masks/{split}/<same stem>.png + classes.txt (one name a line)."""

    def __init__(self, root, split):
        root = Path(root)
        self.name = root.name
        if not (root / "classes.txt").is_file():
            raise FileNotFoundError(f"{root / 'classes.txt'} not found: expected the folder layout "
                                    "(images/{split}, masks/{split}, classes.txt)")
        self.classes = [c.strip() for c in (root / "classes.txt").read_text().splitlines() if c.strip()]
        if not 0 < len(self.classes) < 256:  # uint8 masks: ids 0..254, 255 = ignore
            raise ValueError(f"{root / 'classes.txt'}: expected 1..255 class names, got {len(self.classes)}")
        super().__init__(root, split)

    def _list(self):
        return _pairs(self.root / "images" / self.split, self.root / "masks" / self.split, (".jpg", ".jpeg", ".png"),
                      (".png",), "folder layout (images/{split}, masks/{split}, classes.txt)")


READERS = {"voc": (VOCReader, "VOCdevkit/VOC2012"), "ade20k": (ADE20KReader, "ADEChallengeData2016"),
           "cityscapes": (CityscapesReader, "cityscapes"), "coco_stuff": (COCOStuffReader, "coco_stuff164k")}


def dataset_root(data_root: str | Path, name: str) -> Path:
    if name.startswith("folder:"):
        path = Path(name[len("folder:"):])
        return path if path.is_absolute() else Path(data_root) / path
    if name not in READERS:
        raise ValueError(f"unknown dataset {name!r}: known are {', '.join(READERS)} and folder:PATH")
    return Path(data_root) / READERS[name][1]


def build_reader(name: str, data_root: str | Path, split: str) -> SegReader:
    root = dataset_root(data_root, name)  # raises on an unknown name
    return (FolderReader if name.startswith("folder:") else READERS[name][0])(root, split)


# ------------------------------------------------------------------------------------------ label space
class LabelSpace:
    """M1: the datasets' label spaces concatenated; global id = offset_d + local id, 255 -> IGNORE."""

    def __init__(self, names: list[str], classes: list[list[str]]):
        if len(set(names)) != len(names) or len(names) != len(classes):
            raise ValueError(f"dataset names must be unique and match the class lists, got {names}")
        self.names, self.classes = list(names), [list(c) for c in classes]
        self.num_classes_per_dataset = [len(c) for c in classes]
        self.offsets = [sum(self.num_classes_per_dataset[:d]) for d in range(len(names))]
        self.num_classes = sum(self.num_classes_per_dataset)
        self.class_names = [f"{n}:{c}" for n, cs in zip(names, classes) for c in cs]
        self.class_dataset = torch.tensor([d for d, k in enumerate(self.num_classes_per_dataset) for _ in range(k)],
                                          dtype=torch.long)  # (C,)

    @classmethod
    def from_readers(cls, readers: list[SegReader]) -> "LabelSpace":
        return cls([r.name for r in readers], [r.classes for r in readers])

    def to_global(self, label: np.ndarray | torch.Tensor, d: int) -> torch.Tensor:
        """(H, W) local ids 0..K_d-1 or 255 -> (H, W) int64 global ids or IGNORE."""
        t = torch.as_tensor(label).as_subclass(torch.Tensor)  # plain tensor, also from a tv_tensors.Mask
        k = self.num_classes_per_dataset[d]
        bad = t[((t < 0) | (t >= k)) & (t != RAW_IGNORE)]
        if bad.numel():
            raise ValueError(f"{self.names[d]}: label value {int(bad[0])} outside 0..{k - 1} and not 255")
        return (t.long() + self.offsets[d]).masked_fill_(t == RAW_IGNORE, IGNORE)

    def state_dict(self) -> dict:
        return {"names": list(self.names), "classes": [list(c) for c in self.classes]}

    @classmethod
    def from_state_dict(cls, d: dict) -> "LabelSpace":
        return cls(d["names"], d["classes"])

    def __eq__(self, other) -> bool:
        return isinstance(other, LabelSpace) and self.state_dict() == other.state_dict()


# ---------------------------------------------------------------------------------------- augmentation
def rescale_size(h: int, w: int, base_size: tuple[int, int], ratio: float = 1.0) -> tuple[int, int]:
    """MMSeg keep-ratio Resize: the largest (h', w') fitting inside base_size*ratio (either orientation)."""
    f = min(max(base_size) * ratio / max(h, w), min(base_size) * ratio / min(h, w))
    return int(h * f + 0.5), int(w * f + 0.5)


class RandomRescale(v2.Transform):
    """Keep-ratio rescale to base_size * r, r ~ U(scale_range) (M9); masks are resized nearest by v2."""

    def __init__(self, base_size: tuple[int, int], scale_range: tuple[float, float] = (0.5, 2.0)):
        super().__init__()
        self.base_size, self.scale_range = base_size, scale_range

    def make_params(self, flat_inputs):
        h, w = F.get_size(next(x for x in flat_inputs if isinstance(x, (tv_tensors.Image, tv_tensors.Mask))))
        lo, hi = self.scale_range
        r = lo if lo == hi else torch.empty(()).uniform_(lo, hi).item()  # torch RNG: seeded per DataLoader worker
        return {"size": list(rescale_size(h, w, self.base_size, r))}

    def transform(self, inpt, params):
        return self._call_kernel(F.resize, inpt, params["size"])


def train_transform(base_size: tuple[int, int] = (2048, 512), crop_size: tuple[int, int] = (512, 512),
                    scale_range: tuple[float, float] = (0.5, 2.0)) -> v2.Compose:
    """M9 train pipeline on (Image uint8, Mask uint8); crop_size is (h, w). Colour ops leave the Mask alone."""
    return v2.Compose([
        RandomRescale(base_size, scale_range),
        v2.RandomCrop(crop_size, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: RAW_IGNORE}),
        v2.RandomHorizontalFlip(0.5),
        # MMSeg PhotoMetricDistortion: each op w.p. 0.5; brightness ~32/255, contrast and saturation 0.5-1.5,
        # hue +-18/180 of the circle (applied to the image only)
        *[v2.RandomApply([v2.ColorJitter(**{k: v})], p=0.5) for k, v in
          (("brightness", 0.125), ("contrast", 0.5), ("saturation", 0.5), ("hue", 0.1))],
        v2.ToDtype(torch.float32, scale=True),  # images only; the Mask stays uint8
        v2.Normalize(MEAN, STD),
    ])


class ImageOnly:
    """Applies a transform to the image and passes the label through (eval: label kept at full size)."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, image, mask):
        return self.transform(image), mask


def eval_transform(base_size: tuple[int, int] = (2048, 512)) -> ImageOnly:
    """M9 eval: the image is resized to fit base_size (keep ratio); the label stays at original size."""
    return ImageOnly(v2.Compose([RandomRescale(base_size, (1.0, 1.0)), v2.ToDtype(torch.float32, scale=True),
                                 v2.Normalize(MEAN, STD)]))


def denormalize(img: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) or (3, H, W) normalised -> same shape in [0, 1], for visualisation."""
    mean = torch.tensor(MEAN, device=img.device, dtype=img.dtype).view(3, 1, 1)
    std = torch.tensor(STD, device=img.device, dtype=img.dtype).view(3, 1, 1)
    return (img * std + mean).clamp(0, 1)


def draw_labels(img8: torch.Tensor, label: torch.Tensor, colours: list[tuple[int, int, int]]
                ) -> torch.Tensor:
    """img8 (3, H, W) uint8 with every class c of label (H, W) painted in colours[c] (alpha 0.6);
    values outside [0, len(colours)), i.e. IGNORE, stay unpainted."""
    from torchvision.utils import draw_segmentation_masks

    present = [c for c in label.unique().tolist() if 0 <= c < len(colours)]
    if not present:
        return img8
    masks = torch.stack([label == c for c in present])  # (n, H, W) bool
    return draw_segmentation_masks(img8, masks, alpha=0.6, colors=[colours[c] for c in present])


# ------------------------------------------------------------------------------------ multi-dataset
class MultiDataset(Dataset):
    """The readers concatenated; items are (image (3,H,W) float, label (H,W) int64 global ids, dataset index)."""

    def __init__(self, readers: list[SegReader], transform=None):
        if not readers:
            raise ValueError("MultiDataset needs at least one reader")
        self.readers, self.label_space = readers, LabelSpace.from_readers(readers)
        if transform is None:  # no augmentation: only the conversion to a normalised float image
            transform = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])
        self.transform = transform
        self.sizes = [len(r) for r in readers]
        self.cum = np.cumsum(self.sizes).tolist()

    def __len__(self) -> int:
        return self.cum[-1]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        d = bisect.bisect_right(self.cum, i)
        image, label = self.readers[d][i - (self.cum[d - 1] if d else 0)]
        image, mask = self.transform(tv_tensors.Image(F.pil_to_tensor(image)), tv_tensors.Mask(torch.from_numpy(label)))
        # global mapping after augmentation so crop padding (255) becomes IGNORE too
        return image.as_subclass(torch.Tensor), self.label_space.to_global(mask, d), d


def build_multidataset(names: list[str], data_root: str | Path, split: str, transform=None) -> MultiDataset:
    return MultiDataset([build_reader(n, data_root, split) for n in names], transform)


class DatasetMixSampler(Sampler[int]):
    """Sampler over a MultiDataset: a permutation of all samples (weights None), or len(total) draws where
    dataset d is picked with probability w_d / sum(w); padded and sharded like DistributedSampler."""

    def __init__(self, sizes: list[int], weights: list[float] | None = None, num_replicas: int | None = None,
                 rank: int | None = None, seed: int = 0, shuffle: bool = True):
        ddp = dist.is_available() and dist.is_initialized()
        self.num_replicas = num_replicas if num_replicas is not None else dist.get_world_size() if ddp else 1
        self.rank = rank if rank is not None else dist.get_rank() if ddp else 0
        if weights is not None and (len(weights) != len(sizes) or min(weights) < 0 or sum(weights) <= 0):
            raise ValueError(f"dataset weights {weights}: expected one number >= 0 per dataset {sizes}, not all 0")
        self.sizes, self.weights, self.seed, self.shuffle, self.epoch = list(sizes), weights, seed, shuffle, 0
        self.num_samples = math.ceil(sum(sizes) / self.num_replicas)  # per rank
        self.total_size = self.num_samples * self.num_replicas

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)  # identical on every rank
        n = sum(self.sizes)
        if self.weights is not None:
            w = torch.tensor(self.weights, dtype=torch.float64) / sum(self.weights)
            p = torch.cat([torch.full((s,), float(w[d]) / s, dtype=torch.float64) for d, s in enumerate(self.sizes)])
            idx = torch.multinomial(p, n, replacement=True, generator=g).tolist()
        else:
            idx = torch.randperm(n, generator=g).tolist() if self.shuffle else list(range(n))
        idx = (idx * math.ceil(self.total_size / n))[: self.total_size]  # pad by repeating, like DistributedSampler
        return iter(idx[self.rank: self.total_size: self.num_replicas])


# ------------------------------------------------------------------------------------------ toy data
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
    "wall_plain": ((200, 200, 185), "smooth", 16, 10), "floor_wood": ((140, 95, 55), "hstripe", 4, 25),
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
_SHAPES = {  # thing: (height relative to a person, parts in units of its height around the bottom centre)
    # e: ellipse (y, x, ry, rx); r: rect (y0, x0, y1, x1); o: ring (y, x, r, width); t: triangle (y0, x0, y1, x1)
    "person": (1.0, [("e", -.89, 0, .1, .08), ("r", -.78, -.13, -.4, .13), ("r", -.4, -.12, 0, -.02),
                     ("r", -.4, .02, 0, .12), ("r", -.76, -.19, -.45, -.13), ("r", -.76, .13, -.45, .19)]),
    "car": (.55, [("r", -.65, -1.1, -.15, 1.1), ("r", -1, -.55, -.6, .5), ("e", -.2, -.65, .2, .2),
                  ("e", -.2, .65, .2, .2)]),
    "bus": (1.1, [("r", -1, -1.8, -.12, 1.8), ("e", -.12, -1.2, .12, .12), ("e", -.12, 1.2, .12, .12)]),
    "cat": (.35, [("e", -.45, 0, .22, .45), ("e", -.72, .5, .18, .16), ("r", -.3, -.35, 0, -.25),
                  ("r", -.3, .25, 0, .35), ("r", -.95, -.55, -.45, -.47)]),
    "dog": (.5, [("e", -.55, 0, .2, .55), ("e", -.8, .6, .17, .22), ("r", -.4, -.45, 0, -.35),
                 ("r", -.4, -.25, 0, -.15), ("r", -.4, .2, 0, .3), ("r", -.4, .38, 0, .48)]),
    "bird": (.3, [("e", -.45, 0, .22, .38), ("e", -.7, .38, .14, .14), ("t", -.55, -.3, -.35, -.75),
                  ("r", -.25, -.04, 0, 0), ("r", -.25, .08, 0, .12)]),
    "bicycle": (.55, [("o", -.35, -.55, .35, .07), ("o", -.35, .55, .35, .07), ("r", -.72, -.5, -.64, .45),
                      ("r", -.75, .4, -.35, .48), ("r", -.72, -.2, -.35, -.12)]),
    "chair": (.5, [("r", -.55, -.3, -.45, .3), ("r", -1.1, -.3, -.55, -.2), ("r", -.45, -.3, 0, -.22),
                   ("r", -.45, .22, 0, .3)]),
    "boat": (.6, [("r", -.3, -.9, -.1, .9), ("e", -.1, 0, .1, .8), ("r", -1.3, -.04, -.3, .04),
                  ("t", -1.25, .08, -.38, .7)]),
    "pole": (1.0, [("r", -1, -.025, 0, .025)]),
    "sign": (1.0, [("e", -.5, 0, .5, .5)]),
    "tlight": (1.0, [("r", -1, -.22, 0, .22)]),
}
_VOC_THINGS = ("person", "car", "bus", "cat", "dog", "bird", "bicycle", "chair", "boat")
_ADE_COCO_NAMES = {  # kind -> (ade20k, coco_stuff) class; kinds missing here are ADE20K "other" / COCO-Stuff 255
    "sky": ("sky", "sky-other"), "road": ("road", "road"), "sidewalk": ("sidewalk", "pavement"),
    "grass": ("grass", "grass"), "sand": ("sand", "sand"), "tree": ("tree", "tree"),
    "water_calm": ("water", "river"), "water_rough": ("water", "sea"), "building": ("building", "building-other"),
    "wall_brick": ("wall", "wall-brick"), "wall_plain": ("wall", "wall-concrete"),
    "floor_wood": ("floor", "floor-wood"), "floor_tile": ("floor", "floor-tile"), "mountain": ("mountain", "mountain"),
    "clutter": (None, "solid-other"),
    **{t: ("animal" if t in ("cat", "dog", "bird") else t, t) for t in _VOC_THINGS}}
_CS_IDS = {"sky": 23, "road": 7, "sidewalk": 8, "grass": 22, "sand": 22, "tree": 21, "building": 11, "wall_brick": 12,
           "wall_plain": 12, "clutter": 4, "ego": 1, "person": 24, "car": 26, "bus": 28, "bicycle": 33, "pole": 17,
           "sign": 20, "tlight": 19}  # cityscapes labelIds (grass+sand merged into terrain; clutter=static, ego=1)


def _raw_lut(name: str) -> np.ndarray:
    """kind index -> the raw value written into that set's label files."""
    if name == "voc":
        return np.array([VOC_CLASSES.index(k) if k in _VOC_THINGS else 0 for k in KINDS], np.uint8)
    if name == "cityscapes":
        return np.array([_CS_IDS.get(k, 0) for k in KINDS], np.uint8)
    j, classes, other = (0, ADE20K_CLASSES, 0) if name == "ade20k" else (1, COCO_STUFF_CLASSES, RAW_IGNORE)
    names = [_ADE_COCO_NAMES.get(k, (None, None))[j] for k in KINDS]
    return np.array([other if n is None else classes.index(n) + (name == "ade20k") for n in names], np.uint8)


_TOY = {  # scene types, things, things per image, thing height / H, colour cast, noise, texture scale, JPEG quality
    "voc": dict(scenes=("outdoor", "indoor"), things=_VOC_THINGS, n=(1, 3), h=(.7, 1.1), cast=(1.08, 1.0, .9),
                noise=4.0, scale=1.25, clutter=0.0, quality=90),
    "ade20k": dict(scenes=("outdoor", "indoor"), things=_VOC_THINGS, n=(0, 4), h=(.4, .75), cast=(.95, 1.0, 1.05),
                   noise=8.0, scale=1.0, clutter=0.5, quality=80),
    "coco_stuff": dict(scenes=("outdoor", "indoor"), things=_VOC_THINGS, n=(1, 5), h=(.3, .6), cast=(.9, .97, 1.12),
                       noise=6.0, scale=.8, clutter=0.4, quality=75),
    "cityscapes": dict(scenes=("street",), things=("person", "car", "car", "bus", "bicycle"), n=(2, 6), h=(.25, .5),
                       cast=(.92, 1.04, .95), noise=3.0, scale=.9, clutter=0.2, quality=None),
}
_SUPPORT = {"boat": ("water_calm", "water_rough"), "car": ("road", "grass", "sand"), "bus": ("road",),
            "pole": ("sidewalk",)}  # ground kinds a thing may stand on; others: any non-water ground
_GROUND = ("road", "sidewalk", "grass", "sand", "floor_wood", "floor_tile")
_INDOOR_THINGS = ("person", "chair", "cat", "dog")


def _noise(rng, shape, per, nearest=False) -> np.ndarray:
    """Value noise in [-1, 1] with cells of about `per` px."""
    h, w = shape
    low = rng.uniform(-1, 1, (int(h / per) + 2, int(w / per) + 2)).astype(np.float32)
    return np.asarray(Image.fromarray(low, "F").resize((w, h), Image.NEAREST if nearest else Image.BILINEAR))


def _pattern(p, yy, xx, per, rng) -> np.ndarray:
    """Texture in about [-1, 1]: (H, W), or (H, W, 3) for the multicoloured clutter."""
    a, b = rng.uniform(0, 2 * np.pi, 2)
    sin = lambda u, c=a: np.sin(2 * np.pi * u / per + c)  # noqa: E731
    brick = lambda u: (u % 1 < .15) | ((xx / (2 * per) + .5 * np.floor(u)) % 1 < .08)  # noqa: E731  mortar lines
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
        "confetti": lambda: np.stack([_noise(rng, yy.shape, per, nearest=True) for _ in range(3)], -1),
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
        wall, floor = rng.choice(["wall_brick", "wall_plain"]), rng.choice(["floor_wood", "floor_tile"])
        km = np.where(yy < hor, K(wall), K(floor))
    elif scene == "outdoor":
        hor = rng.uniform(.3, .55) * H
        g = rng.choice(["grass", "sand", "road", "sidewalk", "water_calm", "water_rough", "grass"], size=2)
        split = rng.uniform(.2, .8) * W + .1 * W * np.sin(yy / (.2 * H) + rng.uniform(0, 6))
        km = np.where(yy >= wave(hor, .02, 1.5), np.where(xx < split, K(g[0]), K(g[1])), K("sky"))
        if rng.random() < .5:
            km[(yy < hor) & (yy >= wave(hor - rng.uniform(.08, .25) * H, .05, .7))] = K("mountain")
        for _ in range(rng.integers(0, 4)):  # buildings and trees on the horizon
            x0, w, top = rng.uniform(-.1, .9) * W, rng.uniform(.1, .3) * W, rng.uniform(.05, .8) * hor
            box = (xx >= x0) & (xx < x0 + w) & (yy >= top) & (yy < hor + 2)
            if rng.random() < .5:
                km[box] = K("building")
            else:  # blobby crown
                r2 = ((xx - x0 - w / 2) / (w / 2)) ** 2 + ((yy - hor) / (hor - top)) ** 2
                km[box & (r2 + .4 * _noise(rng, (H, W), 4) < 1)] = K("tree")
    else:  # street: buildings, sidewalks either side of a road vanishing at the horizon, terrain beyond
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
        km = np.where(yy >= hor, np.where(off < t * W * rw, K("road"), np.where(off < t * W * (rw + .3), K("sidewalk"),
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
            h = (rng.uniform(.55, .8) if kind == "pole" else rng.uniform(*cfg["h"]) * _SHAPES[kind][0]) * H * depth
            placed.append((ys[j] + 1, xs[j], kind, h, rng.choice([-1, 1])))
    inst = np.zeros((H, W), np.int32)
    for n, (cy, cx, kind, h, f) in enumerate(sorted(placed, key=lambda p: p[0])):
        parts = [(kind, cy, h)]
        if kind == "pole" and rng.random() < .8:  # sign or traffic light on top
            top = rng.choice(["sign", "tlight"])
            parts.append((top, cy - h * (.75 if top == "sign" else .8), h * (.15 if top == "sign" else .22)))
        for i, (k, y, s) in enumerate(parts):
            m = _shape(k, yy, xx, y, cx, s, f)
            km[m], inst[m] = K(k), 2 * n + i + 1
    if scene == "street" and rng.random() < .5:  # ego-vehicle bonnet (Cityscapes id 1, ignored)
        km[yy > wave(.92 * H, .02, 2) + 2 * np.abs(xx - W / 2) / W * .05 * H] = K("ego")
    return km, inst


def _render(name, km, rng, s) -> np.ndarray:
    """(H, W) kind map -> (H, W, 3) uint8 image with the set's colour cast and noise (domain gap)."""
    cfg = _TOY[name]
    H, W = km.shape
    yy, xx = np.mgrid[:H, :W].astype(np.float32)
    img = np.zeros((H, W, 3), np.float32)
    for k in np.unique(km):
        rgb, pat, per, amp = _TEX[KINDS[k]]
        v = _pattern(pat, yy, xx, max(per * s, 1.0), rng)
        tex = np.asarray(rgb, np.float32) + rng.normal(0, 6, 3) + amp * (v[..., None] if v.ndim == 2 else v)
        m = km == k
        img[m] = tex[m]
    light = 1 + rng.uniform(-.15, .15) * (yy / H - .5)  # vertical illumination gradient
    img = img * light[..., None] * np.asarray(cfg["cast"], np.float32) + rng.normal(0, cfg["noise"], img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _band(inst: np.ndarray, r: int) -> np.ndarray:
    """Pixels within r of a contour between two regions one of which is an object (VOC's 255 bands)."""
    H, W = inst.shape
    p, band = np.pad(inst, r, mode="edge"), np.zeros(inst.shape, bool)
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            nb = p[r + dy: r + dy + H, r + dx: r + dx + W]
            band |= (nb != inst) & ((nb > 0) | (inst > 0))
    return band


def voc_palette() -> list[int]:
    """The 256-entry PASCAL VOC colour map (bit-interleaved), as PIL putpalette expects."""
    pal = []
    for i in range(256):
        r = g = b = 0
        for j in range(8):
            r |= ((i >> 3 * j) & 1) << (7 - j)
            g |= ((i >> 3 * j + 1) & 1) << (7 - j)
            b |= ((i >> 3 * j + 2) & 1) << (7 - j)
        pal += [r, g, b]
    return pal


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
    """Write toy VOC / ADE20K / COCO-Stuff / Cityscapes under root in their real layouts (deterministic)."""
    root = Path(root)
    for name in datasets:
        if name not in _TOY:
            raise ValueError(f"no toy version of {name!r}: toy datasets are {', '.join(_TOY)}")
        base = dataset_root(root, name)
        for si, (split, n) in enumerate((("train", n_train), ("val", n_val))):
            ids = []
            for i in range(n):
                # one generator per image: a smaller toy set is a prefix of a bigger one
                img, raw = _toy_sample(name, np.random.default_rng([seed, list(_TOY).index(name), si, i]), size)
                if name == "voc":
                    ids.append(f"20{12 - si:02d}_{i:06d}")
                    _save(base / "JPEGImages" / f"{ids[-1]}.jpg", img, quality=_TOY[name]["quality"])
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
                    cities = ("aachen", "bochum", "bremen") if split == "train" else ("frankfurt", "lindau")
                    city = cities[i % len(cities)]
                    stem, gt = f"{city}_{i // 3:06d}_{i:06d}", base / "gtFine" / split / city
                    _save(base / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", img)
                    _save(gt / f"{stem}_gtFine_labelIds.png", raw)
                    if split == "train":  # val keeps only labelIds so both reader paths are exercised
                        _save(gt / f"{stem}_gtFine_labelTrainIds.png", CityscapesReader.ID_TABLE[0][raw])
            if name == "voc":
                (base / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
                (base / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return root


def _save(path: Path, img, quality: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(img) if isinstance(img, np.ndarray) else img
    img.save(path, **({"quality": quality} if quality else {}))


# ----------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    mk = sub.add_parser("make-toy", help="write toy VOC/ADE20K/COCO-Stuff/Cityscapes in their real layouts")
    mk.add_argument("--root", default="data/toy")
    mk.add_argument("--n-train", type=int, default=240)
    mk.add_argument("--n-val", type=int, default=60)
    mk.add_argument("--seed", type=int, default=0)
    mk.add_argument("--size", type=int, default=128)
    mk.add_argument("--datasets", nargs="+", default=list(_TOY), choices=list(_TOY))
    inf = sub.add_parser("info", help="classes, images per split and offsets of a dataset list")
    inf.add_argument("--datasets", nargs="+", required=True)
    inf.add_argument("--data-root", default="data/toy")
    inf.add_argument("--names", action="store_true", help="also list every global class id and name")
    args = ap.parse_args(argv)
    if args.cmd == "make-toy":
        t0 = time.time()
        make_toy(args.root, args.n_train, args.n_val, args.seed, args.size, tuple(args.datasets))
        print(f"wrote {', '.join(args.datasets)} ({args.n_train} train / {args.n_val} val each) under {args.root} "
              f"in {time.time() - t0:.1f}s")
        return
    readers = {s: [build_reader(n, args.data_root, s) for n in args.datasets] for s in ("train", "val")}
    space = LabelSpace.from_readers(readers["train"])
    print(f"{'dataset':<12} {'classes':>7} {'offset':>6} {'train':>7} {'val':>6}  root")
    for d, (tr, va) in enumerate(zip(readers["train"], readers["val"])):
        print(f"{tr.name:<12} {len(tr.classes):>7} {space.offsets[d]:>6} {len(tr):>7} {len(va):>6}  {tr.root}")
    print(f"total classes C = {space.num_classes}")
    if args.names:
        for c, n in enumerate(space.class_names):
            print(f"{c:>5} {n}")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:  # one clear line, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
