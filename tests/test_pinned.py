"""
The central formulas pinned at inputs where their terms differ (tests/mutate.py checks that a
one-token change to each is caught): CenterNet's focal loss away from p = 0.5 and at its clamp;
CenterMask's offset and size targets inside the loss, the one-branch masks, the saliency's
resampling and its class channel (CenterMask's loss and decoding, CenterMask-FCOS's loss and
postprocess); FCOSreg's weights and mass-centre sampling; MaskFCOS's RoI levels and mask loss;
FCOSIS's inference centres, the P3 -> P2 resampling of its attention inputs, the upsampling in
apply_attention and the segmentation head, the half-open crop and how its losses are combined;
and two micro-batches of gradient accumulation against one batch.
"""
import math

import pytest
import torch
import torch.nn as nn

from model import (ModelConfig, build_model, centernet_focal_loss, fcos_locations, CenterMask,
                   FCOSForward)
from test_faults import (KINDS, UNEQUAL_COUNTS, accumulated_grads, max_relative_difference,
                         single_process_grads)

LN3 = math.log(3.0)                # sigmoid(+ln 3) = 0.75, sigmoid(-ln 3) = 0.25
SP1 = math.log1p(math.e)           # softplus(1) = 1.313262: BCE(logit 1, target t) = SP1 - t


def tiny_centermask(**kw):
    base = dict(num_classes=3, dcn=False, dla_channels=(4, 8, 8, 16, 16, 32), head_conv=8,
                shape_size=8)
    kw = dict(base, **kw)
    return CenterMask(ModelConfig(**kw))


def tiny_fcos_family(method, **kw):
    """ResNet-18, 32-wide FPN and heads, 3 classes (the FCOS family's test size)."""
    base = dict(method=method, backbone="resnet18", num_classes=3, norm="bn",
                fpn_channels=32, head_conv=32, shape_size=8)
    return build_model(ModelConfig(**dict(base, **kw)))


def locations_64():
    """The FCOS locations of a 64 x 64 input: P3 8x8 (0..63), P4 4x4 (64..79), P5 2x2, P6, P7 1x1:
    P = 86."""
    hw = [(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)]
    points, strides, levels = fcos_locations(hw, [8, 16, 32, 64, 128])
    return hw, points, strides, levels


# -- CenterNet's focal loss ([CM] eq. 3) -----------------------------------------------------------

def test_focal_loss_terms_away_from_one_half():
    """Guards eq. 3's two terms where p != 1 - p (at p = 0.5 log p = log(1 - p), p^a = (1 - p)^a).
    Three cells, N = 1 positive:
      Y = 1,   logit +ln 3, p = 0.75: (1 - p)^2 log p = 0.0625 * -0.287682 = -0.0179801
      Y = 0.5, logit -ln 3, p = 0.25: (1 - Y)^4 p^2 log(1 - p) = 0.0625^2 * -0.287682 = -0.0011238
      Y = 0,   logit +ln 3, p = 0.75: 1 * 0.5625 * log 0.25 = 0.5625 * -1.386294 = -0.7797906
    loss = -(sum) / 1 = 0.7988945."""
    logits = torch.tensor([LN3, -LN3, LN3]).view(1, 1, 1, 3)
    gt = torch.tensor([1.0, 0.5, 0.0]).view(1, 1, 1, 3)
    assert centernet_focal_loss(logits, gt).item() == pytest.approx(0.7988945, abs=1e-6)


def test_focal_loss_sigmoid_clamp():
    """Guards CenterNet's `_sigmoid` clamp to [1e-4, 1 - 1e-4] at both ends. A positive at logit
    -20 (sigmoid 2e-9 -> 1e-4): (1 - 1e-4)^2 log 1e-4 = 0.99980001 * -9.210340 = -9.208498; a
    negative (Y = 0) at logit +20 (-> 1 - 1e-4): (1 - 1e-4)^2 log 1e-4, the same. N = 1 ->
    18.416997 (unclamped: 20 + 20 = 40; a clamp at 1e-3: 13.8). Tolerance 1e-3: in float32
    1 - (1 - 1e-4) = 1.00017e-4, whose log is 1.7e-4 smaller."""
    logits = torch.tensor([-20.0, 20.0]).view(1, 1, 1, 2)
    gt = torch.tensor([1.0, 0.0]).view(1, 1, 1, 2)
    assert centernet_focal_loss(logits, gt).item() == pytest.approx(18.416997, abs=1e-3)


# -- CenterMask: offset and size targets ([CM] eq. 4, 5), class-specific saliency ----------------

def centermask_out(h, w, C=3, S=8, shape=0.0, saliency=None):
    """Planted CenterMask head outputs on an h x w output grid: every head 0, the dense shape map
    `shape`, the saliency map given (default 1 channel of 0)."""
    return {"heatmap": torch.zeros(1, C, h, w), "offset": torch.zeros(1, 2, h, w),
            "size": torch.zeros(1, 2, h, w), "shape": torch.full((1, S * S, h, w), shape),
            "saliency": torch.zeros(1, 1, h, w) if saliency is None else saliency}


def test_offset_and_size_targets_inside_the_loss():
    """Guards eq. 4 and 5 as the loss builds them. Box (1, 2, 13, 16) input px, R = 4: output
    (0.25, 0.5, 3.25, 4); centre (1.75, 2.25), cell (1, 2), offset target p/R - floor(p/R) =
    (0.75, 0.25) (both fractional parts non-zero and different); size target (3, 3.5).
    Predictions at cell (x=1, y=2): offset (0.7, 0.2), size (2, 4); 0 elsewhere.
      offset: lambda_off 1 * (|0.7 - 0.75| + |0.2 - 0.25|) / (2N + 1e-4) = 0.1 / 2.0001 = 0.0499975
      size:   lambda_size 0.1 * (|2 - 3| + |4 - 3.5|) / 2.0001 = 0.1 * 0.749963 = 0.0749963
    (target cell + offset swapped in sign, x/y swapped, or read at another cell: 0.5 to 1 / 2;
    the size's w and h swapped: 0.1 * 2.5 / 2.0001).
    Mask ([CM] eq. 2): shape and saliency logits 0, M = 0.25, an empty mask: -log 0.75 = 0.287682
    on each of the box's 3 x 4 cells (centres 0.5..2.5 in [0.25, 3.25], 0.5..3.5 in [0.5, 4]), their
    mean (the 52 cells outside the box count neither above nor below the line)."""
    m = tiny_centermask()
    out = centermask_out(8, 8)
    out["offset"][0, :, 2, 1] = torch.tensor([0.7, 0.2])
    out["size"][0, :, 2, 1] = torch.tensor([2.0, 4.0])
    target = {"boxes": torch.tensor([[1.0, 2.0, 13.0, 16.0]]), "labels": torch.tensor([0]),
              "masks": torch.zeros(1, 32, 32, dtype=torch.uint8)}
    losses = m.losses(out, [target])
    assert losses["offset"].item() == pytest.approx(0.1 / 2.0001, abs=1e-6)
    assert losses["size"].item() == pytest.approx(0.1 * 1.5 / 2.0001, abs=1e-6)
    assert losses["mask"].item() == pytest.approx(-math.log(0.75), abs=1e-6)


def test_class_specific_saliency_in_the_mask_and_saliency_losses():
    """Guards the channel of class-specific saliency ([CM 3.2], Table 1e/1f) in the loss. One
    object of class 1, box (0, 0, 8, 8) = the whole 2 x 2 output grid, mask all ones; shape
    logits +20 (sigmoid 1 - 2e-9); saliency channel 1 at +ln 3 (0.75), channels 0 and 2 at
    -ln 3 (0.25): the object's own channel above the 0.4 threshold, the others below.
      mask ([CM] eq. 2): -log(0.75 * sigmoid(20)) per cell = 0.287682; mean over the box, / 1 object
        (channel 0 would give -log 0.25 = 1.386294)
      saliency (Table 1f): target channel 1 = 1, channels 0, 2 = 0: BCE(+ln 3, 1) = -log 0.75 and
        BCE(-ln 3, 0) = -log 0.75: the mean 0.287682 (a target on another channel: larger)."""
    m = tiny_centermask(saliency="specific", saliency_loss=True, shape_size=2)
    sal = torch.full((1, 3, 2, 2), -LN3)
    sal[0, 1] = LN3
    out = centermask_out(2, 2, S=2, shape=20.0, saliency=sal)
    target = {"boxes": torch.tensor([[0.0, 0.0, 8.0, 8.0]]), "labels": torch.tensor([1]),
              "masks": torch.ones(1, 8, 8, dtype=torch.uint8)}
    losses = m.losses(out, [target])
    assert losses["mask"].item() == pytest.approx(-math.log(0.75), abs=1e-6)
    assert losses["saliency"].item() == pytest.approx(-math.log(0.75), abs=1e-6)


@pytest.mark.parametrize("branch", ["use_shape", "use_saliency"])
def test_mask_loss_of_one_branch(branch):
    """Guards eq. 2 with one branch switched off (Table 1c/1d): M = sigmoid(x) of the other,
    log(1 - M) = logsigmoid(-x). One object, box (0, 0, 8, 8) = the whole 2 x 2 output grid,
    mask the left input columns 0..3: pooled targets 1 (left cells), 0 (right); the remaining
    branch's logits +ln 3 (M = 0.75): BCE -log 0.75 = 0.287682 (left), -log 0.25 = 1.386294
    (right): mean 0.836988 (log(1 - M) taken as log M: 0.287682)."""
    m = tiny_centermask(shape_size=2, **{branch: False})
    out = centermask_out(2, 2, S=2, shape=LN3, saliency=torch.full((1, 1, 2, 2), LN3))
    mask = torch.zeros(1, 8, 8, dtype=torch.uint8)
    mask[0, :, :4] = 1
    target = {"boxes": torch.tensor([[0.0, 0.0, 8.0, 8.0]]), "labels": torch.tensor([0]),
              "masks": mask}
    del out["shape" if branch == "use_shape" else "saliency"]
    loss = m.losses(out, [target])["mask"]
    assert loss.item() == pytest.approx((-math.log(0.75) - math.log(0.25)) / 2, abs=1e-6)


def test_saliency_resampled_onto_the_input_grid():
    """Guards the saliency's resampling onto a finer grid (inference at input resolution; [CM 3.2]):
    output cell j is the point j + 0.5, so bilinear with align_corners=False is exact. Saliency
    only (Table 1c), a 1 x 2 map of logits (0, 4 ln 3) onto 4 columns at pixel 1/2: column j's
    centre (j + 0.5) / 2 reads source coordinate j / 2 - 0.25 = -0.25, 0.25, 0.75, 1.25 ->
    clamped 0, 0.25, 0.75, 1: logits 0, ln 3, 3 ln 3, 4 ln 3 -> M = 0.5, 0.75, 27/28, 81/82
    (align_corners=True reads j / 3: 0, 4/3 ln 3, ...)."""
    from model import assemble_masks
    sal = torch.tensor([0.0, 4 * LN3]).view(1, 1, 1, 2)
    box = torch.tensor([[0.0, 0.0, 2.0, 1.0]])
    masks = assemble_masks(None, sal, torch.tensor([0]), torch.tensor([0]), box, (2, 4), 0.5)
    torch.testing.assert_close(masks[0], torch.tensor([[0.5, 0.75, 27 / 28, 81 / 82]]).expand(2, 4))


def test_fcosreg_weights_replace_the_centerness_target():
    """Guards FCOSreg's w = a ctr + b s + c sqrt(ctr s) ([IS 3.3], (1/3, 1/3, 1/3)) as the weight of
    the box loss and the centerness branch's target, where plain FCOS keeps ctr. ctr (0.25, 0.64),
    s (1, 0.25): w = (0.25 + 1 + 0.5) / 3 = 0.583333, (0.64 + 0.25 + 0.4) / 3 = 0.43."""
    ctr, seg = torch.tensor([0.25, 0.64]), torch.tensor([1.0, 0.25])
    weight, target = tiny_fcos_family("fcosreg").box_weights(ctr, seg)
    torch.testing.assert_close(weight, torch.tensor([1.75 / 3, 0.43]))
    torch.testing.assert_close(target, weight)
    weight, target = tiny_fcos_family("fcos").box_weights(ctr, None)
    assert torch.equal(weight, ctr) and torch.equal(target, ctr)


def test_fcosreg_samples_around_the_mass_centre():
    """Guards center_sampling_at="mass" ([IS 3.3] Fig. 5): positives within 1.5 strides of the
    mask's centre of mass, not the box's centre. Box (0, 0, 48, 48), an L-shaped mask: columns
    0..15 of rows 0..47 (768 px, centre (8, 24)) and columns 16..47 of rows 32..47 (512 px, centre
    (32, 40)): mass centre ((768 * 8 + 512 * 32) / 1280, (768 * 24 + 512 * 40) / 1280) =
    (17.6, 30.4). Every max(l, t, r, b) <= 48: P3 only, radius 12: x in (5.6, 29.6), y in
    (18.4, 42.4) -> P3 locations x, y in {12, 20, 28} x {20, 28, 36}, 9 positives (around the box
    centre (24, 24): x, y in (12, 36) -> {20, 28}^2, 4)."""
    model = tiny_fcos_family("fcosreg", center_sampling_at="mass")
    hw, points, strides, _ = locations_64()
    mask = torch.zeros(1, 64, 64, dtype=torch.uint8)
    mask[0, 0:48, 0:16] = 1
    mask[0, 32:48, 16:48] = 1
    target = {"boxes": torch.tensor([[0.0, 0, 48, 48]]), "labels": torch.tensor([1]), "masks": mask}
    pos = model.assign(points, strides, [target], hw)["matched"][0] >= 0
    assert (strides[pos] == 8).all()
    grid = [[x, y] for x in (12.0, 20.0, 28.0) for y in (20.0, 28.0, 36.0)]
    assert sorted(points[pos].tolist()) == sorted(grid)


def test_maskfcos_roi_features_read_the_box_on_its_level():
    """Guards MaskFCOS's RoIAlign ([IS] eq. 4): the level k of each box and the scale 1 / 2^k. Every
    level's map is the ramp value = column index, so RoIAlign (bilinear, 2 x 2 samples symmetric in
    each bin, aligned=True) reads at bin i of 14 the column lo + (i + 0.5) (hi - lo) / 14, lo, hi =
    x0 / 2^k - 0.5, x1 / 2^k - 0.5. Box (16, 0, 48, 32): sqrt(32 * 32) < 224 -> P3: lo, hi = 1.5,
    5.5, bin 0 at 1.5 + 2/14 = 1.642857. Box (16, 0, 272, 256): sqrt(256 * 256) in [224, 448) -> P4:
    0.5, 16.5, bin 0 at 0.5 + 8/14 = 1.071429."""
    model = tiny_fcos_family("maskfcos")
    features = [torch.arange(n, dtype=torch.float32).expand(1, 32, n, n).contiguous()
                for n in (40, 20, 10)]                                     # P3, P4, P5 of 320 x 320
    boxes = torch.tensor([[16.0, 0, 48, 32], [16, 0, 272, 256]])
    out = model.roi_features(features, torch.tensor([0, 0]), boxes)              # (2, 32, 14, 14)
    i = torch.arange(14) + 0.5
    for r, (lo, hi) in enumerate(((1.5, 5.5), (0.5, 16.5))):
        torch.testing.assert_close(out[r, 0, 7], lo + i * (hi - lo) / 14)


def test_padded_crop_is_half_open():
    """Guards the padded crop's rule ([IS 3.2.2]'s slice S[y0:y1, x0:x1], "half-open"): a stride-4
    cell is in the crop when its centre 4k + 2 lies in [x0, x1) x [y0, y1). Box (2, 2, 10, 10), mask
    rows 2..9, columns 2..5 (32 px of 64: padding 0): cells 0, 1 on each axis (centres 2, 6; 10
    is out). Pooled targets: rows 0 and 2 half covered, row 1 fully; columns 0, 1 half: cells
    (0.25, 0.25, 0.5, 0.5), mean 0.375; logits 1: BCE SP1 - 0.375 = 0.938262 (closed: 9 cells,
    targets summing to 2: SP1 - 2/9)."""
    from model import padded_crop_bce
    mask = torch.zeros(1, 16, 16, dtype=torch.uint8)
    mask[0, 2:10, 2:6] = 1
    loss = padded_crop_bce(torch.ones(1, 4, 4), mask, torch.tensor([[2.0, 2, 10, 10]]))
    assert loss.item() == pytest.approx(SP1 - 0.375, abs=1e-6)


def test_class_specific_saliency_at_inference():
    """Guards decoding with class-specific saliency: each detection's mask reads its own class's
    channel. Output grid 6 x 10 (non-square), input 24 x 40. Peaks: class 1 at (x=7, y=2) logit
    5, class 2 at (x=2, y=4) logit 4; offsets (0.5, 0.5), sizes (2, 2) output px -> boxes
    (6.5, 1.5, 8.5, 3.5) and (1.5, 3.5, 3.5, 5.5) output = (26, 6, 34, 14) and (6, 14, 14, 22)
    input px. Shape logits +20 (sigmoid ~1); saliency channel 0 = -ln 3 (0.25, below 0.4),
    1 = +ln 3 (0.75), 2 = ln 9 (0.9). Masks: 0.75 on the pixels whose centre is in box 1 (rows
    6..13, cols 26..33), 0.9 in box 2 (rows 14..21, cols 6..13), 0 elsewhere."""
    m = tiny_centermask(saliency="specific", shape_size=2).eval()
    out = centermask_out(6, 10, S=2, shape=20.0, saliency=torch.stack(
        [torch.full((6, 10), v) for v in (-LN3, LN3, math.log(9.0))])[None])
    out["heatmap"].fill_(-10.0)
    for c, (x, y), logit in ((1, (7, 2), 5.0), (2, (2, 4), 4.0)):
        out["heatmap"][0, c, y, x] = logit
        out["offset"][0, :, y, x] = 0.5
        out["size"][0, :, y, x] = 2.0
    det = m.decode(out, (24, 40), k=2)[0]
    assert det["labels"].tolist() == [1, 2]
    torch.testing.assert_close(det["boxes"], torch.tensor([[26.0, 6, 34, 14], [6, 14, 14, 22]]))
    expect = torch.zeros(2, 24, 40)
    expect[0, 6:14, 26:34] = 0.75
    expect[1, 14:22, 6:14] = 0.9
    torch.testing.assert_close(det["masks"], expect, atol=1e-6, rtol=0)


# -- CenterMask-FCOS: the mask loss and the postprocess ([CM 4.3]) --------------------------------

def constant_saliency(model, logits):
    """CenterMask-FCOS's saliency head made to output one constant logit per channel."""
    for layer in (model.saliency[0], model.saliency[2]):
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)
    model.saliency[2].bias.data = torch.tensor(logits)


def test_centermask_fcos_mask_loss_by_hand():
    """Guards CenterMask-FCOS's mask loss: the class channel of the saliency, the RoIAlign target,
    the normaliser (pixels of every positive) and lambda_mask. Local shape logits 0 (0.5);
    saliency channel 2 (the object's class) at +ln 3 (0.75), 0 and 1 at -ln 3: M = 0.375
    (another channel: 0.125). Box (16, 16, 48, 48), mask its left half: the S = 4 RoIAlign
    target is columns (1, 1, 0, 0) (samples at x = 17.5, 21.5 | 25.5, 29.5 | 33.5, ... after the
    -0.5 of aligned=True). Two positives, both on the box: BCE mean over 2 x 16 pixels =
    (-log 0.375 - log 0.625) / 2 = (0.980829 + 0.470004) / 2 = 0.725416; lambda_mask = 2 ->
    1.450833 (channel 0: 2 * (2.079442 + 0.133531) / 2 = 2.212973)."""
    model = tiny_fcos_family("centermask_fcos", saliency="specific", shape_size=4,
                             loss_weights=(1, 1, 0.1, 2))
    nn.init.zeros_(model.local_shape.weight)
    nn.init.zeros_(model.local_shape.bias)
    constant_saliency(model, [-LN3, -LN3, LN3])
    hw, points, _, levels = locations_64()
    matched = torch.full((1, 86), -1)
    matched[0, [27, 70]] = 0                                       # a P3 and a P4 location
    labels = torch.where(matched >= 0, 2, -1)
    box = torch.tensor([[16.0, 16.0, 48.0, 48.0]])
    mask = torch.zeros(1, 64, 64, dtype=torch.uint8)
    mask[0, 16:48, 16:32] = 1
    features = [torch.zeros(1, 32, h, w) for h, w in hw]
    x = FCOSForward({"box_features": features}, features, points, levels, (64, 64),
                    [{"boxes": box, "labels": torch.tensor([2]), "masks": mask}],
                    {"matched": matched, "labels": labels, "boxes": box[None]})
    loss = model.extra_losses(x)["mask"].item()
    assert loss == pytest.approx(-math.log(0.375) - math.log(0.625), abs=1e-5)


def test_centermask_fcos_postprocess_by_hand():
    """Guards CenterMask-FCOS's inference masks: each detection's own location's shape vector
    (level, row, column), its class's saliency channel, its box in P3 units at input resolution.
    The shape conv copies channel 0 of the box tower at the centre tap; that channel is +20 at
    detection 0's location 70 (P4 cell 6: row 1, column 2) and detection 1's location 3 (P3 row 0,
    column 3), -20 elsewhere: sigmoid(L) ~ 1 only where the right cell is read. Saliency: constant
    channels (-ln 3, ln 3, ln 9) = (0.25, 0.75, 0.9).
      detection 0, class 1, box (8, 12, 40, 36): in P3 units (R = 8) centre (3, 3), size (4, 3):
        (1, 1.5, 5, 4.5); pixel j's centre (j + 0.5) / 8 inside: cols 8..39, rows 12..35 -> 0.75
      detection 1, class 2, box (0, 0, 16, 16) -> (0, 0, 2, 2): rows, cols 0..15 -> 0.9
    0 elsewhere."""
    model = tiny_fcos_family("centermask_fcos", saliency="specific", shape_size=2).eval()
    nn.init.zeros_(model.local_shape.weight)
    nn.init.zeros_(model.local_shape.bias)
    model.local_shape.weight.data[:, 0, 1, 1] = 1.0
    constant_saliency(model, [-LN3, LN3, math.log(9.0)])
    hw, points, _, levels = locations_64()
    box_features = [torch.full((1, 32, h, w), -20.0) for h, w in hw]
    box_features[1][0, 0, 1, 2] = 20.0
    box_features[0][0, 0, 0, 3] = 20.0
    dets = [{"boxes": torch.tensor([[8.0, 12, 40, 36], [0, 0, 16, 16]]),
             "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([1, 2]),
             "index": torch.tensor([70, 3])}]
    model.detect = lambda x: dets
    features = [torch.zeros(1, 32, h, w) for h, w in hw]
    x = FCOSForward({"box_features": box_features}, features, points, levels, (64, 64))
    d = model.postprocess(x)[0]
    expect = torch.zeros(2, 64, 64)
    expect[0, 12:36, 8:40] = 0.75
    expect[1, :16, :16] = 0.9
    torch.testing.assert_close(d["masks"], expect, atol=1e-6, rtol=0)


# -- MaskFCOS: the mask loss ([IS 4]) ------------------------------------------------------------

class ConstantMaskHead(nn.Module):
    """A mask head whose (K, C, 28, 28) logits are one constant per class channel."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.tensor(logits)

    def forward(self, x):
        return self.logits.view(1, -1, 1, 1).expand(len(x), -1, 28, 28)


def test_maskfcos_mask_loss_by_hand():
    """Guards MaskFCOS's mask loss: each RoI's own mask (the flat index over the batch), its class
    channel, the binarised RoIAlign target and the mean over RoI pixels. Two images, one object
    each, both boxes (0, 0, 32, 32), no proposals (the ground-truth boxes are the RoIs). Class
    channel logits (-1, 0, 1). Image 0: class 0, mask the whole box: target 1, BCE(-1, 1) =
    softplus(-1) + 1 = 1.313262. Image 1: class 2, mask columns 0..23: 28 bins of 32/28 px, bins
    0..20 end at x = 24 -> 1 (bin 20's samples average 0.89 >= 0.5), bins 21..27 -> 0 (bin 21:
    0.10): target mean 21/28 = 0.75, BCE(1, t) = softplus(1) - t: mean 1.313262 - 0.75 = 0.563262.
    Mean over 2 x 784 pixels: (1.313262 + 0.563262) / 2 = 0.938262 (image 1 reading image 0's
    mask: 0.813262; both on channel 0: 1.188262)."""
    model = tiny_fcos_family("maskfcos")
    model.mask_head = ConstantMaskHead([-1.0, 0.0, 1.0])
    model.detect = lambda x, n=None: [{"boxes": torch.zeros(0, 4)}, {"boxes": torch.zeros(0, 4)}]
    hw, points, _, levels = locations_64()
    masks = torch.zeros(2, 64, 64, dtype=torch.uint8)
    masks[0, :32, :32] = 1
    masks[1, :32, :24] = 1
    box = torch.tensor([[0.0, 0.0, 32.0, 32.0]])
    targets = [{"boxes": box, "labels": torch.tensor([0]), "masks": masks[:1]},
               {"boxes": box, "labels": torch.tensor([2]), "masks": masks[1:]}]
    features = [torch.zeros(2, 32, h, w) for h, w in hw]
    x = FCOSForward({}, features, points, levels, (64, 64), targets, {})
    assert model.extra_losses(x)["mask"].item() == pytest.approx((SP1 + SP1 - 0.75) / 2, abs=1e-5)


# -- FCOSIS: inference centres, attention inputs, the losses' combination ([IS 3.2]) --------------

def test_fcosis_inference_centres_and_crop():
    """Guards the centre each detection stands for at inference ([IS 3.2.1]): the centre of mass
    its own location regresses, x + s r in its level's stride, read in its own image. Image 0,
    location 5 (P3 row 0, column 5: (44, 4)), r = (-0.5, 1): (44 - 4, 4 + 8) = (40, 12). Image 1,
    location 70 (P4 cell 6, row 1, column 2: (40, 24)), r = (0.25, -0.5): (40 + 4, 24 - 8) =
    (44, 16). With mask logits 0 the masks are 0.5 on the pixels whose centre lies in the box
    (closed): box (0, 0, 8, 8) -> rows, cols 0..7."""
    model = tiny_fcos_family("fcosis").eval()
    hw, points, _, levels = locations_64()
    extra = torch.zeros(2, 86, 3)
    extra[0, 5, :2] = torch.tensor([-0.5, 1.0])
    extra[1, 70, :2] = torch.tensor([0.25, -0.5])
    seen = {}

    def segment(features, out, input_hw, boxes, centers, batch, labels, **kw):
        seen["centers"] = centers
        return torch.zeros(len(boxes), 16, 16), None, None
    model.segment = segment
    dets = [{"boxes": torch.tensor([[0.0, 0, 8, 8]]), "scores": torch.tensor([0.9]),
             "labels": torch.tensor([0]), "index": torch.tensor([5])},
            {"boxes": torch.tensor([[30.0, 10, 50, 40]]), "scores": torch.tensor([0.8]),
             "labels": torch.tensor([2]), "index": torch.tensor([70])}]
    model.predict_masks(dets, FCOSForward({"extra": extra}, None, points, levels, (64, 64)))
    assert seen["centers"].tolist() == [[40.0, 12.0], [44.0, 16.0]]
    expect = torch.zeros(1, 64, 64)
    expect[0, :8, :8] = 0.5
    assert torch.equal(dets[0]["masks"], expect)


def test_fcosis_attention_inputs_resampled_onto_p2():
    """Guards the P3 -> P2 resampling of the attention inputs ("half" locations: P3 cell j at
    8j + 4, P2 cell k at 4k + 2; bilinear, align_corners=False maps k to P3 coordinate
    (k + 0.5) / 2 - 0.5). A 4 x 6 P3 grid, r = (0.25, -0.5) everywhere: regressed centres
    (8j + 4 + 2, 8i + 4 - 4), linear, so exact inside. At P2 (row 3, column 5), off the grid's
    symmetry: P3 coordinates x = 2.25, y = 1.25 -> centre (4*5 + 2 + 2, 4*3 + 2 - 4) = (24, 10).
    Foreground logits 0 (0.5) except P3 (row 1, col 2) +ln 3 (0.75) and (row 2, col 3) -ln 3
    (0.25); bilinear weights x: 0.75 (col 2), 0.25 (col 3); y: 0.75 (row 1), 0.25 (row 2):
    0.5625 * 0.75 + 0.1875 * 0.5 + 0.1875 * 0.5 + 0.0625 * 0.25 = 0.625 (rows and columns
    swapped: 0.5). The returned locations are P2's (stride 4): q = (4k + 2, 4i + 2)."""
    model = tiny_fcos_family("fcosis")
    extra = torch.zeros(1, 24, 3)
    extra[..., 0], extra[..., 1] = 0.25, -0.5
    fg = torch.zeros(4, 6)
    fg[1, 2], fg[2, 3] = LN3, -LN3
    extra[0, :, 2] = fg.flatten()
    q, regressed, coarse = model.attention_inputs({"hw": [(4, 6)], "extra": extra}, (8, 12), (32, 48))
    assert regressed.shape == (1, 2, 8, 12) and coarse.shape == (1, 1, 8, 12)
    assert q.shape == (96, 2) and q[3 * 12 + 5].tolist() == [22.0, 14.0]
    torch.testing.assert_close(regressed[0, :, 3, 5], torch.tensor([24.0, 10.0]))
    assert coarse[0, 0, 3, 5].item() == pytest.approx(0.625, abs=1e-6)


def test_segmentation_head_sums_the_levels_upsampled_onto_p2():
    """Guards the segmentation head's merge ([IS 3.2.1] Fig. 2c): each level's tower, upsampled
    bilinearly (align_corners=False) onto P2, summed, then the 1x1 predictor. One channel, no
    GroupNorm, every 3x3 conv the identity (centre tap 1) and the predictor 1, so a non-negative
    input passes its towers unchanged: P2 zeros (4 x 4), P3 columns (0, 4) (2 x 2), P4 the constant
    2 (1 x 1): P2 column k (centre 4k + 2) reads P3 coordinate (k + 0.5) / 2 - 0.5 = -0.25, 0.25,
    0.75, 1.25 -> clamped 0, 0.25, 0.75, 1: values (0, 1, 3, 4) (align_corners=True would give 0,
    4/3, 8/3, 4) -> logits (2, 3, 5, 6)."""
    from model import SegmentationHead
    head = SegmentationHead(1, 1, 1, norm=False)
    for m in head.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)
            m.weight.data[0, 0, m.weight.shape[2] // 2, m.weight.shape[3] // 2] = 1.0
    p3 = torch.tensor([[0.0, 4.0], [0.0, 4.0]]).view(1, 1, 2, 2)
    out = head([torch.zeros(1, 1, 4, 4), p3, torch.full((1, 1, 1, 1), 2.0)])
    torch.testing.assert_close(out[0, 0], torch.tensor([2.0, 3.0, 5.0, 6.0]).expand(4, 4))


class ConstantSegHead(nn.Module):
    """A segmentation head whose logits are 1 everywhere: (num_groups, 1, H/4, W/4) from P2."""

    def __init__(self):
        super().__init__()
        self.predictor = nn.Conv2d(1, 1, 1)                       # read for its out_channels: 1

    def forward(self, features):
        return torch.ones(len(features[0]), 1, *features[0].shape[-2:])


def test_fcosis_losses_combined_by_hand():
    """Guards FCOSIS's three own losses, each with its normaliser ([IS 3.2.1-3.2.2]). One 64 x 64
    image, one object: the 16 x 16 square (16, 16, 32, 32), mass centre (24, 24). Head outputs at
    every location: centre-of-mass offset 0, foreground logit 1; segmentation logits 1.
      foreground: BCE(1, t) = SP1 - t summed over the 86 locations / 86; sum t = the square's
        area over each level's cell area: 256 / 64 + 256 / 256 + 256 / 1024 + 256 / 4096 +
        256 / 16384 = 5.328125 -> 1.313262 - 5.328125 / 86 = 1.251307
      com: the locations whose pixel is in the mask (every level): P3 (20|28, 20|28), targets
        +-4 / 8 = +-0.5, SmoothL1 0.125 per coordinate: 4 x 0.25; P4 (24, 24): 0; P5 (16, 16):
        8 / 32 = 0.25 -> 2 x 0.03125; sum 1.0625 over 6 locations = 0.177083
      mask: padding p = ceil((sqrt(4 * 256 / 0.5) - 32) / 4) = ceil(3.31) = 4: crop
        (12, 12, 36, 36), stride-4 cells 3..8 (centres 14..34): 36 cells, 16 of them (4..7) the
        square: BCE mean SP1 - 16 / 36 = 0.868817, x 1 instance / 1."""
    model = tiny_fcos_family("fcosis")
    model.seg_head = ConstantSegHead()
    hw, points, _, levels = locations_64()
    extra = torch.zeros(1, 86, 3)
    extra[..., 2] = 1.0
    mask = torch.zeros(1, 64, 64, dtype=torch.uint8)
    mask[0, 16:32, 16:32] = 1
    target = {"boxes": torch.tensor([[16.0, 16, 32, 32]]), "labels": torch.tensor([1]),
              "masks": mask}
    features = [torch.zeros(1, 32, 16, 16)] + [torch.zeros(1, 32, h, w) for h, w in hw]
    x = FCOSForward({"extra": extra, "hw": hw}, features, points, levels, (64, 64), [target], None)
    losses = model.extra_losses(x)
    assert losses["foreground"].item() == pytest.approx(SP1 - 5.328125 / 86, abs=1e-5)
    assert losses["com"].item() == pytest.approx(1.0625 / 6, abs=1e-6)
    assert losses["mask"].item() == pytest.approx(SP1 - 16 / 36, abs=1e-5)


# -- gradient accumulation ----------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_two_micro_batches_give_the_gradient_of_one_batch(kind):
    """Guards every method's loss normalisers across micro-batches (train.py's record_normalizers; the same
    reduce_mean calls that DDP averages over processes): the tiny model of each method, a batch of
    4 images with 1, 1, 3, 3 objects, as 2 micro-batches of 2 (2 and 6 objects) accumulated with
    the whole batch's normalisers, gives the one-batch gradient to relative 1e-4; each
    micro-batch over its own counts misses by more than 1e-2 (the test can fail)."""
    single = single_process_grads(kind, UNEQUAL_COUNTS)
    assert max_relative_difference(accumulated_grads(kind, UNEQUAL_COUNTS, 2), single) < 1e-4
    assert max_relative_difference(accumulated_grads(kind, UNEQUAL_COUNTS, 2, False), single) > 1e-2
