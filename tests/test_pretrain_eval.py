"""tools/pretrain_eval.py: a pretraining checkpoint classifies its own dataset's pixels by the
nearest filled prototype of that dataset (MDP) or by its classifier (ce), checked per pixel."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
from pretrain_eval import (OwnTaskClassifier, class_means, effective_rank,  # noqa: E402
                           own_task_classifier, pixel_probe, prototype_cosines)

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
    classes = torch.arange(2, 6)  # dataset d owns global ids 2..5; 2 and 5 are unfilled
    clf = OwnTaskClassifier(Fixed(z), classes, protos, filled)
    x = torch.zeros(B, 3, h, w)  # same size as the features: the upsampling is the identity
    pred = clf(x)["out"].argmax(1)  # (B, h, w) local ids 0..3
    for b in range(B):
        for i in range(h):
            for j in range(w):
                best, best_c = None, None
                for c in range(2, 6):
                    if not filled[c]:
                        continue
                    s = float(z[b, :, i, j] @ protos[c])
                    if best is None or s > best:
                        best, best_c = s, c
                assert pred[b, i, j].item() == best_c - 2
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
    assert method == "ce" and clf.classes.tolist() == [2, 3, 4]
    x = torch.randn(1, 3, 32, 32)
    model.eval(), clf.eval()
    want = F.interpolate(model(x)[:, 2:5], size=(32, 32), mode="bilinear", align_corners=False)
    assert torch.allclose(clf(x)["out"], want)
    with pytest.raises(ValueError, match="not one of the checkpoint's datasets"):
        own_task_classifier(state, "c")
    with pytest.raises(ValueError, match="pix2pix"):
        own_task_classifier({**state, "args": {**args, "method": "pix2pix"}}, "a")


def test_effective_rank_hand_worked_cases() -> None:
    # k orthogonal directions of equal spread about the mean: k equal singular values -> exactly k
    e = torch.eye(5)
    for k in (1, 2, 4):
        x = torch.cat([e[:k], -e[:k]]) * 3 + 7  # (2k, 5): +-3 along k axes, shifted by 7
        assert effective_rank(x) == pytest.approx(k, rel=1e-9)
    # singular values (2, 1): p = (2/3, 1/3), exp(entropy) by hand
    x = torch.tensor([[2.0, 0], [-2, 0], [0, 1], [0, -1]]) / 2 ** 0.5
    p = torch.tensor([2 / 3, 1 / 3], dtype=torch.float64)
    assert effective_rank(x) == pytest.approx(float(torch.exp(-(p * p.log()).sum())), rel=1e-9)
    assert effective_rank(torch.ones(6, 3)) == 0.0  # every row the same: nothing spread


def test_prototype_cosines_skip_unfilled_and_the_diagonal() -> None:
    s = 0.5 ** 0.5
    protos = torch.tensor([[1.0, 0], [s, s], [0, 0], [0, 1.0]])  # row 2 unfilled (zero)
    filled = torch.tensor([True, True, False, True])
    mean, top = prototype_cosines(protos, filled)
    assert mean == pytest.approx((s + 0 + s) / 3) and top == pytest.approx(s)
    with pytest.raises(ValueError, match="fewer than two"):
        prototype_cosines(protos, torch.tensor([True, False, False, False]))


def test_class_means_and_their_lengths_by_hand() -> None:
    s = 0.5 ** 0.5
    z = torch.tensor([[1.0, 0], [1, 0],  # class 0: identical -> length 1
                      [1, 0], [-1, 0],  # class 1: opposite -> 0
                      [1, 0], [0, 1],  # class 2: 90 degrees apart -> (1/2, 1/2), length s
                      [0, 1]])  # ignored
    labels = torch.tensor([0, 0, 1, 1, 2, 2, -1])
    got = class_means(z, labels, num_classes=4)  # class 3 has no pixel: NaN
    assert got[:3].tolist() == [[1.0, 0.0], [0.0, 0.0], [0.5, 0.5]] and got[3].isnan().all()
    assert got[:3].norm(dim=1).tolist() == pytest.approx([1.0, 0.0, s])


def test_pixel_probe_hand_worked() -> None:
    # 1-D, two classes split at 0 by the training pixels; val: -1.5 -> 0 (right), 1.5 -> 1
    # (right), 3 -> 1 (labelled 0: wrong). Class 0: TP 1, FN 1 -> IoU 1/2; class 1: TP 1, FP 1
    x_train, y_train = torch.tensor([[-2.0], [-1], [1], [2]]), torch.tensor([0, 0, 1, 1])
    x_val, y_val = torch.tensor([[-1.5], [1.5], [3]]), torch.tensor([0, 1, 0])
    assert pixel_probe(x_train, y_train, x_val, y_val, 2) == pytest.approx(50.0)
    # separable blobs in 5-D with a constant feature (zero std must not divide by zero): 100
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(5)[:3] * 10
    y = torch.arange(3).repeat_interleave(20)
    x = centres[y] + torch.randn(60, 5, generator=g)
    x[:, 4] = 1.0
    assert pixel_probe(x[::2], y[::2], x[1::2], y[1::2], 3) == pytest.approx(100.0)
