"""Hourglass-104 (layout, shapes, parameter count), CenterMask on it (per-stack heads,
intermediate supervision, last stack at test), the paper config, and the teaching maps."""
import os
import re

import pytest
import torch
import torch.nn as nn

from model import (ModelConfig, build_model, CenterMask, Hourglass104, HourglassModule, Residual,
                   topk_peaks)
from pictures import teaching_maps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_hg(**kw):
    """CenterMask on a reduced Hourglass: 2 stacks, 2 levels (size_divisibility 4 * 2**2 = 16)."""
    kw.setdefault("backbone", "hourglass104")
    kw.setdefault("num_classes", 3)
    kw.setdefault("hg_dims", (8, 8, 16))
    kw.setdefault("hg_modules", (1, 1, 2))
    kw.setdefault("head_conv", 8)
    kw.setdefault("shape_size", 8)
    return ModelConfig(**kw)


def make_batch(B=2, H=32, W=32):
    targets = []
    for _ in range(B):
        masks = torch.zeros(2, H, W, dtype=torch.uint8)
        masks[0, 4:15, 3:20] = 1
        masks[1, 15:30, 10:25] = 1
        targets.append({"boxes": torch.tensor([[3.0, 4.0, 20.0, 15.0], [10.0, 15.0, 25.0, 30.0]]),
                        "labels": torch.tensor([0, 2]), "masks": masks})
    return torch.randn(B, 3, H, W), targets


# -- the backbone ------------------------------------------------------------------------------

def residual_params(cin, cout, projected):
    """Two 3x3 convs (no bias) + two BNs (weight, bias), and a 1x1 conv + BN on the skip."""
    p = 9 * cin * cout + 2 * cout + 9 * cout * cout + 2 * cout
    return p + (cin * cout + 2 * cout if projected else 0)


def hourglass_params(dims, modules):
    """Parameters of one hourglass, counted from CenterNet's `kp_module` layout by hand:
    up1 = m residuals (c->c); low1 = strided residual (c->n, projected skip) + m-1 (n->n);
    low2 = next level, or modules[1] residuals (n->n) in the middle; low3 = m-1 (n->n) + one
    (n->c, projected only if the width changes)."""
    c, n, m = dims[0], dims[1], modules[0]
    p = m * residual_params(c, c, False) + residual_params(c, n, True) + (m - 1) * residual_params(n, n, False)
    p += hourglass_params(dims[1:], modules[1:]) if len(dims) > 2 else modules[1] * residual_params(n, n, False)
    return p + (m - 1) * residual_params(n, n, False) + residual_params(n, c, n != c)


def head_params(cout, cin=256, hidden=256):
    """CenterNet head: 3x3 conv (with bias) + ReLU + 1x1 conv (with bias)."""
    return 9 * cin * hidden + hidden + hidden * cout + cout


def test_hourglass104_parameter_count():
    """Guards the Hourglass-104 layout (residuals per level, strided residuals instead of
    max-pool, skip projections, the 512-wide middle, the "inters" between stacks) against
    CenterNet's `large_hourglass.py`. Neither [CM], [CN] nor CornerNet print a parameter
    count, so the reference is that file's layout counted by hand (closed form above):
        stem: 7x7 conv 3->128 + BN = 19,072; strided residual 128->256 = 919,040   = 938,112
        one hourglass (dims 256,256,384,384,384,512; modules 2,2,2,2,2,4)          = 92,134,400
        3x3 conv 256->256 + BN after each hourglass                                = 590,336
        between the stacks: two 1x1 conv + BN (2 x 66,048) + residual 1,180,672    = 1,312,768
        backbone = 938,112 + 2 x (92,134,400 + 590,336) + 1,312,768                = 187,700,352
    CenterNet's COCO detector adds per stack heatmap (80) + size (2) + offset (2) heads
    (610,640 + 2 x 590,594 = 1,791,828), i.e. 191,284,008 = 191.3M in all, which is the
    "about 190M" usually quoted for CenterNet-HG104. CenterMask adds shape (S^2 = 1024,
    853,248) and saliency (1: 590,337) heads: 3,235,413 per stack, 194,171,178 in all. We
    measured exactly these numbers (built on the meta device: no memory, no forward)."""
    with torch.device("meta"):
        model = build_model(ModelConfig(backbone="hourglass104"))   # paper defaults, C = 80, S = 32
    count = lambda m: sum(p.numel() for p in m.parameters())
    dims, mods = (256, 256, 384, 384, 384, 512), (2, 2, 2, 2, 2, 4)
    assert count(model.backbone.hourglasses[0]) == hourglass_params(dims, mods) == 92_134_400
    assert count(model.backbone) == 187_700_352
    per_stack = head_params(80) + 2 * head_params(2) + head_params(32 * 32) + head_params(1)
    assert count(model.head_sets[0]) == per_stack == 3_235_413
    assert count(model) == 187_700_352 + 2 * per_stack == 194_171_178
    assert 187_700_352 + 2 * (head_params(80) + 2 * head_params(2)) == 191_284_008  # CenterNet-HG104
    assert model.size_divisibility == 128 and model.stride == 4


def test_hourglass_module_structure():
    """Guards the per-level wiring of one hourglass: 5 levels x (2 up1 + 2 low1 + 2 low3)
    + 4 in the middle = 34 residual blocks, of which 7 project their skip (the 5 strided
    low1 blocks and the 2 low3 blocks that change width, 384->256 and 512->384)."""
    with torch.device("meta"):
        hg = HourglassModule((256, 256, 384, 384, 384, 512), (2, 2, 2, 2, 2, 4))
    blocks = [m for m in hg.modules() if isinstance(m, Residual)]
    assert len(blocks) == 34
    assert sum(not isinstance(b.skip, nn.Identity) for b in blocks) == 7
    assert sum(b.conv1.stride == (2, 2) for b in blocks) == 5
    assert not any(isinstance(m, nn.MaxPool2d) for m in hg.modules())


def test_hourglass_merge_is_up1_plus_nearest_upsample():
    """Guards the merge (addition, not concatenation) and the nearest (not bilinear)
    upsampling. With up1 = identity, low1 = 2x2 average pool, low2 = low3 = identity, a 4x4
    input x = 0..15 gives x + nearest_x2(avgpool(x)); the pooled 2x2 map is
    [[2.5, 4.5], [10.5, 12.5]], so e.g. out[0, 0] = 0 + 2.5, out[1, 1] = 5 + 2.5,
    out[2, 1] = 9 + 10.5, out[3, 3] = 15 + 12.5."""
    hg = HourglassModule((2, 2), (1, 1))
    hg.up1, hg.low1, hg.low2, hg.low3 = nn.Identity(), nn.AvgPool2d(2), nn.Identity(), nn.Identity()
    x = torch.arange(16.0).view(1, 1, 4, 4)
    pooled = torch.tensor([[2.5, 2.5, 4.5, 4.5], [2.5, 2.5, 4.5, 4.5],
                           [10.5, 10.5, 12.5, 12.5], [10.5, 10.5, 12.5, 12.5]])
    torch.testing.assert_close(hg(x)[0, 0], x[0, 0] + pooled)


def test_hourglass104_output_shapes():
    """Guards the output stride (4), width (256) and one map per stack at full size:
    128x128 -> two (B, 256, 32, 32) maps."""
    net = Hourglass104().eval()
    with torch.no_grad():
        feats = net(torch.randn(1, 3, 128, 128))
    assert isinstance(feats, list) and [f.shape for f in feats] == [(1, 256, 32, 32)] * 2


def test_hourglass_rejects_unpadded_input():
    """Guards a silent shape mismatch deep inside the hourglass (an odd size halves and
    doubles to a different size): the error must name the size and the divisibility."""
    net = Hourglass104((8, 8, 16), (1, 1, 1))                   # size_divisibility 16
    with pytest.raises(ValueError, match="multiple of 16"):
        net(torch.randn(1, 3, 24, 32))


# -- CenterMask on Hourglass ------------------------------------------------------------------

def test_per_stack_heads_train_and_decode():
    """Guards CenterMask on a (reduced) Hourglass: one head set per stack, every parameter
    (both stacks' heads, the inter-stack modules) gets a gradient, all losses are finite,
    and eval mode returns the contract's keys at input resolution."""
    model = build_model(tiny_hg(saliency="specific", saliency_loss=True)).train()
    assert len(model.head_sets) == 2 and model.size_divisibility == 16
    x, t = make_batch()
    losses = model(x, t)
    assert set(losses) == {"heatmap", "offset", "size", "mask", "saliency", "loss"}
    assert all(torch.isfinite(v) for v in losses.values())
    losses["loss"].backward()
    assert all(p.grad is not None for p in model.parameters())
    det = model.eval()(x)
    assert len(det) == 2 and det[0]["masks"].shape == (100, 32, 32) and det[0]["boxes"].shape == (100, 4)


def test_losses_averaged_over_stacks():
    """Guards intermediate supervision: each named loss (and `loss`) must be the MEAN of the
    two stacks' losses (CenterNet's CtdetLoss divides by num_stacks), not the last stack's
    alone and not their sum. The stacks' losses are computed here one by one with the same
    `losses()` and compared with model(x, t)."""
    model = build_model(tiny_hg()).train()
    x, t = make_batch()
    avg = model(x, t)
    feats = model.features(x)                       # train-mode BN: same batch -> same stats
    per = [model.losses({k: v.float() for k, v in heads(p).items()}, t, heads)
           for heads, p in zip(model.head_sets, feats)]
    for k in avg:
        assert per[0][k].item() != pytest.approx(per[1][k].item(), rel=1e-3), k   # the test can tell
        assert avg[k].item() == pytest.approx((per[0][k].item() + per[1][k].item()) / 2, rel=1e-5), k


def test_single_stack_equals_unaveraged_losses():
    """Guards the averaging for one stack (DLA-34, or num_stacks=1): the losses are exactly
    the head set's losses (divided by 1)."""
    model = build_model(tiny_hg(num_stacks=1)).train()
    assert len(model.head_sets) == 1 and len(model.backbone.inter) == 0
    x, t = make_batch(1)
    out = model(x, t)
    ref = model.losses({k: v.float() for k, v in model.head_sets[0](model.features(x)[0]).items()}, t)
    for k in out:
        assert out[k].item() == pytest.approx(ref[k].item(), rel=1e-6), k


def test_only_last_stack_at_test():
    """Guards inference reading the last stack: changing the first stack's heatmap head
    must not change the detections; changing the last stack's must."""
    model = build_model(tiny_hg()).eval()
    x, _ = make_batch(1)
    before = model(x)[0]["scores"].clone()
    with torch.no_grad():
        model.head_sets[0].heatmap[-1].bias.fill_(5.0)
    torch.testing.assert_close(model(x)[0]["scores"], before)
    with torch.no_grad():
        model.head_sets[1].heatmap[-1].bias.fill_(5.0)
    assert not torch.allclose(model(x)[0]["scores"], before)


def test_paper_config_builds_the_paper_model():
    """Guards config/centermask_hourglass104.py: every key must be a train.py or ModelConfig
    key (a typo would be rejected by the configurator only at launch), and the model keys
    must build the paper's model: Hourglass-104, 2 stacks, class-specific saliency with
    C = 80 channels (3,255,716 parameters per head set), 194,211,784 in all."""
    ns = {}
    exec(open(os.path.join(ROOT, "config", "centermask_hourglass104.py")).read(), ns)
    ns = {k: v for k, v in ns.items() if not k.startswith("__")}
    train_keys = set(re.findall(r"^(\w+) = ", open(os.path.join(ROOT, "train.py")).read(), re.M))
    model_keys = set(ModelConfig.__dataclass_fields__)
    assert set(ns) <= train_keys | model_keys, set(ns) - train_keys - model_keys
    assert (ns["input_size"], ns["learning_rate"], ns["epochs"], ns["lr_steps"]) == (512, 2.5e-4, 130, (100, 120))
    assert ns["loss_weights"] == (1.0, 1.0, 0.1, 1.0) and ns["shape_size"] == 32
    with torch.device("meta"):
        model = build_model(ModelConfig(**{k: v for k, v in ns.items() if k in model_keys}))
    assert isinstance(model, CenterMask) and isinstance(model.backbone, Hourglass104)
    per_stack = head_params(80) + 2 * head_params(2) + head_params(1024) + head_params(80)
    assert sum(p.numel() for p in model.parameters()) == 187_700_352 + 2 * per_stack == 194_211_784


# -- teaching maps ([CM] Fig. 3 and 5) --------------------------------------------------------

@pytest.mark.parametrize("kw", [dict(), dict(saliency="specific"), dict(use_saliency=False),
                                dict(use_shape=False)])
def test_teaching_maps_keys_and_shapes(kw):
    """Guards the documented teaching maps: keys (saliency / local shapes absent when that
    branch is off), shapes (h, w = H/4, W/4; tiles S x (K(S+1) - 1) with NaN gaps; masks at
    input size), value ranges, and that the model's train/eval mode is restored."""
    model = build_model(tiny_hg(**kw)).train()
    x, _ = make_batch(2, 32, 48)
    maps = teaching_maps(model)(x, k=3)
    assert model.training and len(maps) == 2
    expected = {"heatmap", "peaks", "masks"} | ({"saliency"} if model.saliency is not None else set()) \
        | ({"local shapes"} if model.local_shape is not None else set())
    for m in maps:
        assert set(m) == expected
        assert m["heatmap"].shape == m["peaks"].shape == (8, 12)
        assert 0 <= m["heatmap"].min() and m["heatmap"].max() <= 1
        # ranks 1..3 (two classes peaking on one cell share it, keeping the better rank)
        assert 1 in m["peaks"] and set(m["peaks"].unique().tolist()) <= {0, 1, 2, 3}
        assert m["masks"].shape == (32, 48) and m["masks"].dtype == torch.long
        assert 0 <= m["masks"].min() and m["masks"].max() <= 3
        if "saliency" in m:
            assert m["saliency"].shape == (8, 12)
        if "local shapes" in m:
            tiles = m["local shapes"]
            assert tiles.shape == (8, 3 * 9 - 1)
            assert tiles[:, 8].isnan().all() and tiles[:, 17].isnan().all()
            assert not tiles[:, :8].isnan().any()


def test_teaching_maps_hand_planted():
    """Guards what the teaching maps show, on hand-set heads: a single peak (logit 5 at
    cell (x=2, y=1)) must be rank 1 in "peaks"; the first tile of "local shapes" must be the
    sigmoid of the S x S shape vector read at that cell; the class-specific "saliency" is
    the max over classes of the sigmoid (logits 0 and ln 3 -> 0.75); "masks" is 1 inside
    the detection's box (size 2x2 output px around centre (2.5, 1.5) -> input pixels
    [6, 14) x [2, 10)) where sigmoid(L) * sigmoid(G) = 1 * 0.75 >= 0.4."""
    S = 2
    model = build_model(tiny_hg(shape_size=S, saliency="specific", max_detections=2)).eval()
    out = {"heatmap": torch.full((1, 3, 4, 4), -10.0), "offset": torch.full((1, 2, 4, 4), 0.5),
           "size": torch.full((1, 2, 4, 4), 2.0), "shape": torch.full((1, S * S, 4, 4), -20.0),
           "saliency": torch.zeros(1, 3, 4, 4)}
    out["heatmap"][0, 1, 1, 2] = 5.0
    out["shape"][0, :, 1, 2] = torch.tensor([20.0, 20.0, 20.0, 20.0])
    out["saliency"][0, 1] = torch.log(torch.tensor(3.0))
    model.heads = lambda images: out                      # plant the head outputs
    m = teaching_maps(model)(torch.zeros(1, 3, 16, 16), k=2)[0]
    assert m["peaks"][1, 2] == 1
    torch.testing.assert_close(m["local shapes"][:, :S], torch.ones(S, S))
    torch.testing.assert_close(m["saliency"], torch.full((4, 4), 0.75))
    assert m["masks"][2:10, 6:14].eq(1).all() and m["masks"].eq(1).sum() == 64


def test_teaching_maps_figure(tmp_path):
    """Guards the teaching picture path end to end (NaN gaps, integer label maps, the wide
    tile panel): pictures.py's figure writer must accept teaching_maps' output and write a PNG that
    decodes to the figure's size, 2.8 x 2.9 inches per grid unit at 100 dpi: 5 units wide
    (1400 px) and 290 px per row of panels (`_maps_layout`), with the input and the maps drawn
    (not one colour)."""
    import matplotlib.image
    from pictures import save_maps_figure, _maps_layout
    model = build_model(tiny_hg())
    x, _ = make_batch(1)
    maps = teaching_maps(model)(x)[0]
    path = tmp_path / "maps.png"
    save_maps_figure(torch.zeros(3, 32, 32, dtype=torch.uint8), maps, path)
    img = matplotlib.image.imread(path)                   # (H, W, 3 or 4) floats in [0, 1]
    shapes = [(32, 32)] + [tuple(m.shape[:2]) for m in maps.values()]
    rows = _maps_layout([min(5, max(1, round(w / h))) for h, w in shapes], 5)
    assert img.shape[:2] == (290 * len(rows), 1400) and len(rows) >= 2, (img.shape, rows)
    assert img[..., :3].std() > 0.1                       # panels, colour bars and titles, not blank


def test_topk_peaks_hand_computed():
    """Guards the shared peak extraction: 3x3 local maxima only, best first over classes.
    Class 0 has 0.9 at (y=1, x=1) with a 0.8 neighbour (suppressed); class 1 has 0.7 at
    (y=3, x=3) -> top-2 = (0.9, class 0, y 1, x 1), (0.7, class 1, y 3, x 3)."""
    heat = torch.zeros(1, 2, 4, 4)
    heat[0, 0, 1, 1], heat[0, 0, 1, 2], heat[0, 1, 3, 3] = 0.9, 0.8, 0.7
    scores, labels, ys, xs = topk_peaks(heat, 2)
    assert scores.tolist() == [[pytest.approx(0.9), pytest.approx(0.7)]]
    assert labels.tolist() == [[0, 1]] and ys.tolist() == [[1, 3]] and xs.tolist() == [[1, 3]]
