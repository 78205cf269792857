"""
The two METHODS.md pictures of what CenterMask and FCOSIS are TAUGHT, drawn from the ground truth:

    assets/centermask_targets.png   CenterMask ([CM]): (a) image + boxes, (b) the centre heatmap,
                                    (c) the S x S local shapes, (d) the global saliency,
                                    (e) the masks they assemble (local shape x saliency, [CM] eq. 1)
    assets/fcosis_targets.png       FCOSIS ([IS]): (a) image + boxes, (b) the centre-of-mass field,
                                    (c) the coarse foreground, (d) the attention map of one pass,
                                    (e) the same map with -mu on the own background too (the other
                                    reading, attention_background="own_background"), (f) the
                                    Largest-First colouring (one segmentation pass per colour)

Regenerate them with one command, from the repository root:

    python assets/make.py                   # or --out_dir=somewhere/else

No network is trained or even run, nothing is downloaded: a few synthetic shapes images are
written with data.py's `write_shapes_dataset` (fixed seed) and every map is computed from their
ground truth (boxes, masks) by model.py's own target builders, the very functions the losses
compare the network against (`centernet_heatmaps`, `center_of_mass_targets`, ...), and by its own
assembly / attention code fed with those targets (what the network computes once it meets them).
So the pictures are exactly what the code computes. Deterministic (byte-identical PNGs);
seconds on a CPU (most of it importing torch and matplotlib).

Papers, cited as in model.py: [CM] Wang et al., "CenterMask: single shot instance segmentation with
point representation" (arXiv 2004.04446); [IS] "FCOSIS: Fully-Convolutional One-Stage Instance
Segmentation".
"""

import argparse
import io
import math
import os
import sys
import tempfile
import time
import warnings

import matplotlib
matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# model.py and data.py live in the repository root, one folder above this file
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
from model import (  # noqa: E402
    AttentionMap, ModelConfig, assemble_masks, batch_masks, box_overlap_graph, build_model,
    center_of_mass, center_of_mass_targets, centernet_heatmaps, coarse_foreground_targets,
    coloring_groups, draw_gaussian, fcos_locations, flatten_targets, gaussian_radius,
    mask_assignment, mask_targets, min_size_boxes, optimal_padding, saliency_targets)

# -----------------------------------------------------------------------------
# settings (fixed: the pictures must come out the same every time)
SEED = 1337            # write_shapes_dataset's seed
SIZE = 128             # image side (px): the shapes quick start's size
NUM_CANDIDATES = 48    # val images written; the pictures use NUM_IMAGES of them (load_examples' rule)
NUM_IMAGES = 2         # rows of each figure
MIN_OBJECTS, MAX_OBJECTS = 3, 6  # enough objects to show the idea, few enough to read
MIN_OVERLAPS = 2       # pairs of objects whose boxes overlap
EPS = 1e-6             # probabilities -> logits for the code that takes logits (logit(0) = -inf)
FIG_WIDTH = 10.0       # inches
DPI = 130              # 1300 px wide (sharp on high-density screens); each PNG under 100 KB
MAX_BYTES = 200_000    # METHODS.md pictures stay small
INSTANCE_COLORS = plt.get_cmap("tab10").colors  # one colour per object of an image, (a) to (e) ((f) in FCOSIS)
PASS_COLORS = ("#e41a1c", "#377eb8", "#4daf4a", "#984ea3", "#ff7f00")  # FCOSIS colour groups


# -----------------------------------------------------------------------------
# data: a tiny synthetic shapes set, and a fixed rule to pick the images

def load_examples(tmp_dir):
    """
    Write NUM_CANDIDATES val images of the synthetic shapes set into tmp_dir and pick the rows.
    Rule (no hand-picked ids): among the images with MIN_OBJECTS..MAX_OBJECTS objects and at
    least MIN_OVERLAPS pairs of overlapping boxes (the hard case both methods are about: a
    neighbour inside an object's box), the NUM_IMAGES whose masks cover the largest part of the
    image (the biggest objects read best at this size), shown in image-id order.
    Returns the RGB images (uint8 (H, W, 3) each), their target dicts (boxes (N, 4) xyxy input
    frame, labels (N,), masks (N, H, W) 0/1, as CocoInstances gives them) and the class names.
    """
    with warnings.catch_warnings():  # pycocotools' RLE code under numpy 2: one DeprecationWarning a mask
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="pycocotools")
        paths = data.write_shapes_dataset(tmp_dir, n_train=0, n_val=NUM_CANDIDATES, size=SIZE, seed=SEED)
        ds = data.CocoInstances(paths["val_img_dir"], paths["val_ann"])  # no transform: scale 1, no padding
        samples = [ds[i][1] for i in range(len(ds))]                  # target dicts (the images: unused)
    candidates = []                                                   # (foreground fraction, index)
    for i, t in enumerate(samples):
        pairs = int(box_overlap_graph(t["boxes"]).sum()) // 2         # the graph is symmetric
        if MIN_OBJECTS <= len(t["boxes"]) <= MAX_OBJECTS and pairs >= MIN_OVERLAPS:
            candidates.append((float(t["masks"].amax(0).float().mean()), i))
    assert len(candidates) >= NUM_IMAGES, f"only {len(candidates)} of {NUM_CANDIDATES} images pass the rule"
    chosen = sorted(i for _, i in sorted(candidates, reverse=True)[:NUM_IMAGES])
    rgbs = [np.asarray(ds.load_image(i)) for i in chosen]            # (H, W, 3) uint8, for drawing
    targets = [samples[i] for i in chosen]
    return rgbs, targets, ds.class_names


# -----------------------------------------------------------------------------
# CenterMask ([CM] 3): the targets of CenterMask.losses, and the masks they assemble

def centermask_maps(targets, H, W, cfg):
    """
    Everything CenterMask is taught for a batch of B images (all objects at once, as
    CenterMask.losses), at its stride R = 4 (h, w = H/4, W/4; M objects in the batch):
        heat     (B, C, h, w)  centre heatmap: CenterNet gaussians, eq. 3's target ([CM 3.4])
        local    (M, S, S)     each object's ground-truth mask resampled onto an S x S grid
                               over its box: the local shape that reproduces it ([CM 3.1])
        saliency (B, 1, h, w)  the image's foreground on the stride-4 grid ([CM 3.2]): each
                               mask average-pooled, then the max over the objects
        masks    (M, H, W)     local shape stretched to the box x saliency ([CM 3.3] eq. 1)
        boxes    (M, 4)        the boxes the shapes are stretched over, output frame
        objs                   flatten_targets' dict (batch, labels, centres, ...)
    The heatmap is the loss target itself. The mask loss supervises only the PRODUCT
    local x saliency ([CM] eq. 2: BCE of the assembled mask against the ground-truth mask), so
    (c) and (d) are the natural split of that target: the object's own mask in its box, and
    the foreground of the whole image (also the target of [CM] Table 1f's direct saliency loss).
    """
    R, S = 4, cfg.shape_size                                 # stride of DLA-34 / Hourglass; S = 32
    B, C = len(targets), cfg.num_classes
    h, w = H // R, W // R
    objs = flatten_targets(targets, R)                       # boxes, centres in the output frame
    M = len(objs["labels"])
    # as CenterMask.losses: a centre on the last pixel edge must still index the map
    objs["center_int"] = torch.minimum(objs["center_int"].clamp(min=0), torch.tensor([w - 1, h - 1]))

    # (b) centre heatmap, batched: per class the max of the objects' gaussians
    heat = centernet_heatmaps(objs, B, C, h, w)                            # (B, C, h, w)
    # the same splats one object at a time with the readable draw_gaussian (radius from
    # gaussian_radius on the box size rounded up, CenterNet's max(0, int(r))): must agree
    check = torch.zeros(B, C, h, w)
    for m in range(M):
        bw, bh = objs["wh"][m].ceil().tolist()
        r = max(0, int(gaussian_radius(bh, bw)))
        draw_gaussian(check[objs["batch"][m], objs["labels"][m]], objs["center_int"][m], r)
    assert torch.allclose(check, heat, atol=1e-5), "centernet_heatmaps != draw_gaussian splats"

    # (c) local shapes: the boxes the mask loss stretches the shapes over (teacher forcing: the
    # ground-truth centre and size, at least one output pixel wide), and each ground-truth mask
    # sampled on an S x S grid over its box with RoIAlign (`mask_targets`): bin i of the box
    # has its centre exactly where `stretch_weights` puts local-shape cell i
    gt_masks = batch_masks(targets, H, W, "cpu")                                  # (M, H, W)
    boxes = min_size_boxes(objs["center"], objs["wh"])                           # (M, 4) output frame
    local = mask_targets(gt_masks, torch.arange(M), boxes * R, S)                 # (M, S, S) in [0, 1]

    # (d) global saliency: the Table 1f target of CenterMask.losses (`saliency_targets`), each
    # mask average-pooled to stride 4 then the max over the image's objects, in one
    # class-agnostic channel (cfg.saliency = "agnostic", the default)
    gt_small = F.avg_pool2d(gt_masks[:, None].float(), R)[:, 0]                  # (M, h, w)
    saliency = saliency_targets(gt_small, objs["batch"], torch.zeros(M, dtype=torch.long), B, 1)  # (B, 1, h, w)

    # (e) assembly ([CM] eq. 1): sigmoid(L) x sigmoid(G), L stretched over the box, G read in
    # it. assemble_masks takes logits, so the targets go in as logit(p) (clamped to EPS). Drawn
    # at input resolution (pixel = 1/R of an output cell), as CenterMask.decode assembles
    # (the default mask loss compares on the stride-4 grid: the same maps, 4x coarser).
    channels = torch.zeros(M, dtype=torch.long)                                   # agnostic saliency
    masks = assemble_masks(torch.logit(local, EPS), torch.logit(saliency, EPS), objs["batch"], channels,
                           boxes, (H, W), 1.0 / R)                               # (M, H, W) probabilities
    return dict(heat=heat, local=local, saliency=saliency, masks=masks, boxes=boxes, objs=objs,
                gt_masks=gt_masks, R=R)


# -----------------------------------------------------------------------------
# FCOSIS ([IS 3.2]): the targets of FCOSIS.extra_losses, and the attention map they make

def fcosis_maps(targets, H, W, cfg):
    """
    Everything FCOSIS's mask branch is taught for a batch of B images (M objects), computed as
    FCOSIS.extra_losses does, on the head's levels P3-P7 (P locations in all):
        points (P, 2), strides (P,), hw    the FCOS locations of every level ([FCOS] 3.1)
        target (B, P, 2), valid (B, P)     centre-of-mass regression target, stride units
                                           ([IS 3.2.1]), at the mask pixels (`mask_assignment`)
        matched (B, P)                     the object each location regresses (-1: none)
        mass (M, 2)                        centres of mass, input frame (`center_of_mass`)
        fg (B, P)                          coarse foreground target ([IS 3.2.1])
        att (G, 1, H/4, W/4)               attention map of every segmentation pass ([IS 3.2.1])
        att_own (G, 1, H/4, W/4)           the same with -mu on the own object's background too
                                           (attention_background="own_background")
        groups (M,), group_batch (G,)      the passes: Largest-First colours ([IS 3.2.1])
        color_boxes (M, 4)                 the boxes that were coloured (grown by the loss padding)
    The attention map is what FCOSIS.segment builds in training (ground-truth boxes and centres
    of mass), from detection-head outputs that equal their targets: the regressed centres and
    the coarse foreground are the two targets above, fed through FCOSIS.attention_inputs
    (P3 -> the stride-4 P2 grid) and the AttentionMap module (lambda = mu = 1, their initial
    values [IS 3.2.1]). att is the map of cfg's attention_background; att_own the other reading's
    map, from the same module settings with background="own_background".
    """
    B = len(targets)
    # a real FCOSIS (random weights, never run; ResNet-18 keeps it light): its level strides,
    # attention_inputs and AttentionMap are what training uses
    with torch.random.fork_rng():                                       # leave the caller's RNG alone
        net = build_model(cfg).eval()
    hw = [(-(-H // s), -(-W // s)) for s in net.strides]                  # P3-P7 grids (ceil)
    points, strides, _ = fcos_locations(hw, net.strides, offset=cfg.location_offset)  # (P, 2), (P,), (P,)
    flat = flatten_targets(targets, 1)                                      # stride 1: input frame
    boxes, batch = flat["boxes"], flat["batch"]                             # (M, 4), (M,)
    masks = batch_masks(targets, H, W, "cpu")                               # (M, H, W)

    # coarse foreground of every level: the union of the image's masks, average-pooled
    fg = torch.cat([coarse_foreground_targets(masks, s, batch, B, hw_l).flatten(1)
                    for s, hw_l in zip(net.strides, hw)], 1)                # (B, P)
    # centre-of-mass regression: every location whose pixel is in a mask (com_assignment="mask",
    # the smaller mask where two overlap) regresses (x_C - x, y_C - y) / s of that object
    mass = center_of_mass(masks, boxes)                                     # (M, 2)
    matched = mask_assignment(points, masks, batch, B)                      # (B, P) object index
    target, valid = center_of_mass_targets(points, strides, matched, mass, masks)  # (B, P, 2), (B, P)

    # the padded-crop loss padding [IS 3.2.2] grows each box before colouring (FCOSIS.extra_losses)
    wh = boxes[:, 2:] - boxes[:, :2]
    pad = optimal_padding(masks.flatten(1).sum(1, dtype=torch.float32), wh[:, 0], wh[:, 1]).float()  # (M,)
    color_boxes = boxes + pad[:, None] * boxes.new_tensor([-1.0, -1.0, 1.0, 1.0])
    groups, group_batch = coloring_groups(color_boxes, batch)               # (M,), (G,)

    # a detection head that meets its targets: "extra" = (r_x, r_y, coarse-foreground logit)
    # per location (B, P, 3), read back by FCOSIS.p3_maps through attention_inputs
    out = {"hw": hw, "extra": torch.cat([target, torch.logit(fg, EPS)[..., None]], -1)}
    regressed, coarse, stride = net.attention_inputs(out, (H // 4, W // 4))  # (B, 2|1, H/4, W/4), 4
    with torch.no_grad():  # exactly FCOSIS.segment's call, with training's arguments
        att = net.attention(regressed, coarse, stride, boxes, mass, batch, groups, len(group_batch))  # (G, 1, h, w)
        own = AttentionMap(cfg.attention, cfg.attention_assign, cfg.location_offset, "own_background")
        att_own = own(regressed, coarse, stride, boxes, mass, batch, groups, len(group_batch))  # (G, 1, h, w)
    assert att.shape[1:] == att_own.shape[1:] == (1, H // 4, W // 4)
    return dict(points=points, strides=strides, hw=hw, target=target, valid=valid, matched=matched,
                mass=mass, fg=fg, att=att, att_own=att_own, groups=groups, group_batch=group_batch, boxes=boxes,
                batch=batch, color_boxes=color_boxes, lam=net.attention.lam.item(), mu=net.attention.mu.item())


# -----------------------------------------------------------------------------
# drawing helpers: every panel in input-pixel coordinates (x right, y down)

def show_image(ax, rgb, dim=1.0):
    """The image, optionally faded towards white (dim < 1) so that what is drawn on it reads."""
    img = rgb.astype(np.float32) / 255
    ax.imshow(dim * img + (1 - dim), interpolation="nearest", extent=(0, rgb.shape[1], rgb.shape[0], 0))


def show_map(ax, m, H, W, **kw):
    """A (h, w) map stretched over the H x W image (nearest: its cells stay visible)."""
    return ax.imshow(np.asarray(m, np.float32), interpolation="nearest", extent=(0, W, H, 0), **kw)


def draw_boxes(ax, boxes, colors, numbers=True, lw=1.2, **kw):
    """xyxy boxes (N, 4), input frame; with numbers, the object's number at its top-left corner."""
    for k, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=colors[k], lw=lw, **kw))
        if numbers:
            ax.text(x0 + 1, y0 + 1, str(k + 1), color="white", fontsize=6, fontweight="bold", va="top",
                    ha="left", bbox=dict(boxstyle="square,pad=0.1", fc=colors[k], ec="none"))


def panel_grid(rows, cols=5, top=0.75, bottom=0.05, left=0.3, right=0.05, gap=0.08):
    """A figure FIG_WIDTH wide of rows x cols square panels, its height what they need; margins
    and the gap between panels in inches (top: the suptitle and the column titles; left: the
    row labels). Laid out by hand: tight_layout lets square image panels overlap."""
    side = (FIG_WIDTH - left - right - (cols - 1) * gap) / cols                # panel side, inches
    height = top + rows * side + (rows - 1) * gap + bottom
    fig = plt.figure(figsize=(FIG_WIDTH, height))
    axes = np.empty((rows, cols), dtype=object)
    for r in range(rows):
        for c in range(cols):
            x, y = left + c * (side + gap), height - top - (r + 1) * side - r * gap
            axes[r, c] = fig.add_axes((x / FIG_WIDTH, y / height, side / FIG_WIDTH, side / height))
    return fig, axes, height


def finish(ax, H, W):
    ax.set_xlim(0, W)
    ax.set_ylim(H, 0)
    ax.set_xticks([])
    ax.set_yticks([])


def tile_shapes(local, ncols=3, gap=2):
    """(N, S, S) shapes -> one mosaic (rows x (ncols*(S+gap)-gap)), NaN between tiles (blank),
    and each tile's top-left corner (x, y)."""
    N, S, _ = local.shape
    rows = max(1, math.ceil(N / ncols))
    mosaic = np.full((rows * (S + gap) - gap, ncols * (S + gap) - gap), np.nan, np.float32)
    corners = []
    for k in range(N):
        y, x = (k // ncols) * (S + gap), (k % ncols) * (S + gap)
        mosaic[y:y + S, x:x + S] = local[k].numpy()
        corners.append((x, y))
    return mosaic, corners


def save(fig, path):
    """
    The figure as a PNG at DPI, reduced to an adaptive 256-colour palette (no dithering:
    flat colours stay flat; the pictures hold far fewer distinct colours than that, except in
    the images' noise) and optimised: a third of the bytes of a 24-bit PNG at the same
    resolution, so the resolution (and the text) can stay high. Returns its size in bytes (asserted under MAX_BYTES).
    """
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    plt.close(fig)
    buf.seek(0)
    rgb = Image.open(buf).convert("RGB")                                  # drop the opaque alpha
    rgb.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, optimize=True)
    size = os.path.getsize(path)
    assert size < MAX_BYTES, f"{path} is {size} bytes (> {MAX_BYTES}): lower DPI"
    return size


# -----------------------------------------------------------------------------
# the two figures

def draw_centermask(rgbs, targets, names, path):
    H, W = rgbs[0].shape[:2]
    cfg = ModelConfig(method="centermask", num_classes=len(names))     # defaults: S = 32, R = 4
    t = centermask_maps(targets, H, W, cfg)
    objs, S, R = t["objs"], cfg.shape_size, t["R"]
    # check: the assembled masks, binarised at CenterMask's threshold (0.4, [CM 3.5]), give back
    # the ground truth (up to the S x S and stride-4 resolution)
    pred = t["masks"] >= cfg.mask_threshold                                     # (M, H, W)
    gt = t["gt_masks"].bool()
    iou = (pred & gt).flatten(1).sum(1) / (pred | gt).flatten(1).sum(1)         # (M,)
    fig, axes, height = panel_grid(len(rgbs))
    for b, rgb in enumerate(rgbs):
        mine = (objs["batch"] == b).nonzero()[:, 0]                             # this image's objects
        colors = [INSTANCE_COLORS[k % 10] for k in range(len(mine))]
        boxes_in = t["boxes"][mine] * R                                         # (N, 4) input frame
        ax = axes[b]
        # (a) the image and its ground-truth boxes
        show_image(ax[0], rgb)
        draw_boxes(ax[0], boxes_in, colors)
        ax[0].set_ylabel(f"val image {targets[b]['image_id']}", fontsize=8)
        # (b) centre heatmap: max over the classes, one gaussian per object at its centre cell
        show_map(ax[1], t["heat"][b].amax(0), H, W, cmap="magma", vmin=0, vmax=1)
        draw_boxes(ax[1], boxes_in, colors, numbers=False, lw=0.6, alpha=0.8)
        # (c) local shapes: one S x S tile per object, outlined in its colour
        mosaic, corners = tile_shapes(t["local"][mine])
        ax[2].imshow(mosaic, cmap=plt.get_cmap("gray").with_extremes(bad="white"), vmin=0, vmax=1,
                     interpolation="nearest")
        for k, (x, y) in enumerate(corners):
            ax[2].add_patch(Rectangle((x - 0.5, y - 0.5), S, S, fill=False, edgecolor=colors[k], lw=1.5))
            ax[2].text(x + 1, y + 1, str(k + 1), color="white", fontsize=6, fontweight="bold", va="top",
                       bbox=dict(boxstyle="square,pad=0.1", fc=colors[k], ec="none"))
        side = mosaic.shape[1]                              # a square view, the mosaic in its middle,
        top = (mosaic.shape[0] - side) / 2 - 0.5            # so that every panel has the same size
        ax[2].set_xlim(-0.5, side - 0.5)
        ax[2].set_ylim(top + side, top)
        ax[2].axis("off")
        # (d) global saliency on the stride-4 output grid
        show_map(ax[3], t["saliency"][b, 0], H, W, cmap="gray", vmin=0, vmax=1)
        # (e) assembled masks: each pixel coloured by the object of highest mask probability
        # (>= the threshold), over the faded image, with the boxes the shapes were stretched over
        prob, who = t["masks"][mine].max(0)                                     # (H, W) each
        overlay = np.zeros((H, W, 4), np.float32)
        on = (prob >= cfg.mask_threshold).numpy()
        overlay[on] = np.array([(*colors[k], 0.85) for k in who[prob >= cfg.mask_threshold].tolist()])
        show_image(ax[4], rgb, dim=0.35)
        ax[4].imshow(overlay, interpolation="nearest", extent=(0, W, H, 0))
        draw_boxes(ax[4], boxes_in, colors, numbers=False, lw=0.8)
        for a in ax[[0, 1, 3, 4]]:
            finish(a, H, W)
    titles = ["(a) image + boxes", "(b) centre heatmap\n([CM 3.4], CenterNet)",
              f"(c) local shapes {S} x {S}\n([CM 3.1])", "(d) global saliency\n([CM 3.2], stride 4)",
              "(e) assembled masks\n([CM 3.3] eq. 1)"]
    for a, title in zip(axes[0], titles):
        a.set_title(title, fontsize=9)
    fig.suptitle("What CenterMask is taught: the targets model.py computes from the ground truth "
                 f"(mask IoU of (e) vs. ground truth: {iou.mean():.2f})", fontsize=10,
                 y=1 - 0.06 / height, va="top")
    return save(fig, path), float(iou.mean())


def draw_fcosis(rgbs, targets, names, path):
    H, W = rgbs[0].shape[:2]
    cfg = ModelConfig(method="fcosis", backbone="resnet18", num_classes=len(names))  # FCOSIS defaults
    t = fcosis_maps(targets, H, W, cfg)
    P3 = t["hw"][0][0] * t["hw"][0][1]                               # locations of P3 (first level)
    s3 = float(t["strides"][0])                                      # 8
    # check: every arrow ends on its object's centre of mass (location + s * target)
    ends = t["points"][None] + t["strides"][None, :, None] * t["target"]            # (B, P, 2)
    err = (ends - t["mass"][t["matched"].clamp(min=0)]).norm(dim=-1)[t["valid"]]
    assert float(err.max()) < 1e-3, f"centre-of-mass targets miss the centres by {float(err.max())} px"
    fig, axes, height = panel_grid(len(rgbs), cols=6, bottom=0.6)          # room for the legends
    first_of_image = torch.searchsorted(t["batch"], torch.arange(len(rgbs)))  # flat index of each image's object 1
    for b, rgb in enumerate(rgbs):
        mine = (t["batch"] == b).nonzero()[:, 0]
        colors = [INSTANCE_COLORS[k % 10] for k in range(len(mine))]
        boxes = t["boxes"][mine]
        ax = axes[b]
        # (a) the image and its ground-truth boxes
        show_image(ax[0], rgb)
        draw_boxes(ax[0], boxes, colors)
        ax[0].set_ylabel(f"val image {targets[b]['image_id']}", fontsize=8)
        # (b) centre-of-mass field on P3 (stride 8, the level the attention map is built from):
        # an arrow from each assigned location to x + s * r, coloured by its object; x = the
        # object's centre of mass. (The other levels carry the same field, coarser.)
        show_image(ax[1], rgb, dim=0.3)
        v = t["valid"][b, :P3]                                               # (P3,)
        xy = t["points"][:P3][v].numpy()                                     # (n, 2) arrow tails
        uv = (s3 * t["target"][b, :P3][v]).numpy()                           # (n, 2) in pixels
        who = (t["matched"][b, :P3][v] - first_of_image[b]).tolist()         # object within image
        ax[1].quiver(xy[:, 0], xy[:, 1], uv[:, 0], uv[:, 1], color=[colors[k] for k in who],
                     angles="xy", scale_units="xy", scale=1, width=0.012, headwidth=3.5,
                     headlength=4, headaxislength=3.5, minlength=0.5)
        ax[1].plot(xy[:, 0], xy[:, 1], "o", ms=1.2, color="black")          # the locations themselves
        m = t["mass"][mine].numpy()                                          # (N, 2)
        ax[1].scatter(m[:, 0], m[:, 1], marker="X", s=40, c=colors, edgecolors="black", linewidths=0.6,
                      zorder=3)
        # (c) coarse foreground target on P3
        show_map(ax[2], t["fg"][b, :P3].view(t["hw"][0]), H, W, cmap="gray", vmin=0, vmax=1)
        # (d) attention map of the image's first pass (colour 0: Largest-First colours the
        # object with the most (padded) box overlaps first), on the stride-4 P2 grid:
        # +lambda x foreground where a location votes for this pass's object, -mu where it
        # votes for a neighbour (a distractor), 0 outside the pass's boxes
        # votes for a neighbour (a distractor), 0 outside the pass's boxes. (e) the same pass with
        # -mu on the own object's background too: lambda x fg - mu x (1 - fg) on its own locations
        g = int((t["group_batch"] == b).nonzero()[0, 0])                   # first pass of image b
        in_pass = (t["groups"][mine] == g).tolist()
        for a, att in ((ax[3], t["att"]), (ax[4], t["att_own"])):
            att_image = show_map(a, att[g, 0], H, W, cmap="RdBu_r", vmin=-1, vmax=1)
            for k, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
                a.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=1.0 if in_pass[k] else 0.6,
                                      edgecolor=colors[k], ls="-" if in_pass[k] else ":"))
        # (f) colouring: every box filled with its pass's colour; dashed: the padded box that
        # was coloured (overlapping padded boxes never share a pass)
        show_image(ax[5], rgb, dim=0.3)
        col = (t["groups"][mine] - t["groups"][mine].min()).tolist()       # 0..K-1 within the image
        for k, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
            c = PASS_COLORS[col[k] % len(PASS_COLORS)]
            ax[5].add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fc=c, alpha=0.35, ec=c, lw=1.2))
            px0, py0, px1, py1 = t["color_boxes"][mine[k]].tolist()
            ax[5].add_patch(Rectangle((px0, py0), px1 - px0, py1 - py0, fill=False, ec=c, lw=0.8, ls="--"))
            ax[5].text((x0 + x1) / 2, (y0 + y1) / 2, str(col[k] + 1), color="white", fontsize=7,
                       fontweight="bold", ha="center", va="center",
                       bbox=dict(boxstyle="round,pad=0.15", fc=c, ec="none"))
        for a in ax:
            finish(a, H, W)
    titles = ["(a) image + boxes", "(b) centre-of-mass field\nP3, stride 8 ([IS 3.2.1])",
              "(c) coarse foreground\nP3, stride 8 ([IS 3.2.1])",
              "(d) attention map, pass 1\nP2, stride 4 ([IS 3.2.1])",
              "(e) the same, −μ also on\nthe own background",
              "(f) colouring: 1 pass/colour\n([IS 3.2.1], Largest-First)"]
    for a, title in zip(axes[0], titles):
        a.set_title(title, fontsize=8)
    fig.suptitle("What FCOSIS is taught: the targets model.py computes from the ground truth, "
                 "and the attention map they build", fontsize=10, y=1 - 0.06 / height, va="top")
    # the attention maps' scale, under their two columns: -mu, 0 (outside the pass's boxes), +lambda
    x0, _, x1, _ = axes[-1, 3].get_position().extents
    x1 = axes[-1, 4].get_position().extents[2]
    cax = fig.add_axes((x0, 0.4 / height, x1 - x0, 0.1 / height))
    bar = fig.colorbar(att_image, cax=cax, orientation="horizontal", ticks=(-t["mu"], 0, t["lam"]))
    bar.ax.set_xticklabels([f"−μ = −{t['mu']:g}\n(neighbour; (e): also background)", "0",
                            f"+λ·fg\n(λ = {t['lam']:g})"], fontsize=7)
    x0, _, x1, _ = axes[-1, 1].get_position().extents
    fig.text((x0 + x1) / 2, 0.45 / height, "arrow: location → its object's\ncentre of mass (✕)", fontsize=7,
             ha="center", va="top")
    return save(fig, path)


def main(out_dir=os.path.join(ROOT, "assets")):
    """Write both pictures into out_dir; returns {path: size in bytes}."""
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        rgbs, targets, names = load_examples(tmp)
    ids = [t["image_id"] for t in targets]
    sizes = {}
    cm = os.path.join(out_dir, "centermask_targets.png")
    sizes[cm], iou = draw_centermask(rgbs, targets, names, cm)
    fi = os.path.join(out_dir, "fcosis_targets.png")
    sizes[fi] = draw_fcosis(rgbs, targets, names, fi)
    print(f"val images {ids} ({', '.join(str(len(t['boxes'])) for t in targets)} objects); "
          f"assembled CenterMask masks vs. ground truth: mean IoU {iou:.3f}")
    for p, n in sizes.items():
        print(f"wrote {os.path.relpath(p)} ({n / 1000:.0f} KB)")
    print(f"done in {time.time() - t0:.1f}s")
    return sizes


if __name__ == "__main__":
    torch.set_num_threads(1)        # tiny tensors: one thread is as fast, and shares the machine
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--out_dir", default=os.path.join(ROOT, "assets"), help="folder for the two PNGs")
    main(parser.parse_args().out_dir)
