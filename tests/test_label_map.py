"""--label-map (METHOD.md M1 ablation): parsing, global ids, to_global, CSC and multi-head with
merged classes against naive references, bad files, and train_pretrain.py with a map (run and
resume)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_losses import assert_same, naive_csc, naive_soft_ce, setup, unit
from test_train_pretrain import TINY, assert_resume_equals, one_error_line, run

import losses
from datasets import ADE20K_CLASSES, IGNORE, RAW_IGNORE, VOC_CLASSES, LabelSpace
from label_map import read_label_map

ROOT = Path(__file__).resolve().parents[1]

NAMES = ["a", "b", "c"]
CLASSES = [["bg", "person", "car"], ["wall", "person", "dog", "car"], ["person", "sky"]]
# the hand-worked case: lines in any order and direction, a repeated line, a chain and an ignore
MAP = """# people and cars of all three sets are one class each
b:person = a:person
c:person = b:person      # chained over two lines: c -> b -> a

a:car = b:car
a:car = b:car            # the same line again: harmless
a:bg = ignore
"""
# concatenated: a:bg 0, a:person 1, a:car 2, b:wall 3, b:person 4, b:dog 5, b:car 6, c:person 7,
# c:sky 8 -> new ids in the order of each class's first member, a:bg dropped
WANT_LUT = [IGNORE, 0, 1, 2, 0, 3, 1, 0, 4]
WANT_NAMES = ["a:person=b:person=c:person", "a:car=b:car", "b:wall", "b:dog", "c:sky"]
WANT_MEMBERSHIP = [[1, 1, 1], [1, 1, 0], [0, 1, 0], [0, 1, 0], [0, 0, 1]]


def space_from(tmp_path: Path, text: str, name: str = "map.txt") -> LabelSpace:
    f = tmp_path / name
    f.write_text(text)
    return LabelSpace(NAMES, CLASSES, read_label_map(f, NAMES, CLASSES))


def test_hand_worked_global_ids(tmp_path: Path) -> None:
    space = space_from(tmp_path, MAP)
    assert space.num_classes == 5 and space.class_names == WANT_NAMES
    assert space.lut.tolist() == WANT_LUT
    assert space.membership.int().tolist() == WANT_MEMBERSHIP
    assert space.class_dataset.tolist() == [0, 0, 1, 1, 2]  # the first member's dataset
    assert space.label_map == {"merge": [["a:person", "b:person", "c:person"], ["a:car", "b:car"]],
                               "ignore": ["a:bg"]}
    assert space.offsets == [0, 3, 7]  # offsets index the concatenation before the map
    # the same meaning written as one chain per line, the other way round: the same label space
    same = space_from(tmp_path, "a:bg = ignore\nb:car = a:car\na:person = c:person = b:person\n",
                      "same.txt")
    assert same == space and same.state_dict() == space.state_dict()
    # the checkpoint form round-trips; without a map the state_dict keeps its old keys
    again = LabelSpace.from_state_dict(space.state_dict())
    assert again == space and again.lut.tolist() == WANT_LUT
    plain = LabelSpace(NAMES, CLASSES)
    assert plain.state_dict().keys() == {"names", "classes"} and plain != space
    assert plain.membership.int().tolist() == F.one_hot(plain.class_dataset, 3).tolist()


def test_to_global_matches_dict_lookup(tmp_path: Path) -> None:
    space = space_from(tmp_path, MAP)
    # the reference: a dict from each dataset:class name to the id whose name lists it
    lookup = {m: j for j, n in enumerate(space.class_names) for m in n.split("=")}
    rng = np.random.default_rng(0)
    for d, cs in enumerate(CLASSES):
        lbl = rng.integers(0, len(cs), (6, 7)).astype(np.uint8)
        lbl[0, :2] = RAW_IGNORE
        out = space.to_global(torch.from_numpy(lbl), d)
        assert out.dtype == torch.int64
        for (y, x), v in np.ndenumerate(lbl):
            want = IGNORE if v == RAW_IGNORE else lookup.get(f"{NAMES[d]}:{cs[v]}", IGNORE)
            assert out[y, x] == want, (d, y, x)
    with pytest.raises(ValueError, match="outside 0..1"):
        space.to_global(np.array([[2]], np.uint8), 2)


@pytest.mark.parametrize("text, line, fragment", [
    ("a:person\n", 1, "expected 'dataset:class = dataset:class'"),
    ("# comment\n\na:person =   \n", 3, "expected 'dataset:class = dataset:class'"),
    ("a:person = = b:person\n", 1, "expected 'dataset:class = dataset:class'"),
    ("person = b:person\n", 1, "expected dataset:class, got 'person'"),
    ("ignore = a:person\n", 1, "'ignore' can only end a line"),
    ("a:person = ignore = b:person\n", 1, "'ignore' can only end a line"),
    ("x:person = a:person\n", 1, "unknown dataset 'x'"),
    ("a:car = b:car\na:persn = b:person\n", 2, "unknown class 'a:persn'"),
    ("a:person = b:person\na:person = c:person\n", 2, "mapped twice: to b:person on line 1"),
    ("a:bg = ignore\n\na:bg = b:wall\n", 3, "mapped twice: to ignore on line 1"),
    ("a:person = b:person\nb:person = a:person\n", 2, "cycle: b:person -> a:person -> b:person"),
    ("a:person = b:person\nb:person = c:person\nc:person = a:person\n", 3, "cycle"),
    ("a:car = b:car = a:car\n", 1, "cycle"),
    ("a:person = a:person\n", 1, "a:person is mapped to itself"),
])
def test_bad_file_one_line_naming_file_and_line(tmp_path: Path, text: str, line: int,
                                                fragment: str) -> None:
    f = tmp_path / "bad.txt"
    f.write_text(text)
    with pytest.raises(ValueError) as e:
        read_label_map(f, NAMES, CLASSES)
    msg = e.value.args[0]
    assert msg.startswith(f"{f}:{line}: ") and fragment in msg and "\n" not in msg, msg


def test_empty_or_missing_file(tmp_path: Path) -> None:
    f = tmp_path / "empty.txt"
    f.write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="no mapping line"):
        read_label_map(f, NAMES, CLASSES)
    with pytest.raises(FileNotFoundError, match="nowhere.txt"):
        read_label_map(tmp_path / "nowhere.txt", NAMES, CLASSES)


def test_toy_study_map_parses() -> None:
    from reproduce import ROWS

    toy_map = ROOT / "studies" / "toy_label_map.txt"
    assert ROWS["mdp_label_map"] == [(["voc", "ade20k"], ["--label-map", str(toy_map)])]
    space = LabelSpace(["voc", "ade20k"], [VOC_CLASSES, ADE20K_CLASSES],
                       read_label_map(toy_map, ["voc", "ade20k"], [VOC_CLASSES, ADE20K_CLASSES]))
    assert "voc:person=ade20k:person" in space.class_names and space.num_classes == 152


def test_pretrain_eval_own_task_with_merged_and_dropped_classes(tmp_path: Path) -> None:
    """A --label-map checkpoint on its own task: each of the dataset's classes is scored by the
    prototype of its merged class; a dropped class is never predicted (checked per pixel)."""
    from pretrain_eval import own_task_classifier
    from mdp import MDPNet

    f = tmp_path / "map.txt"
    f.write_text("b:person = a:person\nb:dog = ignore\n")
    space = LabelSpace(NAMES, CLASSES, read_label_map(f, NAMES, CLASSES))
    gid = {n: k for k, n in enumerate(space.class_names)}
    torch.manual_seed(0)
    model = MDPNet("resnet14", 16, 8).eval()
    protos = F.normalize(torch.randn(space.num_classes, 8), dim=1)
    count = torch.ones(space.num_classes, dtype=torch.long)
    count[gid["b:car"]] = 0  # never filled
    state = {"args": {"datasets": NAMES, "method": "mdp", "arch": "resnet14", "output_stride": 16,
                      "embed_dim": 8}, "label_space": space.state_dict(),
             "model": model.state_dict(), "bank": {"prototypes": protos, "count": count}}
    # b: wall, person (merged into a's), dog (dropped), car
    clf, _ = own_task_classifier(state, "b")
    wall, person = gid["b:wall"], gid["a:person=b:person"]
    assert clf.classes.tolist() == [wall, person, IGNORE, gid["b:car"]]
    x = torch.randn(1, 3, 32, 32)
    z = model(x)[0]  # (D, 2, 2)
    pred = clf.eval()(x)["out"]
    assert torch.isfinite(pred).all()
    scores = F.interpolate(torch.einsum("dhw,cd->chw", z, protos)[None], size=(32, 32),
                           mode="bilinear", align_corners=False)[0]  # (C, 32, 32)
    for i in range(32):
        for j in range(32):  # naive: the better of b's two classes that can be chosen
            best = 0 if scores[wall, i, j] >= scores[person, i, j] else 1
            assert pred[0, :, i, j].argmax().item() == best


# ------------------------------------------------------------------- losses with merged classes
def datasets_of(membership: torch.Tensor) -> list[set[int]]:
    return [{d for d in range(membership.shape[1]) if membership[c, d]}
            for c in range(membership.shape[0])]


def naive_csc_merged(z, protos, filled, labels, membership, tau, topk):
    """M5 with merges: a candidate shares no dataset with the pixel's label."""
    ds = datasets_of(membership)
    return naive_csc(z, protos, filled, labels, None, tau, topk,
                     other=lambda c, y: not ds[c] & ds[y])


def naive_multihead_merged(logits, y_a, y_b, w, membership):
    """Multi-head with merges: a term's CE averaged over the heads (datasets) its class is in."""
    ds = datasets_of(membership)
    return naive_soft_ce(logits, y_a, y_b, w, heads=lambda y: [
        [c for c in range(logits.shape[1]) if d in ds[c]] for d in sorted(ds[y])])


# 7 classes over 3 datasets: class 0 merged over all three, class 3 over datasets 1 and 2
MEMBERSHIP = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 0, 0], [0, 1, 1], [0, 1, 0], [0, 0, 1],
                           [0, 1, 0]], dtype=torch.bool)


def test_csc_with_merges_matches_naive() -> None:
    z, protos, filled, labels, _, _ = setup(n=16, seed=3)
    labels[:3] = torch.tensor([0, 3, 1])  # a class merged over all datasets, over two, unmerged
    for topk in (1, 3, 10):
        assert_same(lambda z_, p_: losses.csc_loss(z_, p_, filled, labels, MEMBERSHIP, 0.07, topk),
                    lambda z_, p_: naive_csc_merged(z_, p_, filled, labels, MEMBERSHIP, 0.07, topk),
                    z, protos)
    # hand-worked: a pixel of the class merged over datasets 1 and 2 has one candidate, p1 or p2
    # (dataset 0 only), whichever is more similar; here p1
    z1 = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)
    protos = unit(7, 3, seed=1)
    protos[1] = torch.tensor([0.6, 0.8, 0.0], dtype=torch.float64)
    protos[2] = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    logp = (z1 @ protos.T / 0.5).log_softmax(1)[0]
    got = losses.csc_loss(z1, protos, torch.ones(7, dtype=torch.bool), torch.tensor([3]),
                          MEMBERSHIP, 0.5, 1)
    torch.testing.assert_close(got, -logp[1])


def test_losses_without_merges_are_bit_identical_given_membership() -> None:
    # the one-hot membership of a plain concatenation gives the (C,) class_dataset path bit for bit
    z, protos, filled, labels, y_b, w = setup(n=16, seed=4)
    cd = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    onehot = F.one_hot(cd, 3).bool()
    logits = torch.randn(16, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) * 3
    for fn, x in ((lambda m, t: losses.csc_loss(t, protos, filled, labels, m, 0.07, 3), z),
                  (lambda m, t: losses.multihead_loss(t, labels, y_b, w, m), logits)):
        res = []
        for m in (cd, onehot):
            t = x.clone().requires_grad_(True)
            loss = fn(m, t)
            loss.backward()
            res.append((loss.detach(), t.grad))
        assert torch.equal(res[0][0], res[1][0]) and torch.equal(res[0][1], res[1][1])


def test_multihead_with_merges_matches_naive() -> None:
    _, _, _, y_a, y_b, w = setup(n=12, c=7, seed=5)
    y_a[:2] = torch.tensor([0, 3])
    logits = torch.randn(12, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(7)) * 3
    assert_same(lambda l_: losses.multihead_loss(l_, y_a, y_b, w, MEMBERSHIP),
                lambda l_: naive_multihead_merged(l_, y_a, y_b, w, MEMBERSHIP), logits)


# ------------------------------------------------------------------------ train_pretrain.py
TOY_MAP = """# toy VOC + ADE20K
voc:person = ade20k:person
voc:cat = voc:dog = ade20k:animal
voc:bus = ade20k:bus
ade20k:sky = ignore
"""


def test_train_with_label_map_runs_and_resumes_bit_for_bit(toy_root: Path, tmp_path: Path) -> None:
    f = tmp_path / "toy_map.txt"
    f.write_text(TOY_MAP)
    # a constant learning rate (cosine down to the same value), so a 4-step run continued to 6
    # steps must equal a 6-step run
    common = ["--datasets", "voc", "ade20k", "--data-root", str(toy_root), *TINY,
              "--schedule", "cosine", "--min-lr", "1e-3", "--label-map", str(f)]
    ref, part = tmp_path / "ref", tmp_path / "part"
    r = run(common + ["--iters", "6", "--out-dir", str(ref)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert run(common + ["--iters", "4", "--out-dir", str(part)]).returncode == 0
    a = assert_resume_equals(run(common + ["--iters", "6", "--out-dir", str(part), "--resume",
                                           "auto"]), part, ref, 4, 6)
    # the checkpoint records the map; 171 classes less 4 merged away and 1 dropped
    assert a["label_space"]["label_map"] == {
        "merge": [["voc:bus", "ade20k:bus"], ["voc:cat", "voc:dog", "ade20k:animal"],
                  ["voc:person", "ade20k:person"]], "ignore": ["ade20k:sky"]}
    assert a["bank"]["count"].shape == (166,) and a["bank"]["count"].sum() > 0
    # resuming with another map, or none, is refused
    no_map = common[:common.index("--label-map")]
    one_error_line(run(no_map + ["--iters", "7", "--out-dir", str(ref), "--resume", "auto"]),
                   "was trained on", "with a label map")
    other = tmp_path / "other.txt"
    other.write_text(TOY_MAP.replace("voc:bus = ade20k:bus", "voc:car = ade20k:car"))
    one_error_line(run(no_map + ["--label-map", str(other), "--iters", "7", "--out-dir", str(ref),
                                 "--resume", "auto"]), "was trained on", "the label maps differ")
    # a bad file: one line naming FILE:LINE, exit code 2
    bad = tmp_path / "bad.txt"
    bad.write_text("# ok\nvoc:person = ade20k:persons\n")
    r = run(no_map + ["--label-map", str(bad), "--iters", "1", "--out-dir", str(tmp_path / "x")])
    one_error_line(r, f"{bad}:2: unknown class 'ade20k:persons'")
    assert r.returncode == 2
