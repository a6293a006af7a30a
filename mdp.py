"""The MDP pretraining network (METHOD.md M2) and the backbone hand-over to downstream models.

Backbone: torchvision's standard ResNet (not v1c), layer3/layer4 dilated for output stride 8
(16 by flag). Projection head [R]: 1x1 conv 2048->2048, BN, ReLU, 1x1 conv 2048->D; the embedding
is L2-normalised along channels. Only the backbone is transferred [S], so `backbone_state_dict`
returns it in torchvision's own key names, loadable into `torchvision.models.resnet50`, the
DeepLabV3 / FCN backbones and Mask R-CNN's `backbone.body`; `--format detectron2` writes the same
tensors renamed for detectron2's ResNet, as the pickle its checkpointer reads.

CLI:  python mdp.py export --ckpt runs/x/checkpoint.pth --out resnet50_mdp.pth
      python mdp.py export --ckpt runs/x/checkpoint.pth --out resnet50_mdp.pkl --format detectron2
"""
from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.resnet import Bottleneck, ResNet

# Bottleneck ResNets; resnet26 / resnet14 exist only for toy runs on a CPU.
ARCHS: dict[str, list[int]] = {
    "resnet50": [3, 4, 6, 3],
    "resnet101": [3, 4, 23, 3],
    "resnet26": [2, 2, 2, 2],
    "resnet14": [1, 1, 1, 1],
}
_DILATION = {8: [False, True, True], 16: [False, False, True]}


def build_resnet(arch: str = "resnet50", output_stride: int = 8) -> ResNet:
    """A randomly initialised torchvision ResNet (M2: trained from scratch), torchvision's key
    names."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {sorted(ARCHS)}")
    if output_stride not in _DILATION:
        raise ValueError(f"output_stride must be 8 or 16, got {output_stride}")
    return ResNet(Bottleneck, ARCHS[arch], replace_stride_with_dilation=_DILATION[output_stride])


class MDPNet(nn.Module):
    """Backbone + projection head (M2). `forward` gives the L2-normalised embedding
    (B, D, H/s, W/s), or logits (B, C, H/s, W/s) from a 1x1 classifier when num_classes > 0
    (M8 `ce` / `multihead`)."""

    def __init__(self, arch: str = "resnet50", output_stride: int = 8, embed_dim: int = 256,
                 num_classes: int = 0, embed_norm: str = "none"):
        super().__init__()
        self.backbone = build_resnet(arch, output_stride)
        # the classifier of the ImageNet task is not part of this network: an unused parameter
        # would also stall DDP's gradient reduction
        self.backbone.fc = nn.Identity()
        width = 512 * Bottleneck.expansion  # 2048 for every Bottleneck ResNet
        self.head = nn.Sequential(
            nn.Conv2d(width, width, 1, bias=False),  # no bias: BN follows
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, embed_dim, 1),
        )
        if embed_norm == "bn":  # [ours] `--embed-norm bn`: see METHOD.md M2
            # each embedding dimension standardised over the batch's pixels before the L2 norm
            # (BN without affine, as in SimCLR's and BYOL's projection heads): what every pixel
            # shares is taken out before the bank averages the embeddings into class means
            self.head.append(nn.BatchNorm2d(embed_dim, affine=False))
        elif embed_norm != "none":
            raise ValueError(f"unknown embed_norm {embed_norm!r}; expected none or bn")
        self.classifier = nn.Conv2d(embed_dim, num_classes, 1) if num_classes > 0 else None
        self.feature_stride = output_stride
        self.embed_dim = embed_dim

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        b = self.backbone  # stem + layer1..4; avgpool is never used
        x = b.maxpool(b.relu(b.bn1(b.conv1(x))))  # (B, 64, H/4, W/4)
        return b.layer4(b.layer3(b.layer2(b.layer1(x))))  # (B, 2048, H/s, W/s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.head(self.forward_features(x))  # (B, D, h, w)
        if self.classifier is not None:
            return self.classifier(h)  # (B, C, h, w), from the un-normalised head output
        # float32: under bf16 autocast the 1/tau = 14x logit scale would amplify rounding
        return F.normalize(h.float(), dim=1)  # (B, D, h, w), unit norm per pixel


# ----------------------------------------------------------------------------------------------
# backbone export / import


def _strip(key: str) -> str:
    # DDP ("module.") and torch.compile ("_orig_mod.") wrappers add prefixes that mean nothing here
    for p in ("module.", "_orig_mod."):
        while key.startswith(p):
            key = key[len(p):]
    return key


def backbone_state_dict(obj: nn.Module | Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Backbone weights in torchvision ResNet key names ("conv1.weight",
    "layer1.0.bn1.running_mean", ...), without fc.*. Accepts an MDPNet (or any module with a
    `.backbone`), a torchvision ResNet, an MDPNet state_dict, a training checkpoint dict
    {"model": state_dict, ...}, or a plain ResNet state_dict."""
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, Mapping):
        raise ValueError(f"expected a module, a state_dict or a checkpoint dict, "
                         f"got {type(obj).__name__}")
    if isinstance(obj.get("model"), Mapping):
        obj = obj["model"]  # training checkpoint
    sd = {_strip(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if any(k.startswith("backbone.") for k in sd):
        sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    elif "conv1.weight" not in sd:
        raise ValueError("no ResNet backbone weights found: expected keys 'backbone.conv1.weight' "
                         "(MDPNet) or 'conv1.weight' (torchvision ResNet)")
    return {k: v for k, v in sd.items() if not k.startswith("fc.")}


def load_backbone(module: nn.Module, sd: Mapping[str, torch.Tensor]
                  ) -> tuple[list[str], list[str], list[str]]:
    """Loads a backbone state_dict into any torchvision-style module (ResNet, DeepLabV3/FCN
    `.backbone`, Mask R-CNN `.backbone.body`) non-strictly and returns (loaded, missing, unexpected)
    key lists so the caller can report them. A shape mismatch is an error, not a silent skip."""
    own = module.state_dict()
    for k, v in sd.items():
        if k in own and own[k].shape != v.shape:
            raise ValueError(f"backbone weight {k} has shape {tuple(v.shape)}, the model expects "
                             f"{tuple(own[k].shape)} (different arch?)")
    missing, unexpected = module.load_state_dict(sd, strict=False)
    loaded = [k for k in sd if k in own]
    return loaded, list(missing), list(unexpected)


def init_from_imagenet(model: nn.Module, path: str | Path) -> tuple[list[str], list[str]]:
    """Initialises `model.backbone` (or `model` itself if it is a ResNet) from a local torchvision
    ResNet state_dict file (M2 optional two-stage row). fc.* is ignored. Returns (loaded, missing);
    missing keys are also warned about in one line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ImageNet checkpoint not found: {path}")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated / foreign file: many exception types
        raise ValueError(f"cannot read ImageNet checkpoint {path}: {type(e).__name__}") from None
    if isinstance(sd, Mapping) and isinstance(sd.get("state_dict"), Mapping):
        sd = sd["state_dict"]  # some checkpoints nest the weights
    target = getattr(model, "backbone", model)
    try:
        sd = backbone_state_dict(sd)
    except ValueError:
        sd = {}
    loaded, missing, _ = load_backbone(target, sd)
    if not loaded:
        raise ValueError(f"{path}: no key matches a torchvision ResNet backbone "
                         f"(expected e.g. 'conv1.weight', 'layer1.0.conv1.weight')")
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing:
        warnings.warn(f"init_from_imagenet({path}): "
                      f"{len(missing)} backbone tensors not in the file "
                      f"and left at random init: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return loaded, missing


# torchvision ResNet key: stem ("conv1.weight", "bn1.bias") or "layer<N>.<block>.<module>.<leaf>"
_TV_KEY = re.compile(r"(?:layer(?P<stage>\d)\.(?P<block>\d+)\.)?"
                     r"(?P<module>conv\d|bn\d|downsample\.[01])\.(?P<leaf>\w+)")


def detectron2_key(name: str) -> str:
    """torchvision ResNet key -> detectron2 ResNet key, e.g. "bn1.running_mean" ->
    "stem.conv1.norm.running_mean", "layer1.0.bn2.weight" -> "res2.0.conv2.norm.weight",
    "layer3.0.downsample.0.weight" -> "res4.0.shortcut.weight". detectron2 hangs each BN under
    the conv it follows (".norm"); the BN leaf names (weight, bias, running_*) stay."""
    m = _TV_KEY.fullmatch(name)
    if m is None:
        raise ValueError(f"not a torchvision ResNet backbone key: {name!r}")
    module = m["module"]
    if module.startswith("downsample"):  # downsample.0 is the 1x1 conv, downsample.1 its BN
        module = "shortcut" if module.endswith("0") else "shortcut.norm"
    elif module.startswith("bn"):  # bnK follows convK
        module = f"conv{module[2:]}.norm"
    where = f"res{int(m['stage']) + 1}.{m['block']}" if m["stage"] else "stem"
    return f"{where}.{module}.{m['leaf']}"


def detectron2_checkpoint(sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """What detectron2's DetectionCheckpointer reads from a .pkl: numpy arrays under "model";
    "matching_heuristics" lets it match "res2.0.conv1.weight" to "backbone.bottom_up.res2..."."""
    model = {detectron2_key(k): v.detach().cpu().numpy() for k, v in sd.items()}
    return {"model": model, "__author__": "MDP", "matching_heuristics": True}


FORMATS = ("torchvision", "detectron2")


def export_backbone(ckpt: str | Path, out: str | Path, fmt: str = "torchvision") -> int:
    """Writes the backbone of a training checkpoint as a torchvision ResNet state_dict, or as
    detectron2's pickle (`fmt="detectron2"`); atomic either way. The keys are checked against a
    fresh ResNet of the checkpoint's arch. Returns the number of tensors written."""
    from utils import atomic_save, load_checkpoint  # the project's one-line checkpoint errors

    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; expected one of {list(FORMATS)}")
    out = Path(out)
    if fmt == "detectron2" and out.suffix != ".pkl":
        # detectron2 picks its reader by extension: any other name goes to torch.load and fails
        raise ValueError(f"--format detectron2 writes a pickle that detectron2 reads only from a "
                         f"*.pkl file; got --out {out}")
    state = load_checkpoint(ckpt)
    args = state.get("args") or {}
    arch = (args.get("arch", "resnet50") if isinstance(args, Mapping)
            else getattr(args, "arch", "resnet50"))
    sd = {k: v.detach().cpu().clone() for k, v in backbone_state_dict(state).items()}
    _, missing, unexpected = load_backbone(build_resnet(arch), sd)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise ValueError(f"{ckpt}: backbone does not match torchvision {arch} "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    if fmt == "torchvision":
        atomic_save(sd, out)
    else:  # a plain pickle, not torch.save's zip
        atomic_save(detectron2_checkpoint(sd), out, dump=pickle.dump)
    return len(sd)


def main(argv: list[str] | None = None) -> None:
    from utils import ArgumentParser  # one-line errors, also for a bad --format

    parser = ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("export", help="write the backbone of a training checkpoint as a "
                                      "torchvision ResNet state_dict or a detectron2 .pkl")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--format", default="torchvision", choices=FORMATS,
                   help="torchvision: a state_dict (.pth) for torchvision / timm / smp / mmseg; "
                        "detectron2: a .pkl for MODEL.WEIGHTS (default: %(default)s)")
    args = parser.parse_args(argv)
    n = export_backbone(args.ckpt, args.out, args.format)
    print(f"wrote {n} backbone tensors ({args.format}) to {args.out}")


if __name__ == "__main__":
    from utils import run_cli

    run_cli(main)
