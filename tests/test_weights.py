"""Published weights (weights.py; train.py's init_from=PATH): CenterNet's COCO detectors,
the ImageNet DLA-34, torchvision's FCOS and our own checkpoints imported with every tensor
accounted for; the refusals; torchvision parity of the decoded detections; CenterNet's BGR / COCO
input format; train.py started from a file.

No network and no real weights: state dicts are fabricated from the key manifests in
$WEIGHTS_MANIFESTS (default tests/weights, in the repository; names and shapes only, see README
"Tests"), with random values; the parity test builds torchvision's FCOS
with random weights and reads two COCO128 images ($COCO128, skipped without it)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import COCO128, ROOT, WEIGHTS_MANIFESTS

import data
from pictures import network_input_rgb
from model import FCOSForward, ModelConfig, build_model, fcos_locations
from weights import COCO_CATEGORY_IDS, import_weights, load_file, read_weights

DLA34 = "centernet_ctdet_dla34_keys.json"
HOURGLASS = "centernet_ctdet_hourglass104_keys.json"
IMAGENET = "dla34_imagenet_keys.json"


def manifest(name):
    """{key: shape} of a published checkpoint (its manifest in WEIGHTS_MANIFESTS, tests/weights)."""
    path = os.path.join(WEIGHTS_MANIFESTS, name)
    assert os.path.isfile(path), f"key manifest {path} not found (tests/weights, or $WEIGHTS_MANIFESTS)"
    with open(path) as f:
        return json.load(f)["keys"]


def fabricate(keys, prefix="", counters=True, only=None, seed=0):
    """A state dict with the manifest's keys and shapes: random normal values (running_var
    positive, num_batches_tracked integer counters), each key prefixed (DataParallel's "module.");
    counters=False drops the num_batches_tracked entries (old PyTorch). only: a set of keys that
    get real values; the others are zeros broadcast to their shape (no memory: Hourglass-104)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in keys.items():
        if k.endswith("num_batches_tracked"):
            if counters:
                out[prefix + k] = torch.tensor(1000 + len(out))
            continue
        if only is not None and k not in only:
            out[prefix + k] = torch.zeros(()).expand(shape)
            continue
        v = torch.randn(shape, generator=g)
        out[prefix + k] = v.abs() + 0.5 if k.endswith("running_var") else v
    return out


def state_of(model):
    return model.state_dict()


# -- CenterNet's DLA-34 and Hourglass-104, the ImageNet DLA-34 ------------------------------------

# (CenterNet key, our key): one per kind of renaming
DLA34_SPOTS = [
    ("base.base_layer.0.weight", "backbone.base.base_layer.0.weight"),
    ("base.level3.tree2.root.conv.weight", "backbone.base.level3.tree2.root.conv.weight"),
    ("base.level5.project.1.running_var", "backbone.base.level5.project.1.running_var"),
    ("dla_up.ida_1.proj_2.conv.conv_offset_mask.weight", "backbone.dla_up.ida.1.proj.1.offset_mask.weight"),
    ("dla_up.ida_2.node_3.actf.0.running_mean", "backbone.dla_up.ida.2.node.2.bn.running_mean"),
    ("dla_up.ida_0.up_1.weight", "backbone.dla_up.ida.0.up.0.weight"),
    ("ida_up.proj_2.conv.bias", "backbone.ida_up.proj.1.conv.bias"),
    ("ida_up.up_2.weight", "backbone.ida_up.up.1.weight"),
    ("hm.0.weight", "head_sets.0.heatmap.0.weight"),
    ("hm.2.bias", "head_sets.0.heatmap.2.bias"),
    ("wh.2.weight", "head_sets.0.size.2.weight"),
    ("reg.0.bias", "head_sets.0.offset.0.bias"),
]


@pytest.mark.parametrize("prefix,counters", [("", True), ("module.", True), ("module.", False)])
def test_centernet_dla34_import_accounts_for_every_tensor(prefix, counters):
    """Guards the CenterNet ctdet DLA-34 map: a state dict with the published keys (under
    'state_dict'; with or without DataParallel's 'module.', with or without num_batches_tracked)
    loads 386 tensors, ignores exactly the 12 of base.level3/4.project (built by CenterNet, never
    used), leaves only the Local Shape and Global Saliency heads new (plus the BN counters when the
    file has none), and every spot-checked tensor lands where the map says, by value; hm keeps
    COCO's 80 channels in order. The printed report says all of it."""
    keys = manifest(DLA34)
    sd = fabricate(keys, prefix, counters)
    model = build_model(ModelConfig())
    report = import_weights(model, {"epoch": 140, "state_dict": sd})
    unused = ("base.level3.project.", "base.level4.project.")
    n_counters = sum(k.endswith("num_batches_tracked") and not k.startswith(unused) for k in keys)   # 53
    assert len(report.loaded) == 386 - (0 if counters else n_counters)
    # (the report names the file's keys without DataParallel's prefix)
    assert sorted(report.ignored) == sorted(k.removeprefix(prefix) for k in sd if k.removeprefix(prefix).startswith(unused))
    assert len(report.ignored) == (12 if counters else 10)
    fresh = sorted(k for k in report.new if not k.endswith("num_batches_tracked"))
    assert fresh == sorted(k for k in state_of(model) if k.startswith(("head_sets.0.local_shape.", "head_sets.0.saliency.")))
    assert len(report.new) - len(fresh) == (0 if counters else n_counters)
    assert set(report.loaded) | set(report.new) == set(state_of(model))      # every model tensor accounted for
    assert len(report.loaded) + len(report.ignored) == len(sd)               # every file tensor accounted for
    state = state_of(model)
    for theirs, ours in DLA34_SPOTS:
        assert torch.equal(state[ours], sd[prefix + theirs]), (theirs, ours)
    if counters:
        assert int(state["backbone.base.level0.1.num_batches_tracked"]) == int(sd[prefix + "base.level0.1.num_batches_tracked"])
    text = str(report)
    assert "loaded: " in text and "base.level3.project.*" in text and "head_sets.0.local_shape.* (4)" in text
    assert "COCO category ids 1, 2, 3" in text


@pytest.mark.parametrize("prefix,counters", [("module.", False), ("", True)])
def test_centernet_hourglass104_import_two_stacks(prefix, counters):
    """Guards the Hourglass-104 map (2 stacks, heads per stack; with or without 'module.' and
    num_batches_tracked): every tensor of the file is loaded (without the counters in the file,
    the model's 160 are new), only the shape / saliency heads of both stacks are new, and
    spot-checked tensors land where the map says: the stem
    (convolution -> Sequential), the innermost residuals, the between-stack 1x1s (inters_ ->
    skip_input, cnvs_ -> skip_features), the heads' 3x3 (conv with bias, no BN) and 1x1."""
    keys = manifest(HOURGLASS)
    spots = [("pre.0.conv.weight", "backbone.pre.0.0.weight"), ("pre.0.bn.running_var", "backbone.pre.0.1.running_var"),
             ("pre.1.skip.0.weight", "backbone.pre.1.skip.0.weight"),
             ("kps.1.low2.low2.low2.low2.low2.3.bn2.bias", "backbone.hourglasses.1.low2.low2.low2.low2.low2.3.bn2.bias"),
             ("kps.0.low2.low3.1.skip.1.running_mean", "backbone.hourglasses.0.low2.low3.1.skip.1.running_mean"),
             ("cnvs.1.conv.weight", "backbone.convs.1.0.weight"), ("cnvs.0.bn.weight", "backbone.convs.0.1.weight"),
             ("inters.0.conv2.weight", "backbone.inter.0.conv2.weight"),
             ("inters_.0.0.weight", "backbone.skip_input.0.0.weight"),
             ("cnvs_.0.1.bias", "backbone.skip_features.0.1.bias"),
             ("hm.1.0.conv.bias", "head_sets.1.heatmap.0.bias"), ("hm.0.1.weight", "head_sets.0.heatmap.2.weight"),
             ("wh.1.1.bias", "head_sets.1.size.2.bias"), ("reg.0.0.conv.weight", "head_sets.0.offset.0.weight")]
    sd = fabricate(keys, prefix, counters, only={k for k, _ in spots})
    model = build_model(ModelConfig(backbone="hourglass104"))
    report = import_weights(model, {"state_dict": sd})
    assert len(report.loaded) == len(sd) and not report.ignored
    fresh = sorted(k for k in report.new if not k.endswith("num_batches_tracked"))
    assert fresh == sorted(k for k in state_of(model) if ".local_shape." in k or ".saliency." in k)
    assert len(fresh) == 16 and len(report.new) == 16 + (0 if counters else 160)
    state = state_of(model)
    for theirs, ours in spots:
        assert torch.equal(state[ours], sd[prefix + theirs]), (theirs, ours)


@pytest.mark.parametrize("prefix,counters", [("", False), ("module.", True)])
def test_imagenet_dla34_import_drops_the_classifier(prefix, counters):
    """Guards the ImageNet DLA-34 map (a bare state dict; with or without 'module.' and
    num_batches_tracked): the DLA base is loaded (185 tensors without the counters, 185 + 37 with
    them) with its values, the classifier fc and the unused level3/4 projections are ignored with
    their reasons, and DLA-up, the final IDA-up and all heads are new; the report notes the input
    convention the DLA was trained with."""
    sd = fabricate(manifest(IMAGENET), prefix, counters)
    model = build_model(ModelConfig())
    report = import_weights(model, sd)
    assert len(report.loaded) == (185 + 37 if counters else 185)
    assert sorted(report.ignored) == sorted(k.removeprefix(prefix) for k in sd
                                            if k.removeprefix(prefix).startswith(("fc.", "level3.project.", "level4.project.")))
    assert len(report.loaded) + len(report.ignored) == len(sd)
    assert "ImageNet classifier" in report.ignored["fc.weight"]
    assert {k.split(".")[0] + "." + k.split(".")[1] for k in report.new if not k.endswith("num_batches_tracked")} \
        == {"backbone.dla_up", "backbone.ida_up", "head_sets.0"}
    state = state_of(model)
    for k in ("base_layer.0.weight", "level5.root.conv.weight", "level2.project.1.running_mean", "level4.tree2.tree1.conv2.weight"):
        assert torch.equal(state["backbone.base." + k], sd[prefix + k])
    assert "rgb_imagenet" in str(report)


def test_class_channels_follow_the_category_ids():
    """Guards the class mapping: a 4-class CenterMask whose labels are COCO categories 1, 3, 90 and
    2 gets CenterNet's hm channels 0, 2, 79 and 1 (CenterNet's channel k is the k-th COCO id);
    without ids a model of other than 80 classes is refused, as is an id that is not COCO's."""
    sd = fabricate(manifest(DLA34))
    model = build_model(ModelConfig(num_classes=4))
    import_weights(model, sd, cat_ids=[1, 3, 90, 2])
    rows = [0, 2, 79, 1]
    assert torch.equal(state_of(model)["head_sets.0.heatmap.2.weight"], sd["hm.2.weight"][rows])
    assert torch.equal(state_of(model)["head_sets.0.heatmap.2.bias"], sd["hm.2.bias"][rows])
    with pytest.raises(ValueError, match="give the COCO category id"):
        import_weights(build_model(ModelConfig(num_classes=4)), sd)
    with pytest.raises(ValueError, match=r"category id\(s\) \[12\]"):
        import_weights(build_model(ModelConfig(num_classes=4)), sd, cat_ids=[1, 2, 3, 12])


def test_refusals_name_the_file_the_keys_and_the_shapes(tmp_path):
    """Guards the refusals: Hourglass weights into a DLA-34 model (names both), CenterNet's
    DLA-34 into a model with other head widths (names the key and both shapes), into a model
    without deformable convs (names the missing tensors), torchvision's FCOS into CenterMask, a
    file that is not a checkpoint, and a checkpoint of an unknown layout."""
    dla = fabricate(manifest(DLA34))
    hg = fabricate(manifest(HOURGLASS), only=set())
    with pytest.raises(ValueError, match=r"Hourglass-104 .* fits method='centermask', backbone='hourglass104', "
                                         r"not this centermask / dla34 model"):
        import_weights(build_model(ModelConfig()), {"state_dict": hg})
    with pytest.raises(ValueError, match=r"shape mismatch .* hm\.0\.weight \(256, 64, 3, 3\) in the file, "
                                         r"head_sets\.0\.heatmap\.0\.weight \(128, 64, 3, 3\) in the model"):
        import_weights(build_model(ModelConfig(head_conv=128)), dla)
    with pytest.raises(ValueError, match=r"no tensor for 32 of the 398 tensors .*conv_offset_mask.* dcn=True"):
        import_weights(build_model(ModelConfig(dcn=False)), dla)
    tv_like = {"backbone.body.conv1.weight": torch.zeros(64, 3, 7, 7),
               "head.classification_head.cls_logits.weight": torch.zeros(91, 256, 3, 3)}
    with pytest.raises(ValueError, match="torchvision's FCOS .* not this centermask / dla34 model"):
        import_weights(build_model(ModelConfig()), tv_like)
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    with pytest.raises(ValueError, match=f"{text} is not a PyTorch checkpoint"):
        read_weights(str(text))
    torch.save({"net": {"conv.weight": torch.zeros(1)}}, tmp_path / "other.pt")
    whole = (tmp_path / "other.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(whole[:len(whole) // 2])
    with pytest.raises(ValueError, match=f"{tmp_path / 'cut.pt'} is a damaged PyTorch checkpoint"):
        read_weights(str(tmp_path / "cut.pt"))
    with pytest.raises(ValueError, match="none of the weights init_from knows"):
        read_weights(str(tmp_path / "other.pt"))
    with pytest.raises(ValueError, match="missing.pth not found"):
        read_weights(str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match=f"{tmp_path} is a folder, not a checkpoint file"):
        read_weights(str(tmp_path))


class CreatesAFile:
    """An object whose pickle calls open(path, "w") when it is read: a file crafted to run code
    (a real one would call os.system); torch.save writes it as a checkpoint."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def test_a_pickle_that_would_run_code_is_refused_and_never_runs(tmp_path):
    """Guards weights.load_file, the reader of every checkpoint (train.py's resume, eval.py,
    predict.py, init_from): a file whose pickle calls a function is refused with one line naming
    the file and the function, and the function never runs. Unsafe loading would create the file
    (checked first, so the test can fail)."""
    import pickle
    evil, created = tmp_path / "ckpt.pt", tmp_path / "created_by_the_pickle"
    torch.save({"model": CreatesAFile(str(created))}, evil)
    torch.load(evil, weights_only=False)["model"].close()
    assert created.exists()                                  # what weights_only=False does
    created.unlink()
    with open(tmp_path / "bare.pt", "wb") as f:              # a bare pickle, not torch.save's zip
        pickle.dump(CreatesAFile(str(created)), f, protocol=2)
    for path in (evil, tmp_path / "bare.pt"):
        with pytest.raises(ValueError) as e:
            load_file(str(path))
        assert str(e.value).startswith(f"{path} is refused: loading it would call ")
        assert "open" in str(e.value) and "\n" not in str(e.value)
        assert not created.exists()


# -- our own checkpoints --------------------------------------------------------------------------

def tiny_fcos_config(method, num_classes=4):
    return ModelConfig(method=method, backbone="resnet18", num_classes=num_classes, fpn_channels=32,
                       head_conv=16, shape_size=4, norm="bn", fcos_form="torchvision")


def save_checkpoint(model, path, config=None):
    """A checkpoint as train.py writes it (weights_only-loadable: tensors and plain containers)."""
    from dataclasses import asdict
    torch.save({"model": model.state_dict(), "optimizer": {}, "scaler": {}, "iter": 4, "best_ap": 0.1,
                "model_args": asdict(model.cfg), "config": dict(config or {}, input_format="bgr_coco"),
                "class_names": ["a", "b", "c", "d"], "label_to_cat_id": [1, 2, 3, 4]}, path)


def test_project_checkpoint_fcos_into_fcosis_and_maskfcos(tmp_path):
    """Guards init_from=ckpt.pt of this project: an FCOS checkpoint (P3-P7) read from its file
    starts an FCOSIS (P2-P7), each FPN block on its own level (FCOS's P3 output conv becomes
    FCOSIS's block 1; block 0, C2's, is new), the head as it was; FCOSIS's own branches and
    MaskFCOS's mask head are new; a class layer of another size is listed as ignored with both
    shapes; a CenterMask checkpoint fits nothing of FCOS and is refused. config_updates carries
    the checkpoint's input format and location convention, and pretrained=False (same backbone)."""
    fcos = build_model(tiny_fcos_config("fcos"))
    save_checkpoint(fcos, tmp_path / "fcos.pt", {"backbone": "resnet18"})
    w = read_weights(str(tmp_path / "fcos.pt"))
    assert w.kind == "project"
    fcosis = build_model(tiny_fcos_config("fcosis"))
    report = import_weights(fcosis, w)
    src, dst = fcos.state_dict(), fcosis.state_dict()
    assert torch.equal(dst["backbone.fpn.layer_blocks.1.0.weight"], src["backbone.fpn.layer_blocks.0.0.weight"])
    assert torch.equal(dst["backbone.fpn.inner_blocks.3.0.weight"], src["backbone.fpn.inner_blocks.2.0.weight"])
    assert torch.equal(dst["head.cls_logits.weight"], src["head.cls_logits.weight"])
    assert torch.equal(dst["backbone.stages.2.0.conv1.weight"], src["backbone.stages.2.0.conv1.weight"])
    assert not report.ignored and len(report.loaded) == len(src)
    new_modules = {k.rsplit(".", 1)[0] for k in report.new}
    assert {"backbone.fpn.inner_blocks.0.0", "backbone.fpn.layer_blocks.0.0", "head.extra"} <= new_modules
    assert all(k.startswith(("backbone.fpn.inner_blocks.0.", "backbone.fpn.layer_blocks.0.", "head.extra.",
                             "seg_head.", "attention.")) for k in report.new)
    cfg = {"backbone": "resnet18", "input_format": "rgb_imagenet", "fcos_form": "improved", "pretrained": True}
    assert {k: v for k, v, _ in w.config_updates(cfg)} == {"input_format": "bgr_coco", "fcos_form": "torchvision",
                                                           "pretrained": False}
    maskfcos = build_model(tiny_fcos_config("maskfcos", num_classes=3))
    report = import_weights(maskfcos, w)
    assert report.ignored["head.cls_logits.weight"] == "shape (4, 32, 3, 3) in the file, (3, 32, 3, 3) in this model"
    assert set(report.new) == {k for k in maskfcos.state_dict() if k.startswith(("mask_head.", "head.cls_logits."))}
    centermask = build_model(ModelConfig(dla_channels=(4, 8, 8, 16, 16, 32), head_conv=8, shape_size=4, dcn=False,
                                         num_classes=4))
    save_checkpoint(centermask, tmp_path / "cm.pt")
    with pytest.raises(ValueError, match="nothing in .*cm.pt .* fits this fcos / resnet18 model"):
        import_weights(build_model(tiny_fcos_config("fcos")), str(tmp_path / "cm.pt"))


def test_fresh_patterns_keep_the_models_own_initialisation(tmp_path):
    """Guards import_weights(fresh=...): a CenterMask checkpoint into a CenterMask of the same
    shape with fresh = the Local Shape head: its 4 tensors keep the values the new model was built
    with (not the file's), are listed as new, and the file's 4 are listed as ignored with the
    pattern; every other tensor is the file's. A pattern matching nothing is refused."""
    cfg = dict(dla_channels=(4, 8, 8, 16, 16, 32), head_conv=8, shape_size=4, dcn=False, num_classes=4)
    torch.manual_seed(0)
    src = build_model(ModelConfig(**cfg))
    save_checkpoint(src, tmp_path / "cm.pt")
    torch.manual_seed(1)
    dst = build_model(ModelConfig(**cfg))
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    report = import_weights(dst, str(tmp_path / "cm.pt"), fresh=("head_sets.*.local_shape.*",))
    shape_keys = [k for k in before if ".local_shape." in k]
    assert len(shape_keys) == 4 and sorted(report.new) == sorted(shape_keys)
    assert report.ignored == {k: "init_fresh 'head_sets.*.local_shape.*': started fresh" for k in shape_keys}
    after, file = dst.state_dict(), src.state_dict()
    for k in after:
        expected = before[k] if k in shape_keys else file[k]
        assert torch.equal(after[k], expected), k
    assert not torch.equal(before[shape_keys[0]], file[shape_keys[0]])     # the two seeds differ there
    with pytest.raises(ValueError, match="init_fresh pattern 'head.local_shape.*' matches no tensor"):
        import_weights(build_model(ModelConfig(**cfg)), str(tmp_path / "cm.pt"), fresh=("head.local_shape.*",))


# -- torchvision's FCOS -----------------------------------------------------------------------------

@pytest.mark.parametrize("hw", [(320, 416), (800, 1216), (512, 512), (96, 160)])
def test_zero_offset_locations_are_torchvisions_anchor_centres(hw):
    """Guards fcos_form="torchvision"'s locations (the P6/P7 decision): our points of every level equal the
    centres of torchvision's FCOS anchors (AnchorGenerator, sizes 8-128, one per location) on
    inputs padded to 32, including P6/P7 steps of padded size // grid size (320 rows: P7 step
    106, 416 columns: P6 59, P7 104), and the strides stay the anchor sizes."""
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.image_list import ImageList
    H, W = hw
    grids, h, w = [], H // 8, W // 8
    for _ in range(5):
        grids.append((h, w))
        h, w = (h + 1) // 2, (w + 1) // 2                                      # stride-2 conv, padding 1
    gen = AnchorGenerator(((8,), (16,), (32,), (64,), (128,)), ((1.0,),) * 5)
    anchors = gen(ImageList(torch.zeros(1, 3, H, W), [(H, W)]), [torch.zeros(1, 1, *g) for g in grids])[0]
    points, strides, _ = fcos_locations(grids, [8, 16, 32, 64, 128], input_hw=(H, W))
    assert torch.equal(points, (anchors[:, :2] + anchors[:, 2:]) / 2)
    assert torch.equal(strides, anchors[:, 2] - anchors[:, 0])


def test_fcosis_with_torchvision_locations_trains_infers_and_aligns_p2():
    """Guards fcos_form="torchvision" beyond FCOS: FCOSIS (whose attention map reads the P3
    outputs on the P2 grid) trains one step with finite losses and infers masks; its resampling
    of the P3 maps onto P2 puts P3 cell j exactly on P2 cell 2j (the points 8j and 4 * 2j), and
    the regressed centres are the zero-offset points plus s times the head's offsets."""
    cfg = tiny_fcos_config("fcosis")
    model = build_model(cfg)
    images = torch.randn(2, 3, 64, 96)
    mask = torch.zeros(64, 96, dtype=torch.uint8)
    mask[10:40, 20:60] = 1
    targets = [{"boxes": torch.tensor([[20.0, 10.0, 60.0, 40.0]]), "labels": torch.tensor([1]), "masks": mask[None]},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long),
                "masks": torch.zeros(0, 64, 96, dtype=torch.uint8)}]
    losses = model(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    losses["loss"].backward()
    model.eval()
    with torch.no_grad():
        dets = model(images)
        out = model.heads(images)
        regressed, fg = model.p3_maps(out, (64, 96))
        q, up_r, up_fg = model.attention_inputs(out, out["features"][0].shape[-2:], (64, 96))
    assert len(dets) == 2 and dets[0]["masks"].shape[-2:] == (64, 96)
    assert up_r.shape[-2:] == (16, 24) and q[:2].tolist() == [[0.0, 0.0], [4.0, 0.0]]
    assert torch.equal(up_r[..., ::2, ::2], regressed) and torch.equal(up_fg[..., ::2, ::2], fg)
    h, w = out["hw"][0]
    offsets = out["extra"][:, :h * w, :2].transpose(1, 2).reshape(2, 2, h, w)
    grid = torch.stack(torch.meshgrid(torch.arange(w) * 8.0, torch.arange(h) * 8.0, indexing="xy"))  # (2, h, w)
    assert torch.allclose(regressed, grid + 8 * offsets)


def freeze_batchnorm(module):
    """Swap every BatchNorm2d for torchvision's FrozenBatchNorm2d with the same statistics, as
    fcos_resnet50_fpn builds the model of its COCO weights (norm_layer FrozenBatchNorm2d when
    weights are given): the same function as BatchNorm2d in eval mode, in the arithmetic of our
    norm="frozen_bn", so that the two models can agree to the last bit."""
    from torchvision.ops.misc import FrozenBatchNorm2d
    for name, child in module.named_children():
        if isinstance(child, torch.nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            for b in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, b).copy_(getattr(child, b).detach())
            setattr(module, name, frozen)
        else:
            freeze_batchnorm(child)


@pytest.mark.slow
def test_torchvision_fcos_parity_on_coco128():
    """Guards the torchvision FCOS import end to end: torchvision's fcos_resnet50_fpn(weights=None,
    weights_backbone=None, num_classes=91) with seeded random weights (BN statistics, biases, the
    head's GroupNorm and output layers perturbed so that scores, classes and boxes vary), converted
    into our FCOS (80 classes: the channels of COCO's ids; fcos_form="torchvision", scales 1),
    gives the same detections as torchvision's own model in eval
    mode on two COCO128 images: same labels, boxes and scores to 1e-4 (measured: 0 difference).
    Thresholds on both sides: score 0.05 (on sqrt(cls * ctr), torchvision's rule), class-wise NMS
    0.6, 100 detections, top 1000 candidates per level.
    Input: the images resized by PIL to 416 x 320 and 352 x 320 (w x h), then torchvision's
    GeneralizedRCNNTransform with min_size 320 (ImageNet normalisation, a resize at scale 1,
    batching: the second image padded on the right to 416); our model gets that very batch tensor
    and the two image sizes, and its boxes go through the transform's postprocess as torchvision's
    do. Both clip each box to its own image before the NMS (boxes of the second image that reach
    into the padding are shown to exist: decoded against the padded batch they differ). 320 x 416
    is a multiple of 32 but not of 128: P6 / P7 steps are 64 / 106 rows and 59 / 104 columns, and
    a kept detection comes from a P6 cell whose point moves under the nominal stride, so the test
    holds torchvision's step rule (and with FCOS's "half" locations the boxes differ)."""
    import torchvision
    import torchvision.transforms.functional as TF
    paths = [os.path.join(COCO128, "train2017", f) for f in ("000000000009.jpg", "000000000042.jpg")]
    if not all(os.path.isfile(p) for p in paths):
        pytest.skip(f"COCO128 images not found under {COCO128} (set COCO128)")
    torch.manual_seed(0)
    tv = torchvision.models.detection.fcos_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=91, min_size=320, score_thresh=0.05, nms_thresh=0.6,
        detections_per_img=100, topk_candidates=1000)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, t in tv.state_dict().items():
            if name.endswith("running_mean"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
            elif name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) * 1.5 + 0.5)
            elif name.endswith("bias"):
                t.add_(torch.randn(t.shape, generator=g) * 0.1)
            elif name.startswith("head.") and t.dim() == 1:                   # GroupNorm weights
                t.add_(torch.randn(t.shape, generator=g) * 0.1)
        h = tv.head
        h.classification_head.cls_logits.bias.copy_(torch.randn(91, generator=g) * 0.5 - 2.5)
        h.classification_head.cls_logits.weight.mul_(2)
        h.regression_head.bbox_reg.bias.copy_(torch.rand(4, generator=g) + 1.0)
        h.regression_head.bbox_reg.weight.mul_(2)
        h.regression_head.bbox_ctrness.bias.copy_(torch.randn(1, generator=g) * 0.5)
        h.regression_head.bbox_ctrness.weight.mul_(2)
    published = tv.state_dict()                                               # BatchNorm2d: with counters
    freeze_batchnorm(tv)
    tv.eval()
    images = [TF.to_tensor(Image.open(p).convert("RGB").resize(wh, Image.BILINEAR))
              for p, wh in zip(paths, ((416, 320), (352, 320)))]
    batch, _ = tv.transform(images)
    assert tuple(batch.tensors.shape) == (2, 3, 320, 416) and batch.image_sizes == [(320, 416), (320, 352)]

    model = build_model(ModelConfig(method="fcos", backbone="resnet50", num_classes=80, fcos_form="torchvision",
                                    score_threshold=0.05, nms_threshold=0.6, max_detections=100))
    report = import_weights(model, published)
    assert len(report.loaded) == 319 and report.new == ["head.scales"]
    assert sorted(report.ignored) == sorted(k for k in published if k.endswith("num_batches_tracked"))
    model.eval()
    with torch.no_grad():
        ref = tv(images)
        out = model.heads(batch.tensors)
        ours = model.decode(out, batch.tensors.shape[-2:], batch.image_sizes)
        padded = model.decode(out, batch.tensors.shape[-2:])                  # clipped to the batch: other boxes
        assert padded[1]["boxes"][:, 2].max() > 352 and not torch.equal(padded[1]["boxes"], ours[1]["boxes"])
        # our locations are torchvision's anchor centres for this very batch
        features = list(tv.backbone(batch.tensors).values())
        anchors = tv.anchor_generator(batch, features)[0]
        points, _, levels = model.locations(out["hw"], batch.tensors.shape[-2:], "cpu")
        assert torch.equal(points, (anchors[:, :2] + anchors[:, 2:]) / 2)
        detected = model.detect(FCOSForward(out, out["features"], points, levels, tuple(batch.tensors.shape[-2:]),
                                            image_sizes=batch.image_sizes))
        kept = torch.cat([d["index"] for d in detected])
        from_level = [levels[d["index"]] for d in detected]
        # a kept detection sits where torchvision's P6/P7 step (size // grid) and the stride disagree
        half, half_strides, _ = fcos_locations(out["hw"], model.strides)
        nominal = half - (half_strides // 2)[:, None]                            # j * s
        assert (points[kept] != nominal[kept]).any()
    ids = torch.tensor(COCO_CATEGORY_IDS)
    ours = tv.transform.postprocess([{"boxes": d["boxes"], "scores": d["scores"], "labels": ids[d["labels"]]}
                                     for d in ours], batch.image_sizes, [im.shape[-2:] for im in images])
    box_diff = score_diff = 0.0
    for a, b in zip(ref, ours):
        assert len(a["boxes"]) == len(b["boxes"]) == 100
        assert torch.equal(a["labels"], b["labels"])
        box_diff = max(box_diff, (a["boxes"] - b["boxes"]).abs().max().item())
        score_diff = max(score_diff, (a["scores"] - b["scores"]).abs().max().item())
    print(f"torchvision parity: max |box diff| {box_diff:.3g} px, max |score diff| {score_diff:.3g}, "
          f"detections per level {[torch.bincount(l, minlength=5).tolist() for l in from_level]}")
    assert box_diff <= 1e-4 and score_diff <= 1e-4
    # not trivial: several classes, a spread of scores, a detection from P6/P7
    assert len(torch.cat([a["labels"] for a in ref]).unique()) >= 3
    assert torch.cat([a["scores"] for a in ref]).std() > 0.01
    assert int(torch.cat(from_level).max()) >= 3
    with torch.no_grad():
        zero = model.decode(out, batch.tensors.shape[-2:], batch.image_sizes)
        model.cfg.fcos_form = "improved"                                      # FCOS's locations: other boxes
        half = model.decode(out, batch.tensors.shape[-2:], batch.image_sizes)
    assert (half[0]["boxes"][0] - zero[0]["boxes"][0]).abs().max() >= 1.0


def test_torchvision_weights_set_every_key_of_their_form():
    """Guards init_from=torchvision:fcos_resnet50_fpn on the original-FCOS config (config/fcos_r50.py:
    centerness on the classification tower, exp regression, no centre sampling, IoU loss): the
    import sets the form its weights were trained with, fcos_form="torchvision" (the improved FCOS:
    centerness on the box tower, relu(x) * stride, centre sampling 1.5, GIoU; with torchvision's
    locations at j * step), so no hybrid of the two forms is trained."""
    from weights import LoadedWeights
    ns = {"__file__": os.path.join(ROOT, "config", "fcos_r50.py")}
    exec(open(os.path.join(ROOT, "config", "fcos_r50.py")).read(), ns)
    config = {k: ns[k] for k in ("fcos_form", "pretrained")}
    config.update(input_format="rgb_imagenet")
    assert config["fcos_form"] == "original"
    w = LoadedWeights(kind="torchvision_fcos", source="torchvision:fcos_resnet50_fpn", state={})
    assert {k: v for k, v, _ in w.config_updates(config)} == {"fcos_form": "torchvision", "pretrained": False}
    # ... the improved form, with torchvision's conventions: the head and losses of "improved"
    tv = build_model(ModelConfig(method="fcos", backbone="resnet18", fcos_form="torchvision"))
    assert tv.improved and tv.head.improved


def test_torchvision_download_offline_names_the_file(monkeypatch):
    """Guards the offline path of init_from=torchvision:fcos_resnet50_fpn: a failed download stops
    with one line naming the file and torch.hub's checkpoints folder to put it in."""
    import urllib.error
    import torchvision.models._api as api

    def no_network(*a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(api, "load_state_dict_from_url", no_network)
    with pytest.raises(OSError) as e:
        read_weights("torchvision:fcos_resnet50_fpn")
    msg = str(e.value)
    assert "\n" not in msg and "fcos_resnet50_fpn_coco-99b0c9b7.pth" in msg
    assert os.path.join(torch.hub.get_dir(), "checkpoints") in msg
    with pytest.raises(ValueError, match="unknown torchvision weights"):
        read_weights("torchvision:retinanet")


# -- CenterNet's input format -----------------------------------------------------------------------

def test_bgr_coco_input_equals_centernets_preprocessing():
    """Guards input_format="bgr_coco" against CenterNet's preprocessing, on a 2 x 1 image whose
    pixels are RGB (255, 128, 0) and (0, 0, 255). CenterNet reads B, G, R (OpenCV) and computes
    (value / 255 - mean) / std with mean (0.40789654, 0.44719302, 0.47026115) and std
    (0.28863828, 0.27408164, 0.27809835) in B, G, R order:
        pixel 1, B = 0:    (0 - 0.40790) / 0.28864 = -1.41318
                 G = 128:  (0.50196 - 0.44719) / 0.27408 = 0.05477 / 0.27408 = 0.19982
                 R = 255:  (1 - 0.47026) / 0.27810 = 0.52974 / 0.27810 = 1.90486
        pixel 2, B = 255:  (1 - 0.40790) / 0.28864 = 0.59210 / 0.28864 = 2.05137
                 G = 0:    -0.44719 / 0.27408 = -1.63161
                 R = 0:    -0.47026 / 0.27810 = -1.69099
    The test transform at scale 1 (keep_res) gives these numbers (channel 0 = B), equal to
    CenterNet's numpy formula; network_input_rgb gives the RGB pixels back."""
    rgb = np.array([[[255, 128, 0], [0, 0, 255]]], dtype=np.uint8)            # (H=1, W=2, 3)
    t = data.build_transforms("centernet", train=False, input_size=2, keep_res=True, input_format="bgr_coco")
    image, target = data.unlabelled_sample(Image.fromarray(rgb), t)
    hand = torch.tensor([[[-1.41318, 2.05137]], [[0.19982, -1.63161]], [[1.90486, -1.69099]]])
    assert image.shape == (3, 1, 2) and torch.allclose(image, hand, atol=1e-4)
    mean = np.array([0.40789654, 0.44719302, 0.47026115], np.float32)
    std = np.array([0.28863828, 0.27408164, 0.27809835], np.float32)
    centernet = ((rgb[..., ::-1].astype(np.float32) / 255.0 - mean) / std).transpose(2, 0, 1)
    assert torch.allclose(image, torch.from_numpy(centernet.copy()), atol=1e-6)
    assert torch.equal(network_input_rgb(image, "bgr_coco"), torch.from_numpy(rgb).permute(2, 0, 1))
    default = data.build_transforms("centernet", train=False, input_size=2, keep_res=True)
    assert default.input_format == "rgb_imagenet"
    with pytest.raises(ValueError, match="input_format"):
        data.build_transforms("centernet", train=False, input_format="bgr")


def test_bgr_coco_training_crop_is_the_rgb_crop_in_centernets_statistics():
    """Guards the training path (_centernet_train: crop, flip, colour augmentation on RGB, then
    the normalisation): with the same random draws, the "bgr_coco" input is the "rgb_imagenet"
    input with ImageNet's statistics undone, the channels reversed and COCO's applied, on every
    image pixel; outside the image both are 0."""
    rng = np.random.default_rng(0)
    pil = Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8))
    out = {}
    for fmt in ("rgb_imagenet", "bgr_coco"):
        torch.manual_seed(3)
        t = data.build_transforms("centernet", train=True, input_size=48, scale_range=(1.3, 1.3), input_format=fmt)
        out[fmt] = data.unlabelled_sample(pil, t)[0]
    rgb01 = out["rgb_imagenet"] * torch.tensor(data.IMAGENET_STD)[:, None, None] + \
        torch.tensor(data.IMAGENET_MEAN)[:, None, None]
    expect = (rgb01.flip(0) - torch.tensor(data.COCO_BGR_MEAN)[:, None, None]) / \
        torch.tensor(data.COCO_BGR_STD)[:, None, None]
    inside = out["rgb_imagenet"].abs().sum(0) > 0                              # the window's image part
    assert 0 < inside.float().mean() < 1                                       # scale 1.3: some padding
    assert torch.allclose(out["bgr_coco"][:, inside], expect[:, inside], atol=1e-5)
    assert (out["bgr_coco"][:, ~inside] == 0).all()


# -- train.py ----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_train_init_from_centernet_file_runs_and_saves_the_input_format(tmp_path):
    """Guards train.py's init_from=PATH end to end: a fabricated CenterNet DLA-34 checkpoint
    (DataParallel keys, no num_batches_tracked, under 'state_dict') starts a full-width DLA-34
    CenterMask on the tiny shapes set (64 px, 4 classes: COCO ids 1-4): the run prints the
    accounting, sets input_format='bgr_coco' with a line saying why, trains one iteration from
    iteration 0, saves input_format in the checkpoint's config, and eval.py reads it from there.
    A file that is not a checkpoint stops the run with one line naming it."""
    sd = fabricate(manifest(DLA34), "module.", counters=False)
    sd = {k: (v * 0.05 if not k.endswith("running_var") else v) for k, v in sd.items()}  # a tame network
    torch.save({"epoch": 140, "state_dict": sd}, tmp_path / "ctdet_fake.pth")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    args = [f"--shapes_dir={tmp_path / 'shapes'}", f"--out_dir={tmp_path / 'out'}", "--shapes_n_train=8",
            "--shapes_n_val=4", "--input_size=64", "--shape_size=8", "--batch_size=4",
            "--num_workers=0", "--log_interval=1", "--device=cpu", "--threads=1", "--max_iters=1"]
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args,
                        f"--init_from={tmp_path / 'ctdet_fake.pth'}"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    assert "init_from: input_format='bgr_coco' (CenterNet trained these weights on BGR images" in out
    assert "loaded: 333 tensors" in out and "ignored: 10 tensors of the file" in out   # 386 - 53 counters
    assert "base.level3.project.* (5)" in out and "head_sets.0.local_shape.* (4), head_sets.0.saliency.* (4)" in out
    assert "53 BatchNorm num_batches_tracked counters" in out
    assert "COCO category ids 1, 2, 3, 4 (4 of its 80 COCO channels)" in out and "iter 1/1" in out
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", map_location="cpu", weights_only=True)
    assert ckpt["iter"] == 1 and ckpt["config"]["input_format"] == "bgr_coco"
    assert ckpt["config"]["init_from"] == str(tmp_path / "ctdet_fake.pth")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), f"--ckpt={tmp_path / 'out' / 'ckpt.pt'}",
                        "--device=cpu", "--num_workers=0"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "inputs bgr_coco" in r.stdout
    (tmp_path / "notes.txt").write_text("hello\n")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args, "--overwrite=True",   # out holds a run
                        f"--init_from={tmp_path / 'notes.txt'}"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
    assert f"{tmp_path / 'notes.txt'} is not a PyTorch checkpoint" in r.stderr
