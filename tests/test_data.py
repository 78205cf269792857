"""Tests for data.py: COCO loading, bad input, transforms, collate, the synthetic shapes set.

All hermetic (tiny images and json files written to tmp_path), CPU only. The COCO128 test runs
only when the folder is present.
"""

import contextlib
import functools
import io
import json
import os
import pickle
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import data  # noqa: E402
from data import CocoInstances, build_transforms, collate_fn, write_shapes_dataset  # noqa: E402

COCO128 = os.environ.get("COCO128", os.path.join(ROOT, "data", "coco128"))
# pycocotools' decode triggers a numpy 2 DeprecationWarning inside pycocotools itself
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

MEAN = torch.tensor(data.IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(data.IMAGENET_STD).view(3, 1, 1)


# -----------------------------------------------------------------------------
# helpers: tiny COCO files

def square_poly(x1, y1, x2, y2):
    return [[x1, y1, x2, y1, x2, y2, x1, y2]]


def ann(id, image_id=1, category_id=1, bbox=(2, 2, 10, 10), segmentation=None, iscrowd=0):
    if segmentation is None:
        x, y, w, h = bbox
        segmentation = square_poly(x, y, x + w, y + h)
    return {"id": id, "image_id": image_id, "category_id": category_id, "bbox": list(bbox),
            "segmentation": segmentation, "iscrowd": iscrowd, "area": float(bbox[2] * bbox[3])}


def make_coco(tmp_path, anns=(), images=None, cats=None, size=(20, 20), ext="png"):
    """Write one solid-colour image of `size` = (h, w) and a json; returns (img_dir, ann_file)."""
    h, w = size
    img_dir = tmp_path / "images"
    img_dir.mkdir(exist_ok=True)
    if images is None:
        images = [{"id": 1, "file_name": f"a.{ext}", "height": h, "width": w}]
        Image.new("RGB", (w, h), (100, 120, 140)).save(img_dir / f"a.{ext}")
    cats = cats if cats is not None else [{"id": 1, "name": "thing"}]
    ann_file = tmp_path / "ann.json"
    coco = {"images": images, "annotations": list(anns), "categories": cats}
    ann_file.write_text(json.dumps(coco))
    return str(img_dir), str(ann_file)


def mask_extent(mask):
    """(x1, y1, x2, y2) pixel-edge box of a non-empty (h, w) mask."""
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1


# -----------------------------------------------------------------------------
# 1. masks, crowd, empty images, categories

def test_polygon_mask_decodes_to_expected_pixels(tmp_path):
    """Guards polygon decoding (wrong h/w order, wrong frame): a 10x10 square -> 100 pixels."""
    ds = CocoInstances(*make_coco(tmp_path, [ann(1, bbox=(2, 2, 10, 10))]))
    image, t = ds[0]
    assert image.shape == (3, 20, 20) and image.dtype == torch.float32
    assert t["masks"].shape == (1, 20, 20) and t["masks"].dtype == torch.uint8
    m = t["masks"][0]
    assert m.sum().item() == 100 and m[2:12, 2:12].all()
    assert t["boxes"].tolist() == [[2.0, 2.0, 12.0, 12.0]]
    assert t["labels"].tolist() == [0] and t["labels"].dtype == torch.int64
    assert t["image_id"] == 1 and t["scale"] == 1.0
    assert t["orig_size"].tolist() == [20, 20] and t["size"].tolist() == [20, 20]


def test_uncompressed_rle_decodes_column_major(tmp_path):
    """Guards reading RLE counts row-major: COCO RLE runs down columns (Fortran order)."""
    # 4x4 image, counts [5, 3, 8]: 5 zeros, 3 ones, 8 zeros -> column 1, rows 1..3.
    seg = {"size": [4, 4], "counts": [5, 3, 8]}
    ds = CocoInstances(*make_coco(tmp_path, [ann(1, bbox=(1, 1, 1, 3), segmentation=seg)],
                                  size=(4, 4)))
    expected = torch.zeros(4, 4, dtype=torch.uint8)
    expected[1:4, 1] = 1
    assert torch.equal(ds[0][1]["masks"][0], expected)


def test_compressed_rle_decodes(tmp_path):
    """Guards compressed RLE given as a json str (pycocotools wants bytes)."""
    m = np.zeros((20, 20), np.uint8)
    m[3:9, 4:15] = 1
    m[10:17, 6] = 1
    rle = mask_utils.encode(np.asfortranarray(m))
    seg = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
    ds = CocoInstances(*make_coco(tmp_path, [ann(1, bbox=(4, 3, 11, 14), segmentation=seg)]))
    assert torch.equal(ds[0][1]["masks"][0], torch.from_numpy(m))


def test_crowd_annotations_excluded(tmp_path):
    """Guards crowd regions leaking into training targets as instances."""
    crowd = ann(2, bbox=(0, 0, 20, 20), segmentation={"size": [20, 20], "counts": [0, 400]},
                iscrowd=1)
    ds = CocoInstances(*make_coco(tmp_path, [ann(1), crowd]))
    t = ds[0][1]
    assert len(t["labels"]) == 1 and t["masks"][0].sum().item() == 100
    assert len(ds.coco.getAnnIds(iscrowd=None)) == 2  # still in the COCOeval ground truth


def test_image_without_annotations_is_valid(tmp_path):
    """Guards crashes (stack of empty lists) or dropping images that have zero instances."""
    ds = CocoInstances(*make_coco(tmp_path, []))
    assert len(ds) == 1
    for transforms in (None, build_transforms("centernet", True, 32),
                       build_transforms("centernet", False, 32)):
        ds.transforms = transforms
        image, t = ds[0]
        h, w = image.shape[-2:]
        assert t["boxes"].shape == (0, 4) and t["boxes"].dtype == torch.float32
        assert t["labels"].shape == (0,) and t["labels"].dtype == torch.int64
        assert t["masks"].shape == (0, h, w) and t["masks"].dtype == torch.uint8


def test_noncontiguous_category_ids(tmp_path):
    """Guards using COCO category ids as labels (COCO's 1..90 with gaps would break C)."""
    cats = [{"id": 42, "name": "c42"}, {"id": 3, "name": "c3"}, {"id": 7, "name": "c7"}]
    anns = [ann(1, category_id=42, bbox=(0, 0, 5, 5)), ann(2, category_id=3, bbox=(6, 6, 5, 5)),
            ann(3, category_id=7, bbox=(12, 12, 5, 5))]
    ds = CocoInstances(*make_coco(tmp_path, anns, cats=cats))
    assert ds.cat_ids == [3, 7, 42] and ds.num_classes == 3
    assert ds.class_names == ["c3", "c7", "c42"]
    labels = ds[0][1]["labels"].tolist()
    assert sorted(labels) == [0, 1, 2]
    cat_of = {a["id"]: a["category_id"] for a in anns}
    assert [ds.label_to_cat_id[lab] for lab in labels] == [cat_of[i] for i in (1, 2, 3)]
    assert all(ds.cat_id_to_label[ds.label_to_cat_id[k]] == k for k in range(3))


def test_subset_restricts_coco_ground_truth(tmp_path):
    """Guards COCOeval scoring images that the dataset (max_images) never showed the model."""
    images = [{"id": i, "file_name": "a.png", "height": 20, "width": 20} for i in (5, 2, 9)]
    img_dir, ann_file = make_coco(tmp_path, [ann(1, image_id=5), ann(2, image_id=9)],
                                  images=images)
    Image.new("RGB", (20, 20)).save(os.path.join(img_dir, "a.png"))
    ds = CocoInstances(img_dir, ann_file)
    assert ds.ids == [2, 5, 9]
    ds = CocoInstances(img_dir, ann_file, max_images=2)
    assert ds.ids == [2, 5] and sorted(ds.coco.imgs) == [2, 5] and list(ds.coco.anns) == [1]
    pickle.loads(pickle.dumps(ds))  # DataLoader workers may need to pickle it


# -----------------------------------------------------------------------------
# 2. bad input

def test_unknown_category_names_annotation(tmp_path):
    """Guards a KeyError deep in a worker instead of a message naming the annotation."""
    img_dir, ann_file = make_coco(tmp_path, [ann(1), ann(77, category_id=5)])
    with pytest.raises(ValueError, match=r"annotation id 77.*category_id 5") as e:
        CocoInstances(img_dir, ann_file)
    assert ann_file in str(e.value)


def test_annotation_of_missing_image_names_annotation(tmp_path):
    """Guards annotations silently attached to nothing (or a KeyError) when image_id is wrong."""
    img_dir, ann_file = make_coco(tmp_path, [ann(1), ann(88, image_id=123)])
    with pytest.raises(ValueError, match=r"annotation id 88.*image_id 123") as e:
        CocoInstances(img_dir, ann_file)
    assert ann_file in str(e.value)


def test_missing_json_names_file(tmp_path):
    """Guards an anonymous error when the annotation path is wrong."""
    img_dir, _ = make_coco(tmp_path, [])
    missing = str(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match=re.escape(missing)):
        CocoInstances(img_dir, missing)


@pytest.mark.parametrize("text", ['{"images": [', "[]", '{"images": []}', "\xff\xfe"])
def test_malformed_json_names_file(tmp_path, text):
    """Guards a bare JSONDecodeError/KeyError/assert that does not say which file is broken."""
    img_dir, ann_file = make_coco(tmp_path, [])
    with open(ann_file, "wb") as f:
        f.write(text.encode("latin-1"))
    with pytest.raises(ValueError, match=re.escape(ann_file)):
        CocoInstances(img_dir, ann_file)


def _expect_image_error(ds, path):
    with pytest.raises((RuntimeError, OSError), match=re.escape(str(path))):
        ds[0]


def test_missing_image_names_path(tmp_path):
    """Guards a bare FileNotFoundError from inside a DataLoader worker with no image path."""
    img_dir, ann_file = make_coco(tmp_path, [ann(1)])
    os.remove(os.path.join(img_dir, "a.png"))
    _expect_image_error(CocoInstances(img_dir, ann_file), os.path.join(img_dir, "a.png"))


def test_corrupt_png_and_jpeg_name_path(tmp_path):
    """Guards corrupt files giving PIL's UnidentifiedImageError without the file's path."""
    for ext, junk in (("png", b"\x89PNG\r\n\x1a\n" + b"garbage" * 20),
                      ("jpg", b"\xff\xd8\xff\xe0" + b"garbage" * 20)):
        img_dir, ann_file = make_coco(tmp_path, [ann(1)], ext=ext)
        path = os.path.join(img_dir, f"a.{ext}")
        with open(path, "wb") as f:
            f.write(junk)
        _expect_image_error(CocoInstances(img_dir, ann_file), path)


def test_truncated_jpeg_names_path(tmp_path):
    """Guards lazy decoding: a truncated JPEG only fails in load(), which must be inside the try."""
    img_dir, ann_file = make_coco(tmp_path, [ann(1)], size=(64, 64), ext="jpg")
    path = os.path.join(img_dir, "a.jpg")
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, format="JPEG", quality=95)
    with open(path, "wb") as f:
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
    _expect_image_error(CocoInstances(img_dir, ann_file), path)


def test_image_size_mismatch_names_path(tmp_path):
    """Guards masks decoded at the json's size silently misaligned with the actual pixels."""
    img_dir, ann_file = make_coco(tmp_path, [ann(1)])
    Image.new("RGB", (30, 20)).save(os.path.join(img_dir, "a.png"))
    with pytest.raises(ValueError, match=re.escape(os.path.join(img_dir, "a.png"))):
        CocoInstances(img_dir, ann_file)[0]


@pytest.mark.parametrize("mode,ext", [("L", "png"), ("1", "png"), ("P", "png"), ("RGBA", "png"),
                                      ("LA", "png"), ("CMYK", "jpg"), ("I;16", "png")])
def test_image_modes_load_as_rgb(tmp_path, mode, ext):
    """Guards 1-, 2- or 4-channel tensors reaching the model, and 16-bit images clipped white."""
    img_dir, ann_file = make_coco(tmp_path, [ann(1)], ext=ext)
    path = os.path.join(img_dir, f"a.{ext}")
    if mode == "I;16":  # left half 0, right half 65535 -> 0 and 255 after scaling to 8 bits
        arr = np.zeros((20, 20), np.uint16)
        arr[:, 10:] = 65535
        Image.fromarray(arr).save(path)
    else:
        Image.new("RGB", (20, 20), (200, 60, 30)).convert(mode).save(path)
    ds = CocoInstances(img_dir, ann_file)
    image, t = ds[0]
    assert image.shape == (3, 20, 20) and torch.isfinite(image).all()
    rgb = np.asarray(ds.load_image(0))
    assert rgb.shape == (20, 20, 3) and rgb.dtype == np.uint8
    if mode == "I;16":
        assert (rgb[:, :10] == 0).all() and (rgb[:, 10:] == 255).all()
        assert torch.allclose(image[:, 0, 15], ((1 - MEAN) / STD).flatten(), atol=1e-5)
    assert t["masks"].shape == (1, 20, 20)


@pytest.mark.parametrize("seg", [[], [[1, 1, 5, 5]], [[1, 1, 5, 1, 5]],
                                 [[1, 1, float("nan"), 1, 5, 5]], [[1, 1, "x", 1, 5, 5]], "junk",
                                 {"size": [9, 9], "counts": "abc"},
                                 [[1, 1, 3, 3, 6, 6, 2, 2]], [[4, 4, 4, 4, 4, 4]]])
def test_invalid_segmentation_warns_and_skips(tmp_path, seg):
    """Guards crashes (pycocotools reads a 4-number polygon as a box; COCOeval dies on an empty
    one) or garbage masks from empty, 2-point, odd-length, NaN or non-numeric polygons,
    wrong-size RLE and degenerate polygons (collinear points, one repeated point: no area, an
    empty mask that COCOeval would count as an object nobody can find): one warning naming the
    annotation and image, the sample still loads, and COCOeval on `coco` still runs."""
    from pycocotools.cocoeval import COCOeval

    img_dir, ann_file = make_coco(tmp_path, [ann(1, bbox=(10, 10, 5, 5)),
                                             ann(7, bbox=(1, 1, 5, 5), segmentation=seg)])
    with pytest.warns(UserWarning, match=r"annotation id 7 of image .*a\.png"):
        ds = CocoInstances(img_dir, ann_file)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, t = ds[0]
        ds[0]
    assert not [w for w in caught if "annotation id 7" in str(w.message)]  # once, not per load
    assert t["boxes"].tolist() == [[10.0, 10.0, 15.0, 15.0]]  # the valid instance is kept
    rle = mask_utils.encode(np.asfortranarray(t["masks"][0].numpy()))
    dt = ds.coco.loadRes([{"image_id": 1, "category_id": 1, "segmentation": rle, "score": 0.9}])
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(ds.coco, dt, "segm")
        ev.evaluate(), ev.accumulate(), ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)  # the broken annotation is not counted as a miss


def test_invalid_polygon_parts_dropped_valid_parts_kept(tmp_path):
    """Guards losing a whole instance (or crashing) for one stray 2-point polygon part."""
    seg = [[2, 2, 8, 2, 8, 8, 2, 8], [1, 1, 5, 5], []]
    img_dir, ann_file = make_coco(tmp_path, [ann(3, bbox=(2, 2, 6, 6), segmentation=seg)])
    with pytest.warns(UserWarning, match=r"annotation id 3 .*2 invalid polygon part"):
        ds = CocoInstances(img_dir, ann_file)
    m = ds[0][1]["masks"]
    assert m.shape == (1, 20, 20) and m.sum() == 36


def test_self_crossing_polygon_is_kept_as_rasterised(tmp_path):
    """Guards rejecting (or mis-filling) a self-crossing polygon, which is legal COCO: the bow-tie
    (2,2) -> (12,12) -> (12,2) -> (2,12) is two triangles meeting at (7,7), each of base 10 and
    height 5, so 2 * 25 = 50 pixels; no warning, and the gap above and below the crossing stays
    empty. (Its shoelace area is 0: the lobes cancel, so "zero area" cannot be the flatness test.)"""
    img_dir, ann_file = make_coco(tmp_path, [ann(5, bbox=(2, 2, 10, 10),
                                                 segmentation=[[2, 2, 12, 12, 12, 2, 2, 12]])])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        ds = CocoInstances(img_dir, ann_file)
        m = ds[0][1]["masks"][0]
    assert m.sum() == 50
    assert m[7, 3] and m[7, 11]                  # (row y, column x): inside the left and right lobes
    assert not m[3, 7] and not m[11, 7]          # above and below the crossing point

def test_zero_area_and_outside_boxes_dropped(tmp_path):
    """Guards NaN/inf box targets from zero-size boxes and boxes off the image."""
    anns = [ann(1, bbox=(2, 2, 5, 5)),
            ann(2, bbox=(5, 5, 0, 8), segmentation=square_poly(5, 5, 6, 13)),   # zero width
            ann(3, bbox=(30, 30, 5, 5), segmentation=square_poly(2, 2, 4, 4)),  # outside
            ann(4, bbox=(-5, -5, 5, 5), segmentation=square_poly(0, 0, 1, 1)),  # touches corner
            ann(5, bbox=(15, 16, 10, 10), segmentation=square_poly(15, 16, 20, 20))]  # clipped
    ds = CocoInstances(*make_coco(tmp_path, anns))
    t = ds[0][1]
    assert t["boxes"].tolist() == [[2.0, 2.0, 7.0, 7.0], [15.0, 16.0, 20.0, 20.0]]
    assert t["masks"].shape[0] == 2 and len(t["labels"]) == 2


# -----------------------------------------------------------------------------
# 3. transforms

def test_test_transform_scale_and_size(tmp_path):
    """Guards the map back to the original image: size = round(H0*s), round(W0*s) with
    s = input_size / max(H0, W0), and boxes scaled by exactly s (eval divides by it)."""
    anns = [ann(1, bbox=(10, 5, 40, 20)), ann(2, bbox=(60.5, 20.25, 33.3, 21.1))]
    ds = CocoInstances(*make_coco(tmp_path, anns, size=(50, 100)),
                       transforms=build_transforms("centernet", train=False, input_size=64))
    image, t = ds[0]
    assert image.shape == (3, 32, 64)
    assert t["scale"] == pytest.approx(0.64) and t["size"].tolist() == [32, 64]
    assert t["orig_size"].tolist() == [50, 100]
    orig = torch.tensor([[10, 5, 50, 25], [60.5, 20.25, 93.8, 41.35]], dtype=torch.float32)
    assert torch.allclose(t["boxes"], orig * t["scale"], atol=1e-5)
    assert torch.allclose(t["boxes"] / t["scale"], orig, atol=1e-4)
    assert t["masks"].shape == (2, 32, 64)


def test_fcos_multi_scale_training(tmp_path):
    """Guards FCOS's training resize: without multi-scale (scale_range (1, 1)) the short side is
    exactly input_size (a 20x60 image at input_size 40 -> 40x120, scale 2); with scale_range
    (0.5, 0.5) the short side is 0.5 * 40 = 20 (scale 1: 20x60); with (0.5, 1.0) every short side
    lies in [20, 40] and the long-side cap (max_size) still holds (40 * 3 = 120 > 100 -> 100)."""
    ds = CocoInstances(*make_coco(tmp_path, [ann(1)], size=(20, 60)),
                       transforms=build_transforms("fcos", train=True, input_size=40, scale_range=(1.0, 1.0),
                                                   flip_prob=0.0))
    image, t = ds[0]
    assert image.shape[-2:] == (40, 120) and t["scale"] == pytest.approx(2.0)
    ds.transforms = build_transforms("fcos", train=True, input_size=40, scale_range=(0.5, 0.5), flip_prob=0.0)
    assert ds[0][0].shape[-2:] == (20, 60)
    ds.transforms = build_transforms("fcos", train=True, input_size=40, scale_range=(0.5, 1.0), max_size=100)
    shorts = set()
    for _ in range(20):
        h, w = ds[0][0].shape[-2:]
        assert 20 <= h <= 40 and w <= 100
        shorts.add(h)
    assert len(shorts) > 3  # really random


def test_fcos_test_transform_sizes(tmp_path):
    """Guards the FCOS resize rule: short side -> 800 unless the long side would pass 1333."""
    ds = CocoInstances(*make_coco(tmp_path, [ann(1)], size=(20, 60)),
                       transforms=build_transforms("fcos", train=False, input_size=800))
    image, t = ds[0]
    assert t["scale"] == pytest.approx(1333 / 60) and image.shape == (3, 444, 1333)
    ds.transforms = build_transforms("fcos", train=False, input_size=40, max_size=200)
    assert ds[0][0].shape == (3, 40, 120) and ds[0][1]["scale"] == 2.0
    with pytest.raises(TypeError, match="scale_rnage"):
        build_transforms("centernet", True, 64, scale_rnage=(1, 1))
    with pytest.raises(ValueError, match="kind"):
        build_transforms("yolo", True, 64)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    return write_shapes_dataset(str(root), n_train=40, n_val=8, size=128, seed=0)


def test_train_transform_square_and_in_sync(shapes):
    """Guards boxes/masks drifting apart under scale+crop+flip (e.g. flipping the image but not
    the boxes), boxes leaving the canvas, and non-square training inputs."""
    ds = CocoInstances(shapes["train_img_dir"], shapes["train_ann"], max_images=12,
                       transforms=build_transforms("centernet", train=True, input_size=96))
    n_kept = n_tight = 0
    for seed in range(3):
        torch.manual_seed(seed)
        for i in range(len(ds)):
            image, t = ds[i]
            assert image.shape == (3, 96, 96) and t["size"].tolist() == [96, 96]
            assert t["masks"].shape[1:] == (96, 96)
            b = t["boxes"]
            assert len(b) == len(t["labels"]) == len(t["masks"])
            assert (b >= 0).all() and (b <= 96).all()
            assert ((b[:, 2:] - b[:, :2]) >= 1).all()
            # the zoom is 96 / side, side = round(s * 128) for s in 0.6 .. 1.3: 96/166 .. 96/77
            assert 96 / 166 - 1e-6 <= t["scale"] <= 96 / 77 + 1e-6
            for box, mask in zip(b.tolist(), t["masks"]):
                assert mask.any()
                x1, y1, x2, y2 = mask_extent(mask)
                # the mask lies inside its box (1-2 px of rounding from the resize)
                assert x1 >= box[0] - 2 and y1 >= box[1] - 2, (box, mask_extent(mask))
                assert x2 <= box[2] + 2 and y2 <= box[3] + 2, (box, mask_extent(mask))
                if min(box) > 0 and max(box) < 96:
                    # not cut by the crop: shapes' boxes are tight, so the edges agree (up to
                    # a 1-px tip that nearest-neighbour downsampling may drop, 1.3 px at 0.75x)
                    assert all(abs(e - bb) <= 3 for e, bb in zip((x1, y1, x2, y2), box))
                    n_tight += 1
                n_kept += 1
    assert n_kept > 50 and n_tight > 20


def test_train_flip_moves_boxes_masks_and_pixels(tmp_path):
    """Guards a flip applied to the image only. Scale 1 on a 64x64 image with a 64 input: the
    window is 64 px, centred on the random pixel (cx, cy) (border 16: cx, cy in [16, 48)), so it
    starts at x0 = cx - 32, y0 = cy - 32 and a point x lands at x - x0, or 64 - (x - x0) when
    flipped. The draws are replayed from the same seed (_centernet_draw comes first); the box
    (10, 20)-(30, 40) (clipped to the input), its mask and a red pixel (original column 20, row
    30) must all land there; both outcomes occur."""
    img_dir, ann_file = make_coco(tmp_path, [ann(1, bbox=(10, 20, 20, 20))], size=(64, 64))
    arr = np.zeros((64, 64, 3), np.uint8)
    arr[:, :32] = (255, 0, 0)  # red left half
    Image.fromarray(arr).save(os.path.join(img_dir, "a.png"))
    ds = CocoInstances(img_dir, ann_file)
    red = ((torch.tensor([1.0, 0, 0]) - MEAN.flatten()) / STD.flatten())
    black = -MEAN.flatten() / STD.flatten()
    outcomes, shifts = set(), set()
    for seed in range(12):
        ds.transforms = build_transforms("centernet", True, 64, scale_range=(1, 1), color_jitter=0)
        torch.manual_seed(seed)
        s, side, cx, cy, flipped = ds.transforms._centernet_draw(64, 64)
        assert (s, side) == (1.0, 64) and 16 <= cx < 48 and 16 <= cy < 48
        x0, y0 = cx - 32, cy - 32
        torch.manual_seed(seed)
        image, t = ds[0]
        x1, x2 = 10 - x0, 30 - x0
        if flipped:
            x1, x2 = 64 - x2, 64 - x1
        box = [min(max(v, 0), 64) for v in (x1, 20 - y0, x2, 40 - y0)]  # clipped to the input
        assert t["boxes"][0].tolist() == box and t["scale"] == 1.0
        assert mask_extent(t["masks"][0]) == tuple(box)
        col = 20 - x0                                   # original column 20 (red), row 30
        col = 63 - col if flipped else col              # pixel c -> 63 - c when mirrored
        assert torch.allclose(image[:, 30 - y0, col], red, atol=1e-5)
        col = 40 - x0                                   # original column 40 (black)
        col = 63 - col if flipped else col
        assert torch.allclose(image[:, 30 - y0, col], black, atol=1e-5)
        outcomes.add(flipped)
        shifts.add((x0, y0))
    assert outcomes == {True, False} and len(shifts) > 6


def test_centernet_scales_and_border_by_hand():
    """Guards the two rules of CenterNet's crop (its ctdet.py): the crop sizes lo, lo + 0.1, ...
    up to hi ((0.6, 1.3): np.arange(0.6, 1.4, 0.1), 8 values; (1, 1): 1 alone; (0.9, 1.1): 3;
    (1, 1.25): 1.0, 1.1, 1.2, nothing past hi), and `_get_border(128, size)`: 640 - 128 = 512 >
    128 -> 128; 480 -> 128; 200 - 128 = 72 <= 128, halve: 200 - 64 = 136 > 64 -> 64; 150 - 64 =
    86 > 64 -> 64; 128 - 64 = 64 <= 64, halve: 128 - 32 = 96 > 32 -> 32; 64 -> 16; 2 - 1 = 1 <=
    1 -> 0; 1 -> 0 (the centre range [0, 1) of a 1 px side)."""
    assert data.centernet_scales((0.6, 1.3)) == pytest.approx([0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3])
    assert data.centernet_scales((1.0, 1.0)) == [1.0]
    assert data.centernet_scales((0.9, 1.1)) == pytest.approx([0.9, 1.0, 1.1])
    assert data.centernet_scales((1.0, 1.25)) == pytest.approx([1.0, 1.1, 1.2])
    assert [data.centernet_border(s) for s in (640, 480, 200, 150, 128, 64, 2, 1)] == \
        [128, 128, 64, 64, 32, 16, 0, 0]
    with pytest.raises(ValueError, match="scale_range"):
        build_transforms("centernet", True, 64, scale_range=(1.3, 0.6))


def test_centernet_zoom_and_crop_centre_distribution():
    """Guards CenterNet's zoom and crop-centre distribution on a 640 x 480 image, input 512, over
    4000 seeded draws. The window's side is s * 640 for s in 0.6, ..., 1.3 = 384, 448, ..., 832
    px, so the zoom 512 / side takes the 8 values 512 / (s * 640) = 0.8 / s: 1.333, 1.143, 1.0,
    0.889, 0.8, 0.727, 0.667, 0.615, each ~1/8 of the time (500 +- 21 expected: limits 400-600).
    Mean zoom 0.8 * mean(1/s): 1/s = 1.6667 + 1.4286 + 1.25 + 1.1111 + 1 + 0.9091 + 0.8333 +
    0.7692 = 8.968, / 8 = 1.121, * 0.8 = 0.8968 (one draw's sd 0.233, so the mean of 4000 is
    within 0.004; limit 0.015). The zoom is 1/s: the old rule s * 512 / 640 would have a mean of
    0.8 * 0.95 = 0.76. Centre: border 128 on both sides, so cx in [128, 640 - 128) = [128, 512),
    cy in [128, 352), integers, reaching both ends; the mean of cx is (128 + 511) / 2 = 319.5.
    Flips ~1/2. And the whole transform applies what was drawn: target["scale"] = 512 / side."""
    t = build_transforms("centernet", True, 512)
    torch.manual_seed(0)
    draws = [t._centernet_draw(480, 640) for _ in range(4000)]
    zooms = torch.tensor([512 / side for _, side, _, _, _ in draws])
    values = sorted(set(zooms.tolist()))
    expected = sorted(512 / (s * 640) for s in (0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3))
    assert len(values) == 8 and values == pytest.approx(expected, abs=1e-3)
    counts = [(zooms == v).sum().item() for v in values]
    assert all(400 <= c <= 600 for c in counts), counts
    assert zooms.mean().item() == pytest.approx(0.8968, abs=0.015)
    cx = torch.tensor([d[2] for d in draws])
    cy = torch.tensor([d[3] for d in draws])
    assert cx.min() >= 128 and cx.max() < 512 and cy.min() >= 128 and cy.max() < 352
    assert cx.min() <= 131 and cx.max() >= 508 and cy.min() <= 131 and cy.max() >= 348
    assert cx.float().mean().item() == pytest.approx(319.5, abs=8)
    assert 0.45 <= sum(d[4] for d in draws) / 4000 <= 0.55
    empty = {"boxes": data.tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=(480, 640)),
             "labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 480, 640, dtype=torch.uint8),
             "image_id": 1, "orig_size": torch.tensor([480, 640])}
    img = Image.new("RGB", (640, 480), (100, 120, 140))
    for seed in range(6):
        torch.manual_seed(seed)
        side = t._centernet_draw(480, 640)[1]
        torch.manual_seed(seed)
        image, out = t(img, empty)
        assert image.shape == (3, 512, 512) and out["scale"] == 512 / side


def test_centernet_crop_centre_small_image():
    """Guards the border rule on an image smaller than 2 x 128: 200 x 150 (w x h) -> borders 64
    and 64 (test above), so cx in [64, 136), cy in [64, 86), every value reachable; the window
    sides are s * 200 = 120, 140, ..., 260."""
    t = build_transforms("centernet", True, 512)
    torch.manual_seed(1)
    draws = [t._centernet_draw(150, 200) for _ in range(2000)]
    assert {d[2] for d in draws} == set(range(64, 136))
    assert {d[3] for d in draws} == set(range(64, 86))
    assert {d[1] for d in draws} == {120, 140, 160, 180, 200, 220, 240, 260}


def test_centernet_color_aug_by_hand():
    """Guards CenterNet's colour augmentation (its utils/image.py color_aug) on a 2 x 1 RGB image,
    p1 = (0.6, 0.4, 0.2), p2 = (0.2, 0.4, 0.6), draws fixed.
    Grey (OpenCV's BGR2GRAY, 0.299 R + 0.587 G + 0.114 B), once, before the three operations:
      gs1 = 0.1794 + 0.2348 + 0.0228 = 0.437, gs2 = 0.0598 + 0.2348 + 0.0684 = 0.363, mean 0.4.
    (a) order brightness, contrast, saturation; alphas 1.2, 0.5, 1.5; lighting (0, 1, 0):
      brightness x 1.2:          p1 (0.72, 0.48, 0.24)        p2 (0.24, 0.48, 0.72)
      contrast 0.5 x + 0.5 * 0.4: p1 (0.56, 0.44, 0.32)        p2 (0.32, 0.44, 0.56)
      saturation 1.5 x - 0.5 gs:  p1 - 0.2185: (0.6215, 0.4415, 0.2615)
                                  p2 - 0.1815: (0.2985, 0.4785, 0.6585)
      (gs is the grey of the ORIGINAL image: recomputed after contrast it would be 0.4622 for p1)
      lighting: v = 0.01817699 * (-0.69563484, 0.00994535, 0.71832671) = (-0.0126445, 0.0001808,
      0.0130570) in CenterNet's B, G, R order, so R += 0.0130570, G += 0.0001808, B -= 0.0126445:
                                  p1 (0.6345570, 0.4416808, 0.2488555)
                                  p2 (0.3115570, 0.4786808, 0.6458555)
      (adding v unreversed would give R 0.6088555 and B 0.2745570 for p1)
    (b) order saturation, brightness, contrast, same alphas, no lighting:
      saturation: p1 (0.9, 0.6, 0.3) - 0.2185 = (0.6815, 0.3815, 0.0815); p2 (0.1185, 0.4185, 0.7185)
      brightness: p1 (0.8178, 0.4578, 0.0978); p2 (0.1422, 0.5022, 0.8622)
      contrast:   p1 (0.6089, 0.4289, 0.2489); p2 (0.2711, 0.4511, 0.6311)
    (c) no clipping: a grey 0.9 pixel, brightness 1.4 (contrast and saturation 1.0) -> 1.26."""
    img = torch.tensor([[[0.6, 0.2]], [[0.4, 0.4]], [[0.2, 0.6]]])                    # (3, 1, 2)
    out = data.centernet_color_aug(img, [0, 1, 2], torch.tensor([1.2, 0.5, 1.5]), torch.tensor([0.0, 1.0, 0.0]))
    expected = torch.tensor([[0.6345570, 0.4416808, 0.2488555], [0.3115570, 0.4786808, 0.6458555]])
    torch.testing.assert_close(out[:, 0].T, expected, atol=2e-6, rtol=0)
    assert torch.equal(img[:, 0, 0], torch.tensor([0.6, 0.4, 0.2]))                  # input untouched
    out = data.centernet_color_aug(img, [2, 0, 1], torch.tensor([1.2, 0.5, 1.5]), torch.zeros(3))
    expected = torch.tensor([[0.6089, 0.4289, 0.2489], [0.2711, 0.4511, 0.6311]])
    torch.testing.assert_close(out[:, 0].T, expected, atol=2e-6, rtol=0)
    out = data.centernet_color_aug(torch.full((3, 1, 1), 0.9), [1, 0, 2], torch.tensor([1.4, 1.0, 1.0]),
                                   torch.zeros(3))
    torch.testing.assert_close(out.flatten(), torch.full((3,), 1.26), atol=1e-6, rtol=0)


def test_centernet_train_transform_draws_colour_after_geometry(tmp_path):
    """Guards the wiring of the colour augmentation into the training transform: on a uniform
    64 x 64 image (100, 120, 140) with scale 1 and input 64, every pixel inside the image is
    normalise(centernet_color_aug(colour, order, alphas, light)) with the draws replayed from the
    seed in the transform's order (geometry, then order = randperm(3), alphas = 1 + 0.4 * U(-1, 1),
    light = 0.1 * N(0, 1)); outside the image it is 0 (the mean colour, as collate_fn pads)."""
    ds = CocoInstances(*make_coco(tmp_path, [], size=(64, 64)),
                       transforms=build_transforms("centernet", True, 64, scale_range=(1, 1)))
    colour = torch.tensor([100, 120, 140]) / 255
    for seed in range(4):
        torch.manual_seed(seed)
        _, _, cx, cy, flip = ds.transforms._centernet_draw(64, 64)
        order = torch.randperm(3).tolist()
        alphas = 1 + 0.4 * (2 * torch.rand(3) - 1)
        light = 0.1 * torch.randn(3)
        want = data.centernet_color_aug(colour.view(3, 1, 1), order, alphas, light).flatten()
        want = (want - MEAN.flatten()) / STD.flatten()
        torch.manual_seed(seed)
        image, t = ds[0]
        x0, y0 = cx - 32, cy - 32                     # the image covers [-x0, 64 - x0) of the input
        image = image.flip(-1) if flip else image     # (flipped: [x0, 64 + x0))
        inside = image[:, max(-y0, 0):64 - max(y0, 0), max(-x0, 0):64 - max(x0, 0)].flatten(1)
        torch.testing.assert_close(inside, want[:, None].expand_as(inside), atol=1e-5, rtol=0)
        assert (image.abs().sum(0) == 0).sum() == 64 * 64 - inside.shape[1]   # the rest is 0


def test_centernet_train_boxes_and_masks_agree_with_pixels(tmp_path):
    """Guards boxes, masks and pixels drifting apart under the zoom, crop and flip: a white
    rectangle (200, 150)-(360, 330) on a black 640 x 480 image, annotated by that box. After the
    transform (no colour augmentation) the white pixels (brightness > 0.5 after undoing the
    normalisation) must span target["boxes"] to within 1 px, and the mask must cover the same
    pixels (IoU > 0.95); where the crop cut the rectangle away, no white pixel is left."""
    img_dir, ann_file = make_coco(tmp_path, [ann(1, bbox=(200, 150, 160, 180))], size=(480, 640))
    arr = np.zeros((480, 640, 3), np.uint8)
    arr[150:330, 200:360] = 255
    Image.fromarray(arr).save(os.path.join(img_dir, "a.png"))
    ds = CocoInstances(img_dir, ann_file, transforms=build_transforms("centernet", True, 512, color_jitter=0))
    n_kept, flips = 0, set()
    for seed in range(16):
        torch.manual_seed(seed)
        flips.add(ds.transforms._centernet_draw(480, 640)[4])
        torch.manual_seed(seed)
        image, t = ds[0]
        white = (image * STD + MEAN).mean(0) > 0.5                                   # (512, 512)
        if len(t["boxes"]) == 0:
            assert white.sum() == 0
            continue
        n_kept += 1
        box = t["boxes"][0].tolist()
        assert all(abs(e - b) <= 1 for e, b in zip(mask_extent(white), box)), (mask_extent(white), box)
        m = t["masks"][0].bool()
        assert (m & white).sum() / (m | white).sum() > 0.95
    assert n_kept >= 10 and flips == {True, False}


def test_keep_res_test_transform(tmp_path):
    """Guards keep_res (CenterNet's --keep_res): the centernet test transform leaves the image at
    its own size (50 x 100 stays 50 x 100, scale 1.0), boxes and masks unchanged; it is a
    test-time option of the centernet kind only."""
    anns = [ann(1, bbox=(10, 5, 40, 20)), ann(2, bbox=(60.5, 20.25, 33.3, 21.1))]
    ds = CocoInstances(*make_coco(tmp_path, anns, size=(50, 100)))
    plain_image, plain = ds[0]                                           # transforms=None: scale 1
    ds.transforms = build_transforms("centernet", False, 512, keep_res=True)
    image, t = ds[0]
    assert image.shape == (3, 50, 100) and t["scale"] == 1.0 and t["size"].tolist() == [50, 100]
    orig = torch.tensor([[10, 5, 50, 25], [60.5, 20.25, 93.8, 41.35]], dtype=torch.float32)
    torch.testing.assert_close(t["boxes"], orig)
    assert torch.equal(t["masks"], plain["masks"]) and torch.equal(image, plain_image)
    for kind, train in (("centernet", True), ("fcos", False)):
        with pytest.raises(ValueError, match="keep_res"):
            build_transforms(kind, train, 512, keep_res=True)


# -----------------------------------------------------------------------------
# 3b. the masks' fast path (_resize_masks) against the previous one, the reference

def reference_resize_masks(masks, src, dst, canvas, flip=False):
    """The previous mask path: every instance resized over the whole region with TF.resize
    (nearest, as tv_tensors.Mask), pasted into a zero canvas, flipped last."""
    (x0, y0, x1, y1), (u0, v0, u1, v1) = src, dst
    out = torch.zeros(masks.shape[0], *canvas, dtype=torch.uint8)
    if masks.shape[0]:
        out[:, v0:v1, u0:u1] = TF.resize(tv_tensors.Mask(masks[:, y0:y1, x0:x1]), [v1 - v0, u1 - u0])
    return TF.horizontal_flip(tv_tensors.Mask(out)).as_subclass(torch.Tensor) if flip else out


def reference_transform(transform, monkeypatch):
    """The previous transforms, (pil_image, target) -> (image, target), on contiguous masks (the
    previous layout): the centernet training crop with reference_resize_masks; the fcos and test
    paths as they were, v2.Resize of image and masks together, then v2.RandomHorizontalFlip of
    image, boxes and masks (its own draw)."""
    def call(pil_image, target):
        target = dict(target, masks=tv_tensors.Mask(target["masks"].contiguous()))
        if transform.kind == "centernet" and transform.train:
            with monkeypatch.context() as mp:
                mp.setattr(data, "_resize_masks", reference_resize_masks)
                return transform(pil_image, target)
        image = TF.to_image(pil_image)
        H0, W0 = image.shape[-2:]
        scale = transform._scale(H0, W0)
        h, w = max(1, round(H0 * scale)), max(1, round(W0 * scale))
        image, masks = v2.Resize((h, w), antialias=True)(image, target["masks"])
        boxes = tv_tensors.BoundingBoxes(target["boxes"].as_subclass(torch.Tensor) * scale,
                                         format="XYXY", canvas_size=(h, w))
        if transform.train:
            scale = 0.5 * (h / H0 + w / W0)
        if transform.flip_prob > 0:
            image, boxes, masks = v2.RandomHorizontalFlip(transform.flip_prob)(image, boxes, masks)
        return data._finish(data._to_normalized(image, transform.input_format), boxes, masks, target, scale)
    return call


def assert_same_sample(got, want, what):
    (image, t), (image_ref, t_ref) = got, want
    assert torch.equal(image, image_ref), what
    assert t.keys() == t_ref.keys(), what
    for k in t:
        assert torch.equal(t[k], t_ref[k]) if torch.is_tensor(t[k]) else t[k] == t_ref[k], (what, k)
    assert t["masks"].dtype == torch.uint8 and t["masks"].is_contiguous(), what


def test_nearest_index_is_tv_resize_of_masks():
    """Guards _nearest_index drifting from the nearest-neighbour resize that TF.resize applies
    to a tv_tensors.Mask (the fast mask path would then differ from the previous one): picking
    columns by it gives TF.resize's result, down- and upsampling, identity, x2, odd sizes."""
    g = torch.Generator().manual_seed(0)
    for n_in in (1, 2, 3, 7, 64, 127, 480, 640, 1333):
        for n_out in (1, 2, 5, 64, 96, 127, 256, 512, 800, 1066, 1399, n_in, 2 * n_in):
            m = torch.randint(0, 2, (16, 1, n_in), dtype=torch.uint8, generator=g)  # a wrong index shows
            want = TF.resize(tv_tensors.Mask(m), [1, n_out])
            assert torch.equal(m[:, :, data._nearest_index(n_in, n_out)], want), (n_in, n_out)


@pytest.mark.parametrize("column_major", [False, True])
def test_resize_masks_equals_reference(column_major):
    """Guards the fast mask path (each instance resampled over its own extent only, into a zero
    canvas) against the previous one (reference_resize_masks): bit for bit, for contiguous
    masks and CocoInstances' column-major ones, identity, up- and downsampling, one output
    pixel, a crop pasted into a larger canvas (the centernet window), flips, an empty mask,
    single pixels on the corners and edges, pixels outside the cropped region."""
    g = torch.Generator().manual_seed(0)
    H0, W0 = 37, 53
    masks = torch.zeros(9, H0, W0, dtype=torch.uint8)
    masks[0, 5:20, 10:30] = 1                                      # a rectangle
    masks[1] = torch.rand(H0, W0, generator=g) < 0.3               # noise everywhere
    masks[2, 0, 0] = masks[2, -1, -1] = 1                          # two corners
    masks[3, 17, 0] = masks[3, 0, 40] = 1                          # two edges
    masks[4, 30:, 45:] = 1                                         # bottom right: outside some crops
    masks[6, 10, 12] = 1                                           # one pixel (5 stays empty)
    masks[7, 2:35, 2:51] = torch.rand(33, 49, generator=g) < 0.9   # large, with holes
    masks[8, :, 26] = 1                                            # one column
    if column_major:  # (N, H0, W0) view of (N, W0, H0) memory, as CocoInstances decodes
        masks = masks.transpose(1, 2).contiguous().transpose(1, 2)
    cases = [((0, 0, W0, H0), (0, 0, W0, H0), (H0, W0)),     # identity
             ((0, 0, W0, H0), (0, 0, 88, 62), (62, 88)),     # upsampling (fcos)
             ((0, 0, W0, H0), (0, 0, 20, 14), (14, 20)),     # downsampling
             ((0, 0, W0, H0), (0, 0, 1, 1), (1, 1)),         # to one pixel
             ((7, 3, 41, 30), (10, 0, 64, 45), (64, 64)),    # a crop pasted into a canvas (centernet)
             ((12, 0, W0, 22), (0, 9, 24, 32), (32, 32)),
             ((0, 0, W0, H0), (5, 11, 47, 40), (48, 48))]    # the whole image inside a larger window
    for src, dst, canvas in cases:
        for flip in (False, True):
            got = data._resize_masks(tv_tensors.Mask(masks), src, dst, canvas, flip)
            assert got.dtype == torch.uint8 and got.is_contiguous() and got.shape == (9, *canvas)
            assert torch.equal(got, reference_resize_masks(masks, src, dst, canvas, flip)), (src, dst, flip)
    assert data._resize_masks(masks[:0], *cases[1]).shape == (0, 62, 88)


TRANSFORM_CASES = [("centernet", True, {}), ("fcos", True, {}), ("fcos", True, {"scale_range": (0.8, 1.0)}),
                   ("centernet", False, {}), ("centernet", False, {"keep_res": True}), ("fcos", False, {})]


def assert_transform_matches_reference(ds, transform, monkeypatch, seeds, what):
    """Every sample of `ds` through `transform` and through its reference_transform, from the
    same torch seed (0 .. seeds - 1), must be the same sample bit for bit."""
    reference = reference_transform(transform, monkeypatch)
    for seed in range(seeds):
        for i in range(len(ds)):
            ds.transforms = transform
            torch.manual_seed(seed)
            got = ds[i]
            ds.transforms = reference
            torch.manual_seed(seed)
            assert_same_sample(got, ds[i], (*what, seed, ds.ids[i]))


def test_transforms_equal_reference_on_shapes(shapes, monkeypatch):
    """Guards the transforms against the previous ones (reference_transform) on the synthetic
    set, whose masks are compressed RLE: from the same seed the same image, boxes, labels and
    masks, bit for bit, for the centernet crop (flips, windows leaving the image), fcos training
    (single- and multi-scale, flips) and the test transforms."""
    ds = CocoInstances(shapes["train_img_dir"], shapes["train_ann"], max_images=6)
    for kind, train, kw in TRANSFORM_CASES:
        size, kw = (96, kw) if kind == "centernet" else (160, dict(kw, max_size=267))
        transform = build_transforms(kind, train, size, **kw)
        assert_transform_matches_reference(ds, transform, monkeypatch, 3 if train else 1, (kind, train, kw))


# -----------------------------------------------------------------------------
# 4. collate

def test_collate_pads_images_and_masks():
    """Guards batch shapes that are not multiples of the backbone stride, masks left unpadded
    (shape mismatch with the batch), and padding that overwrites or shifts content."""
    def sample(h, w, n):
        img = torch.randn(3, h, w)
        masks = torch.ones(n, h, w, dtype=torch.uint8)
        return img, {"masks": masks, "boxes": torch.zeros(n, 4),
                     "labels": torch.zeros(n, dtype=torch.int64)}
    batch = [sample(50, 70, 2), sample(64, 33, 0)]
    images, targets = collate_fn(batch)
    assert images.shape == (2, 3, 64, 96)
    assert torch.equal(images[0, :, :50, :70], batch[0][0]) and images[0, :, 50:].abs().sum() == 0
    assert images[0, :, :, 70:].abs().sum() == 0
    assert torch.equal(images[1, :, :64, :33], batch[1][0])
    assert targets[0]["masks"].shape == (2, 64, 96) and targets[1]["masks"].shape == (0, 64, 96)
    assert targets[0]["masks"].sum() == 2 * 50 * 70 and targets[0]["masks"].dtype == torch.uint8
    assert batch[0][1]["masks"].shape == (2, 50, 70)  # inputs not modified in place
    images, targets = functools.partial(collate_fn, size_divisibility=128)(batch)
    assert images.shape == (2, 3, 128, 128) and targets[0]["masks"].shape == (2, 128, 128)


def mixed_orientation_set(tmp_path, sizes):
    """A CocoInstances of blank images of the given (h, w), one box each, under FCOS's test transform
    at short side 64 (the sizes below keep theirs)."""
    (tmp_path / "img").mkdir()
    images, anns = [], []
    for i, (h, w) in enumerate(sizes, start=1):
        Image.new("RGB", (w, h)).save(tmp_path / "img" / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "height": h, "width": w})
        anns.append({"id": i, "image_id": i, "category_id": 1, "bbox": [4, 4, 20, 20], "area": 400.0,
                     "iscrowd": 0, "segmentation": [[4, 4, 24, 4, 24, 24, 4, 24]]})
    (tmp_path / "ann.json").write_text(json.dumps({"images": images, "annotations": anns,
                                                   "categories": [{"id": 1, "name": "a"}]}))
    return CocoInstances(str(tmp_path / "img"), str(tmp_path / "ann.json"),
                         transforms=build_transforms("fcos", False, 64, max_size=128))


def test_aspect_ratio_grouping_halves_the_padded_area(tmp_path):
    """Guards FCOS's aspect-ratio grouping (train.py, transform "fcos"). 8 images alternating
    landscape 64 x 128 and portrait 128 x 64 (h x w), in order, batches of 2: plain batches pair
    a landscape with a portrait, each padded to 128 x 128, 4 x 2 x 128^2 = 131072 pixels; grouped,
    (0, 2), (1, 3), (4, 6), (5, 7) pad to their own 64 x 128: 4 x 2 x 8192 = 65536, half."""
    dataset = mixed_orientation_set(tmp_path, [(64, 128), (128, 64)] * 4)
    groups = data.aspect_ratio_groups(dataset)
    assert groups == [0, 1] * 4
    order = torch.utils.data.SequentialSampler(dataset)

    def padded_pixels(batches):
        return sum(collate_fn([dataset[i] for i in b])[0][:, 0].numel() for b in batches)
    plain = list(torch.utils.data.BatchSampler(order, 2, drop_last=True))
    grouped = list(data.GroupedBatchSampler(order, groups, 2))
    assert grouped == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert padded_pixels(plain) == 131072 and padded_pixels(grouped) == 65536


def test_grouped_batch_sampler_epoch_length_leftovers_and_ranks():
    """Guards the epoch of GroupedBatchSampler: len(sampler) // batch_size batches, as the plain
    drop_last batches train.py's schedule counts. Groups 0 0 0 0 0 1 1 1 in order, batches of 2:
    [0, 1], [2, 3], [5, 6] fill up, leaving 4 (group 0) and 7 (group 1); 8 // 2 = 4 batches, so
    one more: the tie goes to the group that arrived first, filled with its first index: [4, 0].
    One group gives BatchSampler's batches. Under DDP (2 ranks of a DistributedSampler over 10
    images, groups by parity), every rank yields 5 // 2 = 2 one-group batches of its own indices."""
    groups = [0, 0, 0, 0, 0, 1, 1, 1]
    order = range(8)
    assert list(data.GroupedBatchSampler(order, groups, 2)) == [[0, 1], [2, 3], [5, 6], [4, 0]]
    shuffled = torch.utils.data.RandomSampler(order, generator=torch.Generator())
    shuffled.generator.manual_seed(0)  # each pass draws a permutation: the same one for both (as train.py)
    grouped = list(data.GroupedBatchSampler(shuffled, [1] * 8, 3))
    shuffled.generator.manual_seed(0)
    assert grouped == list(torch.utils.data.BatchSampler(shuffled, 3, drop_last=True)) and len(grouped) == 2
    parity = [i % 2 for i in range(10)]
    for rank in (0, 1):
        sampler = torch.utils.data.DistributedSampler(range(10), num_replicas=2, rank=rank, shuffle=True, seed=1,
                                                      drop_last=True)
        batches = list(data.GroupedBatchSampler(sampler, parity, 2))
        assert len(batches) == 2 and all(len({parity[i] for i in b}) == 1 for b in batches)
        assert {i for b in batches for i in b} <= set(sampler)


def test_dataloader_end_to_end(shapes):
    """Guards collate/dataset incompatibilities (types, keys) in a real DataLoader."""
    ds = CocoInstances(shapes["val_img_dir"], shapes["val_ann"],
                       transforms=build_transforms("centernet", False, 100))
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate_fn)
    images, targets = next(iter(loader))
    assert images.shape == (4, 3, 128, 128) and len(targets) == 4
    for t in targets:
        assert set(t) == {"boxes", "labels", "masks", "image_id", "orig_size", "size", "scale"}
        assert t["masks"].shape[1:] == (128, 128) and t["size"].tolist() == [100, 100]


def test_dataloader_worker_batch_equals_main_process(shapes):
    """Guards collate_fn's batch in a DataLoader worker (allocated uninitialised in shared
    memory, only the padding zeroed): the batch a worker sends equals the one collated in the
    main process, padding included (100 px inputs padded to 128)."""
    ds = CocoInstances(shapes["val_img_dir"], shapes["val_ann"],
                       transforms=build_transforms("fcos", False, 100, max_size=150))
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate_fn, num_workers=1)
    images, targets = next(iter(loader))
    want_images, want_targets = collate_fn([ds[i] for i in range(4)])
    assert images.shape == (4, 3, 128, 128) and torch.equal(images, want_images)
    for t, want in zip(targets, want_targets):
        assert t["masks"].shape[1:] == (128, 128) and torch.equal(t["masks"], want["masks"])
        assert torch.equal(t["boxes"], want["boxes"]) and torch.equal(t["labels"], want["labels"])


# -----------------------------------------------------------------------------
# 5. synthetic shapes

def _read_tree(root):
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = fh.read()
    return out


def test_shapes_deterministic(tmp_path):
    """Guards unseeded randomness (global RNGs, dict order) making the quick start
    irreproducible."""
    a = write_shapes_dataset(str(tmp_path / "a"), n_train=6, n_val=3, size=64, seed=3)
    write_shapes_dataset(str(tmp_path / "b"), n_train=6, n_val=3, size=64, seed=3)
    write_shapes_dataset(str(tmp_path / "c"), n_train=6, n_val=3, size=64, seed=4)
    ta, tb, tc = (_read_tree(tmp_path / k) for k in "abc")
    assert len(ta) == 6 + 3 + 2 and ta == tb and ta != tc
    assert set(a) == {"train_img_dir", "train_ann", "val_img_dir", "val_ann"}
    assert not [f for f in ta if f.endswith(".tmp")]  # atomic json writes leave no temp file


def test_shapes_prefix_and_missing(tmp_path):
    """Guards train.py's reuse of a bigger shapes set (the quick start writes 2000 train images,
    the FCOS configs read the first 1000 of the same folder): the first n images of an
    (n + k)-image set must be the n-image set byte for byte, and shapes_dataset_missing must
    say why a set cannot serve (missing json, too few images, other size) and accept one that can."""
    from data import shapes_dataset_missing
    write_shapes_dataset(str(tmp_path / "small"), n_train=3, n_val=2, size=64, seed=5)
    write_shapes_dataset(str(tmp_path / "big"), n_train=5, n_val=4, size=64, seed=5)
    small, big = _read_tree(tmp_path / "small"), _read_tree(tmp_path / "big")
    pngs = [f for f in small if f.endswith(".png")]
    assert len(pngs) == 5 and all(small[f] == big[f] for f in pngs)
    for split, n in (("train", 3), ("val", 2)):
        name = os.path.join("annotations", f"instances_{split}.json")
        a, b = json.loads(small[name]), json.loads(big[name])
        assert a["images"] == b["images"][:n]
        assert a["annotations"] == [x for x in b["annotations"] if x["image_id"] <= n]
    big_root = str(tmp_path / "big")
    assert shapes_dataset_missing(big_root, 5, 4, 64) == ""
    assert shapes_dataset_missing(big_root, 3, 2, 64) == ""         # a bigger set serves
    assert "has 5 images, 6 wanted" in shapes_dataset_missing(big_root, 6, 4, 64)
    assert "instances_val.json has 4 images, 9 wanted" in shapes_dataset_missing(big_root, 5, 9, 64)
    assert "64x64 images, 128x128 wanted" in shapes_dataset_missing(big_root, 5, 4, 128)
    assert "instances_train.json is missing" in shapes_dataset_missing(str(tmp_path / "none"), 1, 1, 64)
    with open(os.path.join(big_root, "annotations", "instances_val.json"), "w") as f:
        f.write("{not json")
    assert "instances_val.json is unreadable" in shapes_dataset_missing(big_root, 5, 4, 64)


def test_shapes_content(shapes):
    """Guards a synthetic set too easy to test instance segmentation: needs >= 3 classes, 1-10
    instances per image, overlapping/occluding same-class instances, small and large objects,
    and COCO-valid annotations (tight bbox, area, compressed RLE) that CocoInstances loads."""
    with open(shapes["train_ann"]) as f:
        d = json.load(f)
    assert len(d["categories"]) >= 3 and len(d["images"]) == 40
    per_image = {}
    for a in d["annotations"]:
        per_image.setdefault(a["image_id"], []).append(a)
    assert set(per_image) == {img["id"] for img in d["images"]}
    assert all(1 <= len(v) <= 10 for v in per_image.values())
    assert len({a["category_id"] for a in d["annotations"]}) >= 3

    touching_same_class = 0
    sides = []
    for anns in per_image.values():
        masks = []
        for a in anns:
            seg = a["segmentation"]
            rle = {"size": seg["size"], "counts": seg["counts"].encode()}
            m = mask_utils.decode(rle).astype(bool)
            assert m.sum() == a["area"] >= 12 and a["iscrowd"] == 0
            ys, xs = np.nonzero(m)
            x1, y1, x2, y2 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
            assert a["bbox"] == [x1, y1, x2 - x1, y2 - y1]
            masks.append((a["category_id"], m))
            sides.append(max(a["bbox"][2:]))
        for i in range(len(masks)):
            ci, mi = masks[i]
            grown = mi.copy()  # 1-px dilation: visible parts of overlapping shapes touch
            grown[1:] |= mi[:-1]
            grown[:-1] |= mi[1:]
            grown[:, 1:] |= mi[:, :-1]
            grown[:, :-1] |= mi[:, 1:]
            touching_same_class += sum(cj == ci and (grown & mj).any() for cj, mj in masks[i + 1:])
    assert touching_same_class >= 5
    assert min(sides) <= 12 and max(sides) >= 128 / 3

    ds = CocoInstances(shapes["train_img_dir"], shapes["train_ann"])
    assert ds.num_classes == len(d["categories"])
    for i in range(0, 40, 5):
        image, t = ds[i]
        assert image.shape == (3, 128, 128) and len(t["labels"]) == len(per_image[ds.ids[i]])
        assert t["labels"].min() >= 0 and t["labels"].max() < ds.num_classes


def test_shapes_cli(tmp_path):
    """Guards the documented command `python data.py shapes --out=DIR ...` breaking."""
    out = tmp_path / "cli"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "data.py"), "shapes", f"--out={out}",
                        "--n_train=3", "--n_val=2", "--size=48", "--seed=1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "instances_train.json" in r.stdout and "instances_val.json" in r.stdout
    assert len(os.listdir(out / "train")) == 3 and len(os.listdir(out / "val")) == 2
    with open(out / "annotations" / "instances_val.json") as f:
        assert len(json.load(f)["images"]) == 2


# -----------------------------------------------------------------------------
# 6. real data (COCO128), when present

@pytest.mark.skipif(not os.path.isdir(COCO128), reason=f"COCO128 not found at {COCO128}")
def test_coco128_real_images():
    """Guards real-data surprises the synthetic set cannot show: JPEG decoding, 80 categories
    with gaps in their ids, polygons with holes/parts, crowd RLE exclusion."""
    ann_file = os.path.join(COCO128, "annotations", "instances_train2017.json")
    img_dir = os.path.join(COCO128, "train2017")
    with open(ann_file) as f:
        d = json.load(f)
    crowd_images = sorted({a["image_id"] for a in d["annotations"] if a["iscrowd"]})
    assert sum(a["iscrowd"] for a in d["annotations"]) == 10
    ids = sorted(img["id"] for img in d["images"])[:8] + crowd_images[:2]
    n_noncrowd = {i: sum(1 for a in d["annotations"] if a["image_id"] == i and not a["iscrowd"])
                  for i in ids}

    ds = CocoInstances(img_dir, ann_file)
    ds.ids = ids  # these images only
    assert ds.num_classes == 80 and ds.cat_ids[-1] == 90
    for i, image_id in enumerate(ids):  # original size: every non-crowd annotation, no crowd
        _, t = ds[i]
        assert len(t["labels"]) == n_noncrowd[image_id]
    for train, size in ((True, 128), (False, 160)):
        torch.manual_seed(0)
        ds.transforms = build_transforms("centernet", train=train, input_size=size)
        for i in range(len(ds)):
            image, t = ds[i]
            h, w = t["size"].tolist()
            assert image.shape == (3, h, w) and max(h, w) == size
            if train:
                assert h == w == size
            else:
                H0, W0 = t["orig_size"].tolist()
                assert (h, w) == (round(H0 * t["scale"]), round(W0 * t["scale"]))
            assert torch.isfinite(image).all()
            assert len(t["labels"]) <= n_noncrowd[t["image_id"]]
            if len(t["labels"]):
                assert 0 <= t["labels"].min() and t["labels"].max() < 80
                assert (t["masks"].flatten(1).sum(1) > 0).all()
                assert ((t["boxes"][:, 2:] - t["boxes"][:, :2]) >= 1).all()


@pytest.mark.skipif(not os.path.isdir(COCO128), reason=f"COCO128 not found at {COCO128}")
@pytest.mark.filterwarnings("ignore:.*categories have no annotation at all")
def test_coco128_fast_masks_equal_reference(monkeypatch):
    """Guards the loader's fast mask path on real images (polygons with holes and several
    parts, crowd RLE skipped, landscape and portrait, the training sizes 512 and 800):
    (1) the decoded masks (column-major, a transposed view) are pycocotools' annToMask of every
    non-crowd annotation; (2) every transform gives what the previous one gave
    (reference_transform) from the same seed: images, boxes, labels equal and every instance's
    mask identical, IoU 1. Bound measured on all 128 images, 3 seeds, both training transforms
    and the test ones: every mask bit-identical (the fast path resamples with the resize's own
    source indices), so the bound asserted is equality. Here 12 images, to keep it short."""
    ann_file = os.path.join(COCO128, "annotations", "instances_train2017.json")
    with open(ann_file) as f:
        d = json.load(f)
    images = sorted(d["images"], key=lambda im: im["id"])
    crowd = sorted({a["image_id"] for a in d["annotations"] if a["iscrowd"]})[:2]
    portrait = [im["id"] for im in images if im["height"] > im["width"]][:2]
    ids = list(dict.fromkeys([im["id"] for im in images[:8]] + crowd + portrait))
    ds = CocoInstances(os.path.join(COCO128, "train2017"), ann_file)
    ds.ids = ids  # these images only
    for i, image_id in enumerate(ids):                                  # (1) decoding
        _, t = ds[i]
        anns = [a for a in ds.coco.imgToAnns[image_id] if not a["iscrowd"]]
        want = np.stack([ds.coco.annToMask(a) for a in anns])
        assert torch.equal(t["masks"], torch.from_numpy(want)), image_id
    for kind, train, kw in TRANSFORM_CASES:                            # (2) the transforms
        if kw.get("keep_res") or kw.get("scale_range"):
            continue  # (on the shapes set; the 12 images x 6 cases here would double the time)
        size, kw = (512, kw) if kind == "centernet" else (800, dict(kw, max_size=1333))
        transform = build_transforms(kind, train, size, **kw)
        assert_transform_matches_reference(ds, transform, monkeypatch, 2 if train else 1, (kind, train))


def test_dataset_paths_shapes_and_data_root():
    """Guards train.py and eval.py finding the data in different places: the shapes layout
    under shapes_dir wins; otherwise paths are joined to data_root unless absolute."""
    from data import dataset_paths
    p = dataset_paths({"shapes_dir": "s", "data_root": "ignored", "val_ann": "x.json"})
    assert p["val_img_dir"] == os.path.join("s", "val")
    assert p["train_ann"] == os.path.join("s", "annotations", "instances_train.json")
    p = dataset_paths({"shapes_dir": "", "data_root": "coco", "train_img_dir": "train2017",
                       "train_ann": "/abs/a.json", "val_img_dir": "val2017"})
    assert p["train_img_dir"] == os.path.join("coco", "train2017") and p["train_ann"] == "/abs/a.json"
    assert p["val_ann"] is None


def test_written_files_get_the_usual_permissions(tmp_path):
    """Guards predictions.json and eval.py's --results_json being written mode 0600 (as a
    temporary file made by tempfile.mkstemp and renamed is): every file of data.write_atomic gets
    0666 & ~umask, as a plain open() gives (umask 022: 0644; umask 002: 0664)."""
    old = os.umask(0o022)
    try:
        data.write_json({"a": 1}, str(tmp_path / "predictions.json"))
        os.umask(0o002)
        data.write_atomic(str(tmp_path / "ckpt.pt"), functools.partial(torch.save, {}))
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "predictions.json").st_mode & 0o777 == 0o644
    assert os.stat(tmp_path / "ckpt.pt").st_mode & 0o777 == 0o664


def test_data_warning_prints_once_as_one_line(tmp_path):
    """Guards each data warning printing twice with Python's file:line and source line (train.py
    reads one json as its train and val set): one line, "warning: <message>", once per message,
    while other warnings keep Python's form."""
    img_dir, ann_file = make_coco(tmp_path, [ann(1)], cats=[{"id": 1, "name": "a"}, {"id": 2, "name": "b"}])
    script = (f"import sys, warnings; sys.path.insert(0, {str(ROOT)!r}); import data\n"
              f"data.CocoInstances({img_dir!r}, {ann_file!r})\n"
              f"data.CocoInstances({img_dir!r}, {ann_file!r})\nwarnings.warn('other')\n")
    (tmp_path / "s.py").write_text(script)
    r = subprocess.run([sys.executable, str(tmp_path / "s.py")], capture_output=True, text=True, timeout=120)
    lines = r.stderr.splitlines()
    assert r.returncode == 0 and len(lines) == 3, r.stderr
    assert lines[0] == f"warning: {ann_file}: categories with no annotation at all: 2 (b) (still classes of " \
                       "the model; COCOeval skips them)"
    assert lines[1:] == [f"{tmp_path / 's.py'}:4: UserWarning: other", "  warnings.warn('other')"]
