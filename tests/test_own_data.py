"""A user's own COCO-format data, as labelling tools export it (README, "Training on your own
data"): the round trip train -> eval -> predict through the command lines, what CocoInstances
makes of the exports' habits (a background category, ids from 0, folder prefixes, images
without annotations, crowd regions, pictures annotated upright), predict.py on a phone photo's
EXIF orientation, `python pictures.py data` (the ground truth as training reads it), a
3-picture set overfitted by the README's command (its schedule follows the
run), `python data.py subset` (COCO128 from COCO), and starting a model with
categories that are not COCO's from COCO-trained weights (init_fresh on the class layer)."""
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from conftest import ROOT, WEIGHTS_MANIFESTS
from test_train import run

from data import (BACKGROUND_NAMES, SHAPE_CLASSES, CocoInstances, ImageReadError, load_rgb_image, write_coco_subset,
                  write_shapes_dataset)

# a tiny CenterMask on the CPU, as tests/test_train.py's TINY but without the shapes set
TINY_MODEL = ["--dla_channels=(4, 8, 8, 16, 16, 32)", "--head_conv=8", "--shape_size=8", "--dcn=False",
              "--input_size=64", "--batch_size=2", "--num_workers=0", "--log_interval=1", "--device=cpu", "--threads=1"]


def uncompressed_rle(mask):
    """COCO's uncompressed RLE of a (H, W) 0/1 mask, as its crowd regions are stored: run lengths
    of 0s and 1s alternately, from a run of 0s, over the pixels in column-major order."""
    counts, value, length = [], 0, 0
    for v in mask.flatten(order="F").tolist():
        if v != value:
            counts.append(length)
            value, length = v, 0
        length += 1
    return {"size": list(mask.shape), "counts": counts + [length]}


def labelling_tool_export(root, n=6, size=64):
    """A COCO json as labelme2coco writes one, with what other tools add: category 0
    "_background_" with no annotation and the object classes from 1; image and annotation ids
    from 0; file names under a folder ("JPEGImages/000000.jpg", relative to the json's folder);
    JPEG pictures; one more picture without annotation; one object marked as a crowd region
    (iscrowd=1, uncompressed RLE, as COCO's and CVAT's crowd regions). The pictures are shapes
    images (data.write_shapes_dataset). Returns the json's path and the json."""
    src = write_shapes_dataset(str(root / "src"), n_train=n, n_val=0, size=size, seed=2)
    with open(src["train_ann"]) as f:
        shapes = json.load(f)
    os.makedirs(root / "export" / "JPEGImages")
    images, annotations = [], []
    for img in shapes["images"]:
        name = f"JPEGImages/{os.path.splitext(img['file_name'])[0]}.jpg"
        Image.open(os.path.join(src["train_img_dir"], img["file_name"])).save(root / "export" / name, quality=95)
        images.append(dict(img, id=img["id"] - 1, file_name=name))
    empty = np.full((size, size, 3), 127, np.uint8)                      # a picture with nothing in it
    Image.fromarray(empty).save(root / "export" / "JPEGImages" / "empty.jpg")
    images.append({"id": len(images), "file_name": "JPEGImages/empty.jpg", "height": size, "width": size})
    for a in shapes["annotations"]:
        annotations.append(dict(a, id=a["id"] - 1, image_id=a["image_id"] - 1))
    crowd = annotations[0]
    mask = mask_utils.decode({"size": crowd["segmentation"]["size"], "counts": crowd["segmentation"]["counts"].encode()})
    crowd.update(iscrowd=1, segmentation=uncompressed_rle(mask))
    categories = [{"id": 0, "name": "_background_", "supercategory": None}] + \
                 [{"id": k, "name": name, "supercategory": None} for k, name in enumerate(SHAPE_CLASSES, 1)]
    export = {"info": {"description": "exported"}, "licenses": [], "images": images,
              "annotations": annotations, "categories": categories}
    path = root / "export" / "annotations.json"
    with open(path, "w") as f:
        json.dump(export, f)
    return path, export


def test_labelling_tool_export_is_read_as_exported(tmp_path):
    """Guards CocoInstances on an export's habits: the unused "_background_" category is no
    class (one warning says so; labels 0..3 are category ids 1..4, names kept); the crowd
    region is no instance; the picture without annotation gives an empty target; the folder
    prefix of file_name is read under img_dir."""
    ann, export = labelling_tool_export(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = CocoInstances(str(tmp_path / "export"), str(ann))
    said = [str(w.message) for w in caught]
    assert any("category 0 ('_background_') names the background and has no annotation: not a class" in m
               for m in said), said
    assert ds.num_classes == 4 and ds.label_to_cat_id == [1, 2, 3, 4] and ds.class_names == list(SHAPE_CLASSES)
    assert "_background_" in BACKGROUND_NAMES
    crowd = export["annotations"][0]
    per_image = {}
    for a in export["annotations"]:
        per_image[a["image_id"]] = per_image.get(a["image_id"], 0) + (0 if a["iscrowd"] else 1)
    for i, image_id in enumerate(ds.ids):
        _, target = ds[i]
        assert len(target["labels"]) == per_image.get(image_id, 0), image_id
        assert ((target["labels"] >= 0) & (target["labels"] < 4)).all()
    assert ds.ids[-1] == len(export["images"]) - 1 and len(ds[len(ds) - 1][1]["boxes"]) == 0   # the empty one
    assert crowd["image_id"] in ds.ids


def test_categories_that_are_kept_and_warned_about(tmp_path):
    """Guards the other cases: real classes numbered from 0 keep their ids (label k = id k); a
    background-named category that has annotations stays a class; an unused category that is
    not the background stays a class with a warning; a category with crowd regions only is
    named (CVAT exports brush masks as iscrowd=1)."""
    ann, export = labelling_tool_export(tmp_path, n=3)
    export["categories"] = [{"id": k, "name": n} for k, n in enumerate(["ellipse", "rectangle", "triangle", "ring",
                                                                        "Background", "unused"])]
    for a in export["annotations"]:
        a["category_id"] -= 1                                          # ids 0..3
    export["annotations"][1]["category_id"] = 4                        # "Background" has an object
    for a in export["annotations"]:
        if a["category_id"] == 3:
            a["iscrowd"] = 1                                           # "ring": crowd regions only
    with open(ann, "w") as f:
        json.dump(export, f)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = CocoInstances(str(tmp_path / "export"), str(ann))
    said = " | ".join(str(w.message) for w in caught)
    assert ds.label_to_cat_id == [0, 1, 2, 3, 4, 5] and ds.class_names[4] == "Background"
    assert "no annotation at all: 5 (unused)" in said and "names the background" not in said
    assert "3 (ring) only have crowd regions (iscrowd=1), which are never trained on" in said


def test_missing_image_and_upright_annotations_are_explained(tmp_path):
    """Guards two mistakes a first run on one's own export makes: img_dir pointing inside the
    folder prefix of the json's file names (the error names the file where it is, and what to
    change), and a json made on pictures turned upright by their EXIF tag, as labelling tools
    show them (the size mismatch says so)."""
    ann, export = labelling_tool_export(tmp_path, n=2)
    ds = CocoInstances(str(tmp_path / "export" / "JPEGImages"), str(ann))      # one folder too deep
    with pytest.raises(ImageReadError) as e:
        ds[0]
    msg = str(e.value)
    assert "JPEGImages/JPEGImages/000000.jpg" in msg and "file_name 'JPEGImages/000000.jpg'" in msg
    assert "point img_dir at the folder that the json's file names start from" in msg
    # a portrait photo stored lying on its side (EXIF orientation 6), annotated upright (w 40, h 64)
    stored = Image.fromarray(np.zeros((40, 64, 3), np.uint8))
    exif = stored.getexif()
    exif[0x0112] = 6
    stored.save(tmp_path / "export" / "JPEGImages" / "000000.jpg", exif=exif)
    export["images"][0].update(width=40, height=64)
    with open(ann, "w") as f:
        json.dump(export, f)
    ds = CocoInstances(str(tmp_path / "export"), str(ann))
    with pytest.raises(ValueError, match="turned upright by its EXIF orientation tag it is 40x64"):
        ds[0]


def phone_photo(path, fmt):
    """A 48 x 32 (w x h) picture stored lying on its side, with EXIF orientation 6 ("rotate 90
    degrees clockwise to view"): a viewer shows it 32 wide and 48 high, its top-left red corner at
    the top right. The tag is written in the file's own EXIF (JPEG APP1, PNG eXIf)."""
    a = np.zeros((32, 48, 3), np.uint8)
    a[:8, :8] = (255, 0, 0)
    img = Image.fromarray(a)
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(path, format=fmt, exif=exif)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_load_rgb_image_upright_follows_the_exif_orientation(tmp_path, fmt):
    """Guards upright=True (predict.py's pictures): turned as a viewer shows the picture; the
    default (training, COCO's annotations) reads the stored pixels."""
    path = tmp_path / f"photo.{fmt.lower()}"
    phone_photo(path, fmt)
    assert load_rgb_image(path).size == (48, 32)
    up = load_rgb_image(path, upright=True)
    assert up.size == (32, 48)
    assert np.asarray(up)[2, 29, 0] > 200 and np.asarray(up)[2, 2, 0] < 50          # red at the top right


@pytest.mark.slow
def test_own_data_round_trip_train_eval_predict(tmp_path):
    """Guards the README's own-data path end to end, on a labelling tool's export: the quick
    start's config with the data keys of the README's command (data_root, train/val json and
    folder, shapes_dir="") trains a tiny model a few steps, evaluates, saves the classes;
    eval.py reads the val paths from the checkpoint and prints COCO AP, and refuses a val json
    whose categories are not the checkpoint's (one line); predict.py on the
    export's pictures and on a phone photo writes category ids and names of the json (no
    background) in the upright picture's pixels."""
    ann, export = labelling_tool_export(tmp_path)
    data = tmp_path / "export"
    keys = [f"--data_root={data}", "--train_img_dir=.", "--train_ann=annotations.json", "--val_img_dir=.",
            "--val_ann=annotations.json", "--shapes_dir=", f"--out_dir={tmp_path / 'out'}"]
    r = run("train.py", os.path.join(ROOT, "config", "shapes_centermask.py"), *keys, *TINY_MODEL,
            "--max_iters=3", cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "4 classes, 7 train / 7 val images" in r.stdout and "eval @ iter 3" in r.stdout
    assert "names the background and has no annotation" in r.stderr
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", map_location="cpu", weights_only=True)
    assert ckpt["class_names"] == list(SHAPE_CLASSES) and ckpt["label_to_cat_id"] == [1, 2, 3, 4]

    r = run("eval.py", f"--ckpt={tmp_path / 'out' / 'ckpt.pt'}", "--device=cpu", "--num_workers=0", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    stats = json.loads(r.stdout.strip().splitlines()[-1])
    assert 0 <= stats["segm_AP"] <= 1 and 0 <= stats["bbox_AP"] <= 1 and str(ann) in r.stdout
    renumbered = dict(export, categories=[dict(c, id=c["id"] + 10) for c in export["categories"]],
                      annotations=[dict(a, category_id=a["category_id"] + 10) for a in export["annotations"]])
    with open(data / "renumbered.json", "w") as f:
        json.dump(renumbered, f)                                       # the same classes under other ids
    r = run("eval.py", f"--ckpt={tmp_path / 'out' / 'ckpt.pt'}", f"--val_ann={data / 'renumbered.json'}",
            f"--val_img_dir={data}", "--device=cpu", "--num_workers=0", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].endswith(
        "(ids [11, 12, 13, 14] against [1, 2, 3, 4]): its labels would be scored as other classes"), r.stderr[-2000:]

    phone_photo(tmp_path / "phone.jpg", "JPEG")
    for pictures in (data / "JPEGImages", tmp_path / "phone.jpg"):
        r = run("predict.py", f"--ckpt={tmp_path / 'out' / 'ckpt.pt'}", f"--input={pictures}", "--device=cpu",
                "--score_threshold=0", f"--out_dir={tmp_path / 'pred'}", cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        with open(tmp_path / "pred" / "predictions.json") as f:
            preds = json.load(f)
        dets = [d for ds in preds.values() for d in ds]
        assert dets and {d["category_id"] for d in dets} <= {1, 2, 3, 4}
        assert all(d["class"] == SHAPE_CLASSES[d["label"]] for d in dets)
    assert list(preds) == ["phone.jpg"]
    assert all(d["segmentation"]["size"] == [48, 32] for d in preds["phone.jpg"])        # upright: h 48, w 32
    w, h = Image.open(tmp_path / "pred" / "phone_pred.png").size                       # drawn upright (enlarged)
    assert w * 48 == h * 32 and w >= 32


def hand_made_export(root, n=3, size=64):
    """n pictures of size x size (PNG under "images/"), each with a rectangle and an ellipse of
    16-24 px in opposite corners, on noise, and their COCO json as written by hand: polygons,
    categories 1 "rectangle" and 2 "ellipse". Returns the json's path."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size] + 0.5                                         # pixel centres
    os.makedirs(root / "images")
    images, annotations = [], []
    for k in range(n):
        img = rng.normal(120, 25, (size, size, 3))
        centres = rng.permutation([(16, 16), (46, 44)]) + rng.integers(-3, 4, (2, 2))
        for cat, (cx, cy) in enumerate(centres.tolist(), 1):
            a, b = rng.integers(8, 13, 2).tolist()                            # half sides, semi-axes
            t = np.linspace(0, 2 * np.pi, 24, endpoint=False)
            if cat == 1:
                poly, inside = [cx - a, cy - b, cx + a, cy - b, cx + a, cy + b, cx - a, cy + b], \
                    (abs(xx - cx) < a) & (abs(yy - cy) < b)
            else:
                poly = np.stack([cx + a * np.cos(t), cy + b * np.sin(t)], 1).ravel().tolist()
                inside = ((xx - cx) / a) ** 2 + ((yy - cy) / b) ** 2 < 1
            img[inside] = rng.uniform(0, 255, 3)
            annotations.append({"id": len(annotations) + 1, "image_id": k + 1, "category_id": cat, "iscrowd": 0,
                                "bbox": [cx - a, cy - b, 2 * a, 2 * b], "segmentation": [poly]})
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / "images" / f"{k}.png")
        images.append({"id": k + 1, "file_name": f"images/{k}.png", "height": size, "width": size})
    with open(root / "annotations.json", "w") as f:
        json.dump({"images": images, "annotations": annotations,
                   "categories": [{"id": 1, "name": "rectangle"}, {"id": 2, "name": "ellipse"}]}, f)
    return root / "annotations.json"


@pytest.mark.slow
def test_a_small_own_set_trains_with_the_readme_command(tmp_path):
    """Guards a small set under the README's own-data command (the quick start's config: its
    warm-up of 400 iterations, its lr steps at epochs 5.25 and 6.65 of 7), on a model a quarter as
    wide at 64 px: the run's own length moves them. 3 hand-made pictures (train = val) in batches
    of 2: 1 iteration per epoch, the config's run 7 iterations, this one 600 (x 600 / 7); the
    steps at 5.25 x 600 / 7 = 450 and 6.65 x 600 / 7 = 570 (75% and 95%), the warm-up capped at
    600 / 5 = 120, one evaluation (7 x 600 / 7 = 600). Unchanged, it would warm up for 400 of its
    600 iterations, then run at lr x 0.01 (both steps, at iterations 5 and 6, behind it), and
    evaluate every 7 iterations. It overfits to mask AP >= 0.5."""
    hand_made_export(tmp_path)
    r = run("train.py", os.path.join(ROOT, "config", "shapes_centermask.py"), f"--data_root={tmp_path}",
            "--train_img_dir=.", "--train_ann=annotations.json", "--val_img_dir=.", "--val_ann=annotations.json",
            "--shapes_dir=", f"--out_dir={tmp_path / 'out'}", "--dla_channels=(4, 8, 16, 32, 32, 64)",
            "--head_conv=32", "--shape_size=16", "--input_size=64", "--test_input_size=0", "--batch_size=2",
            "--num_workers=0", "--device=cpu", "--threads=1", "--max_iters=600", "--log_interval=100", cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "this run has 600 iterations, its config's 7: lr_steps and eval_every_epochs scaled by 85.71" in r.stdout
    assert "warmup_iters=400 is over a fifth of this 600-iteration run: 120 instead" in r.stdout
    assert "lr steps at iterations [450, 570]" in r.stdout
    assert r.stdout.count("eval @ iter") == 1
    with open(tmp_path / "out" / "eval.json") as f:
        stats = json.load(f)
    assert stats["iter"] == 600 and stats["segm_AP"] >= 0.5, stats


@pytest.mark.slow
def test_pictures_data_draws_what_training_reads(tmp_path):
    """Guards `python pictures.py data` (README, "Training on your own data": look first): the
    first N images of an export, each drawn at draw_predictions' enlargement (64 px -> 6 x 64 =
    384) with its instances' masks and boxes, named after the json's file names; one line with
    the classes. A missing json or picture: one line naming it, exit status 2."""
    ann, export = labelling_tool_export(tmp_path, n=3)
    data = tmp_path / "export"
    out = tmp_path / "look"
    r = run("pictures.py", "data", f"--img_dir={data}", f"--ann={ann}", "--n=2", f"--out={out}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"2 of the 4 images of {ann} drawn into {out}; 4 classes: ellipse, rectangle, triangle, ring" \
        in r.stdout
    assert sorted(os.listdir(out)) == ["JPEGImages_000000.png", "JPEGImages_000001.png"]
    for k in range(2):
        drawn = np.asarray(Image.open(out / f"JPEGImages_00000{k}.png"))
        plain = np.asarray(Image.open(data / f"JPEGImages/00000{k}.jpg")).repeat(6, 0).repeat(6, 1)
        assert drawn.shape == plain.shape == (384, 384, 3)
        assert (np.abs(drawn.astype(int) - plain).sum(-1) > 30).mean() > 0.05   # masks and boxes on it
    os.remove(data / "JPEGImages" / "000001.jpg")
    for ann_file, named in ((data / "missing.json", "annotation file not found: "),
                            (ann, "cannot read image ")):
        r = run("pictures.py", "data", f"--img_dir={data}", f"--ann={ann_file}", f"--out={tmp_path / 'bad'}",
                cwd=tmp_path)
        last = r.stderr.strip().splitlines()[-1]
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
        assert last.startswith(f"pictures.py data: error: {named}"), last
    assert "JPEGImages/000001.jpg" in last


@pytest.mark.slow
def test_train_and_val_jsons_with_other_categories_are_refused(tmp_path):
    """Guards two exports of one project numbered differently (e.g. two tasks of a labelling
    tool): the model's labels are the training json's, so a val json listing other categories
    would score every label as another class. train.py stops with one line naming both."""
    ann, export = labelling_tool_export(tmp_path, n=2)
    export["categories"] = export["categories"][:1] + export["categories"][2:] + [{"id": 9, "name": "ellipse"}]
    for a in export["annotations"]:
        a["category_id"] = 9 if a["category_id"] == 1 else a["category_id"]
    with open(tmp_path / "export" / "val.json", "w") as f:
        json.dump(export, f)
    r = run("train.py", f"--data_root={tmp_path / 'export'}", "--train_img_dir=.", "--train_ann=annotations.json",
            "--val_img_dir=.", "--val_ann=val.json", f"--out_dir={tmp_path / 'out'}", *TINY_MODEL, "--max_iters=1",
            cwd=tmp_path)
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert "val.json lists other categories than" in last and "annotations.json" in last
    assert "[2, 3, 4, 9] against [1, 2, 3, 4]" in last


# -- COCO128 (or any N-image subset) from COCO's own files -----------------------------------------

def fabricated_coco(root):
    """A COCO-style json of 5 images listed out of id order (ids 42, 7, 19, 3, 25), one of them
    (19) without annotations, 3 categories with gaps in their ids, and the image files."""
    os.makedirs(root / "train2017")
    images, anns = [], []
    for image_id in (42, 7, 19, 3, 25):
        name = f"{image_id:012d}.jpg"
        Image.fromarray(np.full((20, 30, 3), image_id, np.uint8)).save(root / "train2017" / name)
        images.append({"id": image_id, "file_name": name, "height": 20, "width": 30})
        for k in range(0 if image_id == 19 else 2):
            anns.append({"id": 100 * image_id + k, "image_id": image_id, "category_id": (1, 5, 90)[k],
                         "bbox": [1, 1, 5, 5], "area": 25.0, "iscrowd": 0, "segmentation": [[1, 1, 6, 1, 6, 6, 1, 6]]})
    coco = {"info": {"year": 2017}, "licenses": [{"id": 1}], "images": images, "annotations": anns,
            "categories": [{"id": c, "name": f"c{c}"} for c in (1, 5, 90)]}
    os.makedirs(root / "annotations")
    with open(root / "annotations" / "instances_train2017.json", "w") as f:
        json.dump(coco, f)
    return root / "annotations" / "instances_train2017.json", coco


def test_data_py_subset_writes_the_first_n_images_in_cocos_layout(tmp_path):
    """Guards `python data.py subset` (README: COCO128 from COCO's own files): the first n
    images by id (an image without annotations included), their annotations, every category
    and the json's other keys, under OUT/train2017 and OUT/annotations/instances_train2017.json,
    where tests/test_coco128.py and config/coco128_overfit.py read COCO128."""
    ann, coco = fabricated_coco(tmp_path / "coco")
    out = tmp_path / "coco128"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "data.py"), "subset", f"--ann={ann}",
                        f"--img_dir={tmp_path / 'coco' / 'train2017'}", "--n=3", f"--out={out}"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"3 images in {out / 'train2017'}, 4 annotations in {out / 'annotations' / 'instances_train2017.json'}" \
        in r.stdout
    with open(out / "annotations" / "instances_train2017.json") as f:
        sub = json.load(f)
    assert [img["id"] for img in sub["images"]] == [3, 7, 19]
    assert sorted(a["id"] for a in sub["annotations"]) == [300, 301, 700, 701]
    assert sub["categories"] == coco["categories"] and sub["info"] == coco["info"] and sub["licenses"] == coco["licenses"]
    assert sorted(os.listdir(out / "train2017")) == ["000000000003.jpg", "000000000007.jpg", "000000000019.jpg"]
    ds = CocoInstances(str(out / "train2017"), str(out / "annotations" / "instances_train2017.json"))
    assert len(ds) == 3 and ds.num_classes == 3 and len(ds[2][1]["boxes"]) == 0


def test_data_py_subset_names_a_missing_image_and_writes_nothing(tmp_path):
    """Guards the subset's refusal: an image of the json that is not in img_dir is named, before
    any file is written."""
    ann, _ = fabricated_coco(tmp_path / "coco")
    os.remove(tmp_path / "coco" / "train2017" / "000000000007.jpg")
    with pytest.raises(FileNotFoundError, match=r"1 of the 3 images .* are not in .*000000000007\.jpg"):
        write_coco_subset(str(ann), str(tmp_path / "coco" / "train2017"), str(tmp_path / "out"), n=3)
    assert not (tmp_path / "out").exists()


# -- COCO-trained weights for a model whose categories are not COCO's -------------------------------

@pytest.mark.slow
def test_centernet_weights_for_own_categories_start_the_class_layer_fresh(tmp_path):
    """Guards the README's advice for published weights on one's own classes: CenterNet's
    DLA-34 (fabricated from its key manifest) into a 3-class model whose json numbers its
    categories 0..2 (not COCO's) is refused with the init_fresh pattern to use; with it, every
    other tensor is loaded and the heatmap's last layer keeps the model's own initialisation
    (its prior bias)."""
    from model import ModelConfig, build_model
    from weights import import_weights
    with open(os.path.join(WEIGHTS_MANIFESTS, "centernet_ctdet_dla34_keys.json")) as f:
        keys = json.load(f)["keys"]
    g = torch.Generator().manual_seed(0)
    state = {k: (torch.rand(shape, generator=g) + 0.5 if k.endswith("running_var") else torch.randn(shape, generator=g))
             for k, shape in keys.items() if not k.endswith("num_batches_tracked")}
    model = build_model(ModelConfig(method="centermask", backbone="dla34", num_classes=3))
    own = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as e:
        import_weights(model, {"state_dict": state}, cat_ids=[0, 1, 2])
    assert "category id(s) [0] of the training json are not COCO categories" in str(e.value)
    assert "--init_fresh='(\"head_sets.*.heatmap.2.*\",)'" in str(e.value)
    report = import_weights(model, {"state_dict": state}, cat_ids=[0, 1, 2], fresh=("head_sets.*.heatmap.2.*",))
    after = model.state_dict()
    assert torch.equal(after["head_sets.0.heatmap.2.bias"], own["head_sets.0.heatmap.2.bias"])
    assert torch.equal(after["head_sets.0.heatmap.0.weight"], state["hm.0.weight"])
    assert sorted(k for k, why in report.ignored.items() if "init_fresh" in why) == ["hm.2.bias", "hm.2.weight"]
