"""
Every drawing of the project: each method's intermediate results as named 2-D maps (what it is
taught and what it predicts: `teaching_maps`), the predictions drawn on an image, and the
figures that show them (train.py's and predict.py's pictures; METHODS.md's pictures of what
each method is taught, `python pictures.py assets`). They read the model; none of it is part of
a method.

    teaching_maps(model)(images)     the method's maps: CenterMask's or FCOSIS's (else None)
    centermask_maps(model, images)   [CM] Fig. 3 and 5: heatmap, peaks, saliency, local shapes,
                                     masks
    fcosis_maps(model, images)       [IS] Fig. 2-4: centre-of-mass field, coarse foreground,
                                     attention map, colour groups, masks
    draw_predictions(image, pred)    boxes, class names, scores and masks on the original image
    save_maps_figure(image, maps)    the network input and each named map, in one PNG
    save_pictures(model, dataset)    both, for the first images of a dataset (train.py)
    draw_dataset(img_dir, ann, out)  a COCO json's ground truth as training reads it:
                                     `python pictures.py data --img_dir=... --ann=... --out=...`
    save_target_figures(out_dir)     METHODS.md's pictures: CenterMask's and FCOSIS's targets,
                                     computed by model.py from the ground truth of shapes images
"""

import argparse
import colorsys
import contextlib
import functools
import io
import math
import os
import sys
import tempfile

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from matplotlib.colors import BoundaryNorm, ListedColormap, to_rgba
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image
from torch.utils.data import Subset
from torchvision.transforms.functional import pil_to_tensor
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks, make_grid

from data import (COCO_BGR_MEAN, COCO_BGR_STD, IMAGENET_MEAN, IMAGENET_STD, CocoInstances,
                  ImageReadError, load_rgb_image, write_atomic, write_shapes_dataset)
from eval import _base_dataset, _make_loader, _predict_batch, _unwrap_model
from model import (FCOSIS, CenterMask, FCOSForward, ModelConfig, assemble_masks, batch_masks,
                   box_overlap_graph, boxes_inside, build_model, center_of_mass,
                   center_of_mass_targets, centernet_heatmaps, coarse_foreground_targets,
                   coloring_groups, flatten_targets, mask_assignment, mask_targets,
                   min_size_boxes, optimal_padding, saliency_targets, topk_peaks)

# colour maps with NaN cells drawn white (blank): the gaps between tiles
blank_nan = {name: matplotlib.colormaps[name].with_extremes(bad="white")
             for name in ("viridis", "gray")}


@contextlib.contextmanager
def eval_mode(model):
    """model.eval() inside the block; the mode it was in is restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def tile(shapes, ncols, gap):
    """(N, S, S) shapes, N >= ncols -> one mosaic of rows (S + gap) - gap x ncols (S + gap) - gap,
    filled row by row, NaN (drawn blank) between the tiles: make_grid less its outer border."""
    mosaic = make_grid(shapes[:, None], nrow=ncols, padding=gap, pad_value=float("nan"))
    return mosaic[0, gap:-gap, gap:-gap]


def instance_map(masks, threshold):
    """(K, H, W) mask probabilities, best detection first -> (H, W) int64: 1 + the rank of the
    most probable mask where that probability is >= threshold, 0 elsewhere."""
    if len(masks) == 0:
        return torch.zeros(masks.shape[1:], dtype=torch.long, device=masks.device)
    prob, rank = masks.max(0)                                            # (H, W) each
    return torch.where(prob >= threshold, rank + 1, 0)


@torch.no_grad()
def centermask_maps(model, images, k=4):
    """
    The intermediate results of [CM] Fig. 3 for `save_pictures`'s `maps_fn` hook: what the
    heads predict and how the top-k detections' masks are put together.
    images (B, 3, H, W) normalised and padded, as model(images) -> list of B dicts of 2-D
    tensors (h, w = H/4, W/4; K = min(k, number of heatmap cells); best detection first):
        "heatmap"       (h, w)  max over classes of the sigmoid heatmap ([CM 3.4])
        "peaks"         (h, w) int64  rank (1 = best) of each top-K peak (3x3 local
                                maximum, as `decode`) at its cell, 0 elsewhere: the
                                centres whose heads are read; same numbers as "masks"
        "saliency"      (h, w)  sigmoid Global Saliency ([CM 3.2]); class-specific: the max
                                over classes (every object's pixels, as the class-agnostic
                                map drawn in [CM] Fig. 3)
        "local shapes"  (S, K*(S+1) - 1)  sigmoid S x S local shapes of the top-K detections
                                ([CM 3.1]), left to right, separated by NaN columns (blank)
        "masks"         (H, W) int64  the top-K assembled masks ([CM] eq. 1) as an instance
                                map: 1 + rank of the detection whose mask probability is the
                                highest there and >= mask_threshold, 0 elsewhere
    "saliency" / "local shapes" are absent when that branch is switched off (Table 1c/1d,
    [CM] Fig. 5a/5b). Uses the last stack's heads; runs in eval mode (restored after).
    """
    with eval_mode(model):
        out = model.heads(images)
        dets = model.decode(out, images.shape[-2:], k=k)
    heat = out["heatmap"].float().sigmoid()                              # (B, C, h, w)
    B, C, h, w = heat.shape
    scores, labels, ys, xs = topk_peaks(heat, k)                         # (B, K), as decode
    K = scores.shape[1]
    # rank map; two classes can peak on one cell: the better rank is kept there
    ranks = torch.arange(1, K + 1, device=heat.device).expand(B, K)
    peaks = torch.zeros(B, h * w, dtype=torch.long, device=heat.device).scatter_reduce_(
        1, ys * w + xs, ranks, "amin", include_self=False).view(B, h, w)  # (B, h, w)
    maps = []
    for b in range(B):
        m = {"heatmap": heat[b].amax(0), "peaks": peaks[b]}
        if model.saliency is not None:
            m["saliency"] = out["saliency"][b].float().sigmoid().amax(0)  # (h, w)
        if model.local_shape is not None:
            S = model.cfg.shape_size
            cells = torch.stack([xs[b], ys[b]], 1)                       # (K, 2) as (x, y)
            local = model.head_sets[-1].shape_at(out, torch.full_like(xs[b], b), cells)
            m["local shapes"] = tile(local.float().sigmoid().view(K, S, S), ncols=K, gap=1)
        m["masks"] = instance_map(dets[b]["masks"], model.mask_threshold)
        maps.append(m)
    return maps


@torch.no_grad()
def fcosis_maps(model, images, k=8, score_threshold=0.3):
    """
    What [IS] Fig. 2-4 show, for `save_pictures`'s `maps_fn` hook. images (B, 3, H, W) ->
    list of B dicts (h, w = H/8, W/8, the P3 grid of the detection head's outputs):
        "centre of mass field"  (h, w, 3) RGB: hue = angle of the regressed vector (r_x,
                                r_y), brightness = coarse foreground (Fig. 3)
        "coarse foreground"     (h, w) sigmoid of the detection head's coarse segmentation
        "attention map"         the attention map of the best detection's pass, on the P2
                                grid (H/4, W/4)
                                (absent for the "none" baseline)
        "colour groups"         (H, W) int64: each detection's box (score >= threshold,
                                best k) filled with 1 + its colour (one segmentation pass
                                per colour, Fig. 4); overlapping boxes have other colours
        "masks"                 (H, W) int64: 1 + rank of the detection whose mask is the
                                most probable there and >= mask_threshold
    """
    with eval_mode(model):
        out = model.heads(images)
        points, _, levels = model.locations(out["hw"], images.shape[-2:], images.device)
        x = FCOSForward(out, out["features"], points, levels, tuple(images.shape[-2:]))
        dets = model.detect(x, k)
        # keep the confident ones: the picture is about them
        dets = [{key: v[d["scores"] >= score_threshold] for key, v in d.items()} for d in dets]
        att, groups, batch = model.predict_masks(dets, x)
    regressed, fg = model.p3_maps(out, images.shape[-2:])
    h, w = fg.shape[-2:]
    loc = points[:h * w].t().reshape(1, 2, h, w)  # the P3 locations
    vec = regressed - loc  # (B, 2, h, w) input pixels
    hue = (torch.atan2(vec[:, 1], vec[:, 0]) / (2 * math.pi)) % 1.0          # (B, h, w) in [0, 1)
    H, W = images.shape[-2:]
    maps = []
    for b, d in enumerate(dets):
        m = {"centre of mass field": hsv_to_rgb(hue[b], fg[b, 0]), "coarse foreground": fg[b, 0]}
        mine = (batch == b).nonzero()[:, 0]  # this image's detections
        if att is not None and len(mine):
            m["attention map"] = att[groups[mine[0]], 0]
        colour = torch.zeros(H, W, dtype=torch.long, device=images.device)
        cols = coloring_groups(d["boxes"], torch.zeros_like(d["labels"]))[0]  # (K,) this image
        for j, inside in enumerate(boxes_inside(d["boxes"], H, W)):  # in rank order
            colour[inside] = cols[j] + 1
        m["masks"] = instance_map(d["masks"], model.mask_threshold)
        m["colour groups"] = colour
        maps.append(m)
    return maps


def hsv_to_rgb(h, v):
    """Hue h and value v, each (h, w) in [0, 1], full saturation -> (h, w, 3) RGB in [0, 1]."""
    k = (torch.tensor([5.0, 3.0, 1.0], device=h.device) + h[..., None] * 6) % 6  # (h, w, 3)
    return v[..., None] * (1 - (torch.minimum(k, 4 - k).clamp(0, 1)))


def teaching_maps(model):
    """The method's teaching maps as a function of the images, images (B, 3, H, W) -> one dict
    of named 2-D maps per image (`centermask_maps` or `fcosis_maps` bound to the model, keyword
    arguments passed on), or None for a method that has none (FCOS, FCOSreg, MaskFCOS,
    CenterMask-FCOS)."""
    model = _unwrap_model(model)
    if isinstance(model, CenterMask):
        return functools.partial(centermask_maps, model)
    if isinstance(model, FCOSIS):
        return functools.partial(fcosis_maps, model)
    return None


# -----------------------------------------------------------------------------
# predictions drawn on the images (eval.py's `to_original`), and the teaching maps as a figure


def write_png(image, path):
    """(3, H, W) uint8 -> a PNG at `path`, written atomically (data.write_atomic)."""
    write_atomic(path, lambda tmp: torchvision.io.write_png(image, tmp))


def _color(i):
    """Class or object i's colour, "#rrggbb" (torchvision and matplotlib take it): a fixed,
    well-spread hue (golden ratio) so that pictures are comparable."""
    rgb = colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.75, 1.0)
    return "#" + "".join(f"{int(c * 255):02x}" for c in rgb)


def draw_predictions(image, pred, class_names=None, score_threshold=0.3):
    """Draw `to_original` predictions on a (3, H0, W0) uint8 image; returns a new image.

    Masks are blended in the class colour, boxes are outlined and labelled "class score"
    ("class" alone for the ground truth, a `pred` without scores: `draw_dataset`).
    """
    # ground truth (no "scores"): every instance, labelled by its class name alone
    keep = pred["scores"] >= score_threshold if "scores" in pred else slice(None)
    pred = {k: v[keep].cpu() for k, v in pred.items()}
    # small images (the 128 px shapes) are enlarged so that labels stay readable
    up = max(1, math.ceil(384 / max(image.shape[-2:])))
    image = image.repeat_interleave(up, -2).repeat_interleave(up, -1)
    labels = pred["labels"].tolist()
    if not labels:
        return image
    colors = [_color(c) for c in labels]
    if "masks" in pred:
        masks = pred["masks"].repeat_interleave(up, -2).repeat_interleave(up, -1)
        image = draw_segmentation_masks(image, masks, alpha=0.5, colors=colors)
    names = [class_names[c] if class_names and c < len(class_names) else str(c)
             for c in labels]
    if "scores" in pred:
        names = [f"{n} {s:.2f}" for n, s in zip(names, pred["scores"].tolist())]
    return draw_bounding_boxes(image, pred["boxes"] * up, labels=names, colors=colors, width=2)


def network_input_rgb(image, input_format="rgb_imagenet"):
    """A normalised (3, H, W) network input -> (3, H, W) uint8 RGB for display: data.py's
    normalisation undone (ImageNet statistics; for input_format "bgr_coco" CenterNet's COCO
    statistics, then B, G, R back to R, G, B); the batch padding shows as the mean colour."""
    bgr = input_format == "bgr_coco"
    mean = torch.tensor(COCO_BGR_MEAN if bgr else IMAGENET_MEAN, device=image.device)[:, None, None]
    std = torch.tensor(COCO_BGR_STD if bgr else IMAGENET_STD, device=image.device)[:, None, None]
    rgb = image.float() * std + mean
    rgb = rgb.flip(0) if bgr else rgb
    return (rgb.clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def _maps_layout(widths, capacity):
    """Flow panels of the given widths (grid units) into rows of at most `capacity` units."""
    rows, row = [], []
    for i, w in enumerate(widths):
        if row and sum(widths[j] for j in row) + w > capacity:
            rows.append(row)
            row = []
        row.append(i)
    return rows + [row]


def save_maps_figure(image, maps, path, capacity=5):
    """Teaching view: the image the network saw, then each named 2-D map, with titles.

    Float maps are drawn with a colour bar (viridis; NaN cells blank, e.g. the gaps between
    tiles), (h, w, 3) maps as RGB images (no colour bar), integer maps as label maps (0 = none in
    black, 1..n in distinct colours, e.g. instance ids). Every map keeps its aspect ratio and is
    enlarged to the panel size with nearest interpolation, so a 32x32 stride-4 map shows its
    cells instead of a blur. Panels flow into rows of `capacity` grid units; a wide map (a row
    of tiles) takes several units.
    """
    panels = [("network input", image.permute(1, 2, 0).numpy())]
    panels += [(name, m.detach().cpu().numpy()) for name, m in maps.items()]
    # a panel is 1 grid unit per unit of aspect ratio (width / height), at least 1
    widths = [min(capacity, max(1, round(p.shape[1] / p.shape[0]))) for _, p in panels]
    rows = _maps_layout(widths, capacity)
    fig = Figure(figsize=(2.8 * capacity, 2.9 * len(rows)))
    grid = fig.add_gridspec(len(rows), capacity)
    for r, row in enumerate(rows):
        col = 0
        for i in row:
            name, m = panels[i]
            ax = fig.add_subplot(grid[r, col:col + widths[i]], xticks=[], yticks=[])
            col += widths[i]
            ax.set_title(f"{name} {m.shape[0]}x{m.shape[1]}", fontsize=10)
            if i == 0 or m.ndim == 3:  # the image, or an RGB map (e.g. FCOSIS's angle field)
                ax.imshow(m.astype(np.float32) if i else m, interpolation="nearest")
                continue
            if np.issubdtype(m.dtype, np.integer):
                n = max(int(m.max()), 1)
                cmap = ListedColormap(["black"] + [_color(k) for k in range(n)])
                im = ax.imshow(m, cmap=cmap, norm=BoundaryNorm(np.arange(-0.5, n + 1), n + 1),
                               interpolation="nearest")
                bar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02, ticks=range(n + 1))
            else:
                im = ax.imshow(m.astype(np.float32), cmap=blank_nan["viridis"],
                               interpolation="nearest")
                bar = fig.colorbar(im, ax=ax, fraction=0.046 / max(1, widths[i] ** 0.5), pad=0.02)
            bar.ax.tick_params(labelsize=7)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def save_pictures(model, dataset, out_dir, n=8, device="cpu", collate_fn=None, maps_fn=None):
    """Draw the predictions on the first `n` images of `dataset`; returns the PNG paths.

    The original image is read from disk (`dataset.img_dir` / file_name from `dataset.coco`)
    and the predictions are mapped back with `to_original`, the same code as evaluation.
    Class names come from `dataset.class_names` when it has them.

    maps_fn (the teaching hook): optional `maps_fn(images (B, 3, H, W)) -> list (one per
    image) of {name: (h, w) tensor}` (`teaching_maps`: heatmap, local shapes, saliency,
    attention map); each image's maps are saved next to its prediction as `<stem>_maps.png`
    with matplotlib, after the network input they were computed from (float maps with a
    colour bar, integer maps as label maps; see `save_maps_figure`).
    """
    base = _base_dataset(dataset)
    net = _unwrap_model(model)
    subset = Subset(dataset, range(min(n, len(dataset))))
    loader = _make_loader(subset, 1, 0, device, None, collate_fn, False, net.size_divisibility)
    class_names = getattr(base, "class_names", None)
    input_format = getattr(getattr(base, "transforms", None), "input_format", "rgb_imagenet")
    paths = []
    with eval_mode(net.to(device)), torch.no_grad():
        for images, targets in loader:  # one image a batch
            pred = _predict_batch(net, images, targets, device, None, net.mask_threshold)[0]
            info = base.coco.loadImgs(int(targets[0]["image_id"]))[0]
            # the stored grid, (3, H0, W0)
            image = pil_to_tensor(load_rgb_image(os.path.join(base.img_dir, info["file_name"])))
            stem = os.path.join(out_dir, os.path.splitext(os.path.basename(info["file_name"]))[0])
            paths.append(f"{stem}_pred.png")
            write_png(draw_predictions(image, pred, class_names), paths[-1])
            if maps_fn is not None:
                # the maps live in the padded network-input frame: show that image
                paths.append(f"{stem}_maps.png")
                shown = network_input_rgb(images[0], input_format)
                save_maps_figure(shown, maps_fn(images.to(device))[0], paths[-1])
    return paths


def draw_dataset(img_dir, ann_file, out_dir, n=8):
    """Look at your data first: the first `n` images of a COCO json, each with the boxes, masks
    and class names that training reads from it, drawn as predictions are (draw_predictions).
    It reads through data.CocoInstances, so with training's checks and messages (a missing file,
    an annotation naming an unknown image, a picture whose size is not the json's); what
    training skips is not drawn (crowd regions, unusable annotations: a warning names each).
    Returns (the dataset, the PNG paths: out_dir/<file_name's stem>.png)."""
    dataset = CocoInstances(img_dir, ann_file)  # no transform: each image at its own size
    paths = []
    for i in range(min(n, len(dataset))):
        image, target = dataset[i]  # (3, H0, W0) normalised; boxes (N, 4), masks (N, H0, W0)
        truth = {k: target[k].as_subclass(torch.Tensor) for k in ("boxes", "labels")}
        truth["masks"] = target["masks"].as_subclass(torch.Tensor).bool()
        name = dataset.coco.imgs[dataset.ids[i]]["file_name"]
        paths.append(os.path.join(out_dir, os.path.splitext(name)[0].replace("/", "_") + ".png"))
        write_png(draw_predictions(network_input_rgb(image), truth, dataset.class_names), paths[-1])
    return dataset, paths


# -----------------------------------------------------------------------------
# METHODS.md's two pictures of what CenterMask and FCOSIS are TAUGHT, drawn from the ground truth
#
#     python pictures.py assets             # or another folder: assets/*_targets.png
#
# No network is trained or even run, nothing is downloaded: a few synthetic shapes images are
# written with data.py's `write_shapes_dataset` (fixed seed), and every map is computed from their
# ground truth by model.py's own target builders (the very functions the losses compare the network
# against) and by its own assembly / attention code fed with those targets. Deterministic
# (byte-identical PNGs); seconds on a CPU.

FIGURE_SEED = 1337     # write_shapes_dataset's seed
FIGURE_SIZE = 128      # image side (px): the shapes quick start's size
CANDIDATES = 48        # val images written; the figures show 2 of them (`example_targets`' rule)
EPS = 1e-6             # probabilities -> logits for the code that takes logits (logit(0) = -inf)
FIG_WIDTH, DPI = 10.0, 130  # inches; 1300 px wide, each PNG under 100 KB
PASS_COLORS = ("#e41a1c", "#377eb8", "#4daf4a", "#984ea3", "#ff7f00")  # FCOSIS colour groups


def example_targets(tmp_dir, n=2):
    """Write CANDIDATES shapes val images into tmp_dir and pick n by a fixed rule (no hand-picked
    ids): among those with 3-6 objects and at least 2 pairs of overlapping boxes (the hard case
    both methods are about: a neighbour inside an object's box), the n whose masks cover the most
    of the image, in image-id order. -> RGB images (H, W, 3) uint8, target dicts (boxes (N, 4)
    xyxy, labels (N,), masks (N, H, W) 0/1, as CocoInstances gives them), class names."""
    paths = write_shapes_dataset(tmp_dir, n_train=0, n_val=CANDIDATES, size=FIGURE_SIZE,
                                 seed=FIGURE_SEED)
    ds = CocoInstances(paths["val_img_dir"], paths["val_ann"])  # no transform: scale 1, no padding
    targets = [ds[i][1] for i in range(len(ds))]
    candidates = []  # (foreground fraction, index)
    for i, t in enumerate(targets):
        pairs = int(box_overlap_graph(t["boxes"]).sum()) // 2  # the graph is symmetric
        if 3 <= len(t["boxes"]) <= 6 and pairs >= 2:
            candidates.append((float(t["masks"].amax(0).float().mean()), i))
    chosen = sorted(i for _, i in sorted(candidates, reverse=True)[:n])
    rgbs = [np.asarray(ds.load_image(i)) for i in chosen]
    return rgbs, [targets[i] for i in chosen], ds.class_names


def centermask_targets(targets, H, W, cfg):
    """
    What CenterMask is taught for a batch of B images, as CenterMask.losses computes it, at its
    stride R = 4 (h, w = H/4, W/4; M objects in the batch):
        heat     (B, C, h, w)  centre heatmap: CenterNet gaussians, eq. 3's target ([CM 3.4])
        local    (M, S, S)     each object's ground-truth mask resampled onto an S x S grid over
                               its box: the local shape that reproduces it ([CM 3.1])
        saliency (B, 1, h, w)  the image's foreground on the stride-4 grid ([CM 3.2]): each mask
                               average-pooled, then the max over the objects (Table 1f's target)
        masks    (M, H, W)     local shape stretched to the box x saliency ([CM 3.3] eq. 1)
        boxes    (M, 4)        the boxes the shapes are stretched over, output frame
    The mask loss supervises only the PRODUCT local x saliency ([CM] eq. 2), so (c) and (d) are
    the natural split of that target: the object's own mask in its box, and the image's foreground.
    """
    R, S = 4, cfg.shape_size
    B, C, h, w = len(targets), cfg.num_classes, H // R, W // R
    objs = flatten_targets(targets, R)  # boxes, centres in the output frame
    M = len(objs["labels"])
    # as CenterMask.losses: a centre on the last pixel edge must still index the map
    last = torch.tensor([w - 1, h - 1])
    objs["center_int"] = torch.minimum(objs["center_int"].clamp(min=0), last)
    heat = centernet_heatmaps(objs, B, C, h, w)
    # the boxes the mask loss stretches the shapes over (the ground-truth centre and size, at
    # least one output pixel wide), each ground-truth mask sampled on an S x S grid over its box
    gt_masks = batch_masks(targets, H, W, "cpu")  # (M, H, W)
    boxes = min_size_boxes(objs["center"], objs["wh"])  # (M, 4) output frame
    local = mask_targets(gt_masks, torch.arange(M), boxes * R, S)  # (M, S, S) in [0, 1]
    # one class-agnostic saliency channel (cfg.saliency = "agnostic", the default)
    agnostic = torch.zeros(M, dtype=torch.long)
    gt_small = F.avg_pool2d(gt_masks[:, None].float(), R)[:, 0]  # (M, h, w)
    saliency = saliency_targets(gt_small, objs["batch"], agnostic, B, 1)  # (B, 1, h, w)
    # assembly ([CM] eq. 1) takes logits: the targets go in as logit(p), at input resolution
    masks = assemble_masks(torch.logit(local, EPS), torch.logit(saliency, EPS), objs["batch"],
                           agnostic, boxes, (H, W), 1.0 / R)  # (M, H, W) probabilities
    return dict(heat=heat, local=local, saliency=saliency, masks=masks, boxes=boxes,
                batch=objs["batch"], gt_masks=gt_masks)


def fcosis_targets(targets, H, W, cfg):
    """
    What FCOSIS's mask branch is taught for a batch of B images (M objects), as
    FCOSIS.extra_losses computes it, on the head's levels P3-P7 (P locations in all):
        points (P, 2), strides (P,), hw    the FCOS locations of every level ([FCOS] 3.1)
        target (B, P, 2), valid (B, P)     centre-of-mass regression target, stride units
                                           ([IS 3.2.1]), at the mask pixels (`mask_assignment`)
        matched (B, P)                     the object each location regresses (-1: none)
        mass (M, 2)                        centres of mass, input frame (`center_of_mass`)
        fg (B, P)                          coarse foreground target ([IS 3.2.1])
        att (G, 1, H/4, W/4)               the attention map of every segmentation pass
        groups (M,), group_batch (G,)      the passes: Largest-First colours ([IS 3.2.1])
        color_boxes (M, 4)                 the boxes that were coloured (grown by the loss padding)
    The attention maps are what FCOSIS.segment builds in training, from detection-head outputs
    that equal their targets, through FCOSIS.attention_inputs (P3 -> the stride-4 P2 grid) and
    the AttentionMap module (lambda = mu = 1, their initial values [IS 3.2.1]).
    """
    B = len(targets)
    # a real FCOSIS (random weights, never run): its locations, attention_inputs and AttentionMap
    with torch.random.fork_rng():
        net = build_model(cfg).eval()
    hw = [(-(-H // s), -(-W // s)) for s in net.strides]  # P3-P7 grids (ceil)
    points, strides, _ = net.locations(hw, (H, W), "cpu")
    flat = flatten_targets(targets, 1)  # stride 1: input frame
    boxes, batch = flat["boxes"], flat["batch"]  # (M, 4), (M,)
    masks = batch_masks(targets, H, W, "cpu")  # (M, H, W)
    # coarse foreground of every level: the union of the image's masks, average-pooled
    fg = torch.cat([coarse_foreground_targets(masks, s, batch, B, level_hw).flatten(1)
                    for s, level_hw in zip(net.strides, hw)], 1)  # (B, P)
    # every location whose pixel is in a mask (the smaller mask where two overlap) regresses
    # (x_C - x, y_C - y) / s of that object
    mass = center_of_mass(masks, boxes)  # (M, 2)
    matched = mask_assignment(points, masks, batch, B)  # (B, P)
    target, valid = center_of_mass_targets(points, strides, matched, mass, masks)
    # the padded-crop loss padding [IS 3.2.2] grows each box before colouring
    wh = boxes[:, 2:] - boxes[:, :2]
    area = masks.flatten(1).sum(1, dtype=torch.float32)
    pad = optimal_padding(area, wh[:, 0], wh[:, 1]).float()  # (M,)
    color_boxes = boxes + pad[:, None] * boxes.new_tensor([-1.0, -1.0, 1.0, 1.0])
    groups, group_batch = coloring_groups(color_boxes, batch)  # (M,), (G,)
    # a detection head that meets its targets: "extra" = (r_x, r_y, coarse-foreground logit)
    out = {"hw": hw, "extra": torch.cat([target, torch.logit(fg, EPS)[..., None]], -1)}
    q, regressed, coarse = net.attention_inputs(out, (H // 4, W // 4), (H, W))
    with torch.no_grad():  # exactly FCOSIS.segment's call, with training's arguments
        att = net.attention(q, regressed, coarse, boxes, mass, batch, groups, len(group_batch))
    return dict(points=points, strides=strides, hw=hw, target=target, valid=valid,
                matched=matched, mass=mass, fg=fg, att=att, groups=groups,
                group_batch=group_batch, boxes=boxes, batch=batch, color_boxes=color_boxes,
                lam=net.attention.lam.item(), mu=net.attention.mu.item())


# drawing: every panel in input-pixel coordinates (x right, y down)

def _show(ax, m, H, W, **kw):
    """A map or an image stretched over the H x W image (nearest: its cells stay visible)."""
    shown = ax.imshow(np.asarray(m, np.float32), interpolation="nearest", extent=(0, W, H, 0), **kw)
    ax.set_xlim(0, W)
    ax.set_ylim(H, 0)
    return shown


def _faded(rgb, dim=1.0):
    """An RGB image in [0, 1], faded towards white (dim < 1) so that what is drawn on it reads."""
    return dim * (rgb.astype(np.float32) / 255) + (1 - dim)


def _number(ax, x, y, k, color, style="square,pad=0.1", **kw):
    """The number k in white on a patch of the object's colour."""
    ax.text(x, y, str(k), color="white", fontweight="bold", **kw,
            bbox=dict(boxstyle=style, fc=color, ec="none"))


def _draw_boxes(ax, boxes, colors, numbers=True, lw=1.2, **kw):
    """xyxy boxes (N, 4), input frame; with numbers, the object's number at its top-left."""
    for k, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=colors[k], lw=lw,
                               **kw))
        if numbers:
            _number(ax, x0 + 1, y0 + 1, k + 1, colors[k], fontsize=6, va="top", ha="left")


def _figure(rgbs, targets, boxes, titles, suptitle, title_size, bottom=0.05, top=0.75, left=0.3,
            gap=0.08, right=0.05):
    """A figure FIG_WIDTH wide of one row per image of square panels, one per title, as high as
    they need; margins and gaps in inches (top: the titles; left: the row labels). Laid out by
    hand: tight_layout lets square image panels overlap. Column (a): each image with its boxes
    (N, 4), numbered. -> figure, axes (rows, cols), height."""
    rows, cols = len(rgbs), len(titles)
    side = (FIG_WIDTH - left - right - (cols - 1) * gap) / cols  # inches
    height = top + rows * side + (rows - 1) * gap + bottom
    fig = Figure(figsize=(FIG_WIDTH, height))
    axes = fig.subplots(rows, cols, squeeze=False, subplot_kw=dict(xticks=[], yticks=[]),
                        gridspec_kw=dict(left=left / FIG_WIDTH, right=1 - right / FIG_WIDTH,
                                         bottom=bottom / height, top=1 - top / height,
                                         wspace=gap / side, hspace=gap / side))
    for ax, rgb, target, image_boxes in zip(axes[:, 0], rgbs, targets, boxes):
        _show(ax, _faded(rgb), *rgb.shape[:2])
        _draw_boxes(ax, image_boxes, [_color(k) for k in range(len(image_boxes))])
        ax.set_ylabel(f"val image {target['image_id']}", fontsize=8)
    for ax, title in zip(axes[0], titles):
        ax.set_title(title, fontsize=title_size)
    fig.suptitle(suptitle, fontsize=10, y=1 - 0.06 / height, va="top")
    return fig, axes, height


def _save_figure(fig, path):
    """The figure as a PNG at DPI, reduced to an adaptive 256-colour palette (no dithering: flat
    colours stay flat) and optimised: a third of the bytes of a 24-bit PNG, so the resolution
    (and the text) can stay high."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    rgb = Image.open(buf).convert("RGB")  # drop the opaque alpha
    small = rgb.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    write_atomic(path, lambda tmp: small.save(tmp, "PNG", optimize=True))


def draw_centermask_targets(rgbs, targets, names, path):
    """(a) image + boxes, (b) centre heatmap, (c) local shapes, (d) global saliency, (e) the
    masks they assemble, one row per image; the title gives the mean IoU of (e), binarised at
    CenterMask's threshold, against the ground truth. Returns that IoU."""
    H, W = rgbs[0].shape[:2]
    cfg = ModelConfig(method="centermask", num_classes=len(names))  # defaults: S = 32, R = 4
    t = centermask_targets(targets, H, W, cfg)
    S, R = cfg.shape_size, 4
    pred, gt = t["masks"] >= cfg.mask_threshold, t["gt_masks"].bool()  # (M, H, W)
    iou = float(((pred & gt).flatten(1).sum(1) / (pred | gt).flatten(1).sum(1)).mean())
    titles = ["(a) image + boxes", "(b) centre heatmap\n([CM 3.4], CenterNet)",
              f"(c) local shapes {S} x {S}\n([CM 3.1])",
              "(d) global saliency\n([CM 3.2], stride 4)",
              "(e) assembled masks\n([CM 3.3] eq. 1)"]
    suptitle = ("What CenterMask is taught: the targets model.py computes from the ground truth "
                f"(mask IoU of (e) vs. ground truth: {iou:.2f})")
    per_image = [t["boxes"][t["batch"] == b] * R for b in range(len(rgbs))]  # input frame
    fig, axes, height = _figure(rgbs, targets, per_image, titles, suptitle, 9)
    for b, (rgb, ax, boxes) in enumerate(zip(rgbs, axes, per_image)):
        mine = (t["batch"] == b).nonzero()[:, 0]  # this image's objects
        colors = [_color(k) for k in range(len(mine))]
        # (b) the max over the classes: one gaussian per object at its centre cell
        _show(ax[1], t["heat"][b].amax(0), H, W, cmap="magma", vmin=0, vmax=1)
        _draw_boxes(ax[1], boxes, colors, numbers=False, lw=0.6, alpha=0.8)
        # (c) one S x S tile per object, outlined in its colour, in a square view
        mosaic = tile(t["local"][mine], ncols=3, gap=2).numpy()
        ax[2].imshow(mosaic, cmap=blank_nan["gray"], vmin=0, vmax=1, interpolation="nearest")
        corners = torch.tensor([[k % 3, k // 3] for k in range(len(mine))]) * (S + 2) - 0.5
        _draw_boxes(ax[2], torch.cat([corners, corners + S], 1), colors, lw=1.5)  # the tiles
        ax[2].set_aspect("equal", adjustable="datalim")  # a square view: one scale in each row
        ax[2].axis("off")
        _show(ax[3], t["saliency"][b, 0], H, W, cmap="gray", vmin=0, vmax=1)
        # (e) each pixel in the colour of the object of highest mask probability (>= the
        # threshold), over the faded image, with the boxes the shapes were stretched over
        who = instance_map(t["masks"][mine], cfg.mask_threshold).numpy()  # (H, W), 0: none
        overlay = np.array([(0, 0, 0, 0)] + [to_rgba(c, 0.85) for c in colors])[who]  # (H, W, 4)
        _show(ax[4], _faded(rgb, 0.35), H, W)
        ax[4].imshow(overlay, interpolation="nearest", extent=(0, W, H, 0))
        _draw_boxes(ax[4], boxes, colors, numbers=False, lw=0.8)
    _save_figure(fig, path)
    return iou


def draw_fcosis_targets(rgbs, targets, names, path):
    """(a) image + boxes, (b) the centre-of-mass field on P3 (arrows), (c) the coarse
    foreground, (d) the attention map of the image's first pass, (e) the Largest-First
    colouring, one row per image."""
    H, W = rgbs[0].shape[:2]
    cfg = ModelConfig(method="fcosis", backbone="resnet18", num_classes=len(names))
    t = fcosis_targets(targets, H, W, cfg)
    P3, s3 = t["hw"][0][0] * t["hw"][0][1], float(t["strides"][0])  # P3's locations, stride 8
    titles = ["(a) image + boxes", "(b) centre-of-mass field\nP3, stride 8 ([IS 3.2.1])",
              "(c) coarse foreground\nP3, stride 8 ([IS 3.2.1])",
              "(d) attention map, pass 1\nP2, stride 4 ([IS 3.2.1])",
              "(e) colouring: 1 pass/colour\n([IS 3.2.1], Largest-First)"]
    suptitle = ("What FCOSIS is taught: the targets model.py computes from the ground truth, and "
                "the attention map they build")
    per_image = [t["boxes"][t["batch"] == b] for b in range(len(rgbs))]
    fig, axes, height = _figure(rgbs, targets, per_image, titles, suptitle, 8,
                                bottom=0.6)  # room for the legends
    for b, (rgb, ax, boxes) in enumerate(zip(rgbs, axes, per_image)):
        mine = (t["batch"] == b).nonzero()[:, 0]
        colors = [_color(k) for k in range(len(mine))]
        # (b) an arrow from each assigned P3 location x to x + s * r, in its object's colour,
        # ends on the object's centre of mass (X); the other levels carry the same field, coarser
        _show(ax[1], _faded(rgb, 0.3), H, W)
        v = t["valid"][b, :P3]  # (P3,)
        xy = t["points"][:P3][v].numpy()  # (n, 2) arrow tails
        uv = (s3 * t["target"][b, :P3][v]).numpy()  # (n, 2) in pixels
        who = (t["matched"][b, :P3][v] - mine[0]).tolist()  # object within the image
        ax[1].quiver(xy[:, 0], xy[:, 1], uv[:, 0], uv[:, 1], color=[colors[k] for k in who],
                     angles="xy", scale_units="xy", scale=1, width=0.012, headwidth=3.5,
                     headlength=4, headaxislength=3.5, minlength=0.5)
        ax[1].plot(xy[:, 0], xy[:, 1], "o", ms=1.2, color="black")  # the locations
        m = t["mass"][mine].numpy()  # (N, 2)
        ax[1].scatter(m[:, 0], m[:, 1], marker="X", s=40, c=colors, edgecolors="black",
                      linewidths=0.6, zorder=3)
        _show(ax[2], t["fg"][b, :P3].view(t["hw"][0]), H, W, cmap="gray", vmin=0, vmax=1)
        # (d) the image's first pass (colour 0: Largest-First colours the object with the most
        # padded-box overlaps first) on the stride-4 P2 grid, inside the pass's boxes:
        # lambda x fg - mu x (1 - fg) where a location votes for the box's object, -mu where it
        # votes for a neighbour; 0 outside them. Dotted: the boxes of the other passes
        g = int((t["group_batch"] == b).nonzero()[0, 0])
        in_pass = (t["groups"][mine] == g).tolist()
        att_image = _show(ax[3], t["att"][g, 0], H, W, cmap="RdBu_r", vmin=-1, vmax=1)
        for k, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
            ax[3].add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False,
                                      lw=1.0 if in_pass[k] else 0.6, edgecolor=colors[k],
                                      ls="-" if in_pass[k] else ":"))
        # (e) every box filled with its pass's colour; dashed: the padded box that was coloured
        # (overlapping padded boxes never share a pass)
        _show(ax[4], _faded(rgb, 0.3), H, W)
        col = (t["groups"][mine] - t["groups"][mine].min()).tolist()  # 0..K-1 in the image
        for k, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
            c = PASS_COLORS[col[k] % len(PASS_COLORS)]
            ax[4].add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fc=c, alpha=0.35, ec=c, lw=1.2))
            px0, py0, px1, py1 = t["color_boxes"][mine[k]].tolist()
            ax[4].add_patch(Rectangle((px0, py0), px1 - px0, py1 - py0, fill=False, ec=c, lw=0.8,
                                      ls="--"))
            _number(ax[4], (x0 + x1) / 2, (y0 + y1) / 2, col[k] + 1, c, "round,pad=0.15",
                    fontsize=7, ha="center", va="center")
    # the attention map's scale under its column: -mu, 0 (outside the boxes), +lambda
    x0, x1 = axes[-1, 3].get_position().x0, axes[-1, 3].get_position().x1
    cax = fig.add_axes((x0, 0.4 / height, x1 - x0, 0.1 / height))
    bar = fig.colorbar(att_image, cax=cax, orientation="horizontal",
                       ticks=(-t["mu"], 0, t["lam"]))
    bar.ax.set_xticklabels([f"−μ = −{t['mu']:g}\n(neighbour / background)", "0",
                            f"+λ\n(λ = {t['lam']:g})"], fontsize=7)
    x0, x1 = axes[-1, 1].get_position().x0, axes[-1, 1].get_position().x1
    fig.text((x0 + x1) / 2, 0.45 / height, "arrow: location → its object's\ncentre of mass (✕)",
             fontsize=7, ha="center", va="top")
    _save_figure(fig, path)


def save_target_figures(out_dir):
    """Both METHODS.md pictures into out_dir; returns their paths."""
    with tempfile.TemporaryDirectory() as tmp:
        rgbs, targets, names = example_targets(tmp)
    paths = [os.path.join(out_dir, f"{m}_targets.png") for m in ("centermask", "fcosis")]
    iou = draw_centermask_targets(rgbs, targets, names, paths[0])
    draw_fcosis_targets(rgbs, targets, names, paths[1])
    print(f"val images {[t['image_id'] for t in targets]}; assembled CenterMask masks vs. ground "
          f"truth: mean IoU {iou:.3f}; wrote {', '.join(paths)}")
    return paths


if __name__ == "__main__":
    torch.set_num_threads(1)  # tiny tensors: one thread is as fast, and shares the machine
    if sys.argv[1:2] == ["data"]:
        parser = argparse.ArgumentParser(prog="pictures.py data", description="the first N "
                                         "images of a COCO json with what training reads of it")
        parser.add_argument("--img_dir", required=True, help="the folder of the json's file names")
        parser.add_argument("--ann", required=True, help="the COCO json, e.g. train.json")
        parser.add_argument("--n", type=int, default=8, help="images to draw, the first by id")
        parser.add_argument("--out", required=True, help="output folder")
        args = parser.parse_args(sys.argv[2:])
        try:
            dataset, paths = draw_dataset(args.img_dir, args.ann, args.out, args.n)
        except (OSError, ValueError, ImageReadError) as e:  # the user's files: one line, status 2
            print(f"pictures.py data: error: {e}", file=sys.stderr)
            sys.exit(2)
        print(f"{len(paths)} of the {len(dataset)} images of {args.ann} drawn into {args.out}; "
              f"{dataset.num_classes} classes: {', '.join(dataset.class_names)}")
    elif len(sys.argv) != 2:
        sys.exit("usage: python pictures.py OUT_DIR   (METHODS.md's pictures: assets)\n"
                 "       python pictures.py data --img_dir=DIR --ann=JSON --out=DIR [--n=8]")
    else:
        save_target_figures(sys.argv[1])
