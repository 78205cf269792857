"""pictures.py draws METHODS.md's two teaching pictures from the ground truth
(`python pictures.py assets`): it runs (fast, no network, no download) and writes two valid,
small, non-blank PNGs."""
import os
import subprocess
import sys

import matplotlib.image
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_pictures_writes_both_target_figures(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "pictures.py"), str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    names = ("centermask_targets.png", "fcosis_targets.png")
    assert sorted(os.listdir(tmp_path)) == sorted(names)
    for name in names:
        size = os.path.getsize(tmp_path / name)
        assert 10_000 < size < 200_000, (name, size)
        img = matplotlib.image.imread(tmp_path / name)   # a valid PNG: decodes, (H, W, 3 or 4)
        assert img.ndim == 3 and img.shape[2] in (3, 4), (name, img.shape)
        assert img.shape[0] > 100 and img.shape[1] > 100, (name, img.shape)
        assert img[..., :3].std() > 0.1, f"{name} looks blank"  # images, maps and text, not one colour
