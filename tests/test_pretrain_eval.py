"""scripts/pretrain_eval.py: a pretraining checkpoint classifies its own dataset's pixels by the
nearest filled prototype of that dataset (MDP) or by its classifier (ce), checked per pixel."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from pretrain_eval import OwnTaskClassifier, own_task_classifier  # noqa: E402

from datasets import LabelSpace  # noqa: E402
from mdp import MDPNet  # noqa: E402


class Fixed(nn.Module):
    """Returns the same unit embeddings (B, D, h, w) for any input of the right batch size."""

    def __init__(self, z: torch.Tensor):
        super().__init__()
        self.z = z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.z


def test_nearest_filled_prototype_of_the_dataset_per_pixel() -> None:
    g = torch.Generator().manual_seed(0)
    B, D, h, w, C = 2, 8, 3, 4, 7
    z = F.normalize(torch.randn(B, D, h, w, generator=g), dim=1)
    protos = F.normalize(torch.randn(C, D, generator=g), dim=1)
    filled = torch.tensor([True, True, False, True, True, False, True])
    classes = slice(2, 6)  # dataset d owns global ids 2..5; 2 and 5 are unfilled
    clf = OwnTaskClassifier(Fixed(z), classes, protos, filled)
    x = torch.zeros(B, 3, h, w)  # same size as the features: the upsampling is the identity
    pred = clf(x)["out"].argmax(1)  # (B, h, w) local ids 0..3
    for b in range(B):
        for i in range(h):
            for j in range(w):
                best, best_c = None, None
                for c in range(classes.start, classes.stop):
                    if not filled[c]:
                        continue
                    s = float(z[b, :, i, j] @ protos[c])
                    if best is None or s > best:
                        best, best_c = s, c
                assert pred[b, i, j].item() == best_c - classes.start
    # upsampled to a larger input: still finite scores (no -inf * 0 = NaN), never an unfilled class
    out = clf(torch.zeros(B, 3, 2 * h + 1, 2 * w + 1))["out"]
    assert torch.isfinite(out).all()
    assert set(out.argmax(1).unique().tolist()) <= {1, 2}


def test_checkpoint_slices_its_own_dataset_and_refuses_pix2pix() -> None:
    space = LabelSpace(["a", "b"], [["x", "y"], ["p", "q", "r"]])
    torch.manual_seed(0)
    model = MDPNet("resnet14", 16, 8, num_classes=5)
    args = {"datasets": ["a", "b"], "method": "ce", "arch": "resnet14", "output_stride": 16,
            "embed_dim": 8}
    state = {"args": args, "label_space": space.state_dict(), "model": model.state_dict()}
    clf, method = own_task_classifier(state, "b")
    assert method == "ce" and clf.classes == slice(2, 5)
    x = torch.randn(1, 3, 32, 32)
    model.eval(), clf.eval()
    want = F.interpolate(model(x)[:, 2:5], size=(32, 32), mode="bilinear", align_corners=False)
    assert torch.allclose(clf(x)["out"], want)
    with pytest.raises(ValueError, match="not one of the checkpoint's datasets"):
        own_task_classifier(state, "c")
    with pytest.raises(ValueError, match="pix2pix"):
        own_task_classifier({**state, "args": {**args, "method": "pix2pix"}}, "a")
