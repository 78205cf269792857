"""
COCO evaluation: model -> predictions mapped back to the original images -> COCO results json
-> COCOeval (bbox, and segm when the model predicts masks). Also reports images/s (predict.py
draws predictions, pictures.py the teaching maps).

    python eval.py --ckpt=out/centermask_dla34/ckpt.pt
    python eval.py --ckpt=ckpt.pt --val_ann=annotations/instances_val2017.json \\
        --val_img_dir=val2017 --max_images=500 --results_json=out/results.json
    python eval.py --oracle_stride=4 --val_ann=data/shapes/annotations/instances_val.json

The COCOeval tables are printed, then, as the very last line, one JSON object with the AP
numbers and the speed, so scripts can read it with `tail -n 1`.

From Python (train.py's periodic evaluation):

    from eval import evaluate
    stats = evaluate(model, val_loader, device="cuda")   # {'bbox_AP': ..., 'segm_AP': ...}

Coordinate frames: the model sees the "network input" (the image resized by `scale` and
zero-padded bottom/right to the batch size); COCO wants the original image. One function,
`to_original`, does that mapping for evaluation and for the pictures.
"""
import ast
import contextlib
import functools
import io
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from torch.utils.data.distributed import DistributedSampler
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import data

# COCOeval.stats[0:6] in order; these become "bbox_AP", ..., "segm_APl"
_STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")

# -----------------------------------------------------------------------------
# mapping predictions back to the original image


# The windowed fast path of `_masks_to_original` (below): the same bilinear taps as
# F.interpolate, only over each box's window of the original image.


def _source_taps(n_out, n_in, start, length):
    """Bilinear taps (align_corners=False, exactly as F.interpolate with a `size`) of the output
    pixels start + 0 .. length-1 along one axis resized from n_in to n_out pixels.
    start (K,) int64, length int -> (i0, i1, l1) each (K, length): source pixels and the weight of
    i1 (i0 gets 1 - l1)."""
    scale = n_in / n_out                                         # F.interpolate's float scale
    out = start[:, None] + torch.arange(length, device=start.device)
    u = ((out.float() + 0.5) * scale - 0.5).clamp(min=0)        # source coordinate (K, length)
    i0 = u.long()
    i1 = (i0 + 1).clamp(max=n_in - 1)
    return i0, i1, u - i0


def _box_windows(boxes, n_out, n_in, axis):
    """Original-frame pixel ranges [lo, hi) that a mask zero outside `boxes` (K, 4) input frame
    can reach through the bilinear taps along one axis (0: x, 1: y): the box's pixels
    [floor(b0), ceil(b1)) widened by one source pixel each side for the taps. (K,), (K,) int64."""
    scale = n_in / n_out
    b0 = boxes[:, axis].floor() - 1
    b1 = boxes[:, axis + 2].ceil() + 1
    lo = ((b0 + 0.5) / scale - 0.5).floor().clamp(0, n_out).long()
    hi = ((b1 + 0.5) / scale - 0.5).ceil().clamp(0, n_out).long() + 1
    return lo, hi.clamp(max=n_out)


def _paste_windows(masks, orig_size, threshold, x_lo, y_lo, Wm, Hm):
    """The windowed path of `_masks_to_original`: masks (K, h, w) float, each computed over a
    window of Wm x Hm original pixels from (x_lo, y_lo) (K,) each -> (K, H0, W0) bool. A window
    that would pass the image's right or bottom edge is moved back inside it: its extra pixels
    get the same taps as the dense resize. Separable: the rows first, then the columns."""
    K, h, w = masks.shape
    H0, W0 = orig_size
    dev = masks.device
    x_lo, y_lo = x_lo.clamp(max=W0 - Wm), y_lo.clamp(max=H0 - Hm)
    x0, x1, lx = _source_taps(W0, w, x_lo, Wm)                   # (K, Wm) source columns
    y0, y1, ly = _source_taps(H0, h, y_lo, Hm)                   # (K, Hm) source rows
    sx = x0[:, :1]                                               # (K, 1) first source column
    src_cols = (sx + torch.arange(int((x1 - sx).max()) + 1, device=dev)).clamp(max=w - 1)
    flat = masks.float().flatten(1)                              # (K, h*w)

    def rows(ys):                                                # (K, Hm, Sw)
        where = (ys[:, :, None] * w + src_cols[:, None, :]).flatten(1)
        return flat.gather(1, where).view(K, Hm, -1)
    r = torch.lerp(rows(y0), rows(y1), ly[:, :, None])                         # (K, Hm, Sw)
    c0, c1 = ((c - sx)[:, None, :].expand(K, Hm, Wm) for c in (x0, x1))
    value = torch.lerp(r.gather(2, c0), r.gather(2, c1), lx[:, None, :])     # (K, Hm, Wm)
    row_i = y_lo[:, None] + torch.arange(Hm, device=dev)                     # (K, Hm)
    col_i = x_lo[:, None] + torch.arange(Wm, device=dev)                     # (K, Wm)
    where = (row_i[:, :, None] * W0 + col_i[:, None, :]).flatten(1)          # (K, Hm * Wm)
    out = torch.zeros((K, H0 * W0), dtype=torch.bool, device=dev)
    return out.scatter_(1, where, (value > threshold).flatten(1)).view(K, H0, W0)


def _masks_to_original(masks, size, orig_size, threshold, boxes=None):
    """(K, H, W) masks at padded network-input resolution -> (K, H0, W0) bool original masks.

    The plain form: the padding cropped away (`size` = (h, w) before padding) so that it does
    not stretch into the image, then F.interpolate(masks, (H0, W0), bilinear) > threshold.
    Bool/uint8 masks are resized as 0/1 floats and thresholded at 0.5 (a 0/1 mask made by
    nearest-downsampling by 1/2 comes back exactly).
    With `boxes` (K, 4) in the input frame, the masks must be zero outside their boxes (every
    model here crops them so): when the boxes' windows are small (the largest under 1/4 of the
    image), only a window around each box of the original image is computed, with the same
    bilinear taps as F.interpolate, all detections at once (each window as large as the
    largest). Otherwise (or without boxes): one dense `interpolate` of all detections, in chunks
    that bound memory (~256 MB fp32).
    """
    if not masks.is_floating_point():
        threshold = 0.5
    h, w = size
    H0, W0 = orig_size
    masks = masks[:, :h, :w]                                     # (K, h, w)
    K = masks.shape[0]
    if K > 0 and boxes is not None:
        x_lo, x_hi = _box_windows(boxes.float(), W0, w, 0)       # (K,) original columns
        y_lo, y_hi = _box_windows(boxes.float(), H0, h, 1)       # (K,) original rows
        Wm, Hm = int((x_hi - x_lo).max()), int((y_hi - y_lo).max())  # the largest window
        if Wm <= 0 or Hm <= 0:
            return torch.zeros((K, H0, W0), dtype=torch.bool, device=masks.device)
        if Hm * Wm * 4 < H0 * W0:  # windows well below the image: worth it
            return _paste_windows(masks, (H0, W0), threshold, x_lo, y_lo, Wm, Hm)
    chunk = max(1, (1 << 26) // (H0 * W0))
    out = [torch.zeros((0, H0, W0), dtype=torch.bool, device=masks.device)]
    for i in range(0, K, chunk):
        # the k masks as the channels of one image: 1.3x faster than k images of one channel (CPU)
        m = masks[None, i:i + chunk].float()                     # (1, k, h, w)
        m = F.interpolate(m, size=(H0, W0), mode="bilinear", align_corners=False)
        out.append(m[0] > threshold)                             # (k, H0, W0) bool
    return torch.cat(out)


def to_original(output, target, mask_threshold=0.5):
    """Map one image's predictions from network-input pixels to original-image pixels.

    output: the model's dict for one image: `boxes (K, 4)` xyxy network-input pixels,
        `scores (K,)`, `labels (K,)` contiguous, optional `masks (K, H, W)` float
        probabilities or bool at the padded network-input resolution.
    target: the dataset's dict: `orig_size` (H0, W0), `size` (h, w) network input before
        padding, `scale` (original = network / scale).
    Returns {boxes (K, 4) float xyxy original pixels clipped to the image, scores (K,) float,
    labels (K,) int64, masks (K, H0, W0) bool (only if the model gave masks)}.
    """
    H0, W0 = (int(v) for v in target["orig_size"])
    h, w = (int(v) for v in target["size"])
    scale = float(target["scale"])                               # a number, or a 1-element tensor
    boxes = output["boxes"].float() / scale                      # (K, 4) original pixels
    boxes = boxes.clamp(min=0).minimum(boxes.new_tensor([W0, H0, W0, H0]))
    result = {"boxes": boxes, "scores": output["scores"].float(),
              "labels": output["labels"].long()}
    if "masks" in output:
        result["masks"] = _masks_to_original(output["masks"], (h, w), (H0, W0),
                                             mask_threshold, output["boxes"])
    return result


def to_coco_results(pred, image_id, label_to_cat_id):
    """One image's `to_original` predictions -> list of COCO result dicts.

    {image_id, category_id (the dataset's, e.g. 1..90 with gaps), bbox [x, y, w, h],
    score, segmentation (compressed RLE, counts as str; only with masks)}.
    """
    boxes = pred["boxes"].cpu()
    if boxes.shape[0] == 0:
        return []
    labels = pred["labels"].cpu()
    if labels.min() < 0 or labels.max() >= len(label_to_cat_id):
        raise ValueError(f"model predicted label {int(labels.max())} but the dataset has "
                         f"{len(label_to_cat_id)} classes (checkpoint from another dataset?)")
    cat_ids = torch.as_tensor(label_to_cat_id)[labels].tolist()
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    scores = pred["scores"].cpu().tolist()
    results = [{"image_id": int(image_id), "category_id": int(c), "bbox": b, "score": s}
               for c, b, s in zip(cat_ids, xywh, scores)]
    if "masks" in pred:
        # (K, H0, W0) -> (H0, W0, K) Fortran order, the layout pycocotools encodes in one call;
        # transposing on the torch side first makes the final numpy .T free
        m = pred["masks"].to(torch.uint8).transpose(1, 2).contiguous().cpu().numpy().T
        rles = mask_util.encode(np.asfortranarray(m))
        for r, rle in zip(results, rles):
            rle["counts"] = rle["counts"].decode("ascii")    # bytes are not JSON
            r["segmentation"] = rle
    return results


# -----------------------------------------------------------------------------
# helpers


def _base_dataset(dataset):
    """Unwrap (nested) Subsets down to the dataset that has `coco` and `label_to_cat_id`."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset


def _unwrap_model(model):
    """DDP -> its module: calling DDP's forward in eval would broadcast buffers, a collective
    that hangs when ranks run different numbers of batches."""
    ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    return model.module if ddp else model


def _make_loader(source, batch_size, num_workers, device, max_images, collate_fn, distributed,
                 size_divisibility=32):
    """A DataLoader as given, or one built over a Dataset (sharded when distributed).

    data.collate_fn pads the batch to a multiple of the model's `size_divisibility` (32, or
    128 for Hourglass-104); a collate_fn given explicitly is used as it is.
    """
    if isinstance(source, DataLoader):
        return source
    if max_images is not None:
        source = Subset(source, range(min(max_images, len(source))))
    if collate_fn is None:
        collate_fn = functools.partial(data.collate_fn, size_divisibility=size_divisibility)
    sampler = DistributedSampler(source, shuffle=False) if distributed else None
    return DataLoader(source, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      collate_fn=collate_fn, pin_memory=torch.device(device).type == "cuda")


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _predict_batch(model, images, targets, device, amp_dtype, mask_threshold):
    """Forward one batch and map every image's predictions (one dict per image) back to its
    original frame. amp_dtype: None (fp32) or a torch dtype for autocast."""
    images = images.to(device, non_blocking=True)                # (B, 3, H, W)
    sizes = [tuple(int(v) for v in t["size"]) for t in targets]  # each image before padding
    with torch.autocast(torch.device(device).type, dtype=amp_dtype, enabled=amp_dtype is not None):
        outputs = model(images, image_sizes=sizes)
    return [to_original(o, t, mask_threshold) for o, t in zip(outputs, targets)]


def _coco_eval(coco_gt, results, iou_type, img_ids, verbose):
    """COCOeval stats[0:6] for one iou_type over `img_ids`.

    No detections -> all 0.0 (pycocotools' loadRes indexes results[0] and would crash).
    COCOeval reports -1.0 for an area range with no ground truth objects; we pass it on.

    Annotation ids <= 0 are renumbered 1..N first (in file order): COCOeval records matches by
    annotation id and reads id 0 as "unmatched", so a ground truth whose id is 0 (labelme2coco
    and other exporters number from 0) would never be matched and its detection would count as
    a false positive. Annotation ids are not reported anywhere in the results (they hold image
    and category ids), so nothing needs mapping back.
    """
    anns = coco_gt.dataset.get("annotations", [])
    if any(a["id"] <= 0 for a in anns):
        renumbered = [dict(a, id=k + 1) for k, a in enumerate(anns)]
        coco_gt = data.coco_index(dict(coco_gt.dataset, annotations=renumbered))
    if not results:
        if verbose:
            print(f"no detections: {iou_type} AP = 0.0")
        return [0.0] * 6
    # loadRes mutates its input (adds id/area/iscrowd), so it gets copies. For segm the box is
    # dropped so that loadRes computes `area` from the mask (used for the S/M/L split), as
    # detectron2 does; for bbox the masks are dropped (not needed, large).
    drop = "bbox" if iou_type == "segm" else "segmentation"
    dts = [{k: v for k, v in r.items() if k != drop} for r in results]
    with contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO()):
        E = COCOeval(coco_gt, coco_gt.loadRes(dts), iou_type)
        E.params.imgIds = sorted(img_ids)
        E.evaluate()
        E.accumulate()
        E.summarize()
    return [float(x) for x in E.stats[:6]]


def grid_oracle(ann_file, stride, threshold=0.4, verbose=False):
    """
    Mask AP that a perfect mask on a stride-`stride` grid reaches on `ann_file`: every
    ground-truth mask (H, W) is zero-padded bottom/right to a multiple of the stride and
    average-pooled (model.average_pool_masks, as the batch's masks are for a stride-R loss) to
    (h, w) = (ceil(H/stride), ceil(W/stride)), bilinearly resized back to (h*stride, w*stride)
    (align_corners=False, as the assembled masks are), cropped to (H, W) and binarised at
    `threshold` (0.4, [CM 3.5]),
    then scored (score 1) against the ground truth by COCOeval segm. It tells what a mask loss on
    that grid can teach at best (RESULTS.md, "CenterMask quick start": 0.61 at stride 4 on the
    shapes set). Returns {"segm_AP": ..., ..., "segm_APl": ...}.
    """
    from model import average_pool_masks
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(ann_file)
    results = []
    for ann in coco_gt.loadAnns(coco_gt.getAnnIds(iscrowd=False)):
        gt = torch.from_numpy(coco_gt.annToMask(ann))[None]                         # (1, H, W)
        H, W = gt.shape[-2:]
        pooled = average_pool_masks(gt, stride)[None]                               # (1, 1, h, w)
        up = F.interpolate(pooled, scale_factor=stride, mode="bilinear", align_corners=False)
        mask = up[0, 0, :H, :W] > threshold                                         # (H, W) bool
        rle = mask_util.encode(np.asfortranarray(mask.numpy().astype(np.uint8)))
        rle["counts"] = rle["counts"].decode("ascii")
        results.append({"image_id": ann["image_id"], "category_id": ann["category_id"],
                        "segmentation": rle, "score": 1.0})
    stats = _coco_eval(coco_gt, results, "segm", coco_gt.getImgIds(), verbose)
    return {f"segm_{name}": v for name, v in zip(_STAT_NAMES, stats)}


# -----------------------------------------------------------------------------
# evaluation


def hours_minutes(seconds):
    """A duration as h:mm, e.g. 3725 s -> "1:02"."""
    minutes = int(seconds) // 60
    return f"{minutes // 60}:{minutes % 60:02d}"


class Progress:
    """Progress lines of a loop over `total` images (evaluate, predict.py): at each tenth of the
    way that comes `every_s` seconds or more after the last line, so a short loop prints none,
    "<what>: 1000/5000 images, 12.3 images/s, ETA 0:05" (h:mm; the rate counts data loading)."""
    every_s = 10.0

    def __init__(self, what, total):
        self.what, self.total, self.tenth = what, total, 0
        self.start = self.last = time.perf_counter()

    def __call__(self, done):
        now, tenth = time.perf_counter(), 10 * done // max(1, self.total)
        if tenth > self.tenth and now - self.last >= self.every_s:
            self.tenth, self.last, rate = tenth, now, done / max(now - self.start, 1e-9)
            print(f"{self.what}: {done}/{self.total} images, {rate:.1f} images/s, "
                  f"ETA {hours_minutes((self.total - done) / rate)}", flush=True)


def evaluate(model, loader_or_dataset, device="cpu", batch_size=8, num_workers=0,
             max_images=None, results_json=None, amp_dtype=None, verbose=True,
             collate_fn=None):
    """COCO box (and mask) AP of `model` on a COCO-format dataset.

    model: a model.Method (or anything with its eval-mode call, `size_divisibility` and
        `mask_threshold`): `model(images (B, 3, H, W), image_sizes=[(h, w)] * B)` (each
        image's size before padding) returns one dict per image (boxes,
        scores, labels, optional masks; see `to_original`), masks thresholded at
        `model.mask_threshold`. Moved to `device`; its train/eval mode is restored on return.
        A DDP wrapper is unwrapped.
    loader_or_dataset: a DataLoader yielding `(images, targets)`, or a Dataset (then a
        loader is built with `collate_fn`, else `data.collate_fn`). The (Subset-unwrapped)
        dataset must have `coco` (pycocotools ground truth) and `label_to_cat_id`.
    max_images: evaluate only the first max_images images (per rank: max_images/world).
    results_json: if given, the COCO results list is written there (atomically).
    amp_dtype: None (fp32) or torch.bfloat16/float16 for autocast.

    Returns {bbox_AP, bbox_AP50, bbox_AP75, bbox_APs, bbox_APm, bbox_APl, and the same with
    segm_ when the model predicted masks, num_images, num_detections, images_per_s, seconds,
    total_seconds}. APs are in [0, 1]; -1.0 means COCOeval found no ground truth objects of
    that size (e.g. APl on small images). `seconds` is the time spent in the model forward,
    its post-processing and the mapping back to original images (CUDA synchronised, data
    loading, RLE encoding and COCOeval excluded); images_per_s = num_images / seconds.
    `total_seconds` is the whole call. A long evaluation prints progress lines (`Progress`;
    rank 0, whatever `verbose`: train.py's evaluation of thousands of images too).

    Multi-process (torch.distributed initialised): every rank evaluates its shard (give it a
    DistributedSampler loader, or a Dataset and one is built); the results are gathered to
    rank 0 (all_gather_object: with NCCL, torch.cuda.set_device must have been called),
    duplicates from the sampler's padding are dropped by image_id, rank 0 runs COCOeval once,
    and the stats dict is broadcast so every rank returns the same dict (so ranks never
    disagree on e.g. "best AP so far"). Only rank 0 prints the tables and writes results_json.
    """
    from model import NON_FINITE_DEFORM, non_finite_deform_count
    t_start = time.perf_counter()
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    net = _unwrap_model(model)
    loader = _make_loader(loader_or_dataset, batch_size, num_workers, device, max_images,
                          collate_fn, distributed, net.size_divisibility)
    dataset = _base_dataset(loader.dataset)
    limit = sys.maxsize if max_images is None else math.ceil(max_images / world)

    was_training = net.training
    net.to(device).eval()
    per_image = {}        # image_id -> its COCO results; a dict so repeated images count once
    has_masks = False     # a box-only model (FCOS) is evaluated for bbox only
    seconds, seen = 0.0, 0
    # rank 0 tells for all: its images (of its shard) x world
    progress = Progress("evaluating", min(limit, len(loader.sampler)) * world)
    try:
        with torch.no_grad():
            for images, targets in loader:
                if seen >= limit:
                    break
                images, targets = images[:limit - seen], targets[:limit - seen]
                seen += len(targets)
                _sync(device)
                t0 = time.perf_counter()
                preds = _predict_batch(net, images, targets, device, amp_dtype, net.mask_threshold)
                _sync(device)
                seconds += time.perf_counter() - t0
                for target, pred in zip(targets, preds):
                    image_id = int(target["image_id"])
                    has_masks = has_masks or "masks" in pred
                    if image_id not in per_image:
                        per_image[image_id] = to_coco_results(pred, image_id,
                                                              dataset.label_to_cat_id)
                if rank == 0:
                    progress(seen * world)
    finally:
        net.train(was_training)

    # DeformConv's NaN / inf on a GPU, counted on the device (model.non_finite_deform_count):
    # raised here, on every rank together, as the CPU's assert raises at once
    bad_deform = int(non_finite_deform_count("cpu"))
    if distributed:  # every rank's results (rank 0 scores them), and the ranks' counts
        gathered = [None] * world
        dist.all_gather_object(gathered, (per_image, has_masks, seconds, bad_deform))
        per_image = {}
        for rank_images, *_ in gathered:
            for image_id, res in rank_images.items():
                per_image.setdefault(image_id, res)              # first copy wins
        has_masks = any(g[1] for g in gathered)
        # ranks run in parallel: the slowest one's time
        seconds, bad_deform = max(g[2] for g in gathered), sum(g[3] for g in gathered)
    if bad_deform:
        raise RuntimeError(NON_FINITE_DEFORM)

    stats = {}
    if rank == 0:
        results = [r for res in per_image.values() for r in res]
        if results_json:
            data.write_json(results, results_json)
        for iou_type in ("bbox", "segm") if has_masks else ("bbox",):
            values = _coco_eval(dataset.coco, results, iou_type, list(per_image), verbose)
            stats.update({f"{iou_type}_{n}": v for n, v in zip(_STAT_NAMES, values)})
        stats.update(num_images=len(per_image), num_detections=len(results),
                     images_per_s=len(per_image) / seconds if seconds > 0 else 0.0,
                     seconds=seconds, total_seconds=time.perf_counter() - t_start)
    if distributed:
        box = [stats]
        dist.broadcast_object_list(box, src=0)
        stats = box[0]
    return stats


# -----------------------------------------------------------------------------
# a trained model from its checkpoint (eval.py and predict.py)


def load_checkpoint_model(ckpt, device="cpu", overrides=None):
    """The model a train.py checkpoint describes, with its weights, on `device`, in eval mode.

    ckpt: path of a checkpoint written by train.py ({"model", "model_args", "config", ...}).
    overrides: ModelConfig fields to change at inference (e.g. {"mask_threshold": 0.3}).
    The prefixes of a compiled ("_orig_mod.") or DDP ("module.") model are stripped. Weights
    holding NaN / inf or a negative BatchNorm variance are refused (weights.check_weights), as
    are a folder, a file that is not a checkpoint and one whose pickle would run code
    (weights.load_file). Returns (model, checkpoint dict). Raises ValueError naming the file.
    """
    from model import ModelConfig, build_model
    from weights import check_weights, load_file
    checkpoint = load_file(ckpt, device)      # weights_only: a pickle that would run code refused
    if not isinstance(checkpoint, dict) or not {"model", "model_args"} <= set(checkpoint):
        raise ValueError(f"checkpoint '{ckpt}' has no 'model'/'model_args' entries "
                         "(not written by train.py?)")
    unknown = sorted(set(overrides or {}) - set(ModelConfig.__dataclass_fields__))
    if unknown:
        raise ValueError(f"--model_args: {', '.join(unknown)} not ModelConfig field(s)")
    try:
        model = build_model(ModelConfig(**{**checkpoint["model_args"], **(overrides or {})}))
    except TypeError as e:
        raise ValueError(f"checkpoint '{ckpt}' has model_args this model.py does not know: "
                         f"{e}") from None
    state = {k.removeprefix("_orig_mod.").removeprefix("module."): v
             for k, v in checkpoint["model"].items()}
    check_weights(state, f"checkpoint '{ckpt}'")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"weights in '{ckpt}' do not fit the model built from its model_args: "
                         f"{e}") from None
    return model.to(device).eval(), checkpoint


def checkpoint_transform(checkpoint, input_size=None, keep_res=None):
    """The test transform of a checkpoint's training config (data.build_transforms), as eval.py
    and predict.py use it: its kind ("transform"), its input_format (RGB / ImageNet statistics,
    or "bgr_coco" for a model started from CenterNet's weights), keep_res, and its input size
    (test_input_size, else input_size). `input_size` / `keep_res` given: those instead."""
    saved = checkpoint.get("config") or {}
    keep_res = saved.get("keep_res", False) if keep_res is None else keep_res
    size = input_size or saved.get("test_input_size") or saved.get("input_size")
    kw = {"input_size": size} if size else {}      # none at all: build_transforms' own default
    if keep_res:
        kw["keep_res"] = True                      # data.py refuses it for fcos
    return data.build_transforms(saved.get("transform", "centernet"), train=False,
                                 input_format=saved.get("input_format", "rgb_imagenet"), **kw)


# -----------------------------------------------------------------------------
# command line

if __name__ == "__main__":
    # ---- config (overridable: python eval.py [CONFIG] --key=value) -------------------------
    ckpt = ""                  # checkpoint written by train.py (required)
    val_img_dir = None         # None: from the checkpoint's training config (data_root/shapes_dir)
    val_ann = None             # None: from the checkpoint's training config
    # None: the checkpoint's training config's test_input_size, else its input_size
    input_size = None
    # centernet: each image at its own size (CenterNet's --keep_res; wins over input_size);
    # None: the checkpoint config's keep_res
    keep_res = None
    # train.py's policy, so that a checkpoint gets the AP its training logged: "auto" is a GPU
    # when there is one, else the CPU; dtype "auto" is configurator.auto_dtype (GPU bf16, else
    # fp16; CPU bf16 where native, else fp32); or "float32", "bfloat16", "float16" (autocast)
    device = "auto"
    dtype = "auto"
    batch_size = 8
    num_workers = 2
    max_images = None          # None: the whole val set
    results_json = None        # path to write the COCO results list to
    model_args = ""            # overrides of the checkpoint's model_args, a dict literal, e.g. an
                               # inference-time setting: --model_args="{'mask_threshold': 0.3}"
    oracle_stride = 0          # > 0: no model; the mask AP of perfect stride-R masks on --val_ann
                               # (`grid_oracle`), e.g. --oracle_stride=4
                               # --val_ann=data/shapes/annotations/instances_val.json
    # -----------------------------------------------------------------------------------------
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configurator.py")).read())

    # a bad image or annotation met in a DataLoader worker, a bad path, a ValueError raised below:
    # one line naming it, "eval.py: error: ...", exit status 2 (CENTERMASK_DEBUG=1: the traceback)
    from weights import one_line_errors
    one_line_errors("eval.py")

    if oracle_stride:
        if not val_ann or not os.path.isfile(val_ann):
            raise ValueError("--oracle_stride needs --val_ann=FILE (a COCO instances json), "
                             f"got {val_ann!r}")
        stats = grid_oracle(val_ann, int(oracle_stride), verbose=True)
        print(json.dumps({"oracle_stride": oracle_stride, **stats}))
        raise SystemExit(0)
    device, dtype = device_and_dtype(device, dtype)  # (configurator's, exec'd above)
    if not ckpt:
        raise ValueError("no checkpoint given: pass --ckpt=PATH")
    try:
        overrides = ast.literal_eval(model_args) if model_args else {}
    except (ValueError, SyntaxError):
        overrides = None
    if not isinstance(overrides, dict):
        raise ValueError("--model_args must be a dict literal such as "
                         f"\"{{'mask_threshold': 0.3}}\", got {model_args!r}")
    model, checkpoint = load_checkpoint_model(ckpt, device, overrides)
    if device.startswith("cuda"):  # train.py's GPU settings, under which its evaluations ran
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
        model = model.to(memory_format=torch.channels_last)

    # val paths not given: where the training config had them (data.dataset_paths, as train.py)
    saved = checkpoint.get("config") or {}
    if val_ann is None and saved.get("shapes_dir") and max_images is None:
        max_images = saved.get("shapes_n_val")  # as train.py: the first n of a possibly bigger set
    saved_paths = data.dataset_paths(saved)
    val_img_dir = saved_paths["val_img_dir"] if val_img_dir is None else val_img_dir
    val_ann = saved_paths["val_ann"] if val_ann is None else val_ann
    for key, value in (("val_img_dir", val_img_dir), ("val_ann", val_ann)):
        if value is None:
            raise ValueError(f"--{key} not given and the checkpoint's config has none")
    transform = checkpoint_transform(checkpoint, input_size, keep_res)
    dataset = data.CocoInstances(val_img_dir, val_ann, transforms=transform)  # names a bad file

    # label k = category trained[k] (train.py saves it)
    trained, ids = checkpoint.get("label_to_cat_id"), dataset.label_to_cat_id
    if trained is not None and list(trained) != ids:
        raise ValueError(f"{val_ann} lists other categories than {ckpt} was trained on (ids "
                         f"{ids[:20]} against {list(trained)[:20]}): its labels would be scored "
                         "as other classes")
    n_eval = len(dataset) if max_images is None else min(max_images, len(dataset))
    at = "with each image at its own size (keep_res)" if transform.keep_res \
        else f"at input size {transform.input_size}"
    print(f"evaluating {ckpt} on {n_eval} images of {val_ann}, "
          f"{transform.kind} test transform {at}, inputs {transform.input_format}, device "
          f"{device}, dtype {dtype}")
    amp_dtype = None if dtype == "float32" else getattr(torch, dtype)
    from model import NON_FINITE_DEFORM
    try:
        stats = evaluate(model, dataset, device=device, batch_size=batch_size,
                         num_workers=num_workers, max_images=max_images,
                         results_json=results_json, amp_dtype=amp_dtype)
    except RuntimeError as e:
        # DeformConv's refusal of NaN / inf as one line; anything else passes through
        if NON_FINITE_DEFORM not in str(e):
            raise
        raise ValueError(f"{ckpt}: {NON_FINITE_DEFORM}") from None
    print(json.dumps(stats))
