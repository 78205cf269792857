"""Real COCO data end to end: load, train a few iterations, evaluate (skipped without COCO128)."""
import os
from functools import partial

import pytest
import torch
from torch.utils.data import DataLoader

from conftest import COCO128
from data import CocoInstances, build_transforms, collate_fn
from eval import evaluate
from model import ModelConfig, build_model

ANN = os.path.join(COCO128, "annotations", "instances_train2017.json")
IMG = os.path.join(COCO128, "train2017")
pytestmark = pytest.mark.skipif(not os.path.isfile(ANN), reason=f"COCO128 not found at {COCO128}")


def test_coco128_train_and_evaluate():
    """Guards the whole pipeline on real photographs (polygons, crowd RLE, 80-class ids with
    gaps, odd image sizes): 4 images through the CenterNet training transforms, 3 training
    iterations with finite losses that change the weights, then COCOeval on the same images
    with the test transform returns bbox and segm AP in [0, 1]."""
    train = CocoInstances(IMG, ANN, build_transforms("centernet", True, 128), max_images=4)
    val = CocoInstances(IMG, ANN, build_transforms("centernet", False, 128), max_images=4)
    assert train.num_classes == 80 and train.label_to_cat_id[-1] == 90
    cfg = ModelConfig(num_classes=train.num_classes, dcn=False, dla_channels=(8, 16, 32, 32, 64, 64), head_conv=16)
    model = build_model(cfg).train()
    loader = DataLoader(train, batch_size=2, shuffle=True, collate_fn=partial(collate_fn, size_divisibility=32))
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    for _, (images, targets) in zip(range(3), loader):
        assert images.shape[-2:] == (128, 128)
        losses = model(images, targets)
        assert all(torch.isfinite(v) for v in losses.values()), losses
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    stats = evaluate(model, val, batch_size=2, verbose=False)
    assert stats["num_images"] == 4
    for k in ("bbox_AP", "segm_AP", "segm_AP50"):
        assert 0.0 <= stats[k] <= 1.0, (k, stats[k])
