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
a checkpoint written before train.py saved them shows its classes by their label number.
"""

import glob
import os

import torch
from torchvision.transforms.v2.functional import pil_to_tensor

from configurator import device_and_dtype
from data import ImageReadError, collate_fn, load_rgb_image, unlabelled_sample, write_json
from eval import Progress, checkpoint_transform, load_checkpoint_model, to_coco_results, to_original
from model import NON_FINITE_DEFORM, check_deform_finite
from pictures import draw_predictions, network_input_rgb, save_maps_figure, teaching_maps, write_png
from weights import one_line_errors

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


def input_files(pattern):
    """The files `pattern` names: a file, every file of a folder (sorted), or a glob's matches."""
    if os.path.isdir(pattern):
        pattern = os.path.join(glob.escape(pattern), "*")  # (hidden files left out: not pictures)
    files = [pattern] if os.path.isfile(pattern) else glob.glob(pattern)
    return sorted(f for f in files if os.path.isfile(f))


if __name__ == "__main__":
    # a ValueError or OSError (a user's error: a bad checkpoint, option or input) ends with one
    # line "predict.py: error: ..." and exit status 2
    one_line_errors("predict.py")
    if not ckpt:
        raise ValueError("no checkpoint given: pass --ckpt=PATH")
    files = input_files(input)
    if not files:
        raise ValueError(f"--input={input!r} names no file (a picture, a folder, a glob '*.jpg')")
    device, _ = device_and_dtype(device, "float32")  # "auto": a GPU when there is one; fp32
    model, checkpoint = load_checkpoint_model(ckpt, device)
    # what each label means (train.py saves it); a checkpoint without: the label numbers
    class_names = checkpoint.get("class_names") or [str(k) for k in range(model.cfg.num_classes)]
    label_to_cat_id = checkpoint.get("label_to_cat_id") or list(range(len(class_names)))
    transform = checkpoint_transform(checkpoint)     # the training config's test transform
    maps_fn = teaching_maps(model) if maps else None
    if maps and maps_fn is None:
        print(f"predict.py: {type(model).__name__} draws no teaching maps; --maps ignored")

    out = out_dir or os.path.join(os.path.dirname(os.path.abspath(ckpt)), "predict")
    print(f"predicting {len(files)} file(s) with {ckpt} ({type(model).__name__}, "
          f"{len(class_names)} classes) on {device}, {transform.kind} test transform, "
          f"inputs {transform.input_format}; writing to {out}")
    results, progress = {}, Progress("predicting", len(files))
    with torch.no_grad():
        for done, path in enumerate(files):
            progress(done)                                      # files done so far
            try:
                pil = load_rgb_image(path, upright=True)         # EXIF orientation applied
            except ImageReadError as e:
                print(f"skipping {path}: not an image that can be read ({e.__cause__ or e})")
                continue
            sample = unlabelled_sample(pil, transform)                  # the picture, no target
            images, targets = collate_fn([sample], model.size_divisibility)  # (1, 3, H, W)
            images = images.to(device)
            try:
                output = model(images, image_sizes=[tuple(targets[0]["size"].tolist())])[0]
                check_deform_finite()  # a GPU's count of NaN / inf offsets, read once per image
            except RuntimeError as e:  # DeformConv's refusal of NaN / inf as one line
                if NON_FINITE_DEFORM in str(e):
                    raise ValueError(f"{ckpt} on {path}: {NON_FINITE_DEFORM}") from None
                raise
            keep = output["scores"] >= score_threshold
            pred = to_original({k: v[keep].cpu() for k, v in output.items()}, targets[0],
                               model.mask_threshold)
            stem = os.path.splitext(os.path.basename(path))[0]
            write_png(draw_predictions(pil_to_tensor(pil), pred, class_names, score_threshold),
                      os.path.join(out, f"{stem}_pred.png"))              # (3, H0, W0) uint8
            if maps_fn is not None:
                save_maps_figure(network_input_rgb(images[0].cpu(), transform.input_format),
                                 maps_fn(images)[0], os.path.join(out, f"{stem}_maps.png"))
            dets = to_coco_results(pred, 0, label_to_cat_id)
            for d, label in zip(dets, pred["labels"].tolist()):
                del d["image_id"]
                d.update(label=label, **{"class": class_names[label]})
            results[os.path.basename(path)] = dets
    if not results:  # nothing to write: a user error (exit status 2), as a bad --input
        raise ValueError(f"none of the {len(files)} file(s) of --input={input!r} is an image "
                         "that can be read")
    write_json(results, os.path.join(out, "predictions.json"))
    print(f"wrote {len(results)} picture(s) with {sum(map(len, results.values()))} detection(s) >= "
          f"{score_threshold} and predictions.json to {out}; skipped {len(files) - len(results)} "
          "file(s) that are not readable images")
