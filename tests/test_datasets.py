"""datasets.py: readers on toy and hand-made layouts, the M1 label space, augmentation, sampling,
errors."""
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import datasets as D
from conftest import TOY_TRAIN, TOY_VAL

NAMES = ["voc", "ade20k", "coco_stuff", "cityscapes"]
PUBLISHED_K = {"voc": 21, "ade20k": 150, "coco_stuff": 171, "cityscapes": 19}
# cityscapesScripts labels.py, written out independently of datasets.py: labelId -> trainId
CS_TRAIN_ID = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
               25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}


def png(path: Path, arr, palette: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(np.asarray(arr, np.uint8), "P" if palette else "L")
    if palette:
        img.putpalette(D.voc_palette())
    img.save(path)
    return path


def rgb(path: Path, h: int, w: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def voc_layout(root: Path, labels: dict, split: str = "train") -> Path:
    base = root / "VOCdevkit" / "VOC2012"
    for i, lbl in labels.items():
        rgb(base / "JPEGImages" / f"{i}.jpg", *np.shape(lbl))
        png(base / "SegmentationClass" / f"{i}.png", lbl, palette=True)
    (base / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
    (base / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(labels) + "\n")
    return base


# ------------------------------------------------------------------------------------ toy layouts
@pytest.mark.parametrize("name", NAMES)
def test_toy_layouts_read_by_real_readers(toy_root, name):
    for split, n in (("train", TOY_TRAIN), ("val", TOY_VAL)):
        r = D.build_reader(name, toy_root, split)
        k = PUBLISHED_K[name]
        assert r.name == name and len(r) == n and len(r.classes) == k and len(set(r.classes)) == k
        for i in range(n):
            img, lbl = r[i]
            assert (img.mode == "RGB" and lbl.dtype == np.uint8
                    and lbl.shape == (img.height, img.width))
            assert all(v < k or v == 255 for v in np.unique(lbl).tolist())
            if name == "cityscapes":
                assert img.width == 2 * img.height


def test_toy_files_follow_real_layouts(toy_root):
    voc = toy_root / "VOCdevkit" / "VOC2012"
    ids = (voc / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    assert len(ids) == TOY_TRAIN and (voc / "JPEGImages" / f"{ids[0]}.jpg").is_file()
    assert Image.open(voc / "SegmentationClass" / f"{ids[0]}.png").mode == "P"
    ade = sorted((toy_root / "ADEChallengeData2016" / "annotations" / "validation")
                 .glob("ADE_val_*.png"))
    assert len(ade) == TOY_VAL and Image.open(ade[0]).mode == "L"
    coco = sorted((toy_root / "coco_stuff164k" / "annotations" / "train2017")
                  .glob("*_labelTrainIds.png"))
    assert len(coco) == TOY_TRAIN
    gt = toy_root / "cityscapes" / "gtFine"
    assert len(list(gt.glob("train/*/*_gtFine_labelIds.png"))) == TOY_TRAIN
    assert len(list(gt.glob("train/*/*_gtFine_labelTrainIds.png"))) == TOY_TRAIN
    assert len(list(gt.glob("val/*/*_gtFine_labelIds.png"))) == TOY_VAL
    assert not list(gt.glob("val/*/*_labelTrainIds.png"))


def test_toy_voc_ignore_bands(toy_root):
    r = D.build_reader("voc", toy_root, "val")
    ds = D.MultiDataset([r])
    n_band, n_touch = 0, 0
    for i in range(3):
        raw = np.array(Image.open(r.files[i][1]))  # palette indices, read naively
        y = ds[i][1]
        h, w = raw.shape
        for py in range(h):
            for px in range(w):
                v = int(raw[py, px])
                assert int(y[py, px]) == (-1 if v == 255 else v)
                if v == 255:  # bands are thin: a labelled pixel within 3 px; most touch an object
                    n_band += 1
                    win = raw[max(py - 3, 0): py + 4, max(px - 3, 0): px + 4]
                    assert (win < 255).any()
                    n_touch += bool(((win > 0) & (win < 255)).any())
    assert n_band > 0 and n_touch > n_band / 2


def test_toy_ade_zero_is_ignored_and_shifted(toy_root):
    readers = [D.build_reader(n, toy_root, "train") for n in ("voc", "ade20k")]
    ds = D.MultiDataset(readers)
    offset, seen_zero = 21, False
    for i in range(4):
        raw = np.array(Image.open(readers[1].files[i][1]))
        img, y, d = ds[TOY_TRAIN + i]
        assert d == 1 and y.dtype == torch.int64
        for py in range(raw.shape[0]):
            for px in range(raw.shape[1]):
                v = int(raw[py, px])
                seen_zero |= v == 0
                assert int(y[py, px]) == (-1 if v == 0 else offset + v - 1)
    assert seen_zero


@pytest.mark.parametrize("split", ["train", "val"])
def test_toy_cityscapes_label_ids_to_train_ids(toy_root, split):
    r = D.build_reader("cityscapes", toy_root, split)
    suffix = "_gtFine_labelTrainIds.png" if split == "train" else "_gtFine_labelIds.png"
    assert all(lbl.name.endswith(suffix) for _, lbl in r.files)
    for i in range(3):
        _, lbl = r[i]
        ids_file = str(r.files[i][1]).replace("_labelTrainIds.png", "_labelIds.png")
        ids = np.array(Image.open(ids_file))
        expect = np.array([[CS_TRAIN_ID.get(int(v), 255) for v in row] for row in ids], np.uint8)
        np.testing.assert_array_equal(lbl, expect)
        if split == "train":
            np.testing.assert_array_equal(lbl, np.array(Image.open(r.files[i][1])))


# ----------------------------------------------------------------------- hand-made known pixels
def test_known_pixels_every_reader(tmp_path):
    voc = voc_layout(tmp_path, {"2012_000001": [[0, 15, 255], [20, 7, 0]]})
    ade = tmp_path / "ADEChallengeData2016"
    rgb(ade / "images" / "training" / "a.jpg", 2, 3)
    png(ade / "annotations" / "training" / "a.png", [[0, 1, 150], [13, 255, 2]])
    cs = tmp_path / "cityscapes"
    rgb(cs / "leftImg8bit" / "train" / "ulm" / "ulm_000000_000001_leftImg8bit.png", 2, 3)
    png(cs / "gtFine" / "train" / "ulm" / "ulm_000000_000001_gtFine_labelIds.png",
        [[7, 26, 0], [33, 24, 23]])
    coco = tmp_path / "coco_stuff164k"
    rgb(coco / "images" / "train2017" / "000000000001.jpg", 1, 3)
    png(coco / "annotations" / "train2017" / "000000000001_labelTrainIds.png", [[0, 170, 255]])
    mine = tmp_path / "mine"
    (mine / "classes.txt").parent.mkdir()
    (mine / "classes.txt").write_text("road\ncar\n\nsky\n")
    rgb(mine / "images" / "train" / "x.png", 1, 3)
    png(mine / "masks" / "train" / "x.png", [[2, 0, 255]])

    names = ["voc", "ade20k", "cityscapes", "coco_stuff", "folder:mine"]
    readers = [D.build_reader(n, tmp_path, "train") for n in names]
    assert readers[4].name == "mine" and readers[4].classes == ["road", "car", "sky"]
    assert D.dataset_root(tmp_path, f"folder:{mine}") == mine  # absolute path
    space = D.LabelSpace.from_readers(readers)
    # hand-worked: offsets 0, 21, 171, 190, 361; ADE 0 -> ignore, v -> v-1;
    # Cityscapes ids -> train ids
    assert space.offsets == [0, 21, 171, 190, 361] and space.num_classes == 364
    expected = [[[0, 15, -1], [20, 7, 0]],
                [[-1, 21, 170], [33, -1, 22]],
                [[171, 184, -1], [189, 182, 181]],
                [[190, 360, -1]],
                [[363, 361, -1]]]
    for d, r in enumerate(readers):
        assert space.to_global(r[0][1], d).tolist() == expected[d]
    assert space.class_names[184] == "cityscapes:car" and space.class_names[363] == "mine:sky"


def test_voc_train_uses_sbd_aug_when_present(tmp_path):
    base = voc_layout(tmp_path, {"a": [[1, 1]]})
    assert (D.build_reader("voc", tmp_path, "train").files[0][1]
            == base / "SegmentationClass" / "a.png")
    rgb(base / "JPEGImages" / "b.jpg", 1, 2)
    png(base / "SegmentationClassAug" / "a.png", [[2, 2]])
    png(base / "SegmentationClassAug" / "b.png", [[3, 0]])
    (base / "ImageSets" / "Segmentation" / "trainaug.txt").write_text("a\nb\n")
    r = D.build_reader("voc", tmp_path, "train")
    assert len(r) == 2 and r[0][1].tolist() == [[2, 2]] and r[1][1].tolist() == [[3, 0]]


# ----------------------------------------------------------------------------------- label space
def test_label_space_concatenation():
    names = ["voc", "ade20k", "cityscapes"]
    classes = [D.VOC_CLASSES, D.ADE20K_CLASSES, D.CITYSCAPES_CLASSES]
    space = D.LabelSpace(names, classes)
    offsets, total, glob_names, glob_ds = [], 0, [], []
    for d, cs in enumerate(classes):
        offsets.append(total)
        total += len(cs)
        for c in cs:
            glob_names.append(f"{names[d]}:{c}")
            glob_ds.append(d)
    assert space.offsets == offsets and space.num_classes == total
    assert space.num_classes_per_dataset == [21, 150, 19]
    assert space.class_names == glob_names and space.class_dataset.tolist() == glob_ds
    assert space.class_dataset.dtype == torch.int64
    lbl = np.random.default_rng(0).integers(0, 19, (5, 7)).astype(np.uint8)
    lbl[0, :3] = 255
    out = space.to_global(torch.from_numpy(lbl), 2)
    assert out.dtype == torch.int64
    for y in range(5):
        for x in range(7):
            assert out[y, x] == (D.IGNORE if lbl[y, x] == 255 else offsets[2] + lbl[y, x])
    with pytest.raises(ValueError, match="cityscapes.*19"):
        space.to_global(np.array([[19]], np.uint8), 2)
    again = D.LabelSpace.from_state_dict(space.state_dict())
    assert again == space and again.class_names == space.class_names
    with pytest.raises(ValueError, match="unique"):
        D.LabelSpace(["voc", "voc"], [D.VOC_CLASSES, D.VOC_CLASSES])


# ---------------------------------------------------------------------------------- augmentation
def test_rescale_size_hand_worked():
    # 500x375 VOC image, base (2048, 512): factor min(2048/500, 512/375) = 1.3653 -> 683 x 512
    assert D.rescale_size(375, 500, (2048, 512)) == (512, 683)
    assert D.rescale_size(375, 500, (2048, 512), 0.5) == (256, 341)  # 500*0.68267 = 341.3
    assert D.rescale_size(1024, 2048, (2048, 1024)) == (1024, 2048)
    # portrait: same factor on long/short edges
    assert D.rescale_size(500, 375, (2048, 512)) == (683, 512)


def test_train_transform_nearest_labels_and_ignore_padding():
    from torchvision import tv_tensors
    torch.manual_seed(0)
    h, w = 30, 40
    image = tv_tensors.Image(torch.randint(0, 256, (3, h, w), dtype=torch.uint8))
    lbl = torch.tensor([[1, 5, 9][(x // 3 + y // 4) % 3] for y in range(h) for x in range(w)],
                       dtype=torch.uint8)
    mask = tv_tensors.Mask(lbl.view(h, w))
    t = D.train_transform(base_size=(w, h), crop_size=(64, 64), scale_range=(1.0, 1.0))
    img, m = t(image, mask)
    assert img.shape == (3, 64, 64) and img.dtype == torch.float32 and m.dtype == torch.uint8
    assert int((m == 255).sum()) == 64 * 64 - h * w  # the whole image fits; the rest is padding
    t = D.train_transform(base_size=(w, h), crop_size=(24, 24), scale_range=(0.5, 2.0))
    for _ in range(20):
        img, m = t(image, mask)
        assert m.shape == (24, 24) and set(m.unique().tolist()) <= {1, 5, 9, 255}  # nearest only


def test_eval_transform_resizes_image_only():
    from torchvision import tv_tensors
    image = tv_tensors.Image(torch.zeros(3, 375, 500, dtype=torch.uint8))
    mask = tv_tensors.Mask(torch.zeros(375, 500, dtype=torch.uint8))
    img, m = D.eval_transform((2048, 512))(image, mask)
    assert img.shape == (3, 512, 683) and m.shape == (375, 500)
    assert torch.allclose(img[:, 0, 0], torch.tensor([-m_ / s for m_, s in zip(D.MEAN, D.STD)]),
                          atol=1e-5)


def test_denormalize_inverts_normalisation():
    x = torch.rand(2, 3, 4, 5)
    mean, std = torch.tensor(D.MEAN).view(3, 1, 1), torch.tensor(D.STD).view(3, 1, 1)
    assert torch.allclose(D.denormalize((x - mean) / std), x, atol=1e-6)


# -------------------------------------------------------------------------------- loading/sampling
def _loader(ds, seed, workers=0):
    sampler = D.DatasetMixSampler(ds.sizes, seed=seed)
    return DataLoader(ds, batch_size=8, sampler=sampler, num_workers=workers,
                      generator=torch.Generator().manual_seed(seed))


def test_training_batches_mix_datasets_with_valid_global_ids(toy_root):
    ds = D.build_multidataset(["voc", "ade20k"], toy_root, "train",
                              D.train_transform(base_size=(128, 96), crop_size=(64, 64)))
    torch.manual_seed(0)
    space = ds.label_space
    for img, y, d in _loader(ds, seed=0):
        assert img.shape == (8, 3, 64, 64) and y.shape == (8, 64, 64) and y.dtype == torch.int64
        assert len(set(d.tolist())) >= 2
        for b in range(8):
            lo, hi = space.offsets[d[b]], space.offsets[d[b]] + space.num_classes_per_dataset[d[b]]
            assert all(v == D.IGNORE or lo <= v < hi for v in y[b].unique().tolist())


@pytest.mark.parametrize("workers", [0, 2])
def test_same_seed_same_samples(toy_root, workers):
    ds = D.build_multidataset(["voc", "cityscapes"], toy_root, "train",
                              D.train_transform(base_size=(128, 96), crop_size=(48, 48)))
    runs = []
    for _ in range(2):
        # transforms draw from torch's RNG (per worker: seeded from the loader generator)
        torch.manual_seed(0)
        runs.append(list(_loader(ds, seed=3, workers=workers)))
    for (a, ya, da), (b, yb, db) in zip(*runs):
        assert torch.equal(a, b) and torch.equal(ya, yb) and torch.equal(da, db)
    torch.manual_seed(1)
    other = next(iter(_loader(ds, seed=4, workers=workers)))
    assert not torch.equal(other[0], runs[0][0][0])  # the seed matters


def test_sampler_permutation_epochs_and_ddp_shards():
    sizes = [7, 3]
    order = list(D.DatasetMixSampler(sizes, seed=5))
    assert sorted(order) == list(range(10)) and order == list(D.DatasetMixSampler(sizes, seed=5))
    s = D.DatasetMixSampler(sizes, seed=5)
    s.set_epoch(1)
    assert sorted(s) == list(range(10)) and list(s) != order
    assert list(D.DatasetMixSampler(sizes, shuffle=False)) == list(range(10))
    for weights in (None, [1.0, 1.0]):
        shards = [list(D.DatasetMixSampler(sizes, weights, num_replicas=3, rank=r, seed=1))
                  for r in range(3)]
        assert [len(x) for x in shards] == [4, 4, 4]  # ceil(10 / 3), padded like DistributedSampler
        if weights is None:
            assert set().union(*shards) == set(range(10))
        full = list(D.DatasetMixSampler(sizes, weights, seed=1))
        assert ([x for i in range(4) for x in (shards[0][i], shards[1][i], shards[2][i])][:10]
                == full)


def test_weighted_sampling_follows_weights():
    sizes, weights = [1000, 3000], [3.0, 1.0]
    idx = list(D.DatasetMixSampler(sizes, weights, seed=0))
    assert len(idx) == 4000
    frac0 = sum(i < 1000 for i in idx) / len(idx)
    assert abs(frac0 - 0.75) < 0.03  # 3:1 although the second set is 3x bigger
    # by size
    assert abs(sum(i < 1000 for i in D.DatasetMixSampler(sizes, seed=0)) / 4000 - 0.25) < 1e-9
    with pytest.raises(ValueError, match="weights"):
        D.DatasetMixSampler(sizes, [1.0])


# ------------------------------------------------------------------------------------- bad input
def test_unknown_dataset_and_split(tmp_path):
    with pytest.raises(ValueError,
                       match="unknown dataset 'pascal'.*voc, ade20k, cityscapes, coco_stuff"):
        D.build_reader("pascal", tmp_path, "train")
    voc_layout(tmp_path, {"a": [[0]]})
    with pytest.raises(ValueError, match="split must be 'train', 'val' or 'test'"):
        D.build_reader("voc", tmp_path, "testing")
    with pytest.raises(FileNotFoundError, match="test.txt not found"):  # a set without a test split
        D.build_reader("voc", tmp_path, "test")


def test_missing_root_and_split_file(tmp_path):
    with pytest.raises(FileNotFoundError,
                       match=re.escape(str(tmp_path / "VOCdevkit" / "VOC2012" / "JPEGImages"))):
        D.build_reader("voc", tmp_path, "train")
    with pytest.raises(FileNotFoundError, match="ADEChallengeData2016"):
        D.build_reader("ade20k", tmp_path, "val")
    with pytest.raises(FileNotFoundError, match="cityscapes"):
        D.build_reader("cityscapes", tmp_path, "val")
    voc_layout(tmp_path, {"a": [[0]]}, split="train")
    with pytest.raises(FileNotFoundError, match=re.escape("ImageSets/Segmentation/val.txt")):
        D.build_reader("voc", tmp_path, "val")
    with pytest.raises(FileNotFoundError, match="classes.txt"):
        D.build_reader("folder:nothing", tmp_path, "train")


def test_bad_label_value_names_file_and_value(tmp_path):
    base = voc_layout(tmp_path, {"ok": [[0, 1]], "bad": [[0, 30]]})
    r = D.build_reader("voc", tmp_path, "train")
    r[0]
    with pytest.raises(ValueError,
                       match=re.escape(str(base / "SegmentationClass" / "bad.png")) + ".*value 30"):
        r[1]
    ade = tmp_path / "ADEChallengeData2016"
    rgb(ade / "images" / "validation" / "a.jpg", 1, 2)
    png(ade / "annotations" / "validation" / "a.png", [[151, 1]])
    with pytest.raises(ValueError, match="a.png.*value 151"):
        D.build_reader("ade20k", tmp_path, "val")[0]


def test_size_mismatch_unreadable_image_missing_label_empty_split(tmp_path):
    base = voc_layout(tmp_path, {"a": [[0, 1]], "b": [[0, 1]], "c": [[0, 1]]})
    rgb(base / "JPEGImages" / "a.jpg", 2, 2)  # image 2x2, label 1x2
    (base / "JPEGImages" / "b.jpg").write_bytes(b"not a jpeg")
    (base / "SegmentationClass" / "c.png").unlink()
    r = D.build_reader("voc", tmp_path, "train")
    with pytest.raises(ValueError,
                       match=re.escape(str(base / "SegmentationClass" / "a.png")) + ".*size"):
        r[0]
    with pytest.raises(ValueError,
                       match=re.escape(str(base / "JPEGImages" / "b.jpg")) + ".*unreadable"):
        r[1]
    with pytest.raises(FileNotFoundError,
                       match=re.escape(str(base / "SegmentationClass" / "c.png"))):
        r[2]
    coco = tmp_path / "coco_stuff164k"
    rgb(coco / "images" / "val2017" / "1.jpg", 1, 1)
    (coco / "annotations" / "val2017").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="1_labelTrainIds.png"):
        D.build_reader("coco_stuff", tmp_path, "val")
    mine = tmp_path / "mine"
    (mine / "images" / "train").mkdir(parents=True)
    (mine / "masks" / "train").mkdir(parents=True)
    (mine / "classes.txt").write_text("a\nb\n")
    with pytest.raises(ValueError, match="empty split.*mine"):
        D.build_reader("folder:mine", tmp_path, "train")


def test_info_cli(toy_root, capsys):
    D.main(["info", "--datasets", "voc", "ade20k", "--data-root", str(toy_root)])
    out = capsys.readouterr().out.splitlines()
    assert out[1].split()[:5] == ["voc", "21", "0", str(TOY_TRAIN), str(TOY_VAL)]
    assert out[2].split()[:5] == ["ade20k", "150", "21", str(TOY_TRAIN), str(TOY_VAL)]
    assert out[3] == "total classes C = 171"
    res = subprocess.run([sys.executable, "datasets.py", "info", "--datasets", "pascal",
                          "--data-root", str(toy_root)],
                         cwd=Path(D.__file__).parent, capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.startswith("error: unknown dataset 'pascal'")
    assert len(res.stderr.strip().splitlines()) == 1


def test_voc_palette_matches_the_devkit_colours() -> None:
    pal = D.voc_palette()
    colour = {i: pal[3 * i: 3 * i + 3] for i in range(256)}
    assert len(pal) == 768
    # PASCAL VOC devkit colours: background, aeroplane, bicycle, person (15), tvmonitor (20)
    assert colour[0] == [0, 0, 0] and colour[1] == [128, 0, 0] and colour[2] == [0, 128, 0]
    assert colour[15] == [192, 128, 128] and colour[20] == [0, 64, 128]
