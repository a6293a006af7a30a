"""Mining unlabelled images (METHOD.md M10): the pseudo-label rule and the mined loss against naive
per-pixel loops, unlabelled pixels changing neither the bank nor CSC, the unlabelled stream keyed by
step, and train_pretrain.py --unlabelled / mine.py run as a user runs them
(toy data, tiny budget)."""
from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_losses import grads, unit
from test_train_pretrain import TINY, assert_same_state, load, one_error_line, run

import mine
from datasets import IGNORE, DatasetMixSampler, LabelSpace, train_transform
from prototypes import PrototypeBank
from train_pretrain import compute_loss

ROOT = Path(__file__).resolve().parents[1]
TOL = dict(atol=1e-10, rtol=1e-10)  # float64 throughout


# ----------------------------------------------------------------------------- naive references
def naive_pseudo(z, protos, filled, tau, threshold):
    """Per pixel: softmax over the filled prototypes only, the first class of largest probability
    (Python's max keeps the first of equal keys), IGNORE below the threshold or with none filled."""
    fidx = [c for c in range(protos.shape[0]) if filled[c]]
    labels, confs = [], []
    for p in range(z.shape[0]):
        if not fidx:
            labels.append(IGNORE)
            confs.append(0.0)
            continue
        q = torch.softmax(torch.stack([(z[p] * protos[c]).sum() / tau for c in fidx]), 0)
        j = max(range(len(fidx)), key=lambda j: float(q[j]))
        labels.append(fidx[j] if float(q[j]) >= threshold else IGNORE)
        confs.append(float(q[j]))
    return torch.tensor(labels), torch.tensor(confs, dtype=torch.float64)


def naive_mined(z, valid, protos, filled, tau, threshold):
    """z (B, D, h, w): every valid pixel, its label from the detached embedding, then M4's
    cross-entropy over the filled prototypes; mean over the mined pixels, and their share."""
    fidx = [c for c in range(protos.shape[0]) if filled[c]]
    terms, n_valid = [], 0
    B, _, h, w = z.shape
    for b in range(B):
        for i in range(h):
            for j in range(w):
                if not valid[b, i, j]:
                    continue
                n_valid += 1
                s = torch.stack([(z[b, :, i, j] * protos[c]).sum() / tau for c in fidx])
                q = torch.softmax(s.detach(), 0)
                k = int(q.argmax())
                if float(q[k]) >= threshold:
                    terms.append(torch.logsumexp(s, 0) - s[k])
    loss = sum(terms) / len(terms) if terms else z.sum() * 0
    return loss, len(terms) / max(n_valid, 1)


def unit_map(b, d, h, w, seed):
    return unit(b, h, w, d, seed=seed).permute(0, 3, 1, 2).contiguous()  # (B, D, h, w), unit over D


FILLED = torch.tensor([True, False, True, True, False, True, True])


# ------------------------------------------------------------------------------------- the rule
@pytest.mark.parametrize("threshold", [0.0, 0.5, 0.7, 0.9])
def test_pseudo_labels_match_naive(threshold: float) -> None:
    z, protos = unit(60, 5, seed=1), unit(7, 5, seed=2)
    labels, conf = mine.pseudo_labels(z, protos, FILLED, 0.2, threshold)
    want_labels, want_conf = naive_pseudo(z, protos, FILLED, 0.2, threshold)
    torch.testing.assert_close(conf, want_conf, **TOL)
    assert torch.equal(labels, want_labels)
    assert 0 < (labels != IGNORE).sum() < 60 or threshold == 0.0  # the threshold does cut here
    assert FILLED[labels[labels != IGNORE]].all()


def test_threshold_is_inclusive() -> None:
    z, protos = unit(1, 5, seed=3).float(), unit(7, 5, seed=4).float()
    _, conf = mine.pseudo_labels(z, protos, FILLED, 0.2, 0.0)
    at = float(conf[0])
    above = float(torch.nextafter(conf[0], torch.tensor(2.0)))
    assert mine.pseudo_labels(z, protos, FILLED, 0.2, at)[0][0] != IGNORE
    assert mine.pseudo_labels(z, protos, FILLED, 0.2, above)[0][0] == IGNORE


def test_unfilled_prototype_never_chosen_and_ties_go_to_the_first_class() -> None:
    e = torch.eye(4, dtype=torch.float64)
    # class 0 (unfilled) and classes 2, 4 point exactly where z does: exact dot products, a tie
    protos = torch.stack([e[0], e[1], e[0], e[2], e[0]])
    filled = torch.tensor([False, True, True, True, True])
    z = e[:1]
    labels, conf = mine.pseudo_labels(z, protos, filled, 0.07, 0.0)
    assert labels.tolist() == [2]  # not the unfilled 0, and 2 before 4
    # logits of the filled classes 1..4
    s = torch.tensor([0.0, 1.0, 0.0, 1.0], dtype=torch.float64) / 0.07
    assert float(conf[0]) == pytest.approx(float(s.softmax(0)[1]), rel=1e-12)  # just below 0.5
    assert mine.pseudo_labels(z, protos, filled, 0.07, 0.5)[0].tolist() == [IGNORE]
    # the tie broken the same way wherever the pair sits
    protos2 = torch.stack([e[1], e[0], e[2], e[0], e[3]])
    all_filled = torch.ones(5, dtype=torch.bool)
    assert mine.pseudo_labels(z, protos2, all_filled, 0.07, 0.0)[0].tolist() == [1]


def test_all_unfilled_bank_mines_nothing() -> None:
    z, protos = unit(9, 5, seed=5), unit(7, 5, seed=6)
    labels, conf = mine.pseudo_labels(z, protos, torch.zeros(7, dtype=torch.bool), 0.07, 0.0)
    assert (labels == IGNORE).all() and (conf == 0).all()
    loss, frac = mine.mined_loss(unit_map(1, 5, 3, 3, 7), torch.ones(1, 3, 3, dtype=torch.bool),
                                 protos, torch.zeros(7, dtype=torch.bool), 0.07, 0.0)
    assert loss.item() == 0 and frac.item() == 0


# ------------------------------------------------------------------------------- the mined loss
@pytest.mark.parametrize("threshold", [0.0, 0.5, 1.01])
def test_mined_loss_and_gradient_match_a_per_pixel_loop(threshold: float) -> None:
    z, protos = unit_map(2, 5, 3, 4, seed=8), unit(7, 5, seed=9)
    valid = torch.rand(2, 3, 4, generator=torch.Generator().manual_seed(0)) > 0.25
    args = (valid, protos, FILLED, 0.2, threshold)
    (_, frac), (_, want_frac) = mine.mined_loss(z, *args), naive_mined(z, *args)
    assert frac.item() == pytest.approx(want_frac)
    assert (0 < want_frac < 1) == (threshold == 0.5)  # some mined, not all
    lf, (gf,) = grads(lambda t: mine.mined_loss(t, *args)[0], z)
    ln, (gn,) = grads(lambda t: naive_mined(t, *args)[0], z)
    torch.testing.assert_close(lf, ln, **TOL)
    torch.testing.assert_close(gf, gn, **TOL)
    assert torch.isfinite(gf).all()
    assert (gf[~valid[:, None].expand_as(gf)] == 0).all()  # padding never pulls


def test_mined_loss_reads_nothing_back_from_the_device() -> None:
    """On the meta device any host read (.item(), nonzero, a boolean-mask index) raises."""
    loss, frac = mine.mined_loss(torch.empty(2, 4, 3, 3, device="meta"),
                                 torch.empty(2, 3, 3, dtype=torch.bool, device="meta"),
                                 torch.empty(5, 4, device="meta"),
                                 torch.empty(5, dtype=torch.bool, device="meta"), 0.07, 0.9)
    assert loss.shape == frac.shape == () and loss.device.type == "meta"


def test_unlabelled_pixels_change_neither_bank_nor_csc() -> None:
    """compute_loss with and without unlabelled embeddings: the same bank, the same M4 and CSC
    parts and labelled gradients; the difference is mine_weight x the mined term, computed with
    the bank after this step's (labelled) update."""
    C, D = 7, 5
    args = Namespace(method="mdp", max_pixels=0, tau=0.2, no_csc=False, topk=2, csc_weight=0.1,
                     label_purity=0.0, mine_threshold=0.0, mine_weight=0.5, proto_grad=False)
    space = LabelSpace(["a", "b"], [["a0", "a1", "a2"], ["b0", "b1", "b2", "b3"]])
    g = torch.Generator().manual_seed(1)
    y = torch.randint(-1, C, (3, 8, 8), generator=g)  # at input resolution; features are 4 x 4
    y[:, :, :4] = torch.randint(0, 3, (3, 8, 4), generator=g)  # both datasets present: CSC > 0
    out = unit_map(3, D, 4, 4, seed=10)
    out_u = unit_map(2, D, 4, 4, seed=11)
    y_u = torch.zeros(2, 8, 8, dtype=torch.long)
    y_u[1, 4:] = IGNORE  # crop padding
    bank = PrototypeBank(C, D, 4).double()
    bank.update(unit_map(2, D, 4, 4, seed=12), torch.randint(-1, C, (2, 4, 4), generator=g))
    w = torch.ones(3, 8, 8, dtype=torch.float64)

    results = []
    for unlabelled in (False, True):
        b, z, zu = copy.deepcopy(bank), out.clone().requires_grad_(), out_u.clone().requires_grad_()
        extra = (zu, y_u) if unlabelled else ()
        loss, parts = compute_loss(args, z, y, y, w, b, space.membership, torch.Generator(), *extra)
        loss.backward()
        results.append((b, z.grad, loss, parts, zu.grad))
    (b0, g0, l0, p0, _), (b1, g1, l1, p1, gu) = results
    assert_same_state(b0.state_dict(), b1.state_dict())
    assert torch.equal(p0["con"], p1["con"]) and torch.equal(p0["csc"], p1["csc"]) and p0["csc"] > 0
    assert torch.equal(g0, g1)
    mined, frac = mine.mined_loss(out_u, y_u[:, ::2, ::2] != IGNORE, b1.prototypes, b1.filled,
                                  args.tau, 0.0)
    assert torch.equal(p1["mined"], mined) and torch.equal(p1["mined_frac"], frac)
    assert frac.item() == 1.0 and mined > 0 and gu.abs().sum() > 0
    torch.testing.assert_close(l1, l0 + 0.5 * mined, **TOL)
    assert set(p0) == {"loss", "con", "csc", "proto_cos"}  # proto_cos: M4 variants' log
    assert set(p1) == {"loss", "con", "csc", "proto_cos", "mined", "mined_frac"}


# ------------------------------------------------------------------------------------ the data
def test_unlabelled_stream_is_a_function_of_the_batch_index(toy_root: Path) -> None:
    data = mine.build_unlabelled(["coco_stuff"], toy_root, train_transform((64, 32), (32, 32)))
    assert len(data) == 24
    sampler = DatasetMixSampler(data.sizes, None, 1, 0, seed=mine.unlabelled_seed(0))

    def take(start: int, n: int) -> list:
        stream = mine.unlabelled_batches(data, sampler, start, 8, 5, 0)
        return [next(stream) for _ in range(n)]
    ref, later = take(0, 5), take(2, 3)  # 3 batches an epoch: batch 3 opens epoch 1
    for (xa, ya), (xb, yb) in zip(ref[2:], later):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(ref[0][0], ref[3][0])  # a new epoch, a new order and new crops
    labels = torch.cat([y for _, y in ref])
    assert ((labels == 0) | (labels == IGNORE)).all() and (labels == IGNORE).any()  # padding


def test_unlabelled_sources(toy_root: Path, tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    (folder / "b").mkdir(parents=True)
    src = sorted((toy_root / "coco_stuff164k" / "images" / "train2017").glob("*.jpg"))
    shutil.copy(src[0], folder / "b" / "z.JPG")
    shutil.copy(src[1], folder / "a.jpg")
    (folder / "notes.txt").write_text("not an image")
    got = mine.unlabelled_source(f"images:{folder}", toy_root)
    assert got.files == [folder / "a.jpg", folder / "b" / "z.JPG"]
    assert mine.unlabelled_source("images:imgs", tmp_path).files == got.files  # under data_root
    image, zeros = got[1]
    assert zeros.shape == (image.height, image.width) and not zeros.any()
    assert mine.unlabelled_source("coco_stuff", toy_root).files == src  # labels never read
    with pytest.raises(ValueError, match="pascal"):
        mine.unlabelled_source("pascal", toy_root)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        mine.unlabelled_source(f"images:{tmp_path / 'nowhere'}", toy_root)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no \\*.jpg"):
        mine.unlabelled_source(f"images:{tmp_path / 'empty'}", toy_root)
    with pytest.raises(ValueError, match="twice"):
        mine.build_unlabelled(["coco_stuff", "coco_stuff"], toy_root, None)


# ----------------------------------------------------------------------------- train_pretrain.py
COMMON = ["--datasets", "voc", "ade20k", "--unlabelled", "coco_stuff", *TINY]


def test_train_with_unlabelled_python_and_torchrun(toy_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "one"
    # threshold 0: every unlabelled pixel is mined once a prototype exists
    r = run(COMMON + ["--data-root", str(toy_root), "--iters", "3", "--mine-warmup", "1",
                      "--mine-threshold", "0", "--out-dir", str(out)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert ("mining 24 unlabelled images (coco_stuff), 4 per process and step from step 1"
            in r.stdout)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert "mined_frac" not in log[0]  # the warm-up step loads no unlabelled image
    for rec in log[1:]:
        assert rec["mined_frac"] == 1.0 and rec["mined"] > 0
        assert rec["loss"] == pytest.approx(rec["con"] + 0.1 * rec["csc"] + rec["mined"], rel=1e-5)
    ckpt = load(out / "last.pth")
    assert ckpt["args"]["mine_warmup"] == 1 and ckpt["bank"]["count"].shape == (171,)

    ddp = tmp_path / "ddp"
    r = run(COMMON + ["--data-root", str(toy_root), "--iters", "2", "--out-dir", str(ddp),
                      "--mine-warmup", "1"], torchrun=2)
    assert r.returncode == 0, r.stderr[-3000:]
    log = [json.loads(line) for line in (ddp / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and 0 <= log[1]["mined_frac"] <= 1
    assert load(ddp / "last.pth")["step"] == 2


def test_resume_with_unlabelled_is_bit_for_bit(toy_root: Path, tmp_path: Path) -> None:
    # constant lr (cosine down to itself): a 3-step run continued to 6 must equal a 6-step run.
    # 8 unlabelled images a step: 3 batches per unlabelled epoch, so the resumed stream (batches
    # 2, 3, 4) crosses into its second epoch; threshold 0 so the mined term moves the weights
    common = COMMON + ["--data-root", str(toy_root), "--schedule", "cosine", "--min-lr", "1e-3",
                       "--mine-warmup", "1", "--mine-ratio", "2", "--mine-threshold", "0"]
    ref, part = tmp_path / "ref", tmp_path / "part"
    assert run(common + ["--iters", "6", "--out-dir", str(ref)]).returncode == 0
    assert run(common + ["--iters", "3", "--out-dir", str(part)]).returncode == 0
    r = run(common + ["--iters", "6", "--out-dir", str(part), "--resume", "auto"])
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = load(ref / "last.pth"), load(part / "last.pth")
    assert a["step"] == b["step"] == 6
    assert_same_state(a["model"], b["model"])
    assert_same_state(a["bank"], b["bank"])


def test_bad_unlabelled_sources_fail_with_one_line(toy_root: Path, tmp_path: Path) -> None:
    base = ["--datasets", "voc", "--data-root", str(toy_root), "--iters", "1", *TINY,
            "--out-dir", str(tmp_path / "x")]
    one_error_line(run(base + ["--unlabelled", "pascal"]), "pascal", "images:PATH")
    one_error_line(run(base + ["--unlabelled", f"images:{tmp_path / 'nowhere'}"]), "nowhere")
    one_error_line(run(base + ["--unlabelled", "coco_stuff", "--method", "ce"]), "--method mdp")


# ------------------------------------------------------------------------------------ mine.py
def mine_cli(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "mine.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def test_mine_cli_writes_pngs_and_legend(toy_root: Path, tmp_path: Path) -> None:
    # a tiny checkpoint trained with a label map and an image folder as its unlabelled source
    folder = tmp_path / "imgs" / "nested"
    folder.mkdir(parents=True)
    for f in sorted((toy_root / "coco_stuff164k" / "images" / "val2017").glob("*.jpg"))[:4]:
        shutil.copy(f, folder / f.name)
    ckpt = tmp_path / "pre" / "last.pth"
    r = run(["--datasets", "voc", "ade20k", "--unlabelled", f"images:{folder.parent}",
             "--label-map", str(ROOT / "studies" / "toy_label_map.txt"), "--data-root",
             str(toy_root), "--iters", "2", "--mine-warmup", "1", "--out-dir", str(ckpt.parent),
             *TINY])
    assert r.returncode == 0, r.stderr[-3000:]
    space = LabelSpace.from_state_dict(load(ckpt)["label_space"])
    assert space.label_map is not None and space.num_classes < 171

    out = tmp_path / "mined"
    r = mine_cli(["--ckpt", str(ckpt), "--images", "coco_stuff", "--data-root", str(toy_root),
                  "--out", str(out), "--num", "3", "--base-size", "64", "32", "--threshold", "0"])
    assert r.returncode == 0, r.stderr[-3000:]
    legend = json.loads((out / "legend.json").read_text())
    assert legend["threshold"] == 0 and len(legend["images"]) == 3
    for rec in legend["images"]:
        png = Image.open(out / rec["png"])
        assert png.width > 3 * 32 and png.height >= 32  # image | labels | confidence | legend
        assert rec["mined_frac"] == 1.0  # threshold 0, no padding at evaluation size
        fracs = [c["frac"] for c in rec["classes"]]
        assert 0 < sum(fracs) <= 1 + 1e-9 and fracs == sorted(fracs, reverse=True)
        assert all(space.class_names[c["id"]] == c["name"] for c in rec["classes"])
    # a bare folder; the checkpoint's own threshold (0.9) by default
    r = mine_cli(["--ckpt", str(ckpt), "--images", str(folder.parent), "--out", str(out / "f"),
                  "--num", "9", "--base-size", "64", "32"])
    assert r.returncode == 0, r.stderr[-3000:]
    legend = json.loads((out / "f" / "legend.json").read_text())
    assert legend["threshold"] == 0.9 and len(legend["images"]) == 4
    assert legend["images"][0]["image"] == str(sorted(folder.glob("*.jpg"))[0])
    # the confidence summary says where a threshold falls: at each image's max it mines that
    # image, just above every max it mines nothing
    peaks = [rec["confidence"]["max"] for rec in legend["images"]]
    assert legend["confidence"]["max"] == max(peaks)
    for rec in legend["images"]:
        c = rec["confidence"]
        assert 0 < c["median"] <= c["p90"] <= c["max"] <= 1
    for threshold, mines in ((min(peaks), True),
                             (torch.nextafter(torch.tensor(max(peaks)), torch.tensor(2.0)).item(),
                              False)):
        r = mine_cli(["--ckpt", str(ckpt), "--images", str(folder.parent), "--out",
                      str(out / "t"), "--base-size", "64", "32", "--threshold", repr(threshold)])
        assert r.returncode == 0, r.stderr[-3000:]
        got = json.loads((out / "t" / "legend.json").read_text())["images"]
        assert [rec["mined_frac"] > 0 for rec in got] == [mines] * 4

    # bad input: one line
    one_error_line(mine_cli(["--ckpt", str(tmp_path / "none.pth"), "--images", "coco_stuff",
                             "--out", str(out)]), "none.pth")
    one_error_line(mine_cli(["--ckpt", str(ckpt), "--images", str(tmp_path / "nowhere"),
                             "--out", str(out)]), "nowhere")
    ce = tmp_path / "ce.pth"
    torch.save({"task": "pretrain", "model": {}, "args": {"method": "ce"},
                "label_space": load(ckpt)["label_space"], "bank": None}, ce)
    one_error_line(mine_cli(["--ckpt", str(ce), "--images", "coco_stuff", "--out", str(out)]),
                   "not an MDP pretraining checkpoint")



def test_label_purity_reaches_the_loss_and_the_bank() -> None:
    """--label-purity: compute_loss drops impure features from M4 and from the bank update, i.e.
    it equals the plain loss on labels made IGNORE where the cell is impure (built here by hand)."""
    C, D = 3, 4
    y = torch.zeros(1, 4, 4, dtype=torch.long)  # 2 x 2 features of 2 x 2 cells
    y[0, 0, 1] = 1  # cell (0, 0): 3/4 class 0
    y[0, 2:, 2:] = 2  # cell (1, 1): pure class 2; cells (0, 1), (1, 0): pure class 0
    z = unit_map(1, D, 2, 2, seed=3)
    w = torch.ones(1, 4, 4, dtype=torch.float64)
    impure = y.clone()
    impure[0, 0:2, 0:2] = IGNORE  # what purity 0.8 must do to cell (0, 0)
    kw = dict(method="mdp", max_pixels=0, tau=0.2, no_csc=True, topk=1, csc_weight=0.0,
              proto_grad=False)
    runs = []
    for purity, labels in ((0.8, y), (0.0, impure), (0.0, y)):
        bank = PrototypeBank(C, D, 4).double()
        loss, _ = compute_loss(Namespace(label_purity=purity, **kw), z, labels, labels, w, bank,
                               torch.zeros(C, dtype=torch.long), torch.Generator())
        runs.append((loss, bank.state_dict()))
    assert torch.equal(runs[0][0], runs[1][0])
    assert_same_state(runs[0][1], runs[1][1])
    assert not torch.equal(runs[0][0], runs[2][0])  # the rule changed something
