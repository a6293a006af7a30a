"""toy.py: toy label spaces disagree like the real ones; make_toy and its CLI write deterministic
files."""
import subprocess
import sys
from pathlib import Path

import datasets as D
import toy as T


def test_toy_label_spaces_disagree_like_real_ones():
    ade, coco, voc = T._raw_lut("ade20k"), T._raw_lut("coco_stuff"), T._raw_lut("voc")
    k = T.KINDS.index
    assert (ade[k("cat")] == ade[k("dog")] == ade[k("bird")]
            == D.ADE20K_CLASSES.index("animal") + 1)  # merged
    assert len({coco[k("cat")], coco[k("dog")], coco[k("bird")]}) == 3  # split
    assert (coco[k("wall_brick")] != coco[k("wall_plain")]
            and ade[k("wall_brick")] == ade[k("wall_plain")])
    assert (voc[k("sky")] == 0 and ade[k("clutter")] == 0
            and coco[k("clutter")] != 255)  # background / other
    for kind in ("pole", "sign", "tlight"):  # Cityscapes-only categories
        assert voc[k(kind)] == 0 and ade[k(kind)] == 0 and coco[k(kind)] == 255
        assert all(kind not in cfg["things"] for name, cfg in T._TOY.items()
                   if name != "cityscapes")


def test_make_toy_is_deterministic(tmp_path):
    files = []
    for run, seed in (("a", 0), ("b", 0), ("c", 1)):
        root = T.make_toy(tmp_path / run, n_train=2, n_val=1, seed=seed, size=64)
        files.append({p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*"))
                      if p.is_file()})
    assert files[0] == files[1] and files[0] != files[2]
    assert files[0].keys() == files[2].keys()


def test_make_toy_cli_writes_what_make_toy_writes(tmp_path):
    res = subprocess.run([sys.executable, "toy.py", "make-toy", "--root", str(tmp_path / "cli"),
                          "--n-train", "2", "--n-val", "1", "--seed", "3", "--size", "64",
                          "--datasets", "voc", "cityscapes"],
                         cwd=Path(T.__file__).parent, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    root = T.make_toy(tmp_path / "api", n_train=2, n_val=1, seed=3, size=64,
                      datasets=("voc", "cityscapes"))
    cli, api = ({p.relative_to(r): p.read_bytes() for p in sorted(r.rglob("*")) if p.is_file()}
                for r in (tmp_path / "cli", root))
    assert cli == api and len(api) > 0
