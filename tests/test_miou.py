"""mIoU (M9): confusion matrix / IoU against a naive per-image, per-class count; sliding-window
inference; 2-process evaluation equal to 1-process on a validation set of odd size."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from evaluation import confusion_matrix, evaluate, iou_from_confusion, slide_inference  # noqa: E402
from gloo import free_port, gloo_group  # noqa: E402

IGN = -1


def naive_iou(images: list[tuple[list[list[int]], list[list[int]]]], k: int) -> tuple[list, float]:
    """Per image, per class, per pixel counts; IoU NaN where a class has no union."""
    tp, fp, fn = [0] * k, [0] * k, [0] * k
    for pred, gt in images:
        for c in range(k):
            for prow, grow in zip(pred, gt):
                for p, g in zip(prow, grow):
                    if g == IGN:
                        continue
                    tp[c] += p == c and g == c
                    fp[c] += p == c and g != c
                    fn[c] += p != c and g == c
    iou = [tp[c] / (tp[c] + fp[c] + fn[c]) if tp[c] + fp[c] + fn[c] else math.nan for c in range(k)]
    present = [v for v in iou if not math.isnan(v)]
    return iou, sum(present) / len(present) if present else math.nan


def ours(images, k: int) -> tuple[list, float]:
    cm = sum(confusion_matrix(torch.tensor(p), torch.tensor(g), k) for p, g in images)
    assert cm.dtype == torch.int64 and cm.shape == (k, k)
    iou, miou = iou_from_confusion(cm)
    return iou.tolist(), miou


def same(a: list, b: list) -> bool:
    return all((math.isnan(x) and math.isnan(y)) or abs(x - y) < 1e-12 for x, y in zip(a, b))


# K = 4. Class 3 is absent from GT and prediction (NaN, left out). Class 2 is predicted on one
# labelled pixel but never in GT (IoU 0, counted). The IGNORE pixels carry predictions 2 and 3 that
# must not count. Hand-worked: class 0: TP 2, FP 1, FN 1 -> 2/4; class 1: TP 2, FP 1, FN 2 -> 2/5;
# class 2: TP 0, FP 1 -> 0; mIoU = (0.5 + 0.4 + 0) / 3 = 0.3.
CASE = [
    ([[0, 0, 1], [2, 3, 3]], [[0, 0, 0], [1, IGN, IGN]]),   # image 1 (pred, gt)
    ([[1, 1], [0, 2]], [[1, 1], [1, IGN]]),                 # image 2, another size
]


def test_hand_worked_case() -> None:
    iou, miou = ours(CASE, 4)
    assert iou[:3] == pytest.approx([0.5, 0.4, 0.0]) and math.isnan(iou[3])
    assert miou == pytest.approx(0.3)
    assert same(iou, naive_iou(CASE, 4)[0]) and miou == pytest.approx(naive_iou(CASE, 4)[1])


def test_random_cases_match_naive() -> None:
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        k = int(torch.randint(2, 6, (1,), generator=g))
        images = []
        for _ in range(int(torch.randint(1, 4, (1,), generator=g))):
            h, w = (int(v) for v in torch.randint(1, 7, (2,), generator=g))
            gt = torch.randint(-1, k, (h, w), generator=g)  # -1 = IGNORE
            gt[gt == k - 1] = 0  # class k-1 never in GT: only predicted (IoU 0) or absent (NaN)
            pred = torch.randint(0, k, (h, w), generator=g)
            images.append((pred.tolist(), gt.tolist()))
        iou, miou = ours(images, k)
        ref_iou, ref_miou = naive_iou(images, k)
        assert same(iou, ref_iou), trial
        assert (math.isnan(miou) and math.isnan(ref_miou)) or miou == pytest.approx(ref_miou)


def test_ignore_only_and_absent() -> None:
    cm = confusion_matrix(torch.tensor([[1, 2]]), torch.tensor([[IGN, IGN]]), 3)
    assert cm.sum() == 0
    iou, miou = iou_from_confusion(cm)
    assert torch.isnan(iou).all() and math.isnan(miou)  # nothing labelled: the one NaN case
    # one class with a union -> a number, never NaN
    iou, miou = iou_from_confusion(confusion_matrix(torch.tensor([0]), torch.tensor([2]), 5))
    assert miou == 0.0 and not math.isnan(iou[0]) and not math.isnan(iou[2])
    assert torch.isnan(iou[[1, 3, 4]]).all()


# ---------------------------------------------------------------------------------------------
# inference and the distributed evaluation


class TinySeg(nn.Module):
    """A fixed per-pixel model with the torchvision segmentation output {"out": (B, K, H, W)}."""

    def __init__(self, k: int):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, k, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.conv(x)}


def test_slide_inference_equals_whole_for_a_per_pixel_model() -> None:
    # every window gives each pixel the same logit, so the window average must equal whole-image
    model = TinySeg(3).eval()
    x = torch.randn(1, 3, 13, 22)
    with torch.no_grad():
        whole = model(x)["out"]
        for window, stride in (([8, 8], [5, 5]), ([13, 30], [4, 4]), ([20, 9], [20, 9])):
            torch.testing.assert_close(slide_inference(model, x, window, stride), whole)


def synthetic_val(n: int = 5, k: int = 3) -> list:
    g = torch.Generator().manual_seed(1)
    items = []
    for i in range(n):  # different sizes; the image is smaller than the label (eval resize)
        h, w = 6 + i, 9 - i
        label = torch.randint(-1, k, (2 * h, 2 * w), generator=g)
        items.append((torch.randn(3, h, w, generator=g), label, 0))
    return items


WINDOWS = (None, [4, 4])  # whole-image and sliding-window inference


def run_eval(window) -> dict:
    return evaluate(TinySeg(3), synthetic_val(), 3, torch.device("cpu"), window=window,
                    stride=[2, 2] if window else None)


def _worker(rank: int, world: int, port: int, out: str) -> None:
    with gloo_group(rank, world, port):
        torch.save([run_eval(w) for w in WINDOWS], f"{out}.{rank}")


def test_two_process_evaluation_equals_one_process(tmp_path: Path) -> None:
    data = synthetic_val()  # 5 images: rank 0 gets 3, rank 1 gets 2
    ones = [run_eval(w) for w in WINDOWS]
    for one in ones:  # every labelled pixel counted exactly once (no padded duplicates)
        assert one["cm"].sum() == sum(int((lab != IGN).sum()) for _, lab, _ in data)
    out = str(tmp_path / "res")
    mp.spawn(_worker, args=(2, free_port(), out), nprocs=2, join=True)
    for rank in range(2):
        for one, two in zip(ones, torch.load(f"{out}.{rank}", weights_only=False)):
            assert torch.equal(two["cm"], one["cm"])
            assert two["miou"] == one["miou"] and two["aacc"] == one["aacc"]
            assert torch.equal(two["iou"].isnan(), one["iou"].isnan())
