"""
Data for instance segmentation: a COCO dataset, its transforms, the batch collate, and a
synthetic "shapes" set written in COCO format so that everything runs with no download.

Read top to bottom:
  1. CocoInstances          any COCO instances json -> (image, target) with torchvision conventions
  2. build_transforms       CenterNet's augmentation (random zoom + crop centre, flip, colour and
                            lighting) and FCOS-style resizing, written with
                            torchvision.transforms.v2 + tv_tensors
  3. collate_fn             zero-pads a list of samples into one (B, 3, H, W) batch;
                            GroupedBatchSampler batches images of one aspect-ratio group (FCOS's)
  4. write_shapes_dataset   synthetic COCO-format set: overlapping shapes on textured backgrounds
  5. write_coco_subset      the first N images of a COCO json and their files (COCO128 from COCO)

Coordinate frames used below (all boxes are xyxy in absolute pixels, pixel edges: a box
(0, 0, W, H) covers the whole image):
  original frame   the image as stored on disk, H0 x W0; the frame of the COCO json
  network frame    the image after the transforms, h x w, before batch padding; the frame of
                   `target["boxes"]` and `target["masks"]`. For the test transforms
                   original = network / scale.
  batch frame      network frame plus zero padding on the bottom/right (same coordinates).

CLI: `python data.py shapes --out=DIR [--n_train=2000] [--n_val=200] [--size=128] [--seed=1337]`
(the defaults: the quick start's set) and `python data.py subset --ann=FILE --img_dir=DIR --out=DIR
[--n=128] [--split=NAME]`.
"""

import contextlib
import io
import json
import math
import os
import shutil
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF

# ImageNet statistics (torchvision's, RGB order): every input here is normalised with them. The
# torchvision ResNets were pretrained with them. CenterNet does otherwise for DLA-34 and
# Hourglass-104: it normalises its BGR images (OpenCV's order) with COCO statistics, mean
# (0.408, 0.447, 0.470) and std (0.289, 0.274, 0.278) in B, G, R order (`mean` / `std` in
# CenterNet's src/lib/datasets/dataset/coco.py). Ours differ (in RGB order the two means differ
# by at most 0.015, the stds by at most 0.064); for DLA-34 and Hourglass-104 trained from
# scratch, as [CM 3.5] trains them, either is fine: a per-channel scale and shift of the input
# is one the first convolution can absorb (its weights and bias are learned from scratch).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# ... except for a model started from CenterNet's published weights, which must see its inputs as
# CenterNet did: input_format "bgr_coco" (train.py sets it for a CenterNet file, and saves it in the
# checkpoint's config, where eval.py and predict.py read it): the channels in B, G, R order,
# normalised with CenterNet's COCO statistics (`mean` / `std` of its src/lib/datasets/dataset/
# coco.py, in B, G, R order; inp = (image / 255 - mean) / std on OpenCV's BGR image).
COCO_BGR_MEAN = (0.40789654, 0.44719302, 0.47026115)
COCO_BGR_STD = (0.28863828, 0.27408164, 0.27809835)
INPUT_FORMATS = ("rgb_imagenet", "bgr_coco")

# CenterNet's colour augmentation (`color_aug` in CenterNet's src/lib/utils/image.py, CornerNet's
# before it), written for our RGB tensors. Its "lighting" is PCA noise along the eigenvectors of
# the pixel colours, with these eigenvalues and eigenvectors (the columns), `_eig_val` and
# `_eig_vec` in CenterNet's src/lib/datasets/dataset/coco.py. CenterNet adds the resulting vector
# to BGR images, so its entries are in B, G, R order (see centernet_color_aug).
CENTERNET_EIG_VAL = (0.2141788, 0.01817699, 0.00341571)
CENTERNET_EIG_VEC = ((-0.58752847, -0.69563484, 0.41340352),
                     (-0.5832747, 0.00994535, -0.81221408),
                     (-0.56089297, 0.71832671, 0.41158938))
# alpha ~ N(0, 0.1) per eigenvector (`lighting_(data_rng, image, 0.1, ...)`)
CENTERNET_LIGHTING_STD = 0.1
# The grey level of saturation / contrast: CenterNet takes cv2.cvtColor(image, COLOR_BGR2GRAY),
# Y = 0.299 R + 0.587 G + 0.114 B (OpenCV's documented weights, exact for float images).
GRAY_WEIGHTS_RGB = (0.299, 0.587, 0.114)


# -----------------------------------------------------------------------------
# 1. COCO instances dataset

# Category names that mean "no object" in labelling tools' COCO exports (labelme2coco: "_background_";
# Detectron-style lists: "__background__"): such a category without annotations is not made a class.
BACKGROUND_NAMES = ("_background_", "__background__", "background")


class ImageReadError(RuntimeError):
    """An image file is missing, unreadable, corrupt or truncated (the message names the path)."""


class DataWarning(UserWarning):
    """A fault of the data that a run survives (a category without annotations, an unusable
    annotation). Printed once per message (train.py reading one json as its train and val set
    would say it twice) as one line, "warning: <message>", without Python's file:line and
    source line; -W options and warnings filters still rule."""


def _format_warning(message, category, *where, _python=warnings.formatwarning):  # Python's: others
    return f"warning: {message}\n" if issubclass(category, DataWarning) \
        else _python(message, category, *where)


warnings.filterwarnings("once", category=DataWarning, append=True)
warnings.formatwarning = _format_warning


def load_rgb_image(path, upright=False):
    """Read an image file as an 8-bit RGB PIL image, whatever its mode on disk.

    Handles grayscale (L, 1), palette (P), RGBA/LA (alpha dropped), CMYK, YCbCr, and 16/32-bit
    integer or float images (I;16*, I, F: scaled from 0..65535 to 0..255, see below).
    EXIF orientation is ignored by default: COCO annotations refer to the stored pixel grid.
    upright=True turns the picture as its EXIF orientation tag says (a phone's portrait photo is
    stored lying on its side), as an image viewer shows it: predict.py's pictures.
    Raises ImageReadError naming `path` if the file is missing, corrupt or truncated.
    """
    try:
        with Image.open(path) as img:
            img.load()  # decode now, inside the try: truncation only shows up while decoding
            return _to_rgb(ImageOps.exif_transpose(img) if upright else img)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        # OSError covers FileNotFoundError, UnidentifiedImageError and "image file is truncated"
        raise ImageReadError(f"cannot read image {path}: {type(e).__name__}: {e}") from e


def _to_rgb(img):
    """PIL image of any mode -> 8-bit RGB PIL image."""
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        # 16-bit PNGs (medical, depth, some scanners) open as I;16 or I. PIL's own
        # convert("L") clips them at 255 (almost all white), so rescale the 16-bit range to
        # 8 bits. An I/F image whose values already fit 0..255 is kept as it is.
        arr = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16") or arr.max(initial=0) > 255:
            arr = np.clip(arr, 0, 65535) / 257.0  # 65535 -> 255
        gray = np.clip(np.round(arr), 0, 255).astype(np.uint8)                   # (H, W)
        return Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2))  # RGB
    return img.convert("RGB")  # L, 1, P, RGBA, LA, CMYK, YCbCr, RGB -> RGB


def _load_json(path):
    """Read a json file; errors name the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"annotation file not found: {path}")
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"annotation file {path} is not valid JSON: {e}") from e


class CocoInstances(torch.utils.data.Dataset):
    """Instance segmentation dataset over any COCO "instances" json (via pycocotools).

    Args:
        img_dir:    folder with the images named by each image's `file_name`
        ann_file:   COCO instances json
        transforms: callable (pil_image, target) -> (image, target), e.g. from
                    build_transforms(); None = keep the original size (scale 1)
        max_images: keep only the first `max_images` images (by id)

    With `max_images`, `self.coco` holds only the kept images and their
    annotations, so COCOeval on `self.coco` scores exactly the images of the dataset.

    Attributes:
        coco             pycocotools COCO object (ground truth for COCOeval)
        ids              COCO image ids in dataset order (sorted)
        cat_ids          sorted COCO category ids (need not be contiguous: COCO has 1..90)
        label_to_cat_id  list: contiguous label 0..C-1 -> COCO category id
        cat_id_to_label  dict: COCO category id -> label
        class_names      list of C names, by label
        num_classes      C (the json's categories, used or not, but for a background one, below)

    __getitem__(i) -> (image, target):
        image   float32 (3, h, w), normalised (ImageNet statistics, or the transform's
                input_format, `normalize_input`), network frame
        target  dict:
          boxes      float32 (N, 4) xyxy, absolute pixels of the network frame
          labels     int64 (N,) in 0..C-1
          masks      uint8 (N, h, w) in {0, 1}, network frame
          image_id   int, COCO image id
          orig_size  int64 tensor [H0, W0]
          size       int64 tensor [h, w], network input before batch padding
          scale      float, network pixels per original pixel (exact for the test transforms:
                     original = network / scale; for the centernet training transform the
                     zoom applied, exact; for fcos training the mean of the two axes' scales)
    Labelling tools' exports (labelme2coco, Roboflow, CVAT) are read as they come: category ids
    from 0, file names with a folder prefix (joined to `img_dir`), images without annotations. A
    category named like the background ("_background_", "background", BACKGROUND_NAMES) that no
    annotation uses is not a class: it is left out of the labels, with a warning. Other
    categories without annotations stay classes (a warning names them); a category whose
    annotations are all crowd regions gets a warning too (a class never trained).
    Crowd annotations (iscrowd=1) never become instances (COCOeval ignores matches to them on
    its side). Annotations with empty/invalid segmentations or bboxes are skipped with one
    warning each, at construction (see _sanitize). Boxes are clipped to the image; zero-area
    and off-image ones are dropped, and so are instances whose box is under 1 px wide/high or
    whose mask is empty after the transforms. Images with no instances are valid: boxes (0, 4),
    labels (0,), masks (0, h, w).

    Errors: a missing/malformed json or an annotation pointing at an unknown image or category
    raise at construction (FileNotFoundError/ValueError naming the file and the annotation); a
    missing, corrupt or truncated image raises ImageReadError naming its path when loaded.
    """

    def __init__(self, img_dir, ann_file, transforms=None, max_images=None):
        self.img_dir, self.ann_file, self.transforms = img_dir, ann_file, transforms
        if not os.path.isdir(img_dir):
            raise FileNotFoundError(f"image folder not found: {img_dir} (for {ann_file})")
        data = _load_json(ann_file)
        images, anns, cats = self._validate(data, ann_file)

        # Category ids are sorted and renumbered 0..C-1: the model predicts labels, eval.py
        # maps them back through label_to_cat_id before writing COCO results. A background
        # category that no annotation uses (labelme2coco writes "_background_", id 0) is no class.
        used = {a["category_id"] for a in anns}
        objects = {a["category_id"] for a in anns if not a["iscrowd"]}
        background = [c for c in cats if c["id"] not in used
                      and str(c.get("name", "")).lower() in BACKGROUND_NAMES]
        if background:
            said = ", ".join(f"category {c['id']} ({c.get('name')!r})" for c in background)
            warnings.warn(f"{ann_file}: {said} names the background and has no annotation: "
                          "not a class of the model", DataWarning)
        cats = sorted((c for c in cats if c not in background), key=lambda c: c["id"])
        self.cat_ids = [c["id"] for c in cats]
        self.label_to_cat_id = list(self.cat_ids)
        self.cat_id_to_label = {cid: label for label, cid in enumerate(self.cat_ids)}
        self.class_names = [str(c.get("name", c["id"])) for c in cats]
        self.num_classes = len(cats)
        named = [f"{cid} ({name})" for cid, name in zip(self.cat_ids, self.class_names)]
        # e.g. Roboflow's category 0, named after the project: a class the model learns never to
        # predict; CVAT, for one, exports masks drawn with a brush as iscrowd=1 RLE
        unused = [n for cid, n in zip(self.cat_ids, named) if cid not in used]
        crowd_only = [n for cid, n in zip(self.cat_ids, named) if cid in used - objects]
        if unused:
            warnings.warn(f"{ann_file}: categories with no annotation at all: {_first(unused)} "
                          "(still classes of the model; COCOeval skips them)", DataWarning)
        if crowd_only:
            warnings.warn(f"{ann_file}: categories {_first(crowd_only)} only have crowd regions "
                          "(iscrowd=1), which are never trained on: if they are objects, set their "
                          "iscrowd to 0", DataWarning)

        # Dataset order (sorted ids) and the optional subset
        self.ids = sorted(img["id"] for img in images)[:max_images]
        if len(self.ids) != len(images):  # a subset: keep self.coco consistent with it
            keep = set(self.ids)
            data = dict(data, images=[img for img in images if img["id"] in keep],
                        annotations=[a for a in anns if a["image_id"] in keep])
        self._warned = set()  # annotation ids already warned about (one warning each)
        self._sanitize(data["annotations"], {img["id"]: img for img in data["images"]})
        # COCO() would re-read the file; built from the dict we validated instead
        self.coco = coco_index(data)

    @staticmethod
    def _validate(data, ann_file):
        """Check the json's structure; errors name the file and the offending image/annotation.

        Also fills the optional keys COCOeval reads (`iscrowd`, `area`) when missing.
        """
        if not isinstance(data, dict):
            raise ValueError(f"{ann_file}: expected a JSON object with 'images', 'annotations' "
                             f"and 'categories', got {type(data).__name__}")
        data.setdefault("annotations", [])
        ids = {}  # "images" -> the set of image ids, ...
        for key, what in (("images", "image"), ("annotations", "annotation"),
                          ("categories", "category")):
            if not isinstance(data.get(key), list):
                raise ValueError(f"{ann_file}: missing or non-list '{key}'")
            ids[key] = set()
            for k, e in enumerate(data[key]):  # every entry has an id, seen once
                if not isinstance(e, dict) or "id" not in e:
                    raise ValueError(f"{ann_file}: {what} #{k} ({str(e)[:60]}) has no 'id'")
                if e["id"] in ids[key]:
                    raise ValueError(f"{ann_file}: duplicate {what} id {e['id']}")
                ids[key].add(e["id"])
        images, anns, cat_ids = data["images"], data["annotations"], ids["categories"]
        if not all(isinstance(cid, int) for cid in cat_ids):
            raise ValueError(f"{ann_file}: category ids must be integers, got "
                             f"{sorted(cat_ids, key=str)}")
        for img in images:
            for key in ("file_name", "height", "width"):
                if key not in img:
                    raise ValueError(f"{ann_file}: image id {img['id']} has no '{key}'")
            if not all(isinstance(img[k], int) and img[k] > 0 for k in ("height", "width")):
                raise ValueError(f"{ann_file}: image id {img['id']} has invalid height/width "
                                 f"{img['height']!r}/{img['width']!r}")
        for a in anns:
            if a.get("image_id") not in ids["images"]:
                raise ValueError(f"{ann_file}: annotation id {a['id']} refers to image_id "
                                 f"{a.get('image_id')!r}, which is not among the file's images")
            if a.get("category_id") not in cat_ids:
                raise ValueError(f"{ann_file}: annotation id {a['id']} has unknown category_id "
                                 f"{a.get('category_id')!r} (known: {sorted(cat_ids)})")
            a.setdefault("iscrowd", 0)
            # COCOeval's area ranges need the area; the box area is a fair stand-in
            box_ok = _valid_bbox(a.get("bbox"))
            a.setdefault("area", float(a["bbox"][2] * a["bbox"][3]) if box_ok else 0.0)
        return images, anns, data["categories"]

    def __len__(self):
        return len(self.ids)

    def load_image(self, index):
        """The original image as an 8-bit RGB PIL image, as stored (EXIF orientation ignored). A
        missing file's error says how the json's file_name was joined to img_dir, and names the
        file when it lies in img_dir without the json's folder prefix."""
        name = self.coco.imgs[self.ids[index]]["file_name"]
        path = os.path.join(self.img_dir, name)
        try:
            return load_rgb_image(path)
        except ImageReadError as e:
            if os.path.exists(path):
                raise
            hint = f" (the json's file_name {name!r}, under img_dir {self.img_dir})"
            flat = os.path.join(self.img_dir, os.path.basename(name))
            if flat != path and os.path.exists(flat):
                hint += (f"; {flat} exists: point img_dir at the folder that the json's file "
                         "names start from, or drop their folder prefix")
            raise ImageReadError(f"{e}{hint}") from e.__cause__

    def __getitem__(self, index):
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        path = os.path.join(self.img_dir, info["file_name"])
        img = self.load_image(index)
        H0, W0 = int(info["height"]), int(info["width"])
        if img.size != (W0, H0):
            # The json's coordinates would not match the pixels: fail loudly, never mis-train.
            upright = load_rgb_image(path, upright=True).size
            hint = (f"; turned upright by its EXIF orientation tag it is "
                    f"{upright[0]}x{upright[1]}, so the json was made on the upright picture "
                    "(as labelling tools show it): save the images upright (PIL's "
                    "ImageOps.exif_transpose) to train on them" if upright == (W0, H0) else "")
            raise ValueError(f"image {path} is {img.size[0]}x{img.size[1]} (w x h) but "
                             f"{self.ann_file} says {W0}x{H0} for image id {image_id}{hint}")

        boxes, labels, masks = [], [], []
        for ann in self.coco.imgToAnns.get(image_id, []):
            # COCO [x, y, w, h] -> [x1, y1, x2, y2] clipped to the image
            x, y, w, h = ann["bbox"]
            x1, y1 = min(max(x, 0.0), W0), min(max(y, 0.0), H0)
            x2, y2 = min(max(x + w, 0.0), W0), min(max(y + h, 0.0), H0)
            # crowd regions are for COCOeval's ignore logic, never instances; a box of zero area
            # or fully outside the image has nothing to teach
            if ann["iscrowd"] or x2 - x1 <= 0 or y2 - y1 <= 0:
                continue
            mask = self._decode_mask(ann, H0, W0, path)
            if mask is not None:
                boxes.append([float(x1), float(y1), float(x2), float(y2)])
                labels.append(self.cat_id_to_label[ann["category_id"]])
                masks.append(mask)
        # (N, H0, W0) as a transposed view of (N, W0, H0) memory: see _decode_mask
        masks = torch.from_numpy(np.stack(masks)).transpose(1, 2) if masks else None
        target = _target(image_id, H0, W0, boxes, labels, masks)
        return (self.transforms or _identity_transform)(img, target)

    def _sanitize(self, anns, images):
        """Check every annotation's segmentation and bbox once, here rather than in each worker.

        An unusable one (no valid polygon, RLE of the wrong size, invalid bbox) gets a warning
        naming the annotation and the image, and becomes a crowd region in self.coco with its
        box as the region: training skips it like any crowd region, and COCOeval (which would
        crash on it) ignores detections there instead of counting them as false positives.
        A polygon list with some invalid parts (e.g. a stray 2-point fragment) keeps its valid
        parts. Edits the annotation dicts in place (they are ours, freshly loaded).
        """
        problems = []  # (annotation id, warning)
        for ann in anns:
            img = images[ann["image_id"]]
            seg, why = _check_segmentation(ann.get("segmentation"), img["height"], img["width"])
            box_ok = _valid_bbox(ann.get("bbox"))
            if seg is not None and not box_ok:
                seg, why = None, f"invalid bbox {ann.get('bbox')!r}"
            if seg is None:
                why += "; skipped (an ignored crowd region for COCOeval)"
                ann.update(iscrowd=1, bbox=ann["bbox"] if box_ok else [0.0, 0.0, 0.0, 0.0])
                x, y, w, h = ann["bbox"]
                seg = [[x, y, x + w, y, x + w, y + h, x, y + h]]
            elif why:
                why += "; kept the valid parts"
            ann["segmentation"] = seg
            if why:
                path = os.path.join(self.img_dir, img["file_name"])
                problems.append((ann["id"], f"annotation id {ann['id']} of image {path} "
                                            f"({self.ann_file}): {why}"))
        for _, message in problems[:20]:
            warnings.warn(message, DataWarning)
        if len(problems) > 20:
            more = [str(ann_id) for ann_id, _ in problems[20:]]
            warnings.warn(f"{len(more)} more annotations of {self.ann_file} with invalid "
                          f"segmentations or boxes, ids {_first(more, 50)}", DataWarning)

    def _decode_mask(self, ann, H0, W0, path):
        """Segmentation (checked by _sanitize) -> the mask TRANSPOSED, uint8 (W0, H0), or None if
        it cannot decode. pycocotools decodes column by column (Fortran order): its (H0, W0)
        array's transpose is contiguous, where making the (H0, W0) array contiguous would
        transpose every full-size mask (the transforms read only each instance's extent)."""
        rle = ann["segmentation"]
        if isinstance(rle, list):  # polygons, flat [x1, y1, x2, y2, ...] in the original frame
            rle = mask_utils.merge(mask_utils.frPyObjects(rle, H0, W0))
        elif isinstance(rle["counts"], list):  # uncompressed RLE (e.g. COCO's crowd regions)
            rle = mask_utils.frPyObjects(rle, H0, W0)
        # else compressed RLE: its counts a str in json, which pycocotools decodes as it is
        try:
            return mask_utils.decode(rle).T                                     # (W0, H0) uint8
        except Exception as e:  # malformed compressed counts: only decoding finds out
            if ann["id"] not in self._warned:  # once per annotation (and per worker)
                self._warned.add(ann["id"])
                warnings.warn(f"annotation id {ann['id']} of image {path} ({self.ann_file}): "
                              f"cannot decode its RLE ({e}); skipped", DataWarning)
            return None


def coco_index(dataset):
    """A pycocotools COCO object over a COCO json's dict, indexed without its progress lines
    (createIndex prints them: they are kept out of training logs)."""
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _first(names, n=10):
    """The first n of a list of strings, joined with commas, "..." when there are more."""
    return ", ".join(names[:n]) + (" ..." if len(names) > n else "")


def _target(image_id, H0, W0, boxes=(), labels=(), masks=None):
    """A sample's target before the transforms, in the original frame: boxes (N, 4) xyxy as
    tv_tensors.BoundingBoxes, labels (N,), masks uint8 (N, H0, W0) as tv_tensors.Mask (None: no
    instance), image_id, orig_size [H0, W0]."""
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)                  # (N, 4)
    return {"boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(H0, W0)),
            "labels": torch.tensor(labels, dtype=torch.int64),                       # (N,)
            "masks": tv_tensors.Mask(torch.zeros(0, H0, W0, dtype=torch.uint8) if masks is None
                                     else masks),                                    # (N, H0, W0)
            "image_id": int(image_id), "orig_size": torch.tensor([H0, W0], dtype=torch.int64)}


def unlabelled_sample(pil_image, transforms, image_id=0):
    """A picture without annotations (a user's own photo) as a CocoInstances sample: the RGB PIL
    image through `transforms` (a test transform of build_transforms) with an empty target, so
    that collate_fn and eval.to_original handle it as they handle the val set.
    Returns (image (3, h, w) float, target {boxes (0, 4), labels (0,), masks (0, h, w),
    image_id, orig_size [H0, W0], size [h, w], scale})."""
    W0, H0 = pil_image.size
    return transforms(pil_image, _target(image_id, H0, W0))


def _valid_polygon(p):
    """>= 3 (x, y) points, all finite numbers, not all on one line. (pycocotools reads a
    4-number list as a box; a flat polygon encloses nothing and rasterises to an empty mask.)"""
    if not isinstance(p, list) or len(p) < 6 or len(p) % 2:
        return False
    try:
        # one C-speed pass: NaN/inf propagate, a str raises; then the flatness, below
        return math.isfinite(sum(p)) and not _is_flat(p)
    except TypeError:
        return False


def _is_flat(p):
    """True if every point of the polygon p = [x1, y1, x2, y2, ...] lies within 1/1000 px of one
    line through its first point (or all points are that point): a degenerate polygon. For a
    real polygon any() stops at the first point off the line, usually the third."""
    x0, y0 = p[0], p[1]
    xs, ys = p[2::2], p[3::2]
    d = next(((x - x0, y - y0) for x, y in zip(xs, ys) if x != x0 or y != y0), None)
    if d is None:
        return True                                    # one point, repeated
    dx, dy = d
    tol = 1e-3 * math.hypot(dx, dy)                    # |cross| / |d| = distance to the line
    return not any(abs((x - x0) * dy - (y - y0) * dx) > tol for x, y in zip(xs, ys))


def _valid_bbox(bbox):
    """A COCO [x, y, w, h]: four finite numbers (not bools), w and h >= 0."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return False
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
               for v in bbox) and bbox[2] >= 0 and bbox[3] >= 0


def _check_segmentation(seg, H0, W0):
    """-> (segmentation to use or None if unusable, problem description or None)."""
    if isinstance(seg, list):
        valid = [p for p in seg if _valid_polygon(p)]
        if not valid:
            return None, ("empty polygon list" if not seg else
                          "no valid polygon (need >= 3 finite (x, y) points, not all on one line)")
        dropped = len(seg) - len(valid)
        return valid, f"{dropped} invalid polygon part(s) dropped" if dropped else None
    if not (isinstance(seg, dict) and "counts" in seg and "size" in seg):
        return None, f"no usable segmentation ({type(seg).__name__})"
    counts = seg["counts"]
    if list(seg["size"]) != [H0, W0]:
        return None, f"RLE size {seg['size']} != image size {[H0, W0]}"
    if isinstance(counts, list) and not (all(isinstance(c, int) and c >= 0 for c in counts)
                                         and sum(counts) == H0 * W0):
        return None, "uncompressed RLE counts are not non-negative ints adding up to h * w"
    if not isinstance(counts, (list, str, bytes)):
        return None, f"RLE counts of type {type(counts).__name__}"
    return seg, None


# -----------------------------------------------------------------------------
# 2. Transforms (torchvision.transforms.v2 + tv_tensors: boxes and masks move with the image)

def _finish(image, boxes, masks, target, scale):
    """Common last step of every transform: normalise, clip, drop degenerate instances.

    image: tv_tensors.Image float32 (3, h, w), normalised; boxes (N, 4) xyxy; masks (N, h, w).
    Returns (image tensor, target dict of plain tensors) as documented in CocoInstances.
    """
    h, w = image.shape[-2:]
    # the transformed COCO box, kept inside the canvas
    canvas = torch.tensor([w, h, w, h], dtype=torch.float32)
    boxes = boxes.as_subclass(torch.Tensor).float().clamp(min=0).minimum(canvas)  # (N, 4)
    masks = masks.as_subclass(torch.Tensor).to(torch.uint8).contiguous()        # (N, h, w)
    # Drop instances the transforms made degenerate (cropped away, or squeezed below a pixel).
    # (On uint8, .any() is many times faster than `> 0` then .any(), and index_select than a
    # boolean index: these are full-size planes, this runs once per sample. On uint8 .any()
    # returns uint8, hence .bool().)
    keep = ((boxes[:, 2:] - boxes[:, :2]) >= 1).all(dim=1) & masks.flatten(1).any(dim=1).bool()
    if not keep.all():
        masks = masks.index_select(0, keep.nonzero().flatten())                  # (N', h, w)
    out = dict(target, boxes=boxes[keep], labels=target["labels"][keep], masks=masks,
               size=torch.tensor([h, w], dtype=torch.int64), scale=float(scale))
    return image.as_subclass(torch.Tensor).contiguous(), out


def normalize_input(image, input_format="rgb_imagenet", inplace=False):
    """An RGB float image (3, h, w) in [0, 1] -> the network input: "rgb_imagenet" (the default)
    normalised with ImageNet's statistics; "bgr_coco" (CenterNet's) the channels reversed to
    B, G, R and normalised with COCO_BGR_MEAN / COCO_BGR_STD. inplace=True may overwrite
    `image` (the transforms' own fresh tensors: one full-size float image less to allocate)."""
    if input_format == "bgr_coco":
        bgr = image.flip(-3)                                       # a copy: normalised in place
        return TF.normalize(bgr, mean=COCO_BGR_MEAN, std=COCO_BGR_STD, inplace=True)
    if input_format != "rgb_imagenet":
        raise ValueError(f"input_format must be one of {INPUT_FORMATS}, got {input_format!r}")
    return TF.normalize(image, mean=IMAGENET_MEAN, std=IMAGENET_STD, inplace=inplace)


def _to_normalized(image, input_format="rgb_imagenet"):
    """uint8 (3, h, w) RGB image -> float32 network input (`normalize_input`)."""
    # TF.to_image's tensors (and TF.resize's of them) are channels-last views: made contiguous
    # here, in uint8, where it costs a quarter of the float copy _finish would make (and the
    # normalisation's per-channel broadcasts run several times faster on contiguous planes)
    out = TF.to_dtype(image.contiguous(), torch.float32, scale=True)   # [0, 255] -> [0, 1]
    return normalize_input(out, input_format, inplace=out is not image)


def _nearest_index(n_in, n_out):
    """The source index of each output sample when TF.resize resizes a tv_tensors.Mask from n_in
    to n_out samples along one axis: int64 (n_out,), non-decreasing. TF.resize does it with
    interpolate(mode="nearest"), each axis on its own; resizing a ramp with that same call reads
    the indices off with torch's own rounding (exact: float32 holds integers up to 2**24)."""
    ramp = torch.arange(n_in, dtype=torch.float32).view(1, 1, 1, n_in)
    return torch.nn.functional.interpolate(ramp, size=(1, n_out), mode="nearest").view(n_out).long()


def _resize_masks(masks, src, dst, canvas, flip=False):
    """The masks' part of the geometric transforms: uint8 (N, H0, W0) {0, 1} masks, any strides
    -> uint8 (N, h, w) contiguous, canvas = (h, w). Bit for bit what
        out = zeros(N, h, w)
        out[:, v0:v1, u0:u1] = TF.resize(tv_tensors.Mask(masks[:, y0:y1, x0:x1]), [v1 - v0, u1 - u0])
    gives (src = (x0, y0, x1, y1), dst = (u0, v0, u1, v1)), then TF.horizontal_flip if `flip`.

    Why not that: resizing (and flipping) every instance over the whole canvas costs N full-size
    planes, mostly zeros, while an instance covers a small part of the image (at 800 px, FCOS's
    training items take 1.6x the time). Here each instance is sampled only over the rows and
    columns where it has pixels, with the resize's own source indices (_nearest_index), into a
    zeroed canvas."""
    x0, y0, x1, y1 = src
    u0, v0, u1, v1 = dst
    w = canvas[1]
    out = torch.zeros(masks.shape[0], *canvas, dtype=torch.uint8)
    rows, cols = _nearest_index(y1 - y0, v1 - v0), _nearest_index(x1 - x0, u1 - u0)
    for i, m in enumerate(masks.as_subclass(torch.Tensor)[:, y0:y1, x0:x1]):    # (Hs, Ws)
        # the instance's extent: columns xs[0] .. xs[-1] (CocoInstances' masks are column-major:
        # a fast reduction), then rows ys[0] .. ys[-1] over those columns only
        xs = m.any(dim=0).nonzero().flatten()
        if len(xs) == 0:
            continue                                   # an empty mask
        ys = m[:, xs[0]:xs[-1] + 1].any(dim=1).nonzero().flatten()
        # the output rows [a, b) and columns [c, d) whose source lies in the extent (rows and
        # cols are non-decreasing: a binary search); every other output pixel is 0
        a, b = torch.searchsorted(rows, torch.stack([ys[0], ys[-1] + 1])).tolist()
        c, d = torch.searchsorted(cols, torch.stack([xs[0], xs[-1] + 1])).tolist()
        if a >= b or c >= d:
            continue                                   # no pixel in a sampled row or column
        q = cols[c:d].flip(0) if flip else cols[c:d]   # flip: column u -> w - 1 - u
        # within the extent, the columns first (column-major masks: one copy per column)
        r = rows[a:b]
        part = m[r[0]:r[-1] + 1, q].index_select(0, r - r[0])                   # (b-a, d-c)
        cs = slice(w - u0 - d, w - u0 - c) if flip else slice(u0 + c, u0 + d)
        out[i, v0 + a:v0 + b, cs] = part
    return out


def centernet_scales(scale_range):
    """The crop sizes s that CenterNet's training draws from, as fractions of the long side:
    lo, lo + 0.1, lo + 0.2, ... up to hi, each equally likely. (0.6, 1.3) gives CenterNet's
    np.arange(0.6, 1.4, 0.1) = 0.6, 0.7, ..., 1.3 (8 values; CenterNet's ctdet.py __getitem__),
    (1.0, 1.0) gives 1.0 alone. The zoom is 1/s: see InstanceTransform."""
    lo, hi = scale_range
    # the 1e-6: in floats 0.3 / 0.1 = 2.9999999999999996
    n = int(math.floor((hi - lo) / 0.1 + 1e-6)) + 1
    return [lo + 0.1 * i for i in range(n)]


def centernet_border(size, border=128):
    """CenterNet's margin between the random crop centre and the image edge (`_get_border` in
    CenterNet's src/lib/datasets/sample/ctdet.py): 128 px, halved (integer division) until the
    centres' range [b, size - b) is not empty. 640 -> 128, 200 -> 64, 150 -> 64, 128 -> 32,
    64 -> 16; a 1 px side gives 0 (the range [0, 1))."""
    b = border
    while size - b <= b:
        b //= 2           # b // 2 // 2 = b // 4: CenterNet's border // i, i = 2, 4, ...
    return b


def centernet_color_aug(image, order, alphas, light):
    """CenterNet's colour augmentation with its random draws given (`color_aug` in CenterNet's
    src/lib/utils/image.py), on one of our images: float (3, h, w) RGB in [0, 1]. Returns a new
    (3, h, w) float tensor; nothing is clipped, as in CenterNet.

    order:  the application order of brightness (0), contrast (1), saturation (2), a permutation
            (CenterNet shuffles the three functions)
    alphas: (3,) the factors of brightness, contrast, saturation, each 1 + U(-var, var) there
    light:  (3,) the PCA weights, each N(0, 0.1) there

    As CenterNet does, the grey image gs (Y = 0.299 R + 0.587 G + 0.114 B, OpenCV's BGR2GRAY) and
    its mean are computed ONCE, from the image before the three operations, and then
        brightness  image = a * image
        contrast    image = a * image + (1 - a) * mean(gs)
        saturation  image = a * image + (1 - a) * gs
    and last the lighting: v = eig_vec @ (eig_val * light) is added to every pixel. CenterNet's
    images are BGR, so its v[0] goes to blue and v[2] to red; on our RGB image the same operation
    adds v reversed: R += v[2], G += v[1], B += v[0]. E.g. light = (0, 1, 0): v = 0.01817699 *
    (-0.69563484, 0.00994535, 0.71832671) = (-0.012645, 0.000181, 0.013057) (B, G, R), so red
    gains 0.013057 and blue loses 0.012645.
    """
    image = image.clone()
    w = torch.tensor(GRAY_WEIGHTS_RGB, dtype=image.dtype)
    gs = torch.einsum("c,chw->hw", w, image)                           # (h, w), before the three
    gs_mean = gs.mean()
    for op in order:
        a = float(alphas[op])
        if op == 0:                                                    # brightness
            image.mul_(a)
        elif op == 1:                                                  # contrast
            image.mul_(a).add_((1 - a) * gs_mean)
        else:                                                          # saturation
            image.mul_(a).add_(gs, alpha=1 - a)
    vec = torch.tensor(CENTERNET_EIG_VEC, dtype=torch.float64)
    val = torch.tensor(CENTERNET_EIG_VAL, dtype=torch.float64)
    v_bgr = vec @ (val * torch.as_tensor(light, dtype=torch.float64))  # (3,) B, G, R
    # R += v[2], G += v[1], B += v[0]
    return image.add_(v_bgr.flip(0).to(image.dtype)[:, None, None])


# the two kinds: CenterNet's square canvas ([CM 3.5], [CN]) and FCOS's short side ([IS 4], [FCOS])
TRANSFORM_KINDS = ("centernet", "fcos")


class InstanceTransform:
    """(pil_image, target) -> (image, target): CenterNet's random square crop in training,
    otherwise a resize keeping the aspect ratio (and for fcos training a flip).

    The target comes from CocoInstances: boxes as tv_tensors.BoundingBoxes (XYXY, original
    canvas), masks as tv_tensors.Mask (N, H0, W0). The output follows CocoInstances' docstring.

    kind "centernet" ([CM 3.5]: a 512 x 512 input and CenterNet's training settings, hence
    CenterNet's augmentation, `__getitem__` of CenterNet's src/lib/datasets/sample/ctdet.py):
        train: a square window of side s * max(H0, W0), s drawn uniformly from
               centernet_scales(scale_range) (0.6, 0.7, ..., 1.3), centred at a random
               integer pixel (cx, cy), cx uniform in [b, W0 - b) with b = centernet_border(W0)
               (128 px for COCO's sizes; cy likewise), is resized onto the input_size x
               input_size input. So the zoom is input_size / (s * max(H0, W0)): s = 0.6 shows
               the long side at input_size / 0.6 = 1.67 input_size, s = 1.3 at 0.77
               input_size; the zoom is 1/s, not s. Then a horizontal flip (flip_prob, 0.5) and
               CenterNet's colour augmentation (centernet_color_aug, var color_jitter = 0.4, and
               the PCA lighting; color_jitter=0 turns both off, as CenterNet's no_color_aug).
               CenterNet does this with one affine warp of the flipped image around the
               mirrored centre (W0 - cx - 1); the same distribution here: the window is cut
               from the unflipped image and the result is flipped (cx's range is symmetric).
               Deviations, all small: the window's side is rounded to whole pixels and the
               pixel cx sits at its centre (to half a pixel), the resize is antialiased
               (cv2.warpAffine's INTER_LINEAR is not), and where the window leaves the image
               the input is the mean colour (0 after normalisation), where CenterNet's warp
               fills black before the colour augmentation and normalisation (see
               _centernet_train).
        test:  long side -> input_size exactly, no padding (collate_fn pads the batch); with
               keep_res=True (CenterNet's --keep_res) the image keeps its own size (scale 1)
               and collate_fn pads the batch to the backbone's stride (32, or 128 for
               Hourglass-104) on the bottom/right, where CenterNet centres the image in a
               canvas of (size | 31) + 1 (or | 127) pixels.
    kind "fcos" ([IS 4], "Training details": the FCOS settings):
        short side -> input_size (800), long side at most max_size (1333); train adds FCOS's
        horizontal flip and, when scale_range is not (1, 1), multi-scale training: the short
        side is s * input_size with s ~ U(scale_range) (FCOS's 640-800: (0.8, 1.0)). No crop,
        no jitter.
    """

    def __init__(self, kind, train, input_size, scale_range=(0.6, 1.3), flip_prob=0.5,
                 color_jitter=0.4, max_size=1333, keep_res=False, input_format="rgb_imagenet"):
        if kind not in TRANSFORM_KINDS:
            raise ValueError(f"unknown transform kind {kind!r}: expected one of {TRANSFORM_KINDS}")
        if keep_res and (kind != "centernet" or train):
            raise ValueError("keep_res is a test-time mode of the centernet transform "
                             f"(got kind={kind!r}, train={bool(train)})")
        if not 0 < scale_range[0] <= scale_range[1]:
            raise ValueError(f"scale_range must be (lo, hi) with 0 < lo <= hi, got {scale_range}")
        if input_format not in INPUT_FORMATS:
            raise ValueError(f"input_format must be one of {INPUT_FORMATS}, got {input_format!r}")
        # input_format: the network's colour order and statistics (normalize_input)
        self.kind, self.train, self.input_format = kind, bool(train), input_format
        self.input_size = int(input_size)
        self.scale_range = tuple(float(s) for s in scale_range)
        self.max_size, self.keep_res = int(max_size), bool(keep_res)
        self.flip_prob = float(flip_prob) if train else 0.0
        self.color_var = float(color_jitter) if train and kind == "centernet" else 0.0
        self.scales = centernet_scales(self.scale_range) if kind == "centernet" else None

    def _scale(self, H0, W0):
        """Network pixels per original pixel of the resize (test transforms, fcos training),
        before rounding the size."""
        if self.kind == "centernet":
            return 1.0 if self.keep_res else self.input_size / max(H0, W0)
        short = self.input_size                            # fcos
        if self.train and self.scale_range != (1.0, 1.0):  # multi-scale training
            lo, hi = self.scale_range
            short *= lo + (hi - lo) * torch.rand(()).item()  # the long-side cap stays (FCOS)
        return min(short / min(H0, W0), self.max_size / max(H0, W0))

    def _centernet_draw(self, H0, W0):
        """The geometric draws of one CenterNet training crop -> (s, side, cx, cy, flip): the
        crop size s, the window's side in whole original pixels, the centre pixel, the flip.
        torch's RNG, so torch.manual_seed and the DataLoader's per-worker seeds drive it."""
        s = self.scales[int(torch.randint(len(self.scales), ()))]
        side = max(1, round(s * max(H0, W0)))
        bx, by = centernet_border(W0), centernet_border(H0)
        cx = int(torch.randint(bx, W0 - bx, ()))                   # CenterNet's randint(low, high)
        cy = int(torch.randint(by, H0 - by, ()))
        flip = bool(torch.rand(()) < self.flip_prob)
        return s, side, cx, cy, flip

    def _centernet_train(self, image, target):
        """CenterNet's training crop (see the class docstring) of a uint8 (3, H0, W0) image."""
        H0, W0 = image.shape[-2:]
        S = self.input_size
        s, side, cx, cy, flip = self._centernet_draw(H0, W0)
        k = S / side                                     # the zoom: input pixels per original pixel
        # the window [x0, x0 + side) x [y0, y0 + side)
        x0, y0 = cx - side // 2, cy - side // 2
        # Only the part of the window inside the image is resized (a window 1.3x the long side is
        # mostly outside). Its edges land at (x - x0) * k, rounded to whole input pixels; boxes
        # are mapped exactly, so boxes and pixels agree to within half a pixel.
        ix0, ix1 = max(x0, 0), min(x0 + side, W0)        # not empty: it holds the pixel cx
        iy0, iy1 = max(y0, 0), min(y0 + side, H0)
        u0, v0 = round((ix0 - x0) * k), round((iy0 - y0) * k)
        u1, v1 = max(u0 + 1, round((ix1 - x0) * k)), max(v0 + 1, round((iy1 - y0) * k))
        part = TF.resize(image[:, iy0:iy1, ix0:ix1], [v1 - v0, u1 - u0], antialias=True)
        # (3, v1 - v0, u1 - u0) in [0, 1]; contiguous: see _to_normalized
        part = TF.to_dtype(part.contiguous(), torch.float32, scale=True)
        if self.color_var > 0:                          # CenterNet: after the warp and / 255
            order = torch.randperm(3).tolist()
            alphas = 1 + self.color_var * (2 * torch.rand(3) - 1)  # 1 + U(-var, var)
            light = CENTERNET_LIGHTING_STD * torch.randn(3)
            part = centernet_color_aug(part, order, alphas, light)
        # colour augmentation on RGB, then BGR if asked (in place: `part` is this function's own)
        part = normalize_input(part, self.input_format, inplace=True)
        # Outside the image: 0 after normalisation, the mean colour. CenterNet's warp fills black
        # there, which its colour augmentation then shifts and its normalisation (COCO statistics)
        # maps to about -1.4 .. -1.7; its model meets black padding at test too (its test warp
        # pads black), so it is consistent. Ours pads test batches with 0 after normalisation
        # (collate_fn), so the training window gets the same 0: the model never has to tell two
        # paddings apart.
        # (Colour statistics, gs_mean, are then over the image pixels only; CenterNet's include
        # the black fill.)
        out = torch.zeros(3, S, S)                                  # (3, S, S)
        out[:, v0:v1, u0:u1] = part
        # the masks: resized as tv_tensors.Mask (nearest) into the same place, flipped with the rest
        masks = _resize_masks(target["masks"], (ix0, iy0, ix1, iy1), (u0, v0, u1, v1), (S, S), flip)
        boxes = (target["boxes"].as_subclass(torch.Tensor) - torch.tensor([x0, y0, x0, y0])) * k
        boxes = tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(S, S))   # (N, 4)
        if flip:  # x -> S - x for the pixels and the boxes (the masks: above)
            out, boxes = TF.horizontal_flip(out), TF.horizontal_flip(boxes)
        return _finish(out, boxes, masks, target, k)

    def __call__(self, pil_image, target):
        image = TF.to_image(pil_image)                              # Image uint8 (3, H0, W0)
        if self.kind == "centernet" and self.train:
            return self._centernet_train(image, target)
        H0, W0 = image.shape[-2:]
        scale = self._scale(H0, W0)
        h, w = max(1, round(H0 * scale)), max(1, round(W0 * scale))
        # Image and masks go to the rounded size (masks nearest, as TF.resize resizes a
        # tv_tensors.Mask: _resize_masks). Boxes are multiplied by exactly `scale` so eval can
        # invert with / scale; the two frames agree to within half a pixel.
        image = TF.resize(image, [h, w], antialias=True)            # (3, h, w), bilinear
        boxes = target["boxes"].as_subclass(torch.Tensor) * scale                 # (N, 4)
        boxes = tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(h, w))
        if self.train:
            # The scale actually applied differs per axis by the rounding: report the mean.
            scale = 0.5 * (h / H0 + w / W0)
        # fcos training: a horizontal flip with probability flip_prob (the draw of
        # v2.RandomHorizontalFlip: torch.rand(1) < p), known before the masks are resized
        flip = self.flip_prob > 0 and bool(torch.rand(1) < self.flip_prob)
        masks = _resize_masks(target["masks"], (0, 0, W0, H0), (0, 0, w, h), (h, w), flip)
        if flip:
            image, boxes = TF.horizontal_flip(image), TF.horizontal_flip(boxes)
        image = _to_normalized(image, self.input_format)            # float32 (3, h, w)
        return _finish(image, boxes, masks, target, scale)


# No geometric change (scale 1; TF.resize returns an image of the same size as it is): what
# CocoInstances does with transforms=None
_identity_transform = InstanceTransform("centernet", train=False, input_size=1, keep_res=True)


def build_transforms(kind="centernet", train=True, input_size=512, **kw):
    """Transforms for CocoInstances: (pil_image, target) -> (image, target).

    kind:        "centernet" (square canvas in training, long side = input_size at test) or
                 "fcos" (short side = input_size, long side <= max_size)
    train:       random augmentation (True) or the deterministic test resize (False)
    input_size:  centernet: canvas side / test long side (512); fcos: short side (800)
    kw:          scale_range=(0.6, 1.3) (centernet: the crop sizes s, zoom 1/s, see
                 centernet_scales; fcos: U(lo, hi) times the short side), flip_prob=0.5,
                 color_jitter=0.4 (centernet only: CenterNet's colour augmentation and
                 lighting, 0 = off), max_size=1333 (fcos only), keep_res=False (centernet
                 test only: each image at its own size, CenterNet's --keep_res),
                 input_format="rgb_imagenet" (or "bgr_coco", CenterNet's: `normalize_input`)
    """
    return InstanceTransform(kind, train, input_size, **kw)


# -----------------------------------------------------------------------------
# 3. Collate

def collate_fn(batch, size_divisibility=32):
    """List of (image, target) -> (images (B, 3, H, W), list of B targets).

    H, W = the largest h, w in the batch rounded up to a multiple of `size_divisibility` (the
    backbone's total stride: 32, or 128 for Hourglass-104; use functools.partial). Images and
    each target's masks are zero-padded on the bottom/right, so network-frame coordinates are
    unchanged; target["size"] keeps the unpadded size. Zero in a normalised image is the
    ImageNet mean colour.
    """
    d = size_divisibility
    H = math.ceil(max(img.shape[-2] for img, _ in batch) / d) * d
    W = math.ceil(max(img.shape[-1] for img, _ in batch) / d) * d
    out = _batch_empty(batch[0][0], len(batch), 3, H, W)             # (B, 3, H, W)
    targets = []
    for i, (img, tgt) in enumerate(batch):
        _pad_into(out[i], img)
        m = tgt["masks"]                                             # (N, h, w)
        if m.shape[-2:] != (H, W):  # (e.g. every centernet training sample already is (S, S))
            m = _pad_into(_batch_empty(m, m.shape[0], H, W), m)      # (N, H, W)
        targets.append(dict(tgt, masks=m))
    return out, targets


def aspect_ratio_groups(dataset):
    """FCOS's aspect-ratio groups (DATALOADER.ASPECT_RATIO_GROUPING: bins [1] on h / w in
    fcos_core/data/build.py, from maskrcnn-benchmark) of a CocoInstances, from its json sizes: 0
    for landscape images (h < w), 1 for the others. A batch of one group pads far less under the
    "fcos" transform (short side fixed, long side free): a portrait 800 x 1333 next to a
    landscape 1333 x 800 pads both to 1333 x 1333 (1.67x their pixels)."""
    infos = [dataset.coco.imgs[i] for i in dataset.ids]
    return [int(info["height"] >= info["width"]) for info in infos]


class GroupedBatchSampler(torch.utils.data.Sampler):
    """Batches of `batch_size` indices of `sampler` from one group each (torchvision's references,
    detection/group_by_aspect_ratio.py): an index waits in its group's buffer until the group fills a batch.
    An epoch has len(sampler) // batch_size batches, as BatchSampler(sampler, batch_size, drop_last=True) (the
    same batches when there is one group); the batches the groups' leftovers still owe at the end are filled,
    fullest group first, with that group's first indices of the epoch again. Under DDP `sampler` is the rank's
    DistributedSampler: every rank groups its own indices and yields the same number of batches."""

    def __init__(self, sampler, group_ids, batch_size):
        self.sampler, self.group_ids, self.batch_size = sampler, group_ids, batch_size

    def __iter__(self):
        buffers, seen, done = {}, {}, 0
        for i in self.sampler:
            g = self.group_ids[i]
            buffers.setdefault(g, []).append(i)
            seen.setdefault(g, []).append(i)
            if len(buffers[g]) == self.batch_size:
                yield buffers.pop(g)
                done += 1
        # fullest first; stable: ties by arrival
        leftovers = sorted(buffers.items(), key=lambda item: len(item[1]), reverse=True)
        for g, rest in leftovers[:len(self) - done]:
            yield rest + (seen[g] * self.batch_size)[:self.batch_size - len(rest)]

    def __len__(self):
        return len(self.sampler) // self.batch_size


def _batch_empty(like, *shape):
    """An uninitialised tensor like `like`; in a DataLoader worker, in shared memory from the
    start (as default_collate does): sending the batch to the main process then spares the
    copy into shared memory, as large as the batch (hundreds of MB at 800 px)."""
    t = like.new_empty(shape)
    return t.share_memory_() if torch.utils.data.get_worker_info() is not None else t


def _pad_into(out, t):
    """out (..., H, W) <- t (..., h, w) zero-padded on the bottom/right; returns out. Zeroes the
    padding only, not all of out first: a batch is tens to hundreds of MB, written once."""
    h, w = t.shape[-2:]
    out[..., :h, :w] = t
    out[..., h:, :] = 0
    out[..., :h, w:] = 0
    return out


# -----------------------------------------------------------------------------
# 4. Synthetic "shapes" dataset in COCO format
#
# What it exercises: several classes, many instances per image, same-class instances that
# overlap and occlude each other (the case that separates instance from semantic
# segmentation), a wide range of object sizes, and textured backgrounds, so that a model has
# to use shape and not just "any pixel that differs from a flat background".

SHAPE_CLASSES = ("ellipse", "rectangle", "triangle", "ring")  # category ids 1..4


def _shape_mask(rng, cls, cx, cy, d, xx, yy):
    """Full (unoccluded) mask of one shape of diameter ~d centred at (cx, cy).

    xx, yy: pixel-centre coordinates (H, W). Returns bool (H, W).
    """
    theta = rng.uniform(0, np.pi)
    c, s = np.cos(theta), np.sin(theta)
    u = (xx - cx) * c + (yy - cy) * s      # coordinates in the shape's rotated frame
    v = -(xx - cx) * s + (yy - cy) * c
    r = d / 2
    if cls == "ellipse":
        b = r * rng.uniform(0.5, 1.0)
        return (u / r) ** 2 + (v / b) ** 2 <= 1
    if cls == "rectangle":
        return (np.abs(u) <= r) & (np.abs(v) <= r * rng.uniform(0.4, 1.0))
    if cls == "ring":  # a hole: the mask is not the filled outline
        b = r * rng.uniform(0.8, 1.0)
        rho = (u / r) ** 2 + (v / b) ** 2
        return (rho <= 1) & (rho >= rng.uniform(0.45, 0.65) ** 2)
    # triangle: 3 vertices around the centre, inside = on the same side of all 3 edges
    ang = theta + np.arange(3) * 2 * np.pi / 3 + rng.uniform(-0.3, 0.3, 3)
    rad = r * rng.uniform(0.8, 1.0, 3)
    px, py = cx + rad * np.cos(ang), cy + rad * np.sin(ang)
    inside = np.ones(xx.shape, bool)
    for i in range(3):  # vertices are counter-clockwise in image coordinates (y down)
        j = (i + 1) % 3
        inside &= (px[j] - px[i]) * (yy - py[i]) - (py[j] - py[i]) * (xx - px[i]) >= 0
    return inside


def _background(rng, size):
    """Smooth random colour gradient + pixel noise: float (size, size, 3)."""
    coarse = rng.uniform(30, 225, (3, 3, 3)).astype(np.uint8)
    smooth = Image.fromarray(coarse).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(smooth, np.float32) + rng.normal(0, 8, (size, size, 3))


def _render_shapes_image(rng, size, min_visible=0.3, min_pixels=12):
    """One synthetic image. Returns (uint8 (size, size, 3), list of (label, visible bool mask)).

    Later shapes occlude earlier ones; masks are the VISIBLE parts. An instance mostly hidden
    (visible < min_visible of its in-image area, or < min_pixels) is removed from the scene
    altogether (not drawn), so no unlabelled fragment is left in the image.
    """
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5      # pixel centres (H, W)
    lo, hi = math.log(8), math.log(max(size / 2, 9))
    n = int(rng.integers(1, 11))                                     # 1..10 instances
    shapes = []                                                      # (label, cx, cy, d, full)
    for _ in range(n):
        if shapes and rng.random() < 0.4:
            # Next to an earlier shape of the same class, overlapping it: the hard case.
            label, pcx, pcy, pd, _ = shapes[int(rng.integers(len(shapes)))]
            d = float(np.clip(pd * math.exp(rng.uniform(-0.3, 0.3)), 8, size / 2))
            dist = rng.uniform(0.35, 0.8) * (pd + d) / 2
            a = rng.uniform(0, 2 * np.pi)
            cx, cy = pcx + dist * math.cos(a), pcy + dist * math.sin(a)
        else:
            label = int(rng.integers(len(SHAPE_CLASSES)))
            d = math.exp(rng.uniform(lo, hi))                        # log-uniform 8 .. size/2
            cx, cy = rng.uniform(0, size, 2)
        full = _shape_mask(rng, SHAPE_CLASSES[label], cx, cy, d, xx, yy)
        shapes.append((label, cx, cy, d, full))

    def visible_masks(kept):
        owner = np.full((size, size), -1, np.int64)                  # last drawn wins
        for k in kept:
            owner[shapes[k][4]] = k
        return {k: owner == k for k in kept}

    # Removing a shape only uncovers the ones below it, so one filtering pass is enough.
    kept = [k for k in range(n) if shapes[k][4].sum() >= min_pixels]
    vis = visible_masks(kept)
    kept = [k for k in kept
            if vis[k].sum() >= max(min_pixels, min_visible * shapes[k][4].sum())]
    vis = visible_masks(kept)

    img = _background(rng, size)
    for k in kept:
        full = shapes[k][4]
        bg_mean = img[full].mean(0)
        for _ in range(5):  # a colour that stands out from the background under it
            colour = rng.uniform(0, 255, 3)
            if np.abs(colour - bg_mean).sum() > 120:
                break
        # Stripes of random period/orientation + noise: same-class neighbours differ in
        # colour and texture, so their shared border is visible.
        phi, period = rng.uniform(0, np.pi), rng.uniform(3, 10)
        stripes = 1 + 0.15 * np.sin(2 * np.pi * (xx * np.cos(phi) + yy * np.sin(phi)) / period
                                    + rng.uniform(0, 2 * np.pi))
        tex = colour * stripes[..., None] + rng.normal(0, 6, (size, size, 3))
        img[vis[k]] = tex[vis[k]]
    img = np.clip(np.round(img), 0, 255).astype(np.uint8)
    return img, [(shapes[k][0], vis[k]) for k in kept]


def write_atomic(path, write):
    """Write `path` by write(tmp), a temporary name beside it, then rename that over the old file:
    readers, and a run killed mid-write, see the old file or the new one whole, never half. On an
    error the temporary file is removed and the error passes on (the old file is intact). The one
    atomic write of the project: annotation jsons, results, checkpoints, pictures."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_json(obj, path, indent=None):
    """`obj` as a JSON file at `path`, written atomically (`write_atomic`)."""
    def dump(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=indent, default=str)
    write_atomic(path, dump)


def _shapes_paths(root):
    """The shapes set's layout under `root`: {train_img_dir, train_ann, val_img_dir, val_ann}."""
    return {"train_img_dir": os.path.join(root, "train"),
            "train_ann": os.path.join(root, "annotations", "instances_train.json"),
            "val_img_dir": os.path.join(root, "val"),
            "val_ann": os.path.join(root, "annotations", "instances_val.json")}


def _write_shapes_split(img_dir, ann_path, n, size, rng, split):
    os.makedirs(img_dir, exist_ok=True)
    images, annotations = [], []
    for i in range(n):
        img, instances = _render_shapes_image(rng, size)
        while not instances:  # every image gets >= 1 instance (rare: one tiny hidden shape)
            img, instances = _render_shapes_image(rng, size)
        file_name = f"{i:06d}.png"
        Image.fromarray(img).save(os.path.join(img_dir, file_name))
        images.append({"id": i + 1, "file_name": file_name, "height": size, "width": size})
        for label, mask in instances:
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            # the box: the tight box of the visible mask
            annotations.append({
                "id": len(annotations) + 1, "image_id": i + 1, "category_id": label + 1,
                "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
                "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                "area": float(mask_utils.area(rle)), "iscrowd": 0})
    categories = [{"id": k + 1, "name": name, "supercategory": "shape"}
                  for k, name in enumerate(SHAPE_CLASSES)]
    # last: a json on disk means its images are complete
    write_json({"info": {"description": f"synthetic shapes ({split}), {n} images of {size}x{size}"},
                "licenses": [], "images": images, "annotations": annotations,
                "categories": categories}, ann_path)


def dataset_paths(config):
    """Where a train.py config's data lies: {train_img_dir, train_ann, val_img_dir, val_ann}.

    With `shapes_dir` set, the synthetic set's layout under it (as `write_shapes_dataset`
    writes it); otherwise the config's own paths, relative to `data_root` unless absolute
    (a missing one stays None). Used by train.py, and by eval.py for a checkpoint's config.
    """
    if config.get("shapes_dir"):
        return _shapes_paths(config["shapes_dir"])
    root = config.get("data_root") or ""
    # os.path.join keeps absolute paths
    return {k: None if config.get(k) is None else os.path.join(root, config[k])
            for k in ("train_img_dir", "train_ann", "val_img_dir", "val_ann")}


def shapes_dataset_missing(root, n_train, n_val, size):
    """Why the shapes set under `root` cannot serve a run that wants (n_train, n_val, size)
    images, or "" when it can. A set with more images than wanted serves: each split is one
    random stream, so the first n images of a bigger set are the n-image set, byte for byte
    (train.py then reads only the first n). Read from the two jsons, which are written last."""
    for split, n in (("train", n_train), ("val", n_val)):
        ann = _shapes_paths(root)[f"{split}_ann"]
        if not os.path.exists(ann):
            return f"{ann} is missing"
        try:
            with open(ann) as f:
                images = json.load(f)["images"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            return f"{ann} is unreadable ({type(e).__name__})"
        if len(images) < n:
            return f"{ann} has {len(images)} images, {n} wanted"
        h, w = (images[0].get("height"), images[0].get("width")) if images else (size, size)
        if (h, w) != (size, size):
            return f"{ann} has {h}x{w} images, {size}x{size} wanted"
    return ""


# The quick start's set (config/shapes_centermask.py; train.py writes it with these): what
# `python data.py shapes --out=data/shapes` writes when given nothing else.
SHAPES_DEFAULTS = {"n_train": 2000, "n_val": 200, "size": 128, "seed": 1337}


def write_shapes_dataset(root, n_train=1000, n_val=100, size=128, seed=0):
    """Write a deterministic synthetic COCO instance segmentation set under `root`.

    Layout: root/train/*.png, root/val/*.png, root/annotations/instances_{train,val}.json.
    Classes (category ids 1..4): ellipse, rectangle, triangle, ring; 1-10 instances per
    image, sizes log-uniform from 8 px to size/2, same-class instances that overlap and occlude
    each other (visible masks only, compressed RLE), textured backgrounds. The same
    (n, size, seed) gives byte-identical files; train and val use separate random streams, so
    val does not change with n_train.

    Returns {"train_img_dir", "train_ann", "val_img_dir", "val_ann"}.
    """
    paths = _shapes_paths(root)
    for k, (split, n) in enumerate((("train", n_train), ("val", n_val))):
        rng = np.random.default_rng([seed, k])
        _write_shapes_split(paths[f"{split}_img_dir"], paths[f"{split}_ann"], n, size, rng, split)
    return paths


# -----------------------------------------------------------------------------
# 5. A subset of a COCO-format set (COCO128 from COCO)

def write_coco_subset(ann_file, img_dir, out, n=128, split=None):
    """The first `n` images (by image id) of a COCO instances json, with their annotations and
    every category of the json, laid out as this repository reads COCO128:
    out/<split>/<file_name> (the image files copied) and out/annotations/instances_<split>.json.
    `split` defaults to img_dir's folder name (train2017). Taken from COCO 2017's own
    instances_train2017.json and train2017/, n=128 gives Ultralytics' COCO128 ("the first 128
    images of COCO train 2017") in COCO's json layout; any COCO-format set gives its first n.
    Images without annotations are kept, as they are in the source. Every source image is
    checked before anything is written; the json is written last (atomically), so a json on disk
    means its images are complete. Returns (image folder, json path, images, annotations)."""
    data = _load_json(ann_file)
    try:
        images = sorted(data["images"], key=lambda img: img["id"])[:n]
        files = [os.path.join(img_dir, img["file_name"]) for img in images]
        keep = {img["id"] for img in images}
        anns = [a for a in data.get("annotations") or [] if a["image_id"] in keep]
    except (TypeError, KeyError, AttributeError) as e:
        raise ValueError(f"{ann_file}: expected a COCO json with 'images' (with 'id' and "
                         f"'file_name') and 'annotations' ({type(e).__name__}: {e})") from e
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of the {len(images)} images of {ann_file} are not "
                                f"in {img_dir}, e.g. {missing[0]}")
    split = split or os.path.basename(os.path.normpath(img_dir))
    out_img_dir = os.path.join(out, split)
    for img, src in zip(images, files):
        dst = os.path.join(out_img_dir, img["file_name"])
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copyfile(src, dst)
    out_ann = os.path.join(out, "annotations", f"instances_{split}.json")
    write_json({**data, "images": images, "annotations": anns}, out_ann)
    return out_img_dir, out_ann, len(images), len(anns)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="data utilities")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("shapes", help="write the synthetic shapes dataset (COCO format); by "
                       "default the quick start's set")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n_train", type=int, default=SHAPES_DEFAULTS["n_train"])
    p.add_argument("--n_val", type=int, default=SHAPES_DEFAULTS["n_val"])
    p.add_argument("--size", type=int, default=SHAPES_DEFAULTS["size"], help="image side in pixels")
    p.add_argument("--seed", type=int, default=SHAPES_DEFAULTS["seed"], help="shapes_seed")
    p = sub.add_parser("subset", help="the first N images of a COCO json and their files, laid "
                       "out as COCO128 (OUT/SPLIT/*.jpg, OUT/annotations/instances_SPLIT.json)")
    p.add_argument("--ann", required=True, help="COCO json, e.g. instances_train2017.json")
    p.add_argument("--img_dir", required=True, help="the folder of its file names, e.g. train2017")
    p.add_argument("--out", required=True, help="output folder, e.g. data/coco128")
    p.add_argument("--n", type=int, default=128, help="images to keep, the first by id (COCO128)")
    p.add_argument("--split", default=None, help="the split's name (default: img_dir's name)")
    args = parser.parse_args()
    if args.command == "subset":
        try:
            folder, ann, n_img, n_ann = write_coco_subset(args.ann, args.img_dir, args.out, args.n,
                                                          args.split)
        except (OSError, ValueError) as e:
            raise SystemExit(f"data.py subset: error: {e}")
        print(f"{n_img} images in {folder}, {n_ann} annotations in {ann}")
    else:
        paths = write_shapes_dataset(args.out, args.n_train, args.n_val, args.size, args.seed)
        print(f"{args.n_train} + {args.n_val} images written: {paths}")
