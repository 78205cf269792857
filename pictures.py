"""
Teaching pictures: each method's intermediate results as named 2-D maps, for eval.save_pictures's
`maps_fn` hook and predict.py (`Method.teaching_maps` in model.py calls these). They read the
model; none of it is part of a method.

    centermask_maps(model, images)   [CM] Fig. 3 and 5: heatmap, peaks, saliency, local shapes, masks
    fcosis_maps(model, images)       [IS] Fig. 2-4: centre-of-mass field, coarse foreground,
                                     attention map, colour groups, masks
"""

import math

import torch

from model import FCOSForward, boxes_inside, coloring_groups, fcos_locations, topk_peaks


@torch.no_grad()
def centermask_maps(model, images, k=4):
    """
    The intermediate results of [CM] Fig. 3 for eval.save_pictures's `maps_fn` hook: what the
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
    What [IS] Fig. 2-4 show, for eval.save_pictures's `maps_fn` hook. images (B, 3, H, W) ->
    list of B dicts (h, w = H/8, W/8, the P3 grid of the detection head's outputs):
        "centre of mass field"  (h, w, 3) RGB: hue = angle of the regressed vector (r_x,
                                r_y), brightness = coarse foreground (Fig. 3)
        "coarse foreground"     (h, w) sigmoid of the detection head's coarse segmentation
        "attention map"         the attention map of the best detection's pass, on its own
                                grid (H/4, W/4; (h, w) with attention_grid="p3")
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
    regressed, fg = model.p3_maps(out)
    h, w = fg.shape[-2:]
    loc = fcos_locations([(h, w)], [model.strides[0]], images.device,
                         model.cfg.location_offset)[0].t().reshape(1, 2, h, w)
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
