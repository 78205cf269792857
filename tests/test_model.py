"""Hand-computed checks of the CenterNet / CenterMask formulas and the DLA-34 backbone."""
import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import deform_conv2d

from model import (ModelConfig, build_model, gaussian_radius, centernet_focal_loss,
                   centernet_heatmaps, flatten_targets, image_index, first_box_index, l1_at_centers, DLASeg,
                   DeformConv, CenterMask)


def tiny_cfg(**kw):
    kw.setdefault("num_classes", 3)
    kw.setdefault("dcn", False)
    kw.setdefault("dla_channels", (4, 8, 8, 16, 16, 32))
    kw.setdefault("head_conv", 8)
    kw.setdefault("shape_size", 8)
    return ModelConfig(**kw)


# -- gaussian_radius -------------------------------------------------------------------------

def test_gaussian_radius_cornernet_bug_10x10():
    """Guards the shipped CenterNet radius (all published numbers used it).
    h = w = 10, m = 0.7, buggy r_i = (b_i + sqrt(b_i^2 - 4 a_i c_i)) / 2:
      case 1: b=20, c=100*0.3/1.7=17.647, sqrt(400-70.588)=18.150 -> r1=19.075
      case 2: b=40, c=30, sqrt(1600-4*4*30)=sqrt(1120)=33.466 -> r2=36.733
      case 3: a=2.8, b=-14*2=-28, c=-30, sqrt(784+4*2.8*30)=sqrt(1120)=33.466 -> r3=2.733
    min = 2.733."""
    assert gaussian_radius(10, 10, 0.7, cornernet_bug=True) == pytest.approx(2.7332, abs=1e-3)


def test_gaussian_radius_corrected_10x10():
    """Guards the corrected quadratic roots behind cornernet_bug=False.
      r1 = (20 - 18.1497) / 2 = 0.9252, r2 = (40 - 33.4664) / 8 = 0.8167,
      r3 = (28 + 33.4664) / (2 * 2.8) = 10.976 -> min = 0.8167.
    Check: shrinking both corners of a 10x10 box by r2 inward gives IoU (10-2r)^2/100 = 0.7."""
    r = gaussian_radius(10, 10, 0.7, cornernet_bug=False)
    assert r == pytest.approx(0.8167, abs=1e-3)
    assert (10 - 2 * r) ** 2 / 100 == pytest.approx(0.7, abs=1e-6)


def test_gaussian_radius_tensor_matches_float():
    """Guards the batched (tensor) path against drifting from the scalar formula."""
    hs, ws = torch.tensor([10.0, 3.0, 40.0]), torch.tensor([10.0, 7.0, 20.0])
    for bug in (True, False):
        rt = gaussian_radius(hs, ws, 0.7, bug)
        for i in range(3):
            assert rt[i].item() == pytest.approx(gaussian_radius(hs[i].item(), ws[i].item(), 0.7, bug), rel=1e-5)


# -- draw_gaussian / batched heatmaps -------------------------------------------------------

def draw_gaussian(heatmap, center, radius):
    """Splat one object onto a (H, W) heatmap in place (CenterNet's `draw_umich_gaussian`):
    heatmap[y, x] = max(heatmap[y, x], exp(-((x-cx)^2 + (y-cy)^2) / (2 sigma^2))) for |x - cx|, |y - cy| <= r,
    sigma = (2r + 1) / 6, (cx, cy) the integer centre, where it is exactly 1 (the focal loss's positive).
    The one-object reference of model.centernet_heatmaps, the same formula for all objects at once."""
    cx, cy, r = int(center[0]), int(center[1]), int(radius)
    sigma = (2 * r + 1) / 6
    H, W = heatmap.shape
    ys = torch.arange(max(0, cy - r), min(H, cy + r + 1), device=heatmap.device)
    xs = torch.arange(max(0, cx - r), min(W, cx + r + 1), device=heatmap.device)
    if len(ys) == 0 or len(xs) == 0:
        return heatmap
    g = torch.exp(-((xs[None, :] - cx) ** 2 + (ys[:, None] - cy) ** 2) / (2 * sigma ** 2))
    window = heatmap[ys[0]:ys[-1] + 1, xs[0]:xs[-1] + 1]
    torch.maximum(window, g.to(heatmap.dtype), out=window)
    return heatmap


def test_draw_gaussian_peak_and_sigma():
    """Guards the peak value (must be exactly 1: the focal loss positive) and sigma=(2r+1)/6.
    r = 1 -> sigma = 0.5, 2 sigma^2 = 0.5: side neighbour exp(-1/0.5) = exp(-2) = 0.1353,
    diagonal exp(-2/0.5) = exp(-4) = 0.0183, distance 2 is outside the window -> 0."""
    hm = torch.zeros(7, 7)
    draw_gaussian(hm, (3, 3), 1)
    assert hm[3, 3].item() == 1.0
    assert hm[3, 4].item() == pytest.approx(math.exp(-2), rel=1e-6)
    assert hm[2, 2].item() == pytest.approx(math.exp(-4), rel=1e-6)
    assert hm[3, 5].item() == 0.0
    assert (hm > 0).sum().item() == 9


def test_draw_gaussian_max_and_border():
    """Guards the element-wise max (not sum) of overlapping objects and clipping at the border."""
    hm = torch.zeros(5, 5)
    draw_gaussian(hm, (0, 0), 2)
    draw_gaussian(hm, (1, 0), 2)
    assert hm.max().item() == 1.0 and hm[0, 0].item() == 1.0 and hm[0, 1].item() == 1.0


def test_batched_heatmaps_equal_draw_gaussian():
    """Guards the batched target builder against the one-object reference, with two images,
    same-class overlap (max) and different classes."""
    targets = [
        {"boxes": torch.tensor([[4.0, 4.0, 44.0, 36.0], [20.0, 8.0, 60.0, 40.0]]), "labels": torch.tensor([1, 1])},
        {"boxes": torch.tensor([[0.0, 0.0, 12.0, 12.0]]), "labels": torch.tensor([2])},
    ]
    objs = flatten_targets(targets, 4)
    heat = centernet_heatmaps(objs, 2, 3, 16, 16)
    ref = torch.zeros(2, 3, 16, 16)
    for b, t in enumerate(targets):
        for box, lab in zip(t["boxes"] / 4, t["labels"]):
            w, h = (box[2] - box[0]).item(), (box[3] - box[1]).item()
            r = max(0, int(gaussian_radius(math.ceil(h), math.ceil(w), 0.7)))
            c = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
            draw_gaussian(ref[b, lab], (int(c[0]), int(c[1])), r)
    torch.testing.assert_close(heat, ref)


def test_heatmaps_flip_equivariant():
    """Guards an x/y mix-up or an off-by-one in the heatmap targets: mirroring the boxes of a
    W = 64 image (x -> 64 - x) must mirror the heatmap. Centres are put at cell centres
    ((j + 0.5) * 4 px) so that floor() maps cell j to cell 15 - j exactly."""
    boxes = torch.tensor([[6.0, 6.0, 30.0, 30.0], [22.0, 10.0, 54.0, 62.0]])  # centre x = 4.5 and 9.5 cells
    flipped = boxes[:, [2, 1, 0, 3]] * torch.tensor([-1.0, 1.0, -1.0, 1.0]) + torch.tensor([64.0, 0.0, 64.0, 0.0])
    maps = []
    for b in (boxes, flipped):
        objs = flatten_targets([{"boxes": b, "labels": torch.tensor([0, 1])}], 4)
        maps.append(centernet_heatmaps(objs, 1, 2, 16, 16))
    torch.testing.assert_close(maps[1], maps[0].flip(-1))


def test_flat_layout_index_conversions():
    """Guards the flat layout of a batch's objects: with 2, 0 and 1 boxes, batch = [0, 0, 2]
    (repeat_interleave of the image ids by the counts) and each image's first flat index is
    [0, 2, 2], so box n of image b is flat object first[b] + n (box 0 of image 2 -> 2)."""
    targets = [{"boxes": torch.zeros(2, 4), "labels": torch.tensor([1, 0])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},
               {"boxes": torch.ones(1, 4), "labels": torch.tensor([2])}]
    batch = image_index([2, 0, 1])
    assert batch.dtype == torch.int64 and batch.tolist() == [0, 0, 2]
    assert torch.equal(batch, torch.repeat_interleave(torch.arange(3), torch.tensor([2, 0, 1])))
    assert torch.equal(flatten_targets(targets, 4)["batch"], batch)
    first = first_box_index(targets, "cpu")
    assert first.tolist() == [0, 2, 2]
    assert flatten_targets(targets, 4)["labels"][first[2] + 0].item() == 2


# -- losses ----------------------------------------------------------------------------------

def test_focal_loss_hand_computed():
    """Guards eq. 3 and its normaliser. logits 0 -> p = 0.5 everywhere; gt = [1, 0.5]:
      positive:  (1-0.5)^2 log 0.5 = 0.25 * -0.693147 = -0.173287
      negative:  (1-0.5)^4 * 0.5^2 * log 0.5 = 0.0625 * 0.25 * -0.693147 = -0.010830
      N = 1 -> loss = 0.173287 + 0.010830 = 0.184117"""
    loss = centernet_focal_loss(torch.zeros(1, 1, 1, 2), torch.tensor([[[[1.0, 0.5]]]]))
    assert loss.item() == pytest.approx(0.184117, abs=1e-5)


def test_focal_loss_no_positive_not_normalised():
    """Guards the empty-image case (finite, un-normalised negative term).
    gt = [0.5, 0]: 0.010830 + (1-0)^4 * 0.25 * 0.693147 = 0.010830 + 0.173287 = 0.184117."""
    loss = centernet_focal_loss(torch.zeros(1, 1, 1, 2), torch.tensor([[[[0.5, 0.0]]]]))
    assert loss.item() == pytest.approx(0.184117, abs=1e-5)


def test_l1_normalised_by_objects_and_coordinates():
    """Guards the CenterNet RegL1Loss normaliser (2N). Two objects, predictions (1, 2) and
    (3, 4) read at their centres, targets (0, 0) and (3, 2): |1|+|2|+|0|+|2| = 5, / (2*2) = 1.25."""
    pred = torch.zeros(1, 2, 4, 4)
    pred[0, :, 1, 2] = torch.tensor([1.0, 2.0])      # object 0 at cell (x=2, y=1)
    pred[0, :, 3, 0] = torch.tensor([3.0, 4.0])      # object 1 at cell (x=0, y=3)
    objs = {"batch": torch.tensor([0, 0]), "center_int": torch.tensor([[2, 1], [0, 3]])}
    loss = l1_at_centers(pred, objs, torch.tensor([[0.0, 0.0], [3.0, 2.0]]))
    assert loss.item() == pytest.approx(1.25, abs=1e-4)


# -- mask assembly ---------------------------------------------------------------------------

def test_mask_assembly_2x2():
    """Guards eq. 1 (M = sigmoid(L) * sigmoid(G)) and the resize of the S x S shape to the box.
    S = 2, box = the whole 2x2 output map, so each pixel centre falls on one shape cell:
      sigmoid(L) = [[.5, .75], [.25, .5]]   (logits 0, ln 3, -ln 3, 0)
      sigmoid(G) = [[.5, .5], [.75, .25]]   (logits 0, 0, ln 3, -ln 3)
      M          = [[.25, .375], [.1875, .125]]"""
    m = CenterMask(tiny_cfg(shape_size=2))
    ln3 = math.log(3)
    out = {"shape": torch.tensor([0.0, ln3, -ln3, 0.0]).view(1, 4, 1, 1).expand(1, 4, 2, 2).contiguous(),
           "saliency": torch.tensor([[0.0, 0.0], [ln3, -ln3]]).view(1, 1, 2, 2)}
    masks = m.assemble(out, torch.tensor([0]), torch.tensor([[1, 1]]), torch.tensor([[0.0, 0.0, 2.0, 2.0]]),
                       torch.tensor([0]), (2, 2), 1.0)
    torch.testing.assert_close(masks[0], torch.tensor([[0.25, 0.375], [0.1875, 0.125]]))


def test_mask_zero_outside_box():
    """Guards the crop: pixels whose centre is outside the box get mask 0."""
    m = CenterMask(tiny_cfg(shape_size=2))
    out = {"shape": torch.zeros(1, 4, 4, 4), "saliency": torch.zeros(1, 1, 4, 4)}
    masks = m.assemble(out, torch.tensor([0]), torch.tensor([[1, 1]]), torch.tensor([[0.0, 0.0, 2.0, 2.0]]),
                       torch.tensor([0]), (4, 4), 1.0)
    assert masks[0, :2, :2].eq(0.25).all() and masks[0, 2:].eq(0).all() and masks[0, :, 2:].eq(0).all()


@pytest.mark.parametrize("grid,expected", [("output", 2.93322), ("input", 1.05990)])
def test_mask_loss_on_output_and_input_grid(grid, expected):
    """Guards eq. 2 on both grids (`mask_loss_grid`). One object, box (0, 0, 8, 8) input px =
    (0, 0, 2, 2) output units (R = 4), ground truth = input columns 3..7 (every row).
    S = 2 shape logits: column 0 -> -20, column 1 -> +20; saliency logit 0 (sigmoid 0.5), so
    M = 0.5 sigmoid(l) with l the stretched shape logit. BCE(l, t) = -t log M - (1-t) log(1-M).
    output grid: cell centres x = 0.5, 1.5 sit on the shape cells: l = -20, +20; targets are the
      4x4 average pools: 1/4 (one of four columns) and 1.
      BCE(-20, 1/4) = 1/4 (ln 2 + softplus(20)) + 3/4 * 0 = 5.17329; BCE(20, 1) = ln 2 = 0.69315;
      mean = 2.93322.
    input grid: pixel centres x = (j + 0.5)/4 = .125 ... 1.875; source coordinate
      u = clamp(x - 0.5, 0, 1) = 0, 0, .125, .375, .625, .875, 1, 1; l = -20 + 40 u =
      -20, -20, -15, -5, 5, 15, 20, 20; binary targets 0, 0, 0, 1, 1, 1, 1, 1.
      BCE: ~0, ~0, ~0, ln 2 + softplus(5) = 5.69985, ln 2 + softplus(-5) = 0.69987, ln 2 (x3)
      = 2.07944; sum 8.47917 / 8 = 1.05990."""
    m = CenterMask(tiny_cfg(shape_size=2, mask_loss_grid=grid))
    out = {"heatmap": torch.zeros(1, 3, 2, 2), "offset": torch.zeros(1, 2, 2, 2), "size": torch.zeros(1, 2, 2, 2),
           "shape": torch.tensor([-20.0, 20.0, -20.0, 20.0]).view(1, 4, 1, 1).expand(1, 4, 2, 2).contiguous(),
           "saliency": torch.zeros(1, 1, 2, 2)}
    mask = torch.zeros(1, 8, 8, dtype=torch.uint8)
    mask[:, :, 3:] = 1
    target = {"boxes": torch.tensor([[0.0, 0.0, 8.0, 8.0]]), "labels": torch.tensor([0]), "masks": mask}
    assert m.losses(out, [target])["mask"].item() == pytest.approx(expected, abs=1e-4)


# -- decoding --------------------------------------------------------------------------------

def test_decode_planted_peak():
    """Guards decoding: peak at cell (x=5, y=3) of class 1, offset (0.25, 0.5), size (4, 2)
    output px -> centre (5.25, 3.5) output = (21, 14) input (stride 4), box half-size (8, 4):
    (13, 10, 29, 18). Its score is sigmoid(5) = 0.99331; a non-maximum neighbour is suppressed."""
    m = CenterMask(tiny_cfg()).eval()
    out = {"heatmap": torch.full((1, 3, 8, 8), -10.0), "offset": torch.zeros(1, 2, 8, 8),
           "size": torch.ones(1, 2, 8, 8), "shape": torch.zeros(1, 64, 8, 8), "saliency": torch.zeros(1, 1, 8, 8)}
    out["heatmap"][0, 1, 3, 5] = 5.0
    out["heatmap"][0, 1, 3, 6] = 4.0                 # neighbour: not a local maximum
    out["offset"][0, :, 3, 5] = torch.tensor([0.25, 0.5])
    out["size"][0, :, 3, 5] = torch.tensor([4.0, 2.0])
    det = m.decode(out, (32, 32), k=5)[0]
    assert det["labels"][0].item() == 1
    assert det["scores"][0].item() == pytest.approx(1 / (1 + math.exp(-5)), abs=1e-5)
    torch.testing.assert_close(det["boxes"][0], torch.tensor([13.0, 10.0, 29.0, 18.0]))
    assert det["scores"][1].item() < 1e-3            # the neighbour at logit 4 was suppressed
    assert det["masks"].shape == (5, 32, 32)
    # inside the box the mask is sigmoid(0) * sigmoid(0) = 0.25, outside 0
    assert det["masks"][0, 10:18, 13:29].eq(0.25).all() and det["masks"][0].sum().item() == pytest.approx(0.25 * 16 * 8)


# -- backbone --------------------------------------------------------------------------------

def test_dla34_output_stride4_64ch():
    """Guards the DLA-up wiring: DLA-34 at full width ends at 64 channels, stride 4."""
    net = DLASeg(dcn=False)
    y = net(torch.randn(1, 3, 64, 96))
    assert y.shape == (1, 64, 16, 24)


def test_dla34_parameter_count():
    """Guards the DLA-34 layer layout against the published size: the ImageNet DLA-34 has
    15.8M parameters ([DLA] / timm / PaddleClas tables). Ours has no classifier (fc 512*1000 +
    1000 = 513,000) and omits CenterNet's two dead Tree projections (level3: 64*128 conv +
    2*128 BN = 8,448; level4: 128*256 + 2*256 = 33,280; total 41,728). So
    base + 513,000 + 41,728 must be 15.8M within rounding (0.5%). We measured 15,229,104 for the
    base (15.78M with the additions); DLA-up + final IDA-up with DCN add 3.94M (19.17M total)."""
    net = DLASeg(dcn=True)
    base = sum(p.numel() for p in net.base.parameters())
    assert abs(base + 513_000 + 41_728 - 15.8e6) / 15.8e6 < 0.005, base
    total = sum(p.numel() for p in net.parameters())
    assert 19.0e6 < total < 19.3e6, total


def test_deform_conv_zero_offset_unit_mask_is_conv():
    """Guards the DCN slot: deform_conv2d with zero offsets and a unit mask is a plain conv."""
    x, w, b = torch.randn(2, 5, 9, 7), torch.randn(6, 5, 3, 3), torch.randn(6)
    y = deform_conv2d(x, torch.zeros(2, 18, 9, 7), w, b, padding=1, mask=torch.ones(2, 9, 9, 7))
    torch.testing.assert_close(y, F.conv2d(x, w, b, padding=1), atol=1e-5, rtol=1e-5)


def test_deform_conv_init_is_half_conv():
    """Guards the zero-initialised offset/mask conv: at init the mask is sigmoid(0) = 0.5 and
    the offsets 0, so the DCN node equals BN(ReLU) of 0.5 * conv(x) + bias."""
    node = DeformConv(4, 6, dcn=True).eval()
    x = torch.randn(1, 4, 5, 5)
    conv = F.conv2d(x, node.conv.weight * 0.5, node.conv.bias, padding=1)
    torch.testing.assert_close(node(x), F.relu(node.bn(conv)), atol=1e-5, rtol=1e-5)


def test_deform_conv_under_cpu_bf16_autocast():
    """Guards the DCN slot under CPU bf16 autocast (train.py picks it on CPUs with native bf16):
    torchvision's CPU deform_conv2d has no bf16 kernel, so the node must run it in fp32.
    The result must match the fp32 node to bf16 precision."""
    node = DeformConv(4, 6, dcn=True).eval()
    x = torch.randn(1, 4, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = node(x)
    torch.testing.assert_close(y.float(), node(x), atol=0.05, rtol=0.05)


# -- whole model -----------------------------------------------------------------------------

def test_head_shapes():
    """Guards every head's channel count and the stride-4 resolution ([CM] Fig. 3)."""
    for sal, n in (("agnostic", 1), ("specific", 3)):
        m = build_model(tiny_cfg(saliency=sal))
        p = m.features(torch.randn(2, 3, 64, 32))[-1]
        out = m.head_sets[-1](p)
        assert out["heatmap"].shape == (2, 3, 16, 8)
        assert out["offset"].shape == out["size"].shape == (2, 2, 16, 8)
        assert out["shape"].shape == (2, 64, 16, 8)
        assert m.head_sets[-1](p, fast=True)["features"] is p   # fast: the head is read at cells
        assert out["saliency"].shape == (2, n, 16, 8)


def make_batch(B=2, H=64, W=64):
    targets = []
    for b in range(B):
        masks = torch.zeros(2, H, W, dtype=torch.uint8)
        masks[0, 8:30, 6:40] = 1
        masks[1, 30:60, 20:50] = 1
        targets.append({"boxes": torch.tensor([[6.0, 8.0, 40.0, 30.0], [20.0, 30.0, 50.0, 60.0]]),
                        "labels": torch.tensor([0, 2]), "masks": masks})
    return torch.randn(B, 3, H, W), targets


def test_empty_targets_finite_losses_and_all_grads():
    """Guards zero-instance images: every loss finite, and every parameter still gets a gradient
    (DDP needs one for each)."""
    m = build_model(tiny_cfg(saliency="specific", saliency_loss=True)).train()
    x = torch.randn(2, 3, 32, 32)
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long),
             "masks": torch.zeros(0, 32, 32, dtype=torch.uint8)}
    losses = m(x, [empty, dict(empty)])
    assert all(torch.isfinite(v) for v in losses.values())
    losses["loss"].backward()
    assert all(p.grad is not None for p in m.parameters())


def test_losses_are_batch_consistent():
    """Guards per-image indexing in the batched targets: two copies of one image in a batch give
    the same losses as the image alone (every loss is a mean over objects)."""
    m = build_model(tiny_cfg()).train()
    for mod in m.modules():          # BN in eval so the batch composition does not change stats
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.eval()
    x, t = make_batch(1)
    one = m(x, t)
    two = m(torch.cat([x, x]), t + t)
    for k in ("offset", "size", "mask", "heatmap"):
        assert one[k].item() == pytest.approx(two[k].item(), rel=1e-4), k


def run_both_paths(m, x, t):
    """Losses, every gradient and the inference masks of model m on (x, t), with its fast paths
    (`fast`) off and on; BatchNorm in eval mode, so that both passes normalise alike."""
    runs = []
    for fast in (False, True):
        m.fast = fast
        m.zero_grad()
        m.train()
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.eval()
        losses = m(x, t)
        losses["loss"].backward()
        grads = {n: q.grad.clone() for n, q in m.named_parameters() if q.grad is not None}
        with torch.no_grad():
            masks = [d["masks"] for d in m.eval()(x)]
        runs.append(({k: v.detach() for k, v in losses.items()}, grads, masks))
    return runs


def assert_fast_equals_plain(m, x, t):
    """`run_both_paths`, then the same numbers up to float rounding: losses, every gradient,
    masks. Returns the fast path's masks."""
    (plain_losses, plain_grads, plain_masks), (losses, grads, masks) = run_both_paths(m, x, t)
    for k in plain_losses:
        assert torch.allclose(losses[k], plain_losses[k], rtol=1e-6, atol=1e-7), k
    assert grads.keys() == plain_grads.keys()
    # the backbone's gradients sum many terms: rounding relative to their scale; a bias before a
    # normalisation has the gradient 0 up to rounding (1e-9 to 1e-8 with two threads), relative to
    # the model's largest gradient
    top = max(g.abs().max().item() for g in plain_grads.values())
    for n in grads:
        scale = plain_grads[n].abs().max().item()
        atol = 1e-5 * scale + 1e-6 * top
        assert torch.allclose(grads[n], plain_grads[n], rtol=1e-5, atol=atol), n
    for a, b in zip(masks, plain_masks):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    return masks


@pytest.mark.parametrize("kw", [dict(), dict(use_saliency=False), dict(saliency="specific", saliency_loss=True)])
def test_fast_paths_equal_plain(kw):
    """Guards `CenterMask.fast`: the shape head read at the cells (`shape_at`, `conv3x3_at`) and
    the resize as matrix products (`stretch_to_boxes`) give the numbers of Eq. 1 as written
    (the dense shape map, grid_sample): the losses, every gradient and the masks, including a
    centre on the map's corner cell (the 3x3 conv's zero padding). Only float rounding differs."""
    torch.manual_seed(0)
    m = build_model(tiny_cfg(**kw))
    x, t = make_batch()
    t[0]["boxes"][0] = torch.tensor([0.0, 0.0, 3.0, 3.0])        # centre cell (0, 0): the corner
    assert_fast_equals_plain(m, x, t)


@pytest.mark.parametrize("kw", [dict(use_shape=False), dict(use_saliency=False), dict(saliency="specific", saliency_loss=True)])
def test_ablation_switches(kw):
    """Guards the Table 1 switches: shape-only has no saliency head, saliency-only no shape
    head, Table 1f adds a `saliency` loss; all train and decode."""
    m = build_model(tiny_cfg(**kw))
    assert (m.local_shape is None) == (not kw.get("use_shape", True))
    assert (m.saliency is None) == (not kw.get("use_saliency", True))
    x, t = make_batch()
    losses = m.train()(x, t)
    assert ("saliency" in losses) == kw.get("saliency_loss", False)
    losses["loss"].backward()
    det = m.eval()(x)
    assert det[0]["masks"].shape == (100, 64, 64)


def test_training_loss_falls():
    """Guards the whole training path (targets, losses, gradients): 30 Adam steps on one batch
    must cut the total loss by more than half."""
    m = build_model(tiny_cfg(dla_channels=(8, 16, 16, 32, 32, 64), head_conv=16)).train()
    opt = torch.optim.Adam(m.parameters(), 2e-3)
    x, t = make_batch()
    first = None
    for _ in range(30):
        loss = m(x, t)["loss"]
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first, (first, loss.item())


def test_config_errors():
    """Guards clear errors for impossible configurations."""
    with pytest.raises(ValueError, match="saliency"):
        ModelConfig(saliency="semantic")
    with pytest.raises(ValueError, match="use_shape"):
        ModelConfig(use_shape=False, use_saliency=False)
    with pytest.raises(ValueError, match="method"):
        build_model(ModelConfig(method="yolo"))
    with pytest.raises(ValueError, match="mask_loss_grid"):
        ModelConfig(mask_loss_grid="stride2")
    with pytest.raises(ValueError, match="mask_loss_grid"):
        ModelConfig(method="maskfcos", backbone="resnet18", mask_loss_grid="input")


def test_stretch_to_boxes_equals_grid_sample():
    """Guards the two forms of [CM 3.1]'s resize: `resize_to_boxes` is torch's grid_sample
    (bilinear, border padding, align_corners=False) of the S x S map stretched over each box,
    each pixel centre mapped into its box's [-1, 1]; `stretch_to_boxes` (two matrix products)
    gives its numbers everywhere, and its in_box the pixel centres with |grid| <= 1; for boxes
    at any sub-pixel position, smaller or larger than S, partly off the grid."""
    from model import resize_to_boxes, stretch_to_boxes
    torch.manual_seed(0)
    small = torch.randn(4, 5, 5)
    boxes = torch.tensor([[2.3, 1.7, 9.9, 12.2], [0.0, 0.0, 3.0, 2.0], [-4.0, 5.5, 6.0, 30.0],
                          [10.2, 3.1, 15.8, 4.6]])
    H, W = 16, 14
    values, (in_y, in_x) = stretch_to_boxes(small, boxes, H, W, pixel=1.0)
    inside = (in_y * in_x).bool()
    xs, ys = torch.arange(W) + 0.5, torch.arange(H) + 0.5
    gx = 2 * (xs[None] - boxes[:, 0:1]) / (boxes[:, 2:3] - boxes[:, 0:1]) - 1        # (M, W)
    gy = 2 * (ys[None] - boxes[:, 1:2]) / (boxes[:, 3:4] - boxes[:, 1:2]) - 1        # (M, H)
    grid = torch.stack([gx[:, None, :].expand(4, H, W), gy[:, :, None].expand(4, H, W)], -1)
    ref = torch.nn.functional.grid_sample(small[:, None], grid, mode="bilinear", padding_mode="border",
                                          align_corners=False)[:, 0]
    ref_inside = (gx.abs() <= 1)[:, None, :] & (gy.abs() <= 1)[:, :, None]
    assert torch.equal(inside, ref_inside) and inside.any((1, 2)).all()
    assert torch.allclose(resize_to_boxes(small, boxes, H, W, pixel=1.0), ref, atol=1e-6)
    assert torch.allclose(values, ref, atol=1e-5)


def test_saliency_targets_by_hand():
    """Guards [CM] Table 1f's saliency target (model.saliency_targets), worked by hand: 2 images,
    2 channels, a 2 x 2 grid. Image 0, channel 1 holds two objects whose pooled masks are
    [[0.5, 0], [0, 0]] and [[0.5, 1], [0, 0]]: the max per cell is [[0.5, 1], [0, 0]] (cell
    (0, 0) half covered by each stays 0.5: pooled before the union); image 1, channel 0 holds
    [[0, 0], [0.25, 0]]; the other two maps have no object: all 0."""
    from model import saliency_targets
    pooled = torch.tensor([[[0.5, 0.0], [0.0, 0.0]], [[0.5, 1.0], [0.0, 0.0]], [[0.0, 0.0], [0.25, 0.0]]])
    out = saliency_targets(pooled, torch.tensor([0, 0, 1]), torch.tensor([1, 1, 0]), 2, 2)
    expect = torch.zeros(2, 2, 2, 2)
    expect[0, 1] = torch.tensor([[0.5, 1.0], [0.0, 0.0]])
    expect[1, 0] = torch.tensor([[0.0, 0.0], [0.25, 0.0]])
    assert out.shape == (2, 2, 2, 2) and torch.equal(out, expect)
