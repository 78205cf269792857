"""assets/make.py draws METHODS.md's two teaching pictures from the ground truth: it runs (fast,
no network, no download) and writes two valid, small, non-blank PNGs."""
import importlib.util
import os

import matplotlib.image
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_make():
    spec = importlib.util.spec_from_file_location("assets_make", os.path.join(ROOT, "assets", "make.py"))
    make = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make)
    return make


@pytest.mark.slow
def test_make_writes_both_pictures(tmp_path):
    make = load_make()
    sizes = make.main(str(tmp_path))
    names = ("centermask_targets.png", "fcosis_targets.png")
    assert sorted(os.path.basename(p) for p in sizes) == sorted(names)
    for name in names:
        path = tmp_path / name
        assert path.exists()
        size = os.path.getsize(path)
        assert size == sizes[str(path)] and 10_000 < size < 200_000, (name, size)
        img = matplotlib.image.imread(path)              # a valid PNG: decodes, (H, W, 3 or 4)
        assert img.ndim == 3 and img.shape[2] in (3, 4), (name, img.shape)
        assert img.shape[0] > 100 and img.shape[1] > 100, (name, img.shape)
        assert img[..., :3].std() > 0.1, f"{name} looks blank"  # images, maps and text, not one colour
