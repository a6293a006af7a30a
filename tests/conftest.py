"""Shared fixtures: `toy_root`, a small toy data root (VOC, ADE20K, COCO-Stuff, Cityscapes
layouts)."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the method's flat modules at the root, what a user runs in tools/, what made the results in
# studies/
for folder in (ROOT / "studies", ROOT / "tools", ROOT):
    sys.path.insert(0, str(folder))

TOY_TRAIN, TOY_VAL = 24, 8


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory) -> Path:
    """Data root holding VOCdevkit/VOC2012, ADEChallengeData2016, coco_stuff164k and cityscapes
    (toy)."""
    from toy import make_toy

    return make_toy(tmp_path_factory.mktemp("toy"), n_train=TOY_TRAIN, n_val=TOY_VAL, seed=0)
