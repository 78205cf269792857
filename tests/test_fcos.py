"""
The FCOS family in model.py: ResNet-FPN, fcos_targets (level ranges, centre sampling,
ambiguity by area vs by segmentation label), FCOSreg's regression weights, MaskFCOS's level
rule and RoIAlign mask targets, CenterMask-FCOS's at-location shape head, the losses against
torchvision's FCOS, and a few training steps of every method.
"""
import math
from urllib.error import URLError

import pytest
import torch
import torch.nn.functional as F

from model import (ModelConfig, build_model, fcos_locations, fcos_targets, regression_weights,
                   average_pool_masks, maskfcos_levels, mask_targets, conv3x3_at, paste_masks, iou_loss,
                   center_of_mass, ResNetFPN)
from configurator import check_settings


def tiny(method, **kw):
    """A CPU-sized member of the family: ResNet-18 trainable from scratch, 32-wide FPN/heads."""
    base = dict(method=method, backbone="resnet18", num_classes=3, norm="bn", fpn_channels=32,
                head_conv=32, shape_size=8)
    base.update(kw)
    return ModelConfig(**base)


def one_image(points, strides, boxes, labels=None, **kw):
    """fcos_targets of one image: boxes (N, 4), labels (N,) as a batch of one -> entries (P, ...)."""
    t = fcos_targets(points, strides, boxes[None], None if labels is None else labels[None], **kw)
    return {k: v[0] for k, v in t.items()}


def toy_batch(H=128, W=96):
    """Two images: one with two overlapping objects (rectangle masks), one empty."""
    torch.manual_seed(0)
    images = torch.randn(2, 3, H, W)
    masks = torch.zeros(2, H, W, dtype=torch.uint8)
    masks[0, 10:50, 20:60] = 1
    masks[1, 30:120, 5:90] = 1
    targets = [{"boxes": torch.tensor([[20., 10, 60, 50], [5, 30, 90, 120]]), "labels": torch.tensor([0, 2]),
                "masks": masks},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long),
                "masks": torch.zeros(0, H, W, dtype=torch.uint8)}]
    return images, targets


# -- locations and targets ------------------------------------------------------------------------

def test_locations_at_cell_centres():
    """Guards the location convention (x, y) = (j*s + s//2, i*s + s//2) of [FCOS] 3.1 (torchvision's
    FCOS puts them at j*s): a 2x3 map at stride 8 -> x in {4, 12, 20}, y in {4, 12}; then a 1x2
    map at stride 16 -> (8, 8), (24, 8)."""
    points, strides, levels = fcos_locations([(2, 3), (1, 2)], [8, 16])
    assert points.tolist() == [[4, 4], [12, 4], [20, 4], [4, 12], [12, 12], [20, 12], [8, 8], [24, 8]]
    assert strides.tolist() == [8] * 6 + [16] * 2 and levels.tolist() == [0] * 6 + [1] * 2


def test_fcos_targets_worked_example():
    """Guards ltrb, level choice and centerness. Box (20, 10, 130, 70), P4 point (56, 40):
    l = 56-20 = 36, t = 40-10 = 30, r = 130-56 = 74, b = 70-40 = 30; max 74 in [64, 128] -> P4;
    centerness = sqrt(min(36,74)/max(36,74) * min(30,30)/max(30,30)) = sqrt(36/74) = 0.69749.
    Centre sampling: centre (75, 40), radius 1.5*16 = 24 -> x in (51, 99), y in (16, 64): inside.
    The P3 location (52, 36) next to it has max(32, 26, 78, 34) = 78 > 64: not on P3."""
    hw = [(256 // s, 256 // s) for s in (8, 16, 32, 64, 128)]
    points, strides, _ = fcos_locations(hw, [8, 16, 32, 64, 128])
    t = one_image(points, strides, torch.tensor([[20., 10, 130, 70]]), torch.tensor([5]))
    p4 = ((points == torch.tensor([56., 40])).all(1) & (strides == 16)).nonzero().item()
    assert t["matched"][p4] == 0 and t["labels"][p4] == 5
    assert t["ltrb"][p4].tolist() == [36, 30, 74, 30]
    assert t["centerness"][p4].item() == pytest.approx(math.sqrt(36 / 74), abs=1e-5)
    assert math.sqrt(36 / 74) == pytest.approx(0.69749, abs=1e-5)
    p3 = ((points == torch.tensor([52., 36])).all(1) & (strides == 8)).nonzero().item()
    assert t["matched"][p3] == -1 and t["centerness"][p3] == 0 and t["labels"][p3] == -1
    # every positive, by hand: inside the sampling region (51, 99) x (16, 64) (P4; P3: radius 12,
    # (63, 87) x (28, 52)) with max(l, t, r, b) in the level's range. P3 (x = 8j + 4, y = 8i + 4):
    # x in 68, 76, 84 (max(x - 20, 130 - x) = 62, 56, 64 <= 64), y in 36, 44. P4 (16j + 8): x = 56
    # (max 74) and 88 (max 68) in [64, 128]; x = 72 has max(52, 58) and t, b <= 46: < 64, not P4. None on P5 up: every max <= 110 < 128.
    pos = t["matched"] >= 0
    assert sorted(zip(strides[pos].tolist(), points[pos].tolist())) == sorted(
        [(8.0, [x, y]) for x in (68.0, 76.0, 84.0) for y in (36.0, 44.0)]
        + [(16.0, [x, y]) for x in (56.0, 88.0) for y in (24.0, 40.0, 56.0)])


def test_level_ranges_inclusive_at_their_boundaries():
    """Guards the size ranges [0,64], [64,128], ... and their boundary rule (inclusive both
    ends, as FCOS's code; torchvision uses strict bounds). The point (100, 100) as a P3 and as a
    P4 location (radius 0: no centre sampling). Box (36, 90, 110, 110): l = 64, t = b = r = 10,
    max = 64 -> candidate on P3 (<= 64) AND on P4 (>= 64). Box (35.5, ...): max 64.5 -> P4 only.
    Box (37, ...): max 63 -> P3 only."""
    points = torch.tensor([[100., 100], [100, 100]])
    strides = torch.tensor([8., 16])
    for x0, expected in ((36.0, [0, 0]), (35.5, [-1, 0]), (37.0, [0, -1])):
        t = one_image(points, strides, torch.tensor([[x0, 90, 110, 110]]), radius=0)
        assert t["matched"].tolist() == expected, x0


def test_centre_sampling_radius():
    """Guards the 1.5-stride centre region, clipped to the box. Box (0, 0, 200, 40), centre
    (100, 20), P3 (stride 8): region x in (100-12, 100+12) = (88, 112), y in (8, 32). The P3
    locations x = 8j+4: 92..108 are inside (92, 100, 108), 84 and 116 not; max(l,t,r,b) <= 64
    needs 136 <= x... so use a smaller box: (60, 0, 140, 40): max side distance at x=92 is
    max(32, 20, 48, 20) = 48 <= 64, P3. With radius 0 every inside location with max <= 64 is a
    candidate (x in [76, 124])."""
    points = torch.tensor([[x, 20.] for x in (76, 84, 92, 100, 108, 116, 124)])
    strides = torch.full((7,), 8.0)
    box = torch.tensor([[60., 0, 140, 40]])
    assert one_image(points, strides, box)["matched"].tolist() == [-1, -1, 0, 0, 0, -1, -1]
    assert one_image(points, strides, box, radius=0)["matched"].tolist() == [0] * 7


def test_ambiguity_by_area_vs_by_segmentation_label():
    """Guards FCOS's smallest-box rule vs FCOSreg's highest-segmentation-label rule ([IS 3.3],
    Fig. 5 left). Location (50, 50), stride 8, both boxes contain it with max side distance <= 64:
    A = (30, 30, 70, 70) area 1600, B = (20, 20, 90, 90) area 4900. FCOS -> A (smaller).
    Segmentation labels at that location: A 0.25 (its mask barely covers the cell), B 1.0 ->
    FCOSreg -> B. Equal labels fall back to the smaller box -> A."""
    points, strides = torch.tensor([[50., 50]]), torch.tensor([8.])
    boxes = torch.tensor([[[30., 30, 70, 70], [20, 20, 90, 90]]])
    assert fcos_targets(points, strides, boxes, radius=0)["matched"].item() == 0
    seg = torch.tensor([[[0.25], [1.0]]])                                 # (B=1, N=2, P=1)
    assert fcos_targets(points, strides, boxes, radius=0, seg_labels=seg)["matched"].item() == 1
    seg = torch.tensor([[[0.5], [0.5]]])
    assert fcos_targets(points, strides, boxes, radius=0, seg_labels=seg)["matched"].item() == 0


def test_batched_targets_equal_per_image_and_padding_ignored():
    """Guards the batched assignment: two images padded to N = 3 boxes give what each image gives
    alone; a padded (invalid) box never wins a location."""
    hw = [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
    points, strides, _ = fcos_locations(hw, [8, 16, 32, 64, 128])
    a = torch.tensor([[10., 10, 60, 50], [30, 20, 120, 110], [0, 0, 128, 128]])
    b = torch.tensor([[40., 40, 70, 90], [0, 0, 0, 0], [0, 0, 0, 0]])
    valid = torch.tensor([[True, True, True], [True, False, False]])
    batched = fcos_targets(points, strides, torch.stack([a, b]), torch.tensor([[0, 1, 2], [1, 0, 0]]), valid)
    for i, (boxes, lab) in enumerate(((a, torch.tensor([0, 1, 2])), (b[:1], torch.tensor([1])))):
        single = one_image(points, strides, boxes, lab)
        for k in ("matched", "labels", "ltrb", "centerness"):
            assert torch.equal(batched[k][i], single[k]), k
    assert (batched["matched"][1] <= 0).all()
    # the levels of fcos_locations (FCOS.forward passes them: no torch.unique) give the same targets
    _, _, levels = fcos_locations(hw, [8, 16, 32, 64, 128])
    given = fcos_targets(points, strides, torch.stack([a, b]), torch.tensor([[0, 1, 2], [1, 0, 0]]), valid,
                         levels=levels)
    assert all(torch.equal(given[k], batched[k]) for k in batched)


def test_regression_weights_three_settings_of_fig6():
    """Guards FCOSreg's w = a*ctr + b*s + c*sqrt(ctr*s) ([IS 3.3]). ctr = 0.64, s = 0.25:
    (a) (1,0,0) -> 0.64; (b) (0,1,0) -> 0.25; (c) 1/3 each -> (0.64 + 0.25 + sqrt(0.16)) / 3
    = (0.64 + 0.25 + 0.4) / 3 = 1.29 / 3 = 0.43."""
    ctr, s = torch.tensor([0.64]), torch.tensor([0.25])
    assert regression_weights(ctr, s, (1, 0, 0)).item() == pytest.approx(0.64)
    assert regression_weights(ctr, s, (0, 1, 0)).item() == pytest.approx(0.25)
    assert regression_weights(ctr, s, (1 / 3, 1 / 3, 1 / 3)).item() == pytest.approx(0.43)


def test_fcosreg_config_defaults_and_errors():
    """Guards the method presets: FCOSreg = mask ambiguity + (1/3, 1/3, 1/3); FCOS = area +
    (1, 0, 0); mask-only options on plain FCOS and weights not summing to 1 are refused."""
    r = tiny("fcosreg")
    assert r.ambiguity == "mask" and r.reg_weights == pytest.approx((1 / 3,) * 3)
    f = tiny("fcos")
    assert f.ambiguity == "area" and f.reg_weights == (1.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="fcosreg"):
        tiny("fcos", ambiguity="mask")
    with pytest.raises(ValueError, match="summing to 1"):
        tiny("fcosreg", reg_weights=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="ResNet-FPN"):
        ModelConfig(method="fcos", backbone="dla34")


def test_average_pool_masks_segmentation_labels():
    """Guards the segmentation label s = fraction of a location's s x s cell covered by the mask
    ([IS 3.3]). A 16x16 image, mask = the 6x4 block rows 0-5, cols 0-3: stride 8 cell (0,0)
    covers rows 0-7, cols 0-7 -> 24/64 = 0.375; stride 16 -> 24/256 = 0.09375. A 10x10 image
    is zero-padded to 16: at stride 16 one cell, 24/256 again (the padding counts as empty)."""
    m = torch.zeros(1, 16, 16)
    m[0, :6, :4] = 1
    p8, p16 = average_pool_masks(m, 8), average_pool_masks(m, 16)
    assert p8.shape == (1, 2, 2) and p8[0, 0, 0].item() == 0.375 and p8[0].sum().item() == 0.375
    assert p16.shape == (1, 1, 1) and p16.item() == 0.09375
    q16 = average_pool_masks(m[:, :10, :10], 16)
    assert q16.item() == 0.09375


def test_center_of_mass_of_an_l_shape():
    """Guards the centre of mass used for FCOSreg's mass-centred sampling. An L of 4 pixels:
    (x, y) = (0,0), (0,1), (0,2), (1,2) -> pixel centres (0.5, 0.5), (0.5, 1.5), (0.5, 2.5),
    (1.5, 2.5): mean x = 3/4 = 0.75, mean y = 7/4 = 1.75. An empty mask -> its box centre."""
    m = torch.zeros(2, 4, 4)
    m[0, 0:3, 0] = 1
    m[0, 2, 1] = 1
    com = center_of_mass(m, torch.tensor([[0., 0, 2, 3], [0, 0, 4, 2]]))
    assert com.tolist() == [[0.75, 1.75], [2.0, 1.0]]


def test_iou_loss_by_hand():
    """Guards FCOS's IoU loss (the original form's, its IOULoss "iou"), on distances from one location.
    pred (2, 2, 2, 2), target (1, 1, 3, 3): areas 4*4 = 16 and 4*4 = 16; overlap (min(2,1) +
    min(2,3)) * (min(2,1) + min(2,3)) = 3 * 3 = 9; union 16 + 16 - 9 = 23 ->
    -log((9 + 1) / (23 + 1)) = log(2.4) = 0.87547. Identical (3, 3, 3, 3): -log(37/37) = 0.
    pred (1, 1, 1, 1) in target (4, 4, 4, 4): overlap 2*2 = 4, union 4 + 64 - 4 = 64 ->
    -log(5/65) = log(13) = 2.56495. A box of no area, (0, 0, 0, 0) vs (0, 0, 0, 0): -log(1/1) = 0
    (FCOS's +1 keeps it finite)."""
    pred = torch.tensor([[2., 2, 2, 2], [3, 3, 3, 3], [1, 1, 1, 1], [0, 0, 0, 0]])
    target = torch.tensor([[1., 1, 3, 3], [3, 3, 3, 3], [4, 4, 4, 4], [0, 0, 0, 0]])
    assert iou_loss(pred, target).tolist() == pytest.approx([0.87547, 0.0, 2.56495, 0.0], abs=1e-5)
    assert math.log(2.4) == pytest.approx(0.87547, abs=1e-5) and math.log(13) == pytest.approx(2.56495, abs=1e-5)


# -- the original FCOS: centerness on the classification tower, exp(scale x) in pixels ----------------

ORIGINAL = dict(fcos_form="original")  # FCOS's code defaults


def constant_towers(model, cls_value, box_value, ltrb_bias):
    """Set a tiny FCOS's head so that every output is computable by hand: the last GroupNorm of
    the classification tower outputs cls_value everywhere (weight 0, bias cls_value, then ReLU),
    the box tower's box_value; the centerness conv averages its input over the 3x3 window and
    the channels (weight 1 / (9 C), bias 0); the ltrb conv outputs its bias (weight 0)."""
    head = model.head
    with torch.no_grad():
        for tower, value in ((head.cls_tower, cls_value), (head.box_tower, box_value)):
            gn = [m for m in tower if isinstance(m, torch.nn.GroupNorm)][-1]
            gn.weight.zero_()
            gn.bias.fill_(value)
        C = head.centerness.in_channels
        head.centerness.weight.fill_(1 / (9 * C))
        head.centerness.bias.zero_()
        head.ltrb.weight.zero_()
        head.ltrb.bias.copy_(torch.tensor(ltrb_bias))


def test_original_head_by_hand():
    """Guards the two forms of FCOSHead. Classification tower = 1, box tower = 2 everywhere, the
    centerness conv the mean of its 3x3 x C window: centerness on the classification tower
    (original, [FCOS] Fig. 2) reads 1 inside the map and 4/9 at a corner (4 of the 9 taps
    inside, zero padding); on the box tower (improved) 2 and 8/9.
    ltrb conv = its bias b = (ln 4, ln 2, 0, ln 8), Scales (1, 2, 1, 1, 1):
      original ([FCOS] 3.2): exp(scale * b) in pixels, whatever the stride: P3 (4, 2, 1, 8),
        P4 exp(2b) = (16, 4, 1, 64);
      improved: relu(scale * b) * stride: P3 8 b = (11.0904, 5.5452, 0, 16.6355),
        P4 16 * 2b = (44.3614, 22.1807, 0, 66.5421).
    The state-dict keys and shapes are the same in every form (published weights import alike)."""
    images = torch.zeros(2, 3, 64, 64)   # P3 8x8, P4 4x4, P5 2x2, P6 1x1, P7 1x1: P = 86 (2 images: GroupNorm
                                         # needs 2 values per group on the 1x1 levels)
    b = [math.log(4), math.log(2), 0.0, math.log(8)]
    outs, keys = {}, set()
    for form in ("original", "improved"):
        model = build_model(tiny("fcos", fcos_form=form)).eval()
        constant_towers(model, 1.0, 2.0, b)
        with torch.no_grad():
            model.head.scales.copy_(torch.tensor([1.0, 2, 1, 1, 1]))
            outs[form] = model.heads(images)
        keys.add(tuple((k, tuple(v.shape)) for k, v in model.state_dict().items()))
    assert len(keys) == 1
    corner, inside, p4 = 0, 9, 64                    # P3 (0, 0); P3 (1, 1); P4 (0, 0)
    ctr = {f: outs[f]["centerness"][0, [corner, inside]].tolist() for f in outs}
    assert ctr["original"] == pytest.approx([4 / 9, 1.0], abs=1e-5)
    assert ctr["improved"] == pytest.approx([8 / 9, 2.0], abs=1e-5)
    exp, relu = outs["original"]["ltrb"][0], outs["improved"]["ltrb"][0]
    assert exp[inside].tolist() == pytest.approx([4, 2, 1, 8])
    assert exp[corner].tolist() == pytest.approx([4, 2, 1, 8])
    assert exp[p4].tolist() == pytest.approx([16, 4, 1, 64])
    assert relu[inside].tolist() == pytest.approx([11.0904, 5.5452, 0, 16.6355], abs=1e-4)
    assert relu[p4].tolist() == pytest.approx([44.3614, 22.1807, 0, 66.5421], abs=1e-4)


def test_original_decoding_by_hand():
    """Guards the decoding of the original regression ([FCOS] 3.1: x0 = x - l, y0 = y - t,
    x1 = x + r, y1 = y + b, the distances exp(scale * x) already in pixels): the head of
    test_original_head_by_hand (centerness on the classification tower, 1 -> sigmoid(1) =
    0.731059; ltrb (4, 2, 1, 8) on P3), and one class score left: location (12, 12) of P3
    (cell (1, 1)), class 2, logit 5 -> sigmoid 0.993307; every other logit -20 (below 0.05).
    Box (12 - 4, 12 - 2, 12 + 1, 12 + 8) = (8, 10, 13, 20), score sqrt(0.993307 * 0.731059) =
    0.852154, label 2."""
    model = build_model(tiny("fcos", **ORIGINAL)).eval()
    constant_towers(model, 1.0, 2.0, [math.log(4), math.log(2), 0.0, math.log(8)])
    images = torch.zeros(2, 3, 64, 64)                      # two images, as test_original_head_by_hand
    with torch.no_grad():
        out = model.heads(images)
        out["cls"] = torch.full_like(out["cls"], -20.0)
        out["cls"][0, 9, 2] = 5.0
        det, other = model.decode(out, (64, 64))
    assert len(other["boxes"]) == 0
    assert len(det["boxes"]) == 1 and det["boxes"][0].tolist() == pytest.approx([8, 10, 13, 20], abs=1e-5)
    assert det["scores"].tolist() == pytest.approx([0.852154], abs=1e-6) and det["labels"].tolist() == [2]


def test_boxes_are_clipped_to_their_own_image_before_nms():
    """Guards FCOS's decoding order (FCOSPostProcessor: clip_to_image, then the NMS; torchvision's
    FCOS: clip_boxes_to_image(boxes, image_shape), then batched_nms): each box is clipped to its own
    image, not to the padded batch. Batch 64 x 64; image 0 is 64 high and 32 wide (padded on the
    right), image 1 64 x 64. Every class logit -20 (below 0.05) but two of image 0, class 1, on P3
    (stride 8, locations j * 8 + 4); centerness logit 20 (sigmoid 1 - 2e-9):
      A: cell (1, 1), point (12, 12), ltrb (12, 12, 18, 18) -> box (0, 0, 30, 30), area 900,
         logit 2 -> score sqrt(sigmoid(2)) = sqrt(0.880797) = 0.938508;
      B: cell (1, 3), point (28, 12), ltrb (18, 12, 22, 18) -> box (10, 0, 50, 30), area 1200,
         logit 1 -> score sqrt(0.731059) = 0.855020.
    Clipped to the padded batch (x <= 64) B keeps its extent: intersection with A (10, 0, 30, 30) =
    600, union 900 + 1200 - 600 = 1500, IoU 0.4 <= 0.6: both kept. Clipped to image 0 (x <= 32), B
    is (10, 0, 32, 30), area 660: union 900 + 660 - 600 = 960, IoU 0.625 > 0.6: NMS keeps A only."""
    model = build_model(tiny("fcos", **ORIGINAL)).eval()
    images = torch.zeros(2, 3, 64, 64)
    with torch.no_grad():
        out = model.heads(images)
        out["cls"] = torch.full_like(out["cls"], -20.0)
        out["centerness"] = torch.full_like(out["centerness"], 20.0)
        out["cls"][0, 9, 1], out["cls"][0, 11, 1] = 2.0, 1.0
        out["ltrb"][0, 9] = torch.tensor([12.0, 12, 18, 18])
        out["ltrb"][0, 11] = torch.tensor([18.0, 12, 22, 18])
        own = model.decode(out, (64, 64), image_sizes=[(64, 32), (64, 64)])
        padded = model.decode(out, (64, 64))
    assert own[0]["boxes"].tolist() == [[0.0, 0.0, 30.0, 30.0]]
    assert own[0]["scores"].tolist() == pytest.approx([0.938508], abs=1e-6) and own[0]["labels"].tolist() == [1]
    assert padded[0]["boxes"].tolist() == [[0.0, 0.0, 30.0, 30.0], [10.0, 0.0, 50.0, 30.0]]
    assert padded[0]["scores"].tolist() == pytest.approx([0.938508, 0.855020], abs=1e-6)
    assert len(own[1]["boxes"]) == len(padded[1]["boxes"]) == 0
    # the eval-mode call takes the sizes too (eval.py hands it each target's "size")
    with torch.no_grad():
        model.heads = lambda images: out
        assert model(images, image_sizes=[(64, 32), (64, 64)])[0]["boxes"].tolist() == [[0.0, 0.0, 30.0, 30.0]]


def test_original_fcos_targets_and_losses_by_hand():
    """Guards the original FCOS's training ([IS 3.1]: every location in a box a candidate; FCOS's
    IoU loss weighted by the centerness target, as its code). 64 x 64 input, one box
    (4, 4, 44, 20), centre (24, 12). P3 locations (8j + 4) strictly inside: x in {12, 20, 28, 36},
    y = 12, ltrb (8, 8, 32, 8), (16, 8, 24, 8), (24, 8, 16, 8), (32, 8, 8, 8), max <= 64: 4
    positives (P4's (8, 8) has max 28 < 64: none). Centre sampling 1.5 would keep x in
    (24 - 12, 24 + 12) only: 20 and 28.
    Predicted ltrb (16, 16, 16, 16) everywhere (area 32 * 32 = 1024):
      (8, 8, 32, 8): area 40 * 16 = 640, overlap (8 + 16) * (8 + 8) = 384, union 1280 ->
        -log(385 / 1281) = 1.20215; centerness sqrt(8/32 * 8/8) = 0.5
      (16, 8, 24, 8): area 640, overlap (16 + 16) * 16 = 512, union 1152 -> -log(513 / 1153) =
        0.80985; centerness sqrt(16/24) = 0.81650; the other two are their mirror images
      box loss = (2 * 0.5 * 1.20215 + 2 * 0.81650 * 0.80985) / (2 * 0.5 + 2 * 0.81650)
               = (1.20215 + 1.32248) / 2.63299 = 0.95884
    Centerness logits 0: BCE = log 2 whatever the target -> 4 log 2 / 4 positives = 0.69315."""
    model = build_model(tiny("fcos", **ORIGINAL))
    hw = [(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)]
    points, strides, _ = fcos_locations(hw, model.strides)
    P = len(points)
    targets = [{"boxes": torch.tensor([[4., 4, 44, 20]]), "labels": torch.tensor([1])}]
    out = {"cls": torch.zeros(1, P, 3), "ltrb": torch.full((1, P, 4), 16.0), "centerness": torch.zeros(1, P), "hw": hw}
    losses, t = model.detection_losses(out, points, strides, targets)
    pos = (t["matched"][0] >= 0).nonzero()[:, 0]
    assert points[pos].tolist() == [[12, 12], [20, 12], [28, 12], [36, 12]] and (strides[pos] == 8).all()
    assert t["labels"][0, pos].tolist() == [1] * 4
    assert t["centerness"][0, pos].tolist() == pytest.approx([0.5, 0.81650, 0.81650, 0.5], abs=1e-5)
    assert losses["box"].item() == pytest.approx(0.95884, abs=1e-5)
    assert losses["centerness"].item() == pytest.approx(math.log(2), abs=1e-6)
    sampled = build_model(tiny("fcos", fcos_form="improved"))       # centre sampling 1.5
    t = sampled.detection_losses(out, points, strides, targets)[1]
    assert points[t["matched"][0] >= 0].tolist() == [[20, 12], [28, 12]]


# -- parity with torchvision's FCOS -----------------------------------------------------------------

def test_assignment_and_losses_match_torchvision_fcos():
    """Guards our positive-location assignment and the focal / GIoU / centerness losses against
    torchvision's FCOS on the same points, boxes and head outputs. Known convention differences,
    made equal here: (1) torchvision's locations are at j*s (its anchors), ours at j*s + s//2 -
    we hand torchvision anchors centred on OUR points; (2) torchvision's size bounds are strict,
    ours inclusive - random float boxes never hit a bound exactly; (3) torchvision's GIoU loss is
    unweighted over N_pos, ours is weighted by the centerness target over its sum ([FCOS]'s
    code) - we compare torchvision's with the unweighted GIoU mean of OUR decoded boxes, and our
    weighted one with the same per-box values re-weighted by hand."""
    from torchvision.models.detection import FCOS as TVFCOS
    from torchvision.ops import generalized_box_iou_loss
    torch.manual_seed(3)
    cfg = tiny("fcos", fcos_form="improved")
    model = build_model(cfg)
    H = W = 256
    hw = [(H // s, W // s) for s in model.strides]
    points, strides, levels = fcos_locations(hw, model.strides)
    P, C = len(points), cfg.num_classes
    xy = torch.rand(6, 2) * 200
    wh = torch.rand(6, 2) * 150 + 8
    boxes = torch.cat([xy, (xy + wh).clamp(max=255)], 1)
    targets = [{"boxes": boxes[:4], "labels": torch.tensor([0, 1, 2, 1])},
               {"boxes": boxes[4:], "labels": torch.tensor([2, 2])}]
    out = {"cls": torch.randn(2, P, C), "ltrb": torch.rand(2, P, 4) * 60 + 1, "centerness": torch.randn(2, P), "hw": hw}

    class Backbone(torch.nn.Module):
        out_channels = 32  # GroupNorm(32) in torchvision's head
    tv = TVFCOS(Backbone(), num_classes=C, center_sampling_radius=1.5)
    captured = []
    original = tv.head.compute_loss
    tv.head.compute_loss = lambda t, o, a, m: (captured.append(m), original(t, o, a, m))[1]
    anchors = [torch.cat([points - strides[:, None] / 2, points + strides[:, None] / 2], 1)] * 2
    head_outputs = {"cls_logits": out["cls"], "bbox_regression": out["ltrb"] / strides[None, :, None],
                    "bbox_ctrness": out["centerness"][..., None]}
    ref = tv.compute_loss(targets, head_outputs, anchors, [h * w for h, w in hw])

    ours, t = model.detection_losses(out, points, strides, targets)
    assert torch.equal(t["matched"], torch.stack(captured[0]))
    assert (t["matched"] >= 0).sum() > 20  # a real test: many positives
    assert ours["cls"].item() == pytest.approx(ref["classification"].item(), rel=1e-5)
    assert ours["centerness"].item() == pytest.approx(ref["bbox_ctrness"].item(), rel=1e-5)
    pos = t["matched"] >= 0
    p = points[None].expand(2, P, 2)[pos]
    pred = torch.cat([p - out["ltrb"][pos][:, :2], p + out["ltrb"][pos][:, 2:]], 1)
    gt = torch.cat([p - t["ltrb"][pos][:, :2], p + t["ltrb"][pos][:, 2:]], 1)
    per_box = generalized_box_iou_loss(pred, gt, reduction="none")
    assert per_box.mean().item() == pytest.approx(ref["bbox_regression"].item(), rel=1e-5)
    w = t["centerness"][pos]
    assert ours["box"].item() == pytest.approx(((per_box * w).sum() / w.sum()).item(), rel=1e-5)


# -- MaskFCOS pieces --------------------------------------------------------------------------------

def test_maskfcos_level_rule():
    """Guards [IS] eq. 4, k = floor(4 + log2(sqrt(wh)/224)) clamped to 3..5: 224x224 -> 4 + 0 = 4
    (P4); 448x448 -> 4 + 1 = 5 (P5); 223x223 -> floor(3.99) = 3 (P3); 447x447 -> 4; 10x10 ->
    floor(-0.48) clamped to 3; 2000x2000 -> floor(7.16) clamped to 5; 112x448 (sqrt = 224) -> 4."""
    sizes = [(224, 224), (448, 448), (223, 223), (447, 447), (10, 10), (2000, 2000), (112, 448)]
    boxes = torch.tensor([[5., 7, 5 + w, 7 + h] for w, h in sizes])
    assert maskfcos_levels(boxes).tolist() == [4, 5, 3, 4, 3, 5, 4]


def test_mask_targets_from_roi_align_by_hand():
    """Guards the RoIAlign mask targets (aligned=True, sampling ratio 2). An 8x8 mask whose left
    half (cols 0-3) is 1. Box (0, 0, 8, 8) at 2x2: the left bins average cols 0-3 -> 1, the right
    cols 4-7 -> 0. Box (2, 0, 6, 8) at 2x2: bin width 2, samples at x = 2.5+-0.5 -> pixel centres
    of cols 2 and 3 (1) for the left bin, cols 4 and 5 (0) for the right. Box (3, 0, 5, 8) at
    1x1: samples at x = 3.5 and 4.5 -> pixel centres of cols 3 (1) and 4 (0) -> 0.5."""
    m = torch.zeros(1, 8, 8)
    m[0, :, :4] = 1
    t = mask_targets(m, torch.tensor([0, 0]), torch.tensor([[0., 0, 8, 8], [2, 0, 6, 8]]), 2)
    assert t.tolist() == [[[1, 0], [1, 0]], [[1, 0], [1, 0]]]
    assert mask_targets(m, torch.tensor([0]), torch.tensor([[3., 0, 5, 8]]), 1).item() == pytest.approx(0.5)


def test_paste_masks_into_boxes():
    """Guards pasting: a 2x2 mask [[1, 0], [0, 1]] stretched over the box (2, 2, 6, 6) of an 8x8
    image: pixel (2, 2) samples the top-left cell centre region -> 1, pixel (5, 5) -> 1, pixel
    (5, 2) -> 0, everything outside the box -> 0 (border clamp inside, zero outside)."""
    out = paste_masks(torch.tensor([[[1., 0], [0, 1]]]), torch.tensor([[2., 2, 6, 6]]), (8, 8))[0]
    assert out[2, 2] == 1 and out[5, 5] == 1 and out[2, 5] == 0 and out[5, 2] == 0
    assert out[:2].sum() == 0 and out[6:].sum() == 0 and out[:, :2].sum() == 0 and out[:, 6:].sum() == 0
    # pixel (row 3, col 4), centre (4.5, 3.5): source u = (4.5 - 2) / 4 * 2 - 0.5 = 0.75 (x),
    # (3.5 - 2) / 4 * 2 - 0.5 = 0.25 (y); bilinear (1 - .25)(1 - .75) * 1 + .25 * .75 * 1 = 0.375
    assert out[3, 4].item() == pytest.approx(0.375, abs=1e-6)


# -- CenterMask-FCOS pieces -------------------------------------------------------------------------

def test_conv3x3_at_equals_the_full_conv():
    """Guards the at-location shape head: a 3x3 conv evaluated only at chosen cells equals the
    full convolution read there, at borders (zero padding) and inside."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(5, 7, 3, padding=1)
    f = torch.randn(2, 5, 6, 4)
    batch, ys, xs = torch.tensor([0, 1, 1, 0]), torch.tensor([0, 5, 2, 3]), torch.tensor([0, 3, 1, 3])
    ref = conv(f)[batch, :, ys, xs]
    assert torch.allclose(conv3x3_at(conv, f, batch, ys, xs), ref, atol=1e-6)



@pytest.mark.parametrize("kw", [dict(), dict(saliency="specific", saliency_loss=True)])
def test_centermask_fcos_fast_paths_equal_plain(kw):
    """Guards `CenterMaskFCOS.fast`: the shape head evaluated only at the locations read
    (`conv3x3_at`) and the resize as matrix products (`stretch_to_boxes`) give the numbers of the
    dense shape map and grid_sample: the losses, every gradient and the inference masks (BatchNorm
    in eval mode, so that both passes normalise alike). Only float rounding differs."""
    torch.manual_seed(0)
    model = build_model(tiny("centermask_fcos", score_threshold=0.0, max_detections=7, **kw))
    from test_model import assert_fast_equals_plain
    masks = assert_fast_equals_plain(model, *toy_batch())
    assert all(len(m) for m in masks)


# -- models ---------------------------------------------------------------------------------------

def train_steps(model, images, targets, steps=40):
    """`steps` Adam steps (lr 1e-3) on one fixed batch, asserting finite losses at every step;
    returns the first and the last step's losses as floats."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    first = None
    for _ in range(steps):
        losses = model(images, targets)
        assert all(torch.isfinite(v) for v in losses.values()), losses
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
        first = first or {k: v.item() for k, v in losses.items()}
    return first, {k: v.item() for k, v in losses.items()}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fcos", "fcosreg", "maskfcos", "centermask_fcos"])
def test_every_method_learns_a_toy_batch(method):
    """Guards the whole training path of each method (targets, losses, backward, optimiser):
    40 Adam steps on one fixed batch (an empty image included) must cut the total loss by at
    least half, and every loss term must stay finite."""
    torch.manual_seed(0)
    first, losses = train_steps(build_model(tiny(method)), *toy_batch())
    assert losses["loss"] < 0.5 * first["loss"], (method, first, losses)
    expected = {"cls", "box", "centerness", "loss"} | ({"mask"} if "mask" in method else set())
    assert set(losses) == expected


@pytest.mark.slow
def test_original_fcos_learns_a_toy_batch():
    """Guards the original FCOS's training path end to end (exp regression, IoU loss, centerness
    on the classification tower, no centre sampling): as test_every_method_learns_a_toy_batch,
    40 Adam steps halve the loss, every term finite."""
    torch.manual_seed(0)
    first, losses = train_steps(build_model(tiny("fcos", **ORIGINAL)), *toy_batch())
    assert losses["loss"] < 0.5 * first["loss"], (first, losses)


@pytest.mark.parametrize("method", ["fcos", "maskfcos", "centermask_fcos"])
def test_inference_outputs(method):
    """Guards the inference contract (eval mode): per image boxes (K, 4) inside the input,
    scores in (0, 1] sorted, labels < C, masks (K, H, W) in [0, 1] for the mask methods; at most
    max_detections; score_threshold 0 so that an untrained model detects something."""
    torch.manual_seed(0)
    model = build_model(tiny(method, score_threshold=0.0, max_detections=7)).eval()
    images, _ = toy_batch()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2
    for d in out:
        K = len(d["boxes"])
        assert 0 < K <= 7 and d["boxes"].shape == (K, 4) and d["labels"].max() < 3
        assert (d["boxes"][:, 2:] >= d["boxes"][:, :2]).all() and d["boxes"][:, 2].max() <= 96
        assert (d["scores"][:-1] >= d["scores"][1:]).all() and d["scores"].max() <= 1
        if method != "fcos":
            assert d["masks"].shape == (K, 128, 96) and 0 <= d["masks"].min() and d["masks"].max() <= 1
        else:
            assert "masks" not in d


def test_empty_batch_gives_finite_losses_and_gradients_everywhere():
    """Guards images with no objects (valid input) and DDP's need for a gradient on every parameter:
    a batch with no boxes at all gives finite losses, and the mask branches stay in the graph."""
    for method in ("maskfcos", "centermask_fcos", "fcosreg"):
        model = build_model(tiny(method))
        images, targets = toy_batch()
        losses = model(images, [targets[1], targets[1]])
        assert all(torch.isfinite(v) for v in losses.values())
        losses["loss"].backward()
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert not missing, (method, missing[:5])


def test_centermask_fcos_table_1f_saliency_loss_by_hand():
    """Guards [CM] Table 1f on CenterMask-FCOS (the COCO config's setting): BCE of the class-specific
    saliency on P3 against the per-class union of the masks average-pooled to P3's grid, the mean
    over B x C x h x w. Two 64 x 64 images (the second without objects), C = 2, P3 8 x 8: 256
    cells. One object of class 1, mask rows 0-15, columns 0-11: pooled cells (0, 0) and (1, 0) 1,
    (0, 1) and (1, 1) 0.5 (4 of 8 columns), every other cell and channel 0: sum of targets 3.
    The saliency head's last conv outputs its bias: channel 0 z0 = -1, channel 1 z1 = 2. BCE of
    logit z against t is softplus(z) - t z, so the loss is
        (128 softplus(-1) + 128 softplus(2) - 2 * 3) / 256
      = (128 * 0.3132617 + 128 * 2.1269280 - 6) / 256 = 306.344282 / 256 = 1.1966574.
    The same batch without objects keeps the key (every forward has the same loss keys) and the
    head in the graph."""
    model = build_model(tiny("centermask_fcos", num_classes=2, saliency="specific", saliency_loss=True)).train()
    with torch.no_grad():
        model.saliency[2].weight.zero_()
        model.saliency[2].bias.copy_(torch.tensor([-1.0, 2.0]))
    masks = torch.zeros(1, 64, 64, dtype=torch.uint8)
    masks[0, :16, :12] = 1
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long),
             "masks": torch.zeros(0, 64, 64, dtype=torch.uint8)}
    one = {"boxes": torch.tensor([[0.0, 0, 12, 16]]), "labels": torch.tensor([1]), "masks": masks}
    images = torch.randn(2, 3, 64, 64)
    losses = model(images, [one, empty])
    assert losses["saliency"].item() == pytest.approx(1.1966574, abs=1e-6)
    assert losses["loss"].item() == pytest.approx(sum(v.item() for k, v in losses.items() if k != "loss"), abs=1e-5)
    none = model(images, [empty, empty])
    assert set(none) == set(losses)
    assert none["saliency"].item() == pytest.approx((128 * 0.3132617 + 128 * 2.1269280) / 256, abs=1e-6)
    none["loss"].backward()
    assert model.saliency[2].bias.grad is not None and model.saliency[2].bias.grad.abs().sum() > 0


def test_table_3_switches_build_on_the_fcosis_coco_config():
    """Guards config/fcosis_r50.py's ablations ([IS] Table 3): each row is one key on top of the
    config (attention "mu0" / "bbox" / "none", and the paper's "segm"), which passes train.py's
    checks and builds. And CenterMask-FCOS's COCO config runs class-specific saliency with Table 1f's
    loss, as the DLA-34 and Hourglass-104 configs ([CM] Table 1e / 1f)."""
    import dataclasses
    import os
    root = os.path.join(os.path.dirname(__file__), "..")

    def config(name):
        ns = {"__file__": os.path.join(root, "config", name)}
        exec(open(os.path.join(root, "config", name)).read(), ns)
        return {f.name: ns.get(f.name, f.default) for f in dataclasses.fields(ModelConfig)}

    fcosis = config("fcosis_r50.py")
    for attention in ("segm", "mu0", "bbox", "none"):
        cfg = check_settings({**fcosis, "attention": attention, "num_classes": 80, "pretrained": False})
        with torch.device("meta"):
            model = build_model(cfg)
        assert (model.attention is None) == (attention == "none")
        assert hasattr(model.attention, "mu") == (attention != "none")
    cm = check_settings({**config("centermask_fcos_r101.py"), "num_classes": 80, "pretrained": False})
    assert cm.saliency == "specific" and cm.saliency_loss


def test_resnet_fpn_levels_and_freezing():
    """Guards the FPN outputs P3-P7 (FCOS) / P2-P7 (FCOSIS) at strides 2^k, P6/P7 rounded up,
    and freeze_at=2 (stem and res2 frozen, as FCOS) with frozen BatchNorm."""
    from torchvision.ops import FrozenBatchNorm2d
    net = ResNetFPN("resnet18", first_level=3, channels=16, norm="frozen_bn", freeze_at=2)
    outs = net(torch.randn(1, 3, 96, 160))
    assert [tuple(o.shape[-2:]) for o in outs] == [(12, 20), (6, 10), (3, 5), (2, 3), (1, 2)]
    assert net.strides == [8, 16, 32, 64, 128]
    assert not any(p.requires_grad for p in net.stem.parameters())
    assert not any(p.requires_grad for p in net.stages[0].parameters())
    assert all(p.requires_grad for p in net.stages[1].parameters())
    assert isinstance(net.stem[1], FrozenBatchNorm2d)
    net2 = ResNetFPN("resnet18", first_level=2, channels=16, norm="bn", freeze_at=0)
    outs = net2(torch.randn(1, 3, 64, 64))
    assert [o.shape[-1] for o in outs] == [16, 8, 4, 2, 1, 1] and net2.strides[0] == 4


def test_pretrained_offline_error_names_the_option(monkeypatch):
    """Guards the offline behaviour: asking for ImageNet weights with no network must fail with
    a message naming the option that turns them off (not a bare URLError)."""
    from torchvision.models._api import WeightsEnum

    def no_network(self, *a, **k):
        raise URLError("no network")
    monkeypatch.setattr(WeightsEnum, "get_state_dict", no_network)
    with pytest.raises(OSError, match="pretrained=False"):
        build_model(tiny("fcos", pretrained=True))


def test_parameter_count_of_fcos_r50():
    """Guards the architecture of FCOS R-50-FPN against torchvision's fcos_resnet50_fpn, the same
    network (ResNet-50, FPN P3-P7 with P6/P7 from P5, 4-conv GN towers, centerness on the box
    tower): 32,322,720 parameters in torchvision for 91 classes built without weights (then it
    uses trainable BatchNorm, whose 53,120 affine parameters are buffers in FrozenBatchNorm2d);
    ours with norm="bn" has one Scale per level more (+5) and otherwise the same layers."""
    from torchvision.models.detection import fcos_resnet50_fpn
    ref = sum(p.numel() for p in fcos_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91).parameters())
    ours = sum(p.numel() for p in build_model(ModelConfig(method="fcos", backbone="resnet50", num_classes=91,
                                                                      norm="bn")).parameters())
    assert ours == ref + 5


@pytest.mark.parametrize("name", sorted(f for f in __import__("os").listdir(
    __import__("os").path.join(__import__("os").path.dirname(__file__), "..", "config")) if f.endswith(".py")))
def test_every_config_file_has_known_keys_and_builds(name):
    """Guards config/*.py: a typo in a key would only be caught by the configurator at launch,
    and a model key combination ModelConfig refuses (e.g. method on the wrong backbone) only
    when the model is built. Every key must be a train.py or ModelConfig key, and the model
    keys must pass train.py's check (configurator.check_settings: no key the method does not read) and
    build (on the meta device: no memory, no weights download)."""
    import os
    import re
    root = os.path.join(os.path.dirname(__file__), "..")
    ns = {"__file__": os.path.join(root, "config", name)}   # as configurator.py runs it
    exec(open(os.path.join(root, "config", name)).read(), ns)
    ns = {k: v for k, v in ns.items() if not k.startswith("_") and not isinstance(v, type(os))}
    train_keys = set(re.findall(r"^(\w+) = ", open(os.path.join(root, "train.py")).read(), re.M))
    model_keys = set(ModelConfig.__dataclass_fields__)
    assert set(ns) <= train_keys | model_keys, set(ns) - train_keys - model_keys
    settings = {**{f.name: f.default for f in __import__("dataclasses").fields(ModelConfig)},
                **{k: v for k, v in ns.items() if k in model_keys}, "num_classes": 80}
    check_settings(settings)                      # train.py's check: no key its method does not read
    cfg = ModelConfig(**{**settings, "pretrained": False})
    with torch.device("meta"):
        model = build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) > 0
