"""MDPNet (M2) shapes, and the backbone hand-over to torchvision's ResNet / DeepLabV3 / FCN /
Mask R-CNN."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from torchvision.ops.misc import FrozenBatchNorm2d

from mdp import (MDPNet, backbone_state_dict, build_resnet, export_backbone, init_from_imagenet,
                 load_backbone)

ROOT = Path(__file__).resolve().parents[1]
FC = {"fc.weight", "fc.bias"}


@pytest.mark.parametrize("os_, hw", [(8, 4), (16, 2)])
def test_embedding_shape_and_unit_norm(os_: int, hw: int) -> None:
    torch.manual_seed(0)
    net = MDPNet("resnet14", output_stride=os_, embed_dim=16)
    z = net(torch.randn(2, 3, 32, 32))
    assert net.feature_stride == os_
    assert z.shape == (2, 16, hw, hw)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(2, hw, hw))


def test_classifier_variant() -> None:
    torch.manual_seed(0)
    net = MDPNet("resnet14", output_stride=8, embed_dim=16, num_classes=7)
    x = torch.randn(2, 3, 32, 32)
    logits = net(x)
    assert logits.shape == (2, 7, 4, 4)
    # logits come from the un-normalised head output
    h = net.head(net.forward_features(x))
    torch.testing.assert_close(logits, net.classifier(h))


def test_bad_arch_and_stride() -> None:
    with pytest.raises(ValueError, match="arch"):
        build_resnet("resnet18")
    with pytest.raises(ValueError, match="output_stride"):
        build_resnet("resnet14", output_stride=32)


@pytest.fixture(scope="module")
def r50() -> tuple[MDPNet, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    net = MDPNet("resnet50")
    # non-default BN statistics so "loaded" is distinguishable from "freshly built"
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.num_batches_tracked.fill_(7)
    return net, backbone_state_dict(net)


def assert_loaded(module: torch.nn.Module, sd: dict[str, torch.Tensor]) -> None:
    own = module.state_dict()
    for k, v in sd.items():
        if k in own:
            assert torch.equal(own[k], v), k


def test_export_keys_are_torchvision_resnet50(r50) -> None:
    net, sd = r50
    assert not any(k.startswith(("fc.", "backbone.", "head.")) for k in sd)
    tv = torchvision.models.resnet50()
    missing, unexpected = tv.load_state_dict(sd, strict=False)
    assert set(missing) == FC and unexpected == []
    assert_loaded(tv, sd)
    # FrozenBatchNorm2d (detection with pretrained backbones) drops num_batches_tracked itself
    frozen = torchvision.models.resnet50(norm_layer=FrozenBatchNorm2d)
    missing, unexpected = frozen.load_state_dict(sd, strict=False)
    assert set(missing) == FC and unexpected == []
    assert_loaded(frozen, sd)


def test_export_loads_into_deeplabv3_and_fcn(r50) -> None:
    net, sd = r50
    for build in (torchvision.models.segmentation.deeplabv3_resnet50,
                  torchvision.models.segmentation.fcn_resnet50):
        seg = build(weights=None, weights_backbone=None, num_classes=21, aux_loss=False)
        seg.backbone.load_state_dict(sd, strict=True)
        assert_loaded(seg.backbone, sd)
    # same function, not just same names: DeepLabV3's backbone (OS8) computes MDPNet's features
    net.eval(), seg.eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(seg.backbone(x)["out"], net.forward_features(x))


def test_export_loads_into_maskrcnn_body(r50) -> None:
    _, sd = r50
    det = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    det.backbone.body.load_state_dict(sd, strict=True)
    assert_loaded(det.backbone.body, sd)
    loaded, missing, unexpected = load_backbone(det.backbone.body, sd)
    assert sorted(loaded) == sorted(sd) and missing == [] and unexpected == []


def test_backbone_state_dict_accepts_checkpoints_and_wrappers() -> None:
    net = MDPNet("resnet14", embed_dim=8)
    ref = backbone_state_dict(net)
    assert set(ref) == set(build_resnet("resnet14").state_dict()) - FC
    ddp_style = {f"module.{k}": v for k, v in net.state_dict().items()}
    for obj in (net.state_dict(), {"model": net.state_dict(), "step": 3}, ddp_style,
                net.backbone, net.backbone.state_dict()):
        sd = backbone_state_dict(obj)
        assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref)
    with pytest.raises(ValueError, match="backbone"):
        backbone_state_dict({"head.0.weight": torch.zeros(1)})


def test_load_backbone_reports_and_rejects_shape_mismatch() -> None:
    sd = backbone_state_dict(MDPNet("resnet14", embed_dim=8))
    target = build_resnet("resnet26")
    loaded, missing, unexpected = load_backbone(target, {k: v for k, v in sd.items()
                                                         if not k.startswith("layer4.")})
    assert "layer4.0.conv1.weight" in missing and "layer2.1.conv1.weight" in missing
    assert unexpected == [] and "conv1.weight" in loaded
    sd["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    with pytest.raises(ValueError, match="conv1.weight"):
        load_backbone(target, sd)


def test_init_from_imagenet(tmp_path: Path) -> None:
    tv = build_resnet("resnet14")  # stands in for a torchvision ImageNet file (fc included)
    torch.save(tv.state_dict(), tmp_path / "in.pth")
    net = MDPNet("resnet14", embed_dim=8)
    loaded, missing = init_from_imagenet(net, tmp_path / "in.pth")
    assert missing == [] and set(loaded) == set(tv.state_dict()) - FC
    assert_loaded(net.backbone, backbone_state_dict(tv))

    partial = {k: v for k, v in tv.state_dict().items() if not k.startswith("layer4.")}
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.warns(UserWarning, match="layer4"):
        _, missing = init_from_imagenet(net, tmp_path / "partial.pth")
    assert missing and all(k.startswith("layer4.") for k in missing)

    with pytest.raises(FileNotFoundError, match="not found"):
        init_from_imagenet(net, tmp_path / "nope.pth")
    torch.save({"foo.weight": torch.zeros(2)}, tmp_path / "foreign.pth")
    with pytest.raises(ValueError, match="no key matches"):
        init_from_imagenet(net, tmp_path / "foreign.pth")


def test_export_function_resnet50(tmp_path: Path, r50) -> None:
    net, sd = r50
    # arch defaults to resnet50
    torch.save({"model": net.state_dict(), "args": {}}, tmp_path / "ckpt.pth")
    export_backbone(tmp_path / "ckpt.pth", tmp_path / "out.pth")
    out = torch.load(tmp_path / "out.pth", weights_only=True)
    assert out.keys() == sd.keys() and all(torch.equal(out[k], sd[k]) for k in sd)
    missing, unexpected = torchvision.models.resnet50().load_state_dict(out, strict=False)
    assert set(missing) == FC and unexpected == []


def run_export(ckpt: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "mdp.py"), "export", "--ckpt", str(ckpt),
                           "--out", str(out)], capture_output=True, text=True, cwd=ROOT)


def test_export_cli_round_trip(tmp_path: Path) -> None:
    net = MDPNet("resnet14", embed_dim=8)
    torch.save({"model": net.state_dict(), "args": {"arch": "resnet14"}}, tmp_path / "ckpt.pth")
    r = run_export(tmp_path / "ckpt.pth", tmp_path / "bb.pth")
    assert r.returncode == 0, r.stderr
    out = torch.load(tmp_path / "bb.pth", weights_only=True)
    ref = backbone_state_dict(net)
    assert out.keys() == ref.keys() and all(torch.equal(out[k], ref[k]) for k in ref)
    missing, unexpected = build_resnet("resnet14").load_state_dict(out, strict=False)
    assert set(missing) == FC and unexpected == []
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("kind", ["missing", "garbage", "no_model", "wrong_arch"])
def test_export_cli_bad_checkpoint(tmp_path: Path, kind: str) -> None:
    ckpt = tmp_path / "ckpt.pth"
    if kind == "garbage":
        ckpt.write_bytes(b"not a checkpoint")
    elif kind == "no_model":
        torch.save({"step": 1}, ckpt)
    elif kind == "wrong_arch":  # a resnet14 model under args saying resnet50
        torch.save({"model": MDPNet("resnet14", embed_dim=8).state_dict(),
                    "args": {"arch": "resnet50"}}, ckpt)
    r = run_export(ckpt, tmp_path / "bb.pth")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("error:")
    assert not (tmp_path / "bb.pth").exists()
