"""
A trained model on your own pictures.

    python predict.py --ckpt=out/shapes_centermask/ckpt.pt --input=photo.jpg
    python predict.py --ckpt=out/shapes_centermask/ckpt.pt --input=my_pictures/          # every file in it
    python predict.py --ckpt=out/shapes_centermask/ckpt.pt --input="my_pictures/*.png"   # a glob
    python predict.py --ckpt=... --input=... --maps=True     # also the teaching maps of the method

For every picture it writes `<stem>_pred.png` (masks, boxes, class names and scores drawn over
the picture) into `out_dir` (default: a `predict` folder beside the checkpoint), and one results
file `predictions.json`, keyed by file name:

    {"photo.jpg": [{"label": 2, "class": "triangle", "category_id": 3, "score": 0.91,
                    "bbox": [x, y, w, h], "segmentation": {"size": [H, W], "counts": "..."}}, ...]}

in the picture's pixels as a viewer shows it: a photo whose EXIF orientation tag says it is stored
turned (a phone's portrait photo, stored lying on its side) is turned upright first, and its boxes,
masks and drawing are in the upright picture (COCO's xywh boxes and RLE masks, as eval.py's results). Only the
detections with score >= score_threshold are drawn and written. The picture goes through the test
transform of the checkpoint's training config (its input size, keep_res, input_format), as
eval.py does. A file that is not an image, or cannot be read, is named and skipped (none left:
exit status 2); every file is written whole (a temporary name, then renamed), so an interrupted
run leaves no half file.

The checkpoint says what each label means ("class_names", "label_to_cat_id", saved by train.py);
for a checkpoint written before train.py saved them, the training json named by its config is
read, and failing that the classes are called by their label number.
"""

import glob
import json
import os
import sys

import numpy as np
import torch

from data import (ImageReadError, collate_fn, dataset_paths, load_rgb_image, unlabelled_sample,
                  write_json)
from eval import (Progress, checkpoint_transform, load_checkpoint_model, to_coco_results,
                  to_original)
from model import NON_FINITE_DEFORM, check_deform_finite
from pictures import draw_predictions, network_input_rgb, save_maps_figure, teaching_maps, write_png

# -- config (overridable: python predict.py --key=value) ------------------------------------------
ckpt = ""                     # checkpoint written by train.py (required)
input = ""                    # a picture, a folder (every file in it) or a glob pattern (required)
out_dir = ""                  # "": <checkpoint folder>/predict
score_threshold = 0.3         # detections drawn and written
# also <stem>_maps.png: the method's teaching maps (heatmap, shapes, saliency, ...)
maps = False
device = "auto"               # "auto" (a GPU when there is one), "cpu", "cuda", "cuda:1"
# ----------------------------------------------------------------------------------------------------
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configurator.py")).read())


def fail(msg):
    print(f"predict.py: error: {msg}", file=sys.stderr)
    sys.exit(2)


def input_files(pattern):
    """The files `pattern` names: a file, every file of a folder (sorted), or a glob's matches."""
    if os.path.isdir(pattern):
        files = [os.path.join(pattern, f) for f in os.listdir(pattern)]
    else:
        files = [pattern] if os.path.isfile(pattern) else glob.glob(pattern)
    return sorted(f for f in files if os.path.isfile(f))


def class_meaning(checkpoint, num_classes):
    """(class_names, label_to_cat_id) of a checkpoint: saved by train.py, else read from the
    training json of its config, else the label numbers themselves."""
    if "class_names" in checkpoint and "label_to_cat_id" in checkpoint:
        return list(checkpoint["class_names"]), list(checkpoint["label_to_cat_id"])
    try:
        ann = dataset_paths(checkpoint.get("config") or {})["train_ann"]
        with open(ann) as f:
            cats = sorted(json.load(f)["categories"], key=lambda c: c["id"])
        print(f"predict.py: the checkpoint does not name its classes: read them from {ann}")
        return [str(c.get("name", c["id"])) for c in cats], [c["id"] for c in cats]
    except (OSError, ValueError, KeyError, TypeError):
        print("predict.py: the checkpoint does not name its classes and its training json is not "
              "at hand: classes are shown by label number")
        return [str(k) for k in range(num_classes)], list(range(num_classes))


if __name__ == "__main__":
    if not ckpt:
        fail("no checkpoint given: pass --ckpt=PATH")
    files = input_files(input) if input else []
    if not files:
        fail(f"--input={input!r} names no file: give a picture, a folder or a glob ('*.jpg')")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        fail(f"--device={device} was asked for but no CUDA GPU is available (use --device=cpu)")
    try:
        model, checkpoint = load_checkpoint_model(ckpt, device)
    except ValueError as e:
        fail(str(e))
    class_names, label_to_cat_id = class_meaning(checkpoint, model.cfg.num_classes)
    transform = checkpoint_transform(checkpoint)     # the training config's test transform
    maps_fn = teaching_maps(model) if maps else None
    if maps and maps_fn is None:
        print(f"predict.py: {type(model).__name__} draws no teaching maps; --maps ignored")

    out = out_dir or os.path.join(os.path.dirname(os.path.abspath(ckpt)), "predict")
    print(f"predicting {len(files)} file(s) with {ckpt} ({type(model).__name__}, "
          f"{len(class_names)} classes) on {device}, {transform.kind} test transform, "
          f"inputs {transform.input_format}; writing to {out}")
    results, skipped, progress = {}, 0, Progress("predicting", len(files))
    with torch.no_grad():
        for done, path in enumerate(files):
            progress(done)                                      # files done so far
            name = os.path.basename(path)
            try:
                pil = load_rgb_image(path, upright=True)         # EXIF orientation applied
            except ImageReadError as e:
                print(f"skipping {path}: not an image that can be read ({e.__cause__ or e})")
                skipped += 1
                continue
            sample = unlabelled_sample(pil, transform)                  # the picture, no target
            images, targets = collate_fn([sample], model.size_divisibility)  # (1, 3, H, W)
            images = images.to(device)
            try:
                output = model(images, image_sizes=[tuple(targets[0]["size"].tolist())])[0]
                # a GPU's count of NaN / inf offsets (model.py), read once per image
                check_deform_finite()
            except RuntimeError as e:
                # DeformConv's refusal of NaN / inf as one line; anything else passes
                if NON_FINITE_DEFORM not in str(e):
                    raise
                fail(f"{ckpt} on {path}: {NON_FINITE_DEFORM}")
            keep = output["scores"] >= score_threshold
            output = {k: v[keep].cpu() for k, v in output.items()}
            pred = to_original(output, targets[0], model.mask_threshold)
            image = torch.from_numpy(np.array(pil)).permute(2, 0, 1)  # (3, H0, W0) uint8
            stem = os.path.splitext(name)[0]
            write_png(draw_predictions(image.contiguous(), pred, class_names, score_threshold),
                      os.path.join(out, f"{stem}_pred.png"))
            if maps_fn is not None:
                save_maps_figure(network_input_rgb(images[0].cpu(), transform.input_format),
                                 maps_fn(images)[0], os.path.join(out, f"{stem}_maps.png"))
            dets = to_coco_results(pred, 0, label_to_cat_id)
            for d, label in zip(dets, pred["labels"].tolist()):
                del d["image_id"]
                d.update(label=label, **{"class": class_names[label]})
            results[name] = dets
    if not results:  # nothing to write: a user error (exit status 2), as a bad --input
        print(f"predict.py: error: none of the {len(files)} file(s) of --input={input!r} is an "
              "image that can be read", file=sys.stderr)
        sys.exit(2)
    write_json(results, os.path.join(out, "predictions.json"))
    print(f"wrote {len(results)} picture(s) with {sum(map(len, results.values()))} detection(s) >= "
          f"{score_threshold} and predictions.json to {out}"
          + (f"; skipped {skipped} file(s) that are not readable images" if skipped else ""))
