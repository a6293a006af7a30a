"""Data layer of MDP: readers, the concatenated label space (M1), augmentation (M9), sampling.

Readers read the layouts of MMSegmentation's dataset-preparation guide and return a PIL image and a
uint8 label in the dataset's own train-id space (0..K_d-1, 255 = ignore). `LabelSpace` concatenates
the label spaces without any manual mapping (M1): global id = o_d + l, ignore -> IGNORE = -1
(int64); only the `--label-map` ablation (label_map.py) merges or drops classes.
`train_transform` / `eval_transform` are the MMSegmentation-style pipelines of M9 on
(tv_tensors.Image, tv_tensors.Mask). `DatasetMixSampler` orders the samples (optionally weighted per
dataset) and shards them over DDP ranks.
toy.py writes toy data in the real layouts for these readers.

    python datasets.py info --datasets voc ade20k --data-root data/toy
"""
import argparse
import bisect
import math
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import Dataset, Sampler
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from label_map import read_label_map
from label_map import resolve as resolve_label_map

IGNORE = -1  # global ignore label (labels are int64 once global, M1)
RAW_IGNORE = 255  # readers' local ignore value (uint8)
MEAN = (0.485, 0.456, 0.406)  # ImageNet, 0..1 scale
STD = (0.229, 0.224, 0.225)

VOC_CLASSES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
               "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
               "sheep", "sofa", "train", "tvmonitor"]
ADE20K_CLASSES = [
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain",
    "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing",
    "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink",
    "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case",
    "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind",
    "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth",
    "television receiver", "airplane", "dirt track", "apparel", "pole", "land", "bannister",
    "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship", "fountain",
    "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel", "basket",
    "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen",
    "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan",
    "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass",
    "clock", "flag"]
CITYSCAPES_CLASSES = ["road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
                      "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car",
                      "truck", "bus", "train", "motorcycle", "bicycle"]
COCO_STUFF_CLASSES = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush", "banner", "blanket", "branch", "bridge",
    "building-other", "bush", "cabinet", "cage", "cardboard", "carpet", "ceiling-other",
    "ceiling-tile", "cloth", "clothes", "clouds", "counter", "cupboard", "curtain", "desk-stuff",
    "dirt", "door-stuff", "fence", "floor-marble", "floor-other", "floor-stone", "floor-tile",
    "floor-wood", "flower", "fog", "food-other", "fruit", "furniture-other", "grass", "gravel",
    "ground-other", "hill", "house", "leaves", "light", "mat", "metal", "mirror-stuff", "moss",
    "mountain", "mud", "napkin", "net", "paper", "pavement", "pillow", "plant-other", "plastic",
    "platform", "playingfield", "railing", "railroad", "river", "road", "rock", "roof", "rug",
    "salad", "sand", "sea", "shelf", "sky-other", "skyscraper", "snow", "solid-other", "stairs",
    "stone", "straw", "structural-other", "table", "tent", "textile-other", "towel", "tree",
    "vegetable", "wall-brick", "wall-concrete", "wall-other", "wall-panel", "wall-stone",
    "wall-tile", "wall-wood", "water-other", "waterdrops", "window-blind", "window-other", "wood"]
# Official cityscapesScripts labels.py: labelId -> trainId (everything not listed is 255).
CITYSCAPES_ID_TO_TRAINID = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
                            23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}


# ------------------------------------------------------------------------------------------ readers
def _table(raw_to_local: dict[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(256,) uint8 raw->local lookup and (256,) bool legal raw values; raw 255 is always ignore."""
    lut, valid = np.full(256, RAW_IGNORE, np.uint8), np.zeros(256, bool)
    for raw, local in raw_to_local.items():
        lut[raw], valid[raw] = local, True
    valid[RAW_IGNORE] = True
    return lut, valid


def _pairs(img_dir: Path, lbl_dir: Path, img_suffixes: tuple[str, ...],
           lbl_suffixes: tuple[str, ...], layout: str, pattern: str = "*"
           ) -> list[tuple[Path, Path]]:
    """Images under img_dir (glob pattern + suffix) paired with the first existing label
    candidate."""
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
    """Base reader: `files` [(image, label)] listed at construction, every item validated when
    read."""
    name: str = ""
    classes: list[str] = []

    def __init__(self, root: str | Path, split: str):
        if split not in ("train", "val", "test"):  # test: only where a set has one
            raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
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
            raise ValueError(f"{lbl_path}: expected a palette or grayscale label PNG, "
                             f"got mode {lbl.mode}")
        raw = np.asarray(lbl)  # (H, W) uint8; palette PNGs give their indices
        if raw.shape != (image.height, image.width):
            raise ValueError(f"{lbl_path}: label size {raw.shape[::-1]} != image size "
                             f"{image.size} of {img_path}")
        lut, valid = self._table_for(lbl_path)
        bad = raw[~valid[raw]]
        if bad.size:
            ids = np.flatnonzero(valid[:RAW_IGNORE])  # the raw ids this file may hold, 0..n
            raise ValueError(f"{lbl_path}: mask value {bad[0]} is not a class id of {self.name} "
                             f"({ids[0]}-{ids[-1]}) or the ignore value {RAW_IGNORE}")
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
    """VOCdevkit/VOC2012; train uses SegmentationClassAug + trainaug.txt when both exist
    (SBD aug)."""
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
            raise FileNotFoundError(f"{list_file} not found: expected the split list of the "
                                    f"{layout}")
        labels = self.root / ("SegmentationClassAug" if aug else "SegmentationClass")
        return [(self.root / "JPEGImages" / f"{i}.jpg", labels / f"{i}.png")
                for i in list_file.read_text().split()]


class ADE20KReader(SegReader):
    """ADEChallengeData2016: raw 0 ("other") -> 255, classes 1..150 -> 0..149
    (MMSeg reduce_zero_label)."""
    name, classes = "ade20k", ADE20K_CLASSES

    def _raw_to_local(self):
        return {0: RAW_IGNORE, **{i: i - 1 for i in range(1, len(self.classes) + 1)}}

    def _list(self):
        sub = {"train": "training", "val": "validation"}[self.split]
        return _pairs(self.root / "images" / sub, self.root / "annotations" / sub, (".jpg",),
                      (".png",), "ADEChallengeData2016/{images,annotations}/{training,validation}")


class CityscapesReader(SegReader):
    """cityscapes/{leftImg8bit,gtFine}/{split}/{city}; *_labelTrainIds.png, else *_labelIds.png
    mapped to trainIds."""
    name, classes = "cityscapes", CITYSCAPES_CLASSES
    # labelIds 0..33 (license plate, -1, reads as 255 = ignore)
    ID_TABLE = _table({i: CITYSCAPES_ID_TO_TRAINID.get(i, RAW_IGNORE) for i in range(34)})

    def _list(self):
        return _pairs(self.root / "leftImg8bit" / self.split, self.root / "gtFine" / self.split,
                      ("_leftImg8bit.png",), ("_gtFine_labelTrainIds.png", "_gtFine_labelIds.png"),
                      "cityscapes/{leftImg8bit,gtFine}/{split}/{city}", pattern="*/*")

    def _table_for(self, lbl_path):
        return self.ID_TABLE if lbl_path.name.endswith("_labelIds.png") else self.table


class COCOStuffReader(SegReader):
    """coco_stuff164k/{images,annotations}/{train2017,val2017} with 171-class
    *_labelTrainIds.png."""
    name, classes = "coco_stuff", COCO_STUFF_CLASSES

    def _list(self):
        sub = f"{self.split}2017"
        return _pairs(self.root / "images" / sub, self.root / "annotations" / sub, (".jpg",),
                      ("_labelTrainIds.png",),
                      "coco_stuff164k/{images,annotations}/{train2017,val2017}")


class FolderReader(SegReader):
    """Any dataset as images/{split}/*.jpg|png + masks/{split}/<same stem>.png + classes.txt
    (one name a line)."""

    def __init__(self, root, split):
        root = Path(root)
        self.name = root.name
        if not (root / "classes.txt").is_file():
            raise FileNotFoundError(f"{root / 'classes.txt'} not found: expected the folder layout "
                                    "(images/{split}, masks/{split}, classes.txt)")
        self.classes = [c.strip() for c in (root / "classes.txt").read_text().splitlines()
                        if c.strip()]
        if not 0 < len(self.classes) < 256:  # uint8 masks: ids 0..254, 255 = ignore
            raise ValueError(f"{root / 'classes.txt'}: expected 1..255 class names, "
                             f"got {len(self.classes)}")
        super().__init__(root, split)

    def _list(self):
        return _pairs(self.root / "images" / self.split, self.root / "masks" / self.split,
                      (".jpg", ".jpeg", ".png"), (".png",),
                      "folder layout (images/{split}, masks/{split}, classes.txt)")


READERS = {"voc": (VOCReader, "VOCdevkit/VOC2012"),
           "ade20k": (ADE20KReader, "ADEChallengeData2016"),
           "cityscapes": (CityscapesReader, "cityscapes"),
           "coco_stuff": (COCOStuffReader, "coco_stuff164k")}


def dataset_root(data_root: str | Path, name: str) -> Path:
    if name.startswith("folder:"):
        path = Path(name[len("folder:"):])
        return path if path.is_absolute() else Path(data_root) / path
    if name not in READERS:
        raise ValueError(f"unknown dataset {name!r}: known are {', '.join(READERS)} "
                         "and folder:PATH")
    return Path(data_root) / READERS[name][1]


def build_reader(name: str, data_root: str | Path, split: str) -> SegReader:
    root = dataset_root(data_root, name)  # raises on an unknown name
    return (FolderReader if name.startswith("folder:") else READERS[name][0])(root, split)


# -------------------------------------------------------------------------------------- label space
class LabelSpace:
    """M1: the datasets' label spaces concatenated; global id = offset_d + local id, 255 -> IGNORE.

    With `label_map` (label_map.read_label_map's normalised dict, the --label-map ablation) the
    concatenated id then goes through a lookup table: merged classes share one id, dropped ones
    become IGNORE, ids stay dense 0..C'-1 in the order of each class's first member. `offsets`
    always index the concatenation before the map."""

    def __init__(self, names: list[str], classes: list[list[str]], label_map: dict | None = None):
        if len(set(names)) != len(names) or len(names) != len(classes):
            raise ValueError(f"dataset names must be unique and match the class lists, got {names}")
        self.names, self.classes = list(names), [list(c) for c in classes]
        self.num_classes_per_dataset = [len(c) for c in classes]
        self.offsets = [sum(self.num_classes_per_dataset[:d]) for d in range(len(names))]
        self.num_classes = sum(self.num_classes_per_dataset)
        self.class_names = [f"{n}:{c}" for n, cs in zip(names, classes) for c in cs]
        concat_dataset = [d for d, k in enumerate(self.num_classes_per_dataset) for _ in range(k)]
        self.class_dataset = torch.tensor(concat_dataset, dtype=torch.long)  # (C,)
        self.label_map, self.lut = label_map, None
        if label_map is not None:
            lut, members, self.class_names = resolve_label_map(self.names, self.classes, label_map)
            self.lut = torch.tensor(lut, dtype=torch.long)  # (C,) concatenated id -> id or IGNORE
            self.num_classes = len(members)
            # a merged class's dataset here is its first member's; `membership` has them all
            self.class_dataset = torch.tensor([concat_dataset[m[0]] for m in members],
                                              dtype=torch.long)
        # (C', D) bool: class c has a member in dataset d (one-hot rows without a map)
        ids = self.lut if self.lut is not None else torch.arange(len(concat_dataset))
        keep = ids != IGNORE
        self.membership = torch.zeros(self.num_classes, len(names), dtype=torch.bool)
        self.membership[ids[keep], torch.tensor(concat_dataset, dtype=torch.long)[keep]] = True

    @classmethod
    def from_readers(cls, readers: list[SegReader], label_map_file: str | Path | None = None
                     ) -> "LabelSpace":
        names, classes = [r.name for r in readers], [r.classes for r in readers]
        return cls(names, classes,
                   read_label_map(label_map_file, names, classes) if label_map_file else None)

    def to_global(self, label: np.ndarray | torch.Tensor, d: int) -> torch.Tensor:
        """(H, W) local ids 0..K_d-1 or 255 -> (H, W) int64 global ids or IGNORE."""
        # plain tensor, also from a tv_tensors.Mask
        t = torch.as_tensor(label).as_subclass(torch.Tensor)
        k = self.num_classes_per_dataset[d]
        bad = t[((t < 0) | (t >= k)) & (t != RAW_IGNORE)]
        if bad.numel():
            raise ValueError(f"{self.names[d]}: label value {int(bad[0])} outside 0..{k - 1} "
                             "and not 255")
        g = (t.long() + self.offsets[d]).masked_fill_(t == RAW_IGNORE, IGNORE)  # concatenated ids
        if self.lut is None:
            return g
        return self.lut[g.clamp(min=0)].masked_fill_(g == IGNORE, IGNORE)

    def state_dict(self) -> dict:
        sd = {"names": list(self.names), "classes": [list(c) for c in self.classes]}
        if self.label_map is not None:  # without a map: the keys of checkpoints before --label-map
            sd["label_map"] = self.label_map
        return sd

    @classmethod
    def from_state_dict(cls, d: dict) -> "LabelSpace":
        return cls(d["names"], d["classes"], d.get("label_map"))

    def __eq__(self, other) -> bool:
        return isinstance(other, LabelSpace) and self.state_dict() == other.state_dict()


# ------------------------------------------------------------------------------------- augmentation
def rescale_size(h: int, w: int, base_size: tuple[int, int], ratio: float = 1.0) -> tuple[int, int]:
    """MMSeg keep-ratio Resize: the largest (h', w') fitting inside base_size*ratio (either
    orientation)."""
    f = min(max(base_size) * ratio / max(h, w), min(base_size) * ratio / min(h, w))
    return int(h * f + 0.5), int(w * f + 0.5)


class RandomRescale(v2.Transform):
    """Keep-ratio rescale to base_size * r, r ~ U(scale_range) (M9); masks are resized
    nearest by v2."""

    def __init__(self, base_size: tuple[int, int], scale_range: tuple[float, float] = (0.5, 2.0)):
        super().__init__()
        self.base_size, self.scale_range = base_size, scale_range

    def make_params(self, flat_inputs):
        h, w = F.get_size(next(x for x in flat_inputs
                               if isinstance(x, (tv_tensors.Image, tv_tensors.Mask))))
        lo, hi = self.scale_range
        # torch RNG: seeded per DataLoader worker
        r = lo if lo == hi else torch.empty(()).uniform_(lo, hi).item()
        return {"size": list(rescale_size(h, w, self.base_size, r))}

    def transform(self, inpt, params):
        return self._call_kernel(F.resize, inpt, params["size"])


def train_transform(base_size: tuple[int, int] = (2048, 512),
                    crop_size: tuple[int, int] = (512, 512),
                    scale_range: tuple[float, float] = (0.5, 2.0)) -> v2.Compose:
    """M9 train pipeline on (Image uint8, Mask uint8); crop_size is (h, w). Colour ops leave the
    Mask alone."""
    return v2.Compose([
        RandomRescale(base_size, scale_range),
        v2.RandomCrop(crop_size, pad_if_needed=True,
                      fill={tv_tensors.Image: 0, tv_tensors.Mask: RAW_IGNORE}),
        v2.RandomHorizontalFlip(0.5),
        # MMSeg PhotoMetricDistortion: each op w.p. 0.5; brightness ~32/255, contrast and
        # saturation 0.5-1.5, hue +-18/180 of the circle (applied to the image only)
        *[v2.RandomApply([v2.ColorJitter(**{k: v})], p=0.5) for k, v in
          (("brightness", 0.125), ("contrast", 0.5), ("saturation", 0.5), ("hue", 0.1))],
        v2.ToDtype(torch.float32, scale=True),  # images only; the Mask stays uint8
        v2.Normalize(MEAN, STD),
    ])


class ImageOnly:
    """Applies a transform to the image and passes the label through (eval: label kept at full
    size)."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, image, mask):
        return self.transform(image), mask


def eval_transform(base_size: tuple[int, int] = (2048, 512)) -> ImageOnly:
    """M9 eval: the image is resized to fit base_size (keep ratio); the label stays at original
    size."""
    return ImageOnly(v2.Compose([RandomRescale(base_size, (1.0, 1.0)),
                                 v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)]))


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


def class_colours(num_classes: int) -> list[tuple[int, int, int]]:
    """Fixed, distinct colours per global class (train_pretrain --show-batch, mine.py)."""
    gen = torch.Generator().manual_seed(0)
    return [tuple(c) for c in torch.randint(40, 256, (num_classes, 3), generator=gen).tolist()]


def voc_palette() -> list[int]:
    """The 256-entry PASCAL VOC colour map (bit-interleaved), as PIL putpalette expects."""
    # channel k of colour i collects bits k, k+3, k+6 of i, most significant first
    return [sum(((i >> (3 * j + k)) & 1) << (7 - j) for j in range(8))
            for i in range(256) for k in range(3)]


# ------------------------------------------------------------------------------------ multi-dataset
class MultiDataset(Dataset):
    """The readers concatenated; items are (image (3,H,W) float, label (H,W) int64 global ids,
    dataset index)."""

    def __init__(self, readers: list[SegReader], transform=None,
                 label_map_file: str | Path | None = None):
        if not readers:
            raise ValueError("MultiDataset needs at least one reader")
        self.readers, self.label_space = readers, LabelSpace.from_readers(readers, label_map_file)
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
        image, mask = self.transform(tv_tensors.Image(F.pil_to_tensor(image)),
                                     tv_tensors.Mask(torch.from_numpy(label)))
        # global mapping after augmentation so crop padding (255) becomes IGNORE too
        return image.as_subclass(torch.Tensor), self.label_space.to_global(mask, d), d


def build_multidataset(names: list[str], data_root: str | Path, split: str, transform=None,
                       label_map_file: str | Path | None = None) -> MultiDataset:
    return MultiDataset([build_reader(n, data_root, split) for n in names], transform,
                        label_map_file)


class DatasetMixSampler(Sampler[int]):
    """Sampler over a MultiDataset: a permutation of all samples (weights None), or len(total)
    draws where dataset d is picked with probability w_d / sum(w); padded and sharded like
    DistributedSampler."""

    def __init__(self, sizes: list[int], weights: list[float] | None = None,
                 num_replicas: int | None = None, rank: int | None = None, seed: int = 0,
                 shuffle: bool = True):
        ddp = dist.is_available() and dist.is_initialized()
        self.num_replicas = (num_replicas if num_replicas is not None
                             else dist.get_world_size() if ddp else 1)
        self.rank = rank if rank is not None else dist.get_rank() if ddp else 0
        if weights is not None and (len(weights) != len(sizes) or min(weights) < 0
                                    or sum(weights) <= 0):
            raise ValueError(f"dataset weights {weights}: expected one number >= 0 per dataset "
                             f"{sizes}, not all 0")
        self.sizes, self.weights, self.seed, self.shuffle, self.epoch = (list(sizes), weights, seed,
                                                                         shuffle, 0)
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
            p = torch.cat([torch.full((s,), float(w[d]) / s, dtype=torch.float64)
                           for d, s in enumerate(self.sizes)])
            idx = torch.multinomial(p, n, replacement=True, generator=g).tolist()
        else:
            idx = torch.randperm(n, generator=g).tolist() if self.shuffle else list(range(n))
        # pad by repeating, like DistributedSampler
        idx = (idx * math.ceil(self.total_size / n))[: self.total_size]
        return iter(idx[self.rank: self.total_size: self.num_replicas])


# ---------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    inf = sub.add_parser("info", help="classes, images per split and offsets of a dataset list")
    inf.add_argument("--datasets", nargs="+", required=True)
    inf.add_argument("--data-root", default="data/toy")
    inf.add_argument("--names", action="store_true",
                     help="also list every global class id and name")
    inf.add_argument("--label-map", default=None, metavar="FILE",
                     help="merge / drop classes (M1 ablation)")
    args = ap.parse_args(argv)
    readers = {s: [build_reader(n, args.data_root, s) for n in args.datasets]
               for s in ("train", "val")}
    space = LabelSpace.from_readers(readers["train"], args.label_map)
    print(f"{'dataset':<12} {'classes':>7} {'offset':>6} {'train':>7} {'val':>6}  root")
    for d, (tr, va) in enumerate(zip(readers["train"], readers["val"])):
        print(f"{tr.name:<12} {len(tr.classes):>7} {space.offsets[d]:>6} {len(tr):>7} "
              f"{len(va):>6}  {tr.root}")
    print(f"total classes C = {space.num_classes}"
          + (f" after {args.label_map}" if args.label_map else ""))
    if args.names:
        for c, n in enumerate(space.class_names):
            print(f"{c:>5} {n}")


if __name__ == "__main__":
    from utils import run_cli  # one clear line, no traceback

    run_cli(main)
