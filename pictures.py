"""
Every drawing of the project: each method's intermediate results as named 2-D maps (what it is
taught and what it predicts: `teaching_maps`), the predictions drawn on an image, and the
figures that show them (train.py's and predict.py's pictures; assets/make.py's). They read the
model; none of it is part of a method.

    teaching_maps(model)(images)     the method's maps: CenterMask's or FCOSIS's (else None)
    centermask_maps(model, images)   [CM] Fig. 3 and 5: heatmap, peaks, saliency, local shapes, masks
    fcosis_maps(model, images)       [IS] Fig. 2-4: centre-of-mass field, coarse foreground,
                                     attention map, colour groups, masks
    draw_predictions(image, pred)    boxes, class names, scores and masks on the original image
    save_maps_figure(image, maps)    the network input and each named map, in one PNG
    save_pictures(model, dataset)    both, for the first images of a dataset (train.py)
"""

import functools
import math
import os

import numpy as np
import torch
from torch.utils.data import Subset

from data import COCO_BGR_MEAN, COCO_BGR_STD, IMAGENET_MEAN, IMAGENET_STD, load_rgb_image, write_atomic
from eval import _base_dataset, _make_loader, _predict_batch, _unwrap_model
from model import (FCOSIS, CenterMask, FCOSForward, boxes_inside, coloring_groups,
                   topk_peaks)


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
    was_training = model.training
    model.eval()
    try:
        out = model.heads(images)
        dets = model.decode(out, images.shape[-2:], k=k)
    finally:
        model.train(was_training)
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
            local = local.float().sigmoid().view(K, S, S)
            gap = torch.full((K, S, 1), float("nan"), device=local.device)
            m["local shapes"] = torch.cat([local, gap], 2).permute(1, 0, 2).reshape(S, -1)[:, :-1]
        prob, rank = dets[b]["masks"].max(0)                             # (H, W) each
        m["masks"] = torch.where(prob >= model.mask_threshold, rank + 1, torch.zeros_like(rank))
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
    was_training = model.training
    model.eval()
    try:
        out = model.heads(images)
        points, _, levels = model.locations(out["hw"], images.shape[-2:], images.device)
        x = FCOSForward(out, out["features"], points, levels, tuple(images.shape[-2:]))
        dets = model.detect(x, k)
        for d in dets:  # keep the confident ones: the picture is about them
            keep = d["scores"] >= score_threshold
            for key in list(d):
                d[key] = d[key][keep]
        att, groups, batch = model.predict_masks(dets, x)
    finally:
        model.train(was_training)
    regressed, fg = model.p3_maps(out, images.shape[-2:])
    h, w = fg.shape[-2:]
    loc = points[:h * w].t().reshape(1, 2, h, w)                             # the P3 locations
    vec = regressed - loc                                                    # (B, 2, h, w) input pixels
    hue = (torch.atan2(vec[:, 1], vec[:, 0]) / (2 * math.pi)) % 1.0          # (B, h, w) in [0, 1)
    H, W = images.shape[-2:]
    maps = []
    for b, d in enumerate(dets):
        m = {"centre of mass field": hsv_to_rgb(hue[b], fg[b, 0]), "coarse foreground": fg[b, 0]}
        mine = (batch == b).nonzero()[:, 0] if len(batch) else batch
        if att is not None and len(mine):
            m["attention map"] = att[groups[mine[0]], 0]
        colour = torch.zeros(H, W, dtype=torch.long, device=images.device)
        if len(mine):
            inside = boxes_inside(d["boxes"], H, W)                          # (K, H, W)
            cols = coloring_groups(d["boxes"], torch.zeros(len(mine), dtype=torch.long, device=images.device))[0]
            for j in range(len(mine)):  # a handful of boxes, drawn in rank order
                colour[inside[j]] = cols[j] + 1
            prob, rank = d["masks"].max(0)
            m["masks"] = torch.where(prob >= model.mask_threshold, rank + 1, torch.zeros_like(rank))
        else:
            m["masks"] = colour.clone()
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
    maps = centermask_maps if isinstance(model, CenterMask) else fcosis_maps if isinstance(model, FCOSIS) else None
    return functools.partial(maps, model) if maps is not None else None


# -----------------------------------------------------------------------------
# predictions drawn on the images (eval.py's `to_original`), and the teaching maps as a figure


def write_png(image, path):
    """(3, H, W) uint8 -> a PNG at `path`, written atomically (data.write_atomic)."""
    from PIL import Image
    write_atomic(path, lambda tmp: Image.fromarray(image.permute(1, 2, 0).contiguous().numpy()).save(tmp, "PNG"))


def _class_colors(num_classes):
    """A fixed, well-spread colour per class (golden-ratio hues) so pictures are comparable."""
    import colorsys
    colors = []
    for i in range(max(num_classes, 1)):
        r, g, b = colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.75, 1.0)
        colors.append((int(r * 255), int(g * 255), int(b * 255)))
    return colors


def draw_predictions(image, pred, class_names=None, score_threshold=0.3):
    """Draw `to_original` predictions on a (3, H0, W0) uint8 image; returns a new image.

    Masks are blended in the class colour, boxes are outlined and labelled "class score".
    """
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks
    # small images (the 128 px shapes) are enlarged so that labels stay readable
    up = max(1, math.ceil(384 / max(image.shape[-2:])))
    if up > 1:
        image = image.repeat_interleave(up, -2).repeat_interleave(up, -1)
        pred = dict(pred, boxes=pred["boxes"] * up)
        if "masks" in pred:
            pred["masks"] = pred["masks"].repeat_interleave(up, -2).repeat_interleave(up, -1)
    keep = pred["scores"].cpu() >= score_threshold
    labels = pred["labels"].cpu()[keep].tolist()
    scores = pred["scores"].cpu()[keep].tolist()
    if not labels:
        return image
    num_classes = len(class_names) if class_names else max(labels) + 1
    palette = _class_colors(max(num_classes, max(labels) + 1))
    colors = [palette[c] for c in labels]
    if "masks" in pred:
        image = draw_segmentation_masks(image, pred["masks"].cpu()[keep], alpha=0.5,
                                        colors=colors)
    names = [class_names[c] if class_names and c < len(class_names) else str(c)
             for c in labels]
    texts = [f"{n} {s:.2f}" for n, s in zip(names, scores)]
    return draw_bounding_boxes(image, pred["boxes"].cpu()[keep], labels=texts, colors=colors,
                               width=2)


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


def _viridis_nan_blank():
    """viridis with NaN cells drawn white (blank): the gaps between tiles of a tiled map."""
    import matplotlib
    return matplotlib.colormaps["viridis"].with_extremes(bad="white")


def save_maps_figure(image, maps, path, capacity=5):
    """Teaching view: the image the network saw, then each named 2-D map, with titles.

    Float maps are drawn with a colour bar (viridis; NaN cells blank, e.g. the gaps between
    tiles), (h, w, 3) maps as RGB images (no colour bar), integer maps as label maps (0 = none in black, 1..n in distinct colours, e.g.
    instance ids). Every map keeps its aspect ratio and is enlarged to the panel size with
    nearest interpolation, so a 32x32 stride-4 map shows its cells instead of a blur. Panels
    flow into rows of `capacity` grid units; a wide map (a row of tiles) takes several units.
    """
    from matplotlib.colors import ListedColormap, BoundaryNorm
    from matplotlib.figure import Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    panels = [("network input", image.permute(1, 2, 0).numpy())]
    panels += [(name, m.detach().cpu().numpy() if torch.is_tensor(m) else np.asarray(m))
               for name, m in maps.items()]
    # a panel is 1 grid unit per unit of aspect ratio (width / height), at least 1
    widths = [min(capacity, max(1, round(p.shape[1] / p.shape[0]))) for _, p in panels]
    rows = _maps_layout(widths, capacity)
    fig = Figure(figsize=(2.8 * capacity, 2.9 * len(rows)))
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(len(rows), capacity)
    for r, row in enumerate(rows):
        col = 0
        for i in row:
            name, m = panels[i]
            ax = fig.add_subplot(grid[r, col:col + widths[i]])
            col += widths[i]
            ax.set_title(f"{name} {m.shape[0]}x{m.shape[1]}", fontsize=10)
            ax.set_xticks([]), ax.set_yticks([])
            if i == 0 or m.ndim == 3:  # the image, or an RGB map (e.g. FCOSIS's angle field)
                ax.imshow(m.astype(np.float32) if i else m, interpolation="nearest")
            elif np.issubdtype(m.dtype, np.integer) or m.dtype == bool:
                n = max(int(m.max()), 1)
                palette = [(0, 0, 0)] + [tuple(c / 255 for c in rgb) for rgb in _class_colors(n)]
                cmap = ListedColormap(palette[:n + 1])
                norm = BoundaryNorm(np.arange(-0.5, n + 1), cmap.N)
                im = ax.imshow(m, cmap=cmap, norm=norm, interpolation="nearest")
                bar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02, ticks=range(n + 1))
                bar.ax.tick_params(labelsize=7)
            else:
                im = ax.imshow(m.astype(np.float32), cmap=_viridis_nan_blank(), interpolation="nearest")
                bar = fig.colorbar(im, ax=ax, fraction=0.046 / max(1, widths[i] ** 0.5), pad=0.02)
                bar.ax.tick_params(labelsize=7)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def save_pictures(model, dataset, out_dir, n=8, device="cpu", score_threshold=0.3,
              batch_size=1, amp_dtype=None, collate_fn=None, maps_fn=None):
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
    loader = _make_loader(subset, batch_size, 0, device, None, collate_fn, False,
                          net.size_divisibility)
    class_names = getattr(base, "class_names", None)
    input_format = getattr(getattr(base, "transforms", None), "input_format", "rgb_imagenet")
    mask_threshold = net.mask_threshold
    was_training = net.training
    net.to(device).eval()
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    try:
        with torch.no_grad():
            for images, targets in loader:
                preds = _predict_batch(net, images, targets, device, amp_dtype,
                                       mask_threshold)
                maps = maps_fn(images.to(device)) if maps_fn is not None else None
                for i, (target, pred) in enumerate(zip(targets, preds)):
                    info = base.coco.loadImgs(int(target["image_id"]))[0]
                    pil = load_rgb_image(os.path.join(base.img_dir, info["file_name"]))  # the stored grid
                    image = torch.from_numpy(np.array(pil)).permute(2, 0, 1).contiguous()  # (3, H0, W0)
                    stem = os.path.splitext(os.path.basename(info["file_name"]))[0]
                    path = os.path.join(out_dir, f"{stem}_pred.png")
                    write_png(draw_predictions(image, pred, class_names, score_threshold), path)
                    paths.append(path)
                    if maps is not None:
                        # the maps live in the padded network-input frame: show that image
                        map_path = os.path.join(out_dir, f"{stem}_maps.png")
                        save_maps_figure(network_input_rgb(images[i], input_format), maps[i], map_path)
                        paths.append(map_path)
    finally:
        net.train(was_training)
    return paths
