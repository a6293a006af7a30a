"""Backbone export formats (`python mdp.py export --format torchvision|detectron2`) and the
libraries that load them: detectron2's key names against a table written out by hand, and the
torchvision file in timm's resnet50 and segmentation_models_pytorch's ResNet-50 encoder (skipped
when those test-only packages, requirements-test.txt, are not installed). Nothing is downloaded."""
from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from mdp import MDPNet, backbone_state_dict, build_resnet, detectron2_key, export_backbone
from mdp import main as mdp_main
# r50: the fixture of a resnet50 MDPNet with non-default BN statistics
from test_mdp import FC, r50  # noqa: F401
from utils import run_cli

ROOT = Path(__file__).resolve().parents[1]


def naive_detectron2_table() -> dict[str, str]:
    """Every ResNet-50 backbone tensor, torchvision name -> detectron2 name, layer by layer."""
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    table = {"conv1.weight": "stem.conv1.weight"}
    table.update({f"bn1.{leaf}": f"stem.conv1.norm.{leaf}" for leaf in bn})
    stages = [("layer1", "res2", 3), ("layer2", "res3", 4), ("layer3", "res4", 6),
              ("layer4", "res5", 3)]
    for tv_stage, d2_stage, blocks in stages:
        for b in range(blocks):
            tv, d2 = f"{tv_stage}.{b}", f"{d2_stage}.{b}"
            for k in (1, 2, 3):
                table[f"{tv}.conv{k}.weight"] = f"{d2}.conv{k}.weight"
                table.update({f"{tv}.bn{k}.{leaf}": f"{d2}.conv{k}.norm.{leaf}" for leaf in bn})
            if b == 0:  # the first block of each stage changes width: projection shortcut
                table[f"{tv}.downsample.0.weight"] = f"{d2}.shortcut.weight"
                table.update({f"{tv}.downsample.1.{leaf}": f"{d2}.shortcut.norm.{leaf}"
                              for leaf in bn})
    return table


def test_detectron2_key_every_resnet50_layer() -> None:
    table = naive_detectron2_table()
    # the table covers exactly the backbone: 16 blocks (3/4/6/3), 4 shortcuts, the stem
    assert set(table) == set(build_resnet("resnet50").state_dict()) - FC
    assert len(table) == 1 + 5 + 16 * 3 * 6 + 4 * 6
    for tv, d2 in table.items():
        assert detectron2_key(tv) == d2, tv
    assert len(set(table.values())) == len(table)  # no two tensors collide


@pytest.mark.parametrize("key", ["fc.weight", "layer1.0.relu.weight", "backbone.conv1.weight",
                                 "layer1.0.conv1", "head.0.weight"])
def test_detectron2_key_rejects_non_backbone_keys(key: str) -> None:
    with pytest.raises(ValueError, match="not a torchvision ResNet backbone key"):
        detectron2_key(key)


@pytest.fixture(scope="module")
def r50_ckpt(r50, tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A resnet50 MDPNet training checkpoint and its backbone in torchvision names."""
    net, sd = r50
    path = tmp_path_factory.mktemp("r50") / "ckpt.pth"
    torch.save({"model": net.state_dict(), "args": {"arch": "resnet50"}}, path)
    return path, sd


def assert_same_tensors(own: dict[str, torch.Tensor], sd: dict[str, torch.Tensor]) -> None:
    for k, v in sd.items():
        assert torch.equal(own[k], v), k


def test_detectron2_pickle_resnet50(tmp_path: Path, r50_ckpt) -> None:
    ckpt, sd = r50_ckpt
    n = export_backbone(ckpt, tmp_path / "bb.pkl", "detectron2")
    with open(tmp_path / "bb.pkl", "rb") as f:
        obj = pickle.load(f)  # plain pickle: no torch.load, as detectron2 reads it
    assert n == len(sd)
    assert obj["__author__"] == "MDP" and obj["matching_heuristics"] is True
    table = naive_detectron2_table()
    assert set(obj["model"]) == set(table.values())
    for tv, d2 in table.items():
        arr = obj["model"][d2]
        assert isinstance(arr, np.ndarray) and arr.dtype == sd[tv].numpy().dtype, d2
        np.testing.assert_array_equal(arr, sd[tv].numpy(), err_msg=d2)


def run_export(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "mdp.py"), "export", *args],
                          capture_output=True, text=True, cwd=ROOT)


def test_export_cli_detectron2(tmp_path: Path) -> None:
    net = MDPNet("resnet14", embed_dim=8)
    torch.save({"model": net.state_dict(), "args": {"arch": "resnet14"}}, tmp_path / "ckpt.pth")
    r = run_export("--ckpt", str(tmp_path / "ckpt.pth"), "--out", str(tmp_path / "bb.pkl"),
                   "--format", "detectron2")
    assert r.returncode == 0, r.stderr
    with open(tmp_path / "bb.pkl", "rb") as f:
        model = pickle.load(f)["model"]
    ref = backbone_state_dict(net)
    assert set(model) == {detectron2_key(k) for k in ref}
    for k, v in ref.items():
        np.testing.assert_array_equal(model[detectron2_key(k)], v.numpy(), err_msg=k)
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("out, fmt, match", [
    ("x.pkl", "caffe2", "invalid choice: 'caffe2'"),
    ("x.pth", "detectron2", "*.pkl"),  # detectron2 would torch.load a file not named .pkl
])
def test_export_cli_bad_format(tmp_path: Path, capsys, out: str, fmt: str, match: str) -> None:
    ckpt = tmp_path / "ckpt.pth"
    net = MDPNet("resnet14", embed_dim=8)
    torch.save({"model": net.state_dict(), "args": {"arch": "resnet14"}}, ckpt)
    with pytest.raises(SystemExit) as e:  # in-process: the CLI's own error path, no torch start-up
        run_cli(lambda: mdp_main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / out),
                                  "--format", fmt]))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error:"), err
    assert len(err.strip().splitlines()) == 1, err
    assert match in err
    assert not (tmp_path / out).exists()


def test_export_function_rejects_unknown_format(tmp_path: Path, r50_ckpt) -> None:
    with pytest.raises(ValueError, match="unknown export format 'onnx'"):
        export_backbone(r50_ckpt[0], tmp_path / "bb.onnx", "onnx")


# ---------------------------------------------------------------------------------------------
# the torchvision file in timm and segmentation_models_pytorch (test-only dependencies)


@pytest.fixture(scope="module")
def exported(r50_ckpt, tmp_path_factory
             ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """(the exported torchvision file as loaded, one input, torchvision resnet50's layer4 output
    for it): the reference both libraries must reproduce."""
    path = tmp_path_factory.mktemp("export") / "resnet50_mdp.pth"
    export_backbone(r50_ckpt[0], path)
    sd = torch.load(path, map_location="cpu", weights_only=True)
    tv = torchvision.models.resnet50().eval()
    tv.load_state_dict(sd, strict=False)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = torch.nn.Sequential(*list(tv.children())[:-2])(x)  # up to layer4: (1, 2048, 2, 2)
    return sd, x, ref


def test_export_loads_into_timm_resnet50(exported) -> None:
    timm = pytest.importorskip("timm", reason="timm not installed "
                                              "(pip install -r requirements-test.txt)")
    sd, x, ref = exported
    model = timm.create_model("resnet50", pretrained=False).eval()
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert set(missing) == FC and unexpected == []  # timm keeps the ImageNet classifier
    assert_same_tensors(model.state_dict(), sd)
    with torch.no_grad():  # same names *and* same function (e.g. stride in the 3x3 conv)
        torch.testing.assert_close(model.forward_features(x), ref)
    # without its classifier (num_classes=0) timm's resnet50 takes the file strictly
    timm.create_model("resnet50", pretrained=False, num_classes=0).load_state_dict(sd, strict=True)


def test_export_loads_into_smp_resnet50_encoder(exported) -> None:
    smp = pytest.importorskip("segmentation_models_pytorch",
                              reason="segmentation_models_pytorch not installed "
                                     "(pip install -r requirements-test.txt)")
    sd, x, ref = exported
    model = smp.Unet("resnet50", encoder_weights=None, classes=2).eval()
    # smp's ResNet encoder is a torchvision ResNet with fc deleted: the file matches it exactly
    assert set(model.encoder.state_dict()) == set(sd)
    model.encoder.load_state_dict(dict(sd), strict=True)  # smp pops fc.* from the dict it gets
    assert_same_tensors(model.encoder.state_dict(), sd)
    with torch.no_grad():
        torch.testing.assert_close(model.encoder(x)[-1], ref)
