"""finetune.py (M9) run as a subprocess on the toy data: training writes checkpoints and results,
--eval-only reproduces the recorded mIoU, SIGTERM + --resume equals an uninterrupted run, bad input
ends with one clear line; backbone loading from a pretraining checkpoint."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import utils  # noqa: E402
from datasets import build_reader  # noqa: E402
from finetune import build_model, load_init, train_subset  # noqa: E402
from mdp import MDPNet  # noqa: E402

# tiny budget (toy VOC images are 128x96; eval resizes them to 64x48, labels stay 128x96)
TINY = ["--dataset", "voc", "--arch", "resnet14", "--crop-size", "32", "32", "--base-size", "64",
        "48", "--batch-size", "2", "--iters", "4", "--eval-interval", "2", "--log-interval", "1",
        "--workers", "0", "--num-overlays", "1"]


def run(*args: str, root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "finetune.py"), "--data-root", str(root),
                           *args], capture_output=True, text=True, cwd=ROOT)


def one_line_error(p: subprocess.CompletedProcess, *words: str) -> None:
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert "Traceback" not in p.stderr and lines[0].startswith("error:")
    for w in words:
        assert w in lines[0], (w, lines[0])


@pytest.fixture(scope="module")
def scratch_run(toy_root: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ft_scratch")
    p = run("--ckpt", "none", *TINY, "--out-dir", str(out), root=toy_root)
    assert p.returncode == 0, p.stderr[-2000:]
    return out


def test_scratch_run_writes_checkpoints_and_results(scratch_run: Path) -> None:
    for name in ("last.pth", "best.pth", "config.json", "log.jsonl", "results.json"):
        assert (scratch_run / name).is_file(), name
    assert list((scratch_run / "overlays").glob("*.png"))
    res = json.loads((scratch_run / "results.json").read_text())
    ckpt = torch.load(scratch_run / "last.pth", weights_only=False)
    assert ckpt["task"] == "finetune" and ckpt["step"] == 4 == res["step"]
    assert len(res["IoU"]) == 21 and 0 <= res["mIoU"] <= 100
    present = [v for v in res["IoU"].values() if v is not None]  # absent classes are null
    assert res["mIoU"] == pytest.approx(sum(present) / len(present))
    assert res["mIoU"] == pytest.approx(100 * ckpt["miou"])
    evals = [r for r in map(json.loads, (scratch_run / "log.jsonl").read_text().splitlines())
             if "mIoU" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert res["best_mIoU"] == max(r["mIoU"] for r in evals)


def test_eval_only_reproduces_recorded_miou(scratch_run: Path, toy_root: Path) -> None:
    out = scratch_run / "re_eval"
    p = run("--ckpt", str(scratch_run / "last.pth"), "--eval-only", "--workers", "0",
            "--out-dir", str(out), root=toy_root)
    assert p.returncode == 0, p.stderr[-2000:]
    recorded = json.loads((scratch_run / "results.json").read_text())
    again = json.loads((out / "results.json").read_text())
    assert again["mIoU"] == recorded["mIoU"] and again["IoU"] == recorded["IoU"]
    assert "mIoU" in p.stdout


def test_eval_split_test_scores_the_test_folders(scratch_run: Path, toy_root: Path,
                                                 tmp_path: Path) -> None:
    """--eval-only --eval-split test reads the split's own folders: a copy of val laid out as test
    gives the recorded val mIoU; without --eval-only the flag is one error line."""
    voc = tmp_path / "VOCdevkit"  # the run's dataset; its splits are lists of image ids
    shutil.copytree(toy_root / "VOCdevkit", voc)
    lists = voc / "VOC2012" / "ImageSets" / "Segmentation"
    (lists / "test.txt").write_text((lists / "val.txt").read_text())
    p = run("--ckpt", str(scratch_run / "last.pth"), "--eval-only", "--eval-split", "test",
            "--workers", "0", "--out-dir", str(tmp_path / "eval"), root=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    recorded = json.loads((scratch_run / "results.json").read_text())
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["mIoU"] == recorded["mIoU"]
    one_line_error(run("--ckpt", "none", "--dataset", "voc", "--eval-split", "test",
                       "--out-dir", str(tmp_path / "x"), root=tmp_path), "--eval-only")


def test_sigterm_then_resume_equals_uninterrupted(scratch_run: Path, toy_root: Path,
                                                  tmp_path: Path) -> None:
    cmd = [sys.executable, str(ROOT / "finetune.py"), "--data-root", str(toy_root), "--ckpt",
           "none", *TINY, "--out-dir", str(tmp_path)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    log = tmp_path / "log.jsonl"
    while proc.poll() is None and not (log.is_file() and log.read_text().strip()):
        time.sleep(0.2)  # the first step is logged: the SIGTERM handler is in place
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate()
    assert proc.returncode == 128 + signal.SIGTERM, err.decode()[-2000:]  # not "finished"
    stopped = torch.load(tmp_path / "last.pth", weights_only=False)["step"]
    assert 1 <= stopped < 4, "the run finished before SIGTERM arrived"
    # everything else inherited; augmentation is keyed, so the worker count does not matter
    p = run("--resume", str(tmp_path / "last.pth"), "--workers", "1", root=toy_root)
    assert p.returncode == 0, p.stderr[-2000:]
    resumed = torch.load(tmp_path / "last.pth", weights_only=False)
    reference = torch.load(scratch_run / "last.pth", weights_only=False)
    assert resumed["step"] == 4
    for k, v in reference["model"].items():
        assert torch.equal(resumed["model"][k], v), k
    assert resumed["miou"] == reference["miou"]


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(toy_root: Path,
                                                              tmp_path: Path) -> None:
    # a constant learning rate this large overflows the weights (or the loss) within a few steps;
    # a checkpoint is written after every step until then
    flags = TINY + ["--iters", "8", "--lr", "1e30", "--min-lr", "1e30", "--eval-interval", "1",
                    "--num-overlays", "0"]
    p = run("--ckpt", "none", *flags, "--out-dir", str(tmp_path), root=toy_root)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert p.stderr.count("error:") == 1, p.stderr[-2000:]
    assert "non-finite" in p.stderr.split("error:")[1].splitlines()[0]
    kept = torch.load(tmp_path / "last.pth", weights_only=False)
    assert 1 <= kept["step"] < 8
    for k, v in kept["model"].items():
        assert torch.isfinite(v.float()).all(), k


def test_save_checkpoint_refuses_non_finite_weights(tmp_path: Path) -> None:
    path = tmp_path / "last.pth"
    good = {"model": {"w": torch.ones(3), "n": torch.tensor(7)}, "step": 1}
    utils.save_checkpoint(good, path)
    bad = {"model": {"w": torch.tensor([1.0, float("nan"), 2.0]), "n": torch.tensor(7)}, "step": 2}
    with pytest.raises(ValueError, match=f"non-finite at step 2.*{path}"):
        utils.save_checkpoint(bad, path)
    kept = torch.load(path, weights_only=False)
    assert kept["step"] == 1 and torch.equal(kept["model"]["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pth"]  # no temp file left


def test_backbone_loaded_from_pretraining_checkpoint(tmp_path: Path, capsys) -> None:
    torch.manual_seed(0)
    net = MDPNet("resnet14", output_stride=8, embed_dim=16)
    path = tmp_path / "pretrain.pth"
    utils.save_checkpoint({"task": "pretrain", "model": net.state_dict(), "step": 0,
                           "args": {"arch": "resnet14"}}, path)
    state = utils.load_checkpoint(path)
    model = build_model("deeplabv3", "resnet14", 5)
    load_init(model, str(path), "pretrain", state)
    got = model.backbone.state_dict()
    want = {k[len("backbone."):]: v for k, v in state["model"].items()
            if k.startswith("backbone.") and not k.startswith("backbone.fc.")}
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert torch.equal(got[k], v), k
    n = len(want)
    assert f"backbone: loaded {n}/{n} tensors" in capsys.readouterr().out


def tiny_pretrain_checkpoint(path: Path) -> Path:
    """A pretraining checkpoint of a seeded, untrained resnet14 MDPNet."""
    torch.manual_seed(0)
    utils.save_checkpoint({"task": "pretrain", "step": 0, "args": {"arch": "resnet14"},
                           "model": MDPNet("resnet14", output_stride=8, embed_dim=16).state_dict()},
                          path)
    return path


def test_freeze_backbone_trains_the_head_only(toy_root: Path, tmp_path: Path) -> None:
    pre = tiny_pretrain_checkpoint(tmp_path / "pretrain.pth")
    p = run("--ckpt", str(pre), *TINY, "--freeze-backbone", "--num-overlays", "0",
            "--out-dir", str(tmp_path / "ft"), root=toy_root)
    assert p.returncode == 0, p.stderr[-3000:]
    state = torch.load(tmp_path / "ft" / "last.pth", weights_only=False)
    model = build_model("deeplabv3", "resnet14", 21)
    names = [k for k, _ in model.named_parameters()]  # the optimizer's order
    backbone = [k for k in names if k.startswith("backbone.")]
    want = torch.load(pre, weights_only=False)["model"]
    for k in backbone:  # every backbone weight is the pretrained one ...
        assert torch.equal(state["model"][k], want[k]), k
    # ... but BN statistics follow the target data
    assert not torch.equal(state["model"]["backbone.bn1.running_mean"],
                           want["backbone.bn1.running_mean"])
    # the optimizer holds exactly the head's parameters, and every one of them got gradients
    head = [k for k in names if not k.startswith("backbone.")]
    momentum = state["optimizer"]["state"]
    assert len(state["optimizer"]["param_groups"][0]["params"]) == len(head) == len(momentum)
    assert all(s["momentum_buffer"].abs().sum() > 0 for s in momentum.values())


@pytest.mark.parametrize("case", ["wrong_kind", "no_backbone", "truncated", "missing_data",
                                  "bad_flag", "bad_value", "eval_only_pretrain"])
def test_bad_input_one_line(case: str, scratch_run: Path, toy_root: Path, tmp_path: Path) -> None:
    ckpt, root, extra = tmp_path / "x.pth", toy_root, []
    if case == "wrong_kind":
        torch.save({"foo": 1}, ckpt)
        words = [str(ckpt), "model"]
    elif case == "no_backbone":
        torch.save({"model": {"head.weight": torch.zeros(1)}}, ckpt)
        words = [str(ckpt), "backbone"]
    elif case == "truncated":
        ckpt.write_bytes((scratch_run / "last.pth").read_bytes()[:4096])
        words = [str(ckpt), "cannot read"]
    elif case == "missing_data":
        ckpt, root = "none", tmp_path / "nowhere"
        words = ["VOC2012", "not found"]
    elif case == "bad_flag":
        ckpt, extra, words = "none", ["--no-such-flag"], ["--no-such-flag"]
    elif case == "bad_value":
        ckpt, extra, words = "none", ["--crop-size", "0", "64"], ["--crop-size"]
    else:  # --eval-only needs a fine-tuning checkpoint
        utils.save_checkpoint({"task": "pretrain", "model": MDPNet("resnet14").state_dict()}, ckpt)
        extra, words = ["--eval-only"], ["--eval-only", "fine-tuning"]
    p = run("--ckpt", str(ckpt), *TINY, *extra, "--out-dir", str(tmp_path / "o"), root=root)
    one_line_error(p, *words)
    assert not (tmp_path / "o" / "last.pth").exists()


def test_linear_probe_changes_nothing_but_its_classifier(toy_root: Path, tmp_path: Path) -> None:
    pre = tiny_pretrain_checkpoint(tmp_path / "pretrain.pth")
    p = run("--ckpt", str(pre), *TINY, "--model", "linear", "--num-overlays", "0",
            "--out-dir", str(tmp_path / "probe"), root=toy_root)
    assert p.returncode == 0, p.stderr[-3000:]
    state = torch.load(tmp_path / "probe" / "last.pth", weights_only=False)
    assert state["args"]["freeze_backbone"] and state["args"]["lr"] == 0.1  # the probe's defaults
    want = torch.load(pre, weights_only=False)["model"]
    backbone = {k: v for k, v in state["model"].items() if k.startswith("backbone.")}
    assert len(backbone) == len([k for k in want if k.startswith("backbone.")
                                 and not k.startswith("backbone.fc")])
    for k, v in backbone.items():  # weights AND BN running statistics: the backbone stays in eval
        assert torch.equal(v, want[k]), k
    # the classifier did train: its BN followed the features, its 1x1 conv moved from its init
    torch.manual_seed(0)
    init = build_model("linear", "resnet14", 21).state_dict()
    assert not torch.equal(state["model"]["classifier.0.running_mean"],
                           init["classifier.0.running_mean"])
    assert not torch.equal(state["model"]["classifier.1.weight"], init["classifier.1.weight"])
    # the optimizer holds exactly the classifier's weight and bias (the BN has no affine part)
    assert len(state["optimizer"]["param_groups"][0]["params"]) == 2
    assert list(state["optimizer"]["state"]) == [0, 1]


def test_linear_probe_refuses_an_unfrozen_backbone(toy_root: Path, tmp_path: Path) -> None:
    p = run("--ckpt", "none", *TINY, "--model", "linear", "--no-freeze-backbone",
            "--out-dir", str(tmp_path / "o"), root=toy_root)
    one_line_error(p, "--model linear", "frozen")


def test_train_subset_is_a_function_of_its_seed() -> None:
    a, b, c = train_subset(50, 7, seed=0), train_subset(50, 7, seed=0), train_subset(50, 7, seed=1)
    assert a == b != c
    for s in (a, c):  # 7 distinct sorted indices in range
        assert len(set(s)) == 7 and s == sorted(s) and 0 <= s[0] and s[-1] < 50
    # drawn without replacement from a seeded permutation: the whole set when k == n
    assert train_subset(9, 9, seed=3) == list(range(9))


def test_train_fraction_keeps_the_same_images_for_one_seed(toy_root: Path,
                                                          tmp_path: Path) -> None:
    import finetune  # in-process: six runs of one step each, the subprocess path is tested above

    flags = ["--data-root", str(toy_root), "--ckpt", "none", *TINY, "--iters", "1",
             "--eval-interval", "1", "--num-overlays", "0"]
    lists = {}
    for name, extra in (("a", ["--train-fraction", "0.25"]), ("b", ["--train-images", "6"]),
                        ("c", ["--train-fraction", "0.25", "--subset-seed", "1"])):
        finetune.main([*flags, *extra, "--out-dir", str(tmp_path / name)])
        lists[name] = (tmp_path / name / "train_subset.txt").read_text().splitlines()
    # toy VOC has 24 training images here: 0.25 of them = 6 images = --train-images 6
    assert len(lists["a"]) == 6 and lists["a"] == lists["b"]
    assert lists["a"] != lists["c"] and len(lists["c"]) == 6
    reader = build_reader("voc", toy_root, "train")
    names = [str(img.relative_to(reader.root)) for img, _ in reader.files]
    assert set(lists["a"]) < set(names)
    assert lists["a"] == [names[i] for i in train_subset(24, 6, 0)]
    for extra, words in ((["--train-fraction", "1.5"], "--train-fraction"),
                         (["--train-images", "99"], "--train-images 99.*only 24"),
                         (["--train-fraction", "0.5", "--train-images", "3"], "not both")):
        with pytest.raises(ValueError, match=words):
            finetune.main([*flags, *extra, "--out-dir", str(tmp_path / "x")])


def test_amp_auto_uses_bf16_only_where_it_is_native(monkeypatch) -> None:
    cpu = torch.device("cpu")
    monkeypatch.setattr(utils, "cpu_has_native_bf16", lambda: False)
    assert utils.amp_dtype("auto", cpu) is None  # emulated bf16 is far slower than fp32
    monkeypatch.setattr(utils, "cpu_has_native_bf16", lambda: True)
    assert utils.amp_dtype("auto", cpu) is torch.bfloat16
    assert utils.amp_dtype("bf16", cpu) is torch.bfloat16
    assert utils.amp_dtype("none", cpu) is None
    with pytest.raises(ValueError, match="fp16 needs CUDA"):
        utils.amp_dtype("fp16", cpu)
    with pytest.raises(ValueError, match="expected auto"):
        utils.amp_dtype("fp64", cpu)
    assert utils.amp_name(None) == "fp32" and utils.amp_name(torch.bfloat16) == "bf16"
