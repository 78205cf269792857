"""
Weights from elsewhere: what train.py's init_from=PATH reads besides model.py's own state
dicts (train.py's resume and eval.py run check_weights on those). Nothing here is part of a
method, and model.py imports nothing from here.

    read_weights(source)       a file (or "torchvision:fcos_resnet50_fpn", torchvision's weights
                               API) -> LoadedWeights: its tensors and which layout they follow,
                               refused when they hold NaN / inf or a negative BatchNorm
                               variance (check_weights; eval.py and train.py's resume run it too)
    import_weights(model, w)   the key map of that layout (below), the class channels of the
                               model's labels, every shape checked; loads and returns an
                               ImportReport that accounts for every tensor of the file and of
                               the model: loaded, ignored (with why), newly initialised
    load_file(path)            torch.load with weights_only=True, for every checkpoint a user
                               names: a file whose pickle would run code is refused unrun
    one_line_errors(script)    the user's bad file, image or annotation ends train.py / eval.py
                               with one line (exit status 2), from a DataLoader worker too
"""

import fnmatch
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass

import torch

from model import FCOS_FAMILY


# -----------------------------------------------------------------------------
# Published weights (train.py's init_from=PATH)
#
# The layouts, and what goes where:
#   * CenterNet's ctdet COCO detectors (its src/lib/models/networks/pose_dla_dcn.py `DLASeg` and
#     large_hourglass.py `HourglassNet`, heads hm 80 / wh 2 / reg 2): the backbone and the
#     heatmap / size / offset heads of CenterMask; the Local Shape and Global Saliency heads start
#     fresh. Our DLASeg / Hourglass104 / CenterMaskHeads compute what CenterNet's code computes
#     with the same weights (checked against CenterNet's code with copied weights), so the maps
#     are a renaming; see `_CENTERNET_DLA_RULES` and `_CENTERNET_HOURGLASS_RULES`.
#   * The ImageNet DLA-34 (dla34-ba72cf86.pth, the classifier CenterNet's DLA-34 starts from):
#     the DLA base; its classifier `fc` is dropped.
#   * torchvision's FCOS R-50-FPN COCO detector (torchvision/models/detection/fcos.py): ResNet-50,
#     FPN, P6/P7 and the head of FCOS and of the FCOS part of FCOSreg, MaskFCOS, CenterMask-FCOS
#     and FCOSIS (their own branches start fresh); see `_TORCHVISION_FCOS_RULES`.
#   * A checkpoint of this project (train.py's ckpt.pt): every tensor whose name and shape match
#     (the FPN levels renumbered between FCOS's P3-P7 and FCOSIS's P2-P7).
# Input conventions that come with the weights (set by train.py from `config_updates`):
# CenterNet's detectors saw BGR images normalised with COCO statistics (input_format
# "bgr_coco", data.py); torchvision's FCOS is the improved one with its own locations and
# candidate test (ModelConfig.fcos_form "torchvision", model.py's `FCOS`).

# COCO's 80 category ids in order: CenterNet's class channel k is category COCO_CATEGORY_IDS[k]
# (its `_valid_ids`, src/lib/datasets/dataset/coco.py); torchvision's detectors have 91 slots, the
# channel of category c being c itself (the others, "N/A" and the background, never used).
COCO_CATEGORY_IDS = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25,
    27, 28, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51,
    52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77,
    78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90)

TORCHVISION_FCOS = "torchvision:fcos_resnet50_fpn"

# layout -> (what it is, the methods and the backbone it fits (None: any model), the ModelConfig
# settings it needs)
DLA34_WIDTHS = "dla_channels=(16, 32, 64, 128, 256, 512)"
WEIGHT_LAYOUTS = {
    "centernet_dla34": (
        "CenterNet's ctdet DLA-34 COCO detector (ctdet_coco_dla_1x.pth / ctdet_coco_dla_2x.pth)",
        ("centermask",), "dla34", "dcn=True, " + DLA34_WIDTHS),
    "centernet_hourglass104": (
        "CenterNet's ctdet Hourglass-104 COCO detector (ctdet_coco_hg.pth)", ("centermask",),
        "hourglass104", "num_stacks=2, hg_dims and hg_modules of Hourglass-104"),
    "dla34_imagenet": ("the ImageNet DLA-34 classifier (dla34-ba72cf86.pth)", ("centermask",),
                       "dla34", DLA34_WIDTHS),
    "torchvision_fcos": (
        "torchvision's FCOS R-50-FPN COCO detector (FCOS_ResNet50_FPN_Weights.COCO_V1)",
        FCOS_FAMILY, "resnet50", "fpn_channels=256, head_convs=4"),
    "project": ("a checkpoint of this project", None, None, ""),
}


class _Ignore(str):
    """A key-map rule's verdict: drop the tensor, for this reason."""


_UNUSED_PROJECTION = _Ignore(
    "built by CenterNet's DLA (its Tree makes a 1x1 projection whenever the width changes) but "
    "never used in its forward: a depth-2 Tree hands its residual to its first child, which "
    "projects it itself; our DLA34 does not build it")


def _deform_conv_key(rest):
    """CenterNet's DeformConv (conv = DCNv2 with its conv_offset_mask, actf = BN + ReLU) -> ours
    (conv, offset_mask, bn). The 27 offset / mask channels keep their order: DCNv2 splits them as
    chunks o1, o2, mask (offsets = the first 18, in the (dy, dx) pairs torchvision's
    deform_conv2d reads; mask = the last 9, sigmoid), as `DeformConv.forward` does.
    conv.weight and conv.bias keep their names."""
    return rest.replace("conv.conv_offset_mask.", "offset_mask.").replace("actf.0.", "bn.")


# CenterNet's DLASeg (pose_dla_dcn.py) -> CenterMask on DLA-34. Its IDAUp numbers its nodes
# proj_1, up_1, node_1, ... (setattr); ours holds them in ModuleLists from 0. Heads: hm -> heatmap,
# wh -> size, reg -> offset, each Conv3x3(64 -> 256) + ReLU + Conv1x1 at indices 0 and 2 in both.
# CenterNet's wh is (w, h) (`wh[k] = 1. * w, 1. * h` in its datasets/sample/ctdet.py) and reg
# (x, y) (`reg[k] = ct - ct_int`), the order of our size and offset channels.
_CENTERNET_DLA_RULES = (
    (r"base\.level[34]\.project\..*", _UNUSED_PROJECTION),
    (r"base\.(.+)", r"backbone.base.\1"),
    (r"dla_up\.ida_(\d+)\.(proj|node)_(\d+)\.(.+)",
     lambda m: f"backbone.dla_up.ida.{m[1]}.{m[2]}.{int(m[3]) - 1}.{_deform_conv_key(m[4])}"),
    (r"dla_up\.ida_(\d+)\.up_(\d+)\.weight",
     lambda m: f"backbone.dla_up.ida.{m[1]}.up.{int(m[2]) - 1}.weight"),
    (r"ida_up\.(proj|node)_(\d+)\.(.+)",
     lambda m: f"backbone.ida_up.{m[1]}.{int(m[2]) - 1}.{_deform_conv_key(m[3])}"),
    (r"ida_up\.up_(\d+)\.weight", lambda m: f"backbone.ida_up.up.{int(m[1]) - 1}.weight"),
    (r"hm\.(.+)", r"head_sets.0.heatmap.\1"),
    (r"wh\.(.+)", r"head_sets.0.size.\1"),
    (r"reg\.(.+)", r"head_sets.0.offset.\1"),
)

# CenterNet's HourglassNet (large_hourglass.py, CornerNet's exkp) -> CenterMask on Hourglass-104.
#   pre.0 (convolution: conv, bn)    -> backbone.pre.0 (Sequential: 0 conv, 1 BN)
#   pre.1 (residual)                 -> backbone.pre.1 (Residual: conv1 bn1 conv2 bn2 skip.0 skip.1)
#   kps.s (kp_module: up1, low1, low2 (recursive, or the middle residuals), low3; max1 / up2 /
#          merge have no weights)    -> backbone.hourglasses.s (HourglassModule, the same names)
#   cnvs.s (convolution)             -> backbone.convs.s (0 conv, 1 BN)
#   inters_.s / cnvs_.s (1x1 + BN)   -> backbone.skip_input.s / backbone.skip_features.s
#   inters.s (residual)              -> backbone.inter.s
#   hm / wh / reg .s (make_kp_layer: 0 = convolution(3, with_bn=False): conv with bias, no BN;
#          1 = Conv1x1)              -> head_sets.s.heatmap / size / offset (0 Conv3x3, 2 Conv1x1)
_CENTERNET_HEADS = {"hm": "heatmap", "wh": "size", "reg": "offset"}
_CONV_BN = {"conv": 0, "bn": 1}
_CENTERNET_HOURGLASS_RULES = (
    (r"pre\.0\.(conv|bn)\.(.+)", lambda m: f"backbone.pre.0.{_CONV_BN[m[1]]}.{m[2]}"),
    (r"pre\.1\.(.+)", r"backbone.pre.1.\1"),
    (r"kps\.(\d+)\.(.+)", r"backbone.hourglasses.\1.\2"),
    (r"cnvs\.(\d+)\.(conv|bn)\.(.+)", lambda m: f"backbone.convs.{m[1]}.{_CONV_BN[m[2]]}.{m[3]}"),
    (r"inters\.(\d+)\.(.+)", r"backbone.inter.\1.\2"),
    (r"inters_\.(\d+)\.(.+)", r"backbone.skip_input.\1.\2"),
    (r"cnvs_\.(\d+)\.(.+)", r"backbone.skip_features.\1.\2"),
    (r"(hm|wh|reg)\.(\d+)\.0\.conv\.(weight|bias)",
     lambda m: f"head_sets.{m[2]}.{_CENTERNET_HEADS[m[1]]}.0.{m[3]}"),
    (r"(hm|wh|reg)\.(\d+)\.1\.(weight|bias)",
     lambda m: f"head_sets.{m[2]}.{_CENTERNET_HEADS[m[1]]}.2.{m[3]}"),
)

# The ImageNet DLA-34 (the DLA of pose_dla_dcn.py with a 1x1-conv classifier `fc`) -> the DLA base.
_DLA34_IMAGENET_RULES = (
    (r"fc\..*", _Ignore("the ImageNet classifier (a 1x1 conv to 1000 classes): "
                        "not part of the detector")),
    (r"level[34]\.project\..*", _UNUSED_PROJECTION),
    (r"(base_layer|level\d)\.(.+)", r"backbone.base.\1.\2"),
)


# torchvision's FCOS (fcos.py: resnet50 + _resnet_fpn_extractor(returned_layers [2, 3, 4],
# LastLevelP6P7(256, 256)) + FCOSHead) -> our ResNetFPN + FCOSHead:
#     backbone.body.conv1 / bn1 / layer1-4    -> backbone.stem.0 / stem.1 / stages.0-3
#     backbone.fpn.inner_blocks / layer_blocks.i (C3-C5) -> the same, i + 1 in FCOSIS (P2-P7, whose
#                                                block 0 is C2's, new; `import_weights`)
#     backbone.fpn.extra_blocks.p6 / p7       -> the same (P6 from P5, P7 from ReLU(P6), as ours)
#     head.classification_head.conv / cls_logits -> head.cls_tower / cls_logits (class rows chosen
#                                                by category id, `import_weights`)
#     head.regression_head.conv / bbox_reg / bbox_ctrness -> head.box_tower / ltrb / centerness
# Both towers are 4 x (Conv3x3, GroupNorm(32), ReLU), so the Sequential indices agree.
_TORCHVISION_FCOS_HEAD = {"classification_head.conv": "cls_tower",
                          "classification_head.cls_logits": "cls_logits",
                          "regression_head.conv": "box_tower", "regression_head.bbox_reg": "ltrb",
                          "regression_head.bbox_ctrness": "centerness"}
_TORCHVISION_FCOS_RULES = (
    (r"backbone\.body\.conv1\.(.+)", r"backbone.stem.0.\1"),
    (r"backbone\.body\.bn1\.(.+)", r"backbone.stem.1.\1"),
    (r"backbone\.body\.layer(\d)\.(.+)", lambda m: f"backbone.stages.{int(m[1]) - 1}.{m[2]}"),
    (r"backbone\.fpn\.extra_blocks\.(.+)", r"backbone.fpn.extra_blocks.\1"),
    (r"head\.(classification_head\.(?:conv|cls_logits)"
     r"|regression_head\.(?:conv|bbox_reg|bbox_ctrness))\.(.+)",
     lambda m: f"head.{_TORCHVISION_FCOS_HEAD[m[1]]}.{m[2]}"),
)


def _rename(key, rules):
    """The first rule whose pattern matches the whole key decides: a new name or an _Ignore."""
    for pattern, target in rules:
        m = re.fullmatch(pattern, key)
        if m:
            if isinstance(target, _Ignore):
                return target
            return target(m) if callable(target) else m.expand(target)
    return _Ignore("not part of the layout the key map knows")


# layout -> a few keys only it has
_SIGNATURES = {
    "centernet_dla34": ("base.base_layer.0.weight", "dla_up.ida_0.proj_1.conv.weight"),
    "centernet_hourglass104": ("pre.0.conv.weight", "kps.0.up1.0.conv1.weight"),
    "dla34_imagenet": ("base_layer.0.weight", "level5.root.conv.weight"),
    "torchvision_fcos": ("backbone.body.conv1.weight",
                         "head.classification_head.cls_logits.weight"),
}


def _strip_prefixes(state):
    """Drop DataParallel's "module." and torch.compile's "_orig_mod." from every key."""
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}


def _first_line(e):
    """The telling line of an exception's message (torch.load's weights_only errors put it after
    a paragraph of advice)."""
    text = str(e).split("WeightsUnpickler error:")[-1].strip()
    return text.splitlines()[0] if text else type(e).__name__


# -----------------------------------------------------------------------------
# Files the user names (train.py's resume and init_from, eval.py's and predict.py's --ckpt), and
# the one line that ends a script when the user's files are wrong


def load_file(path, map_location="cpu"):
    """torch.load with weights_only=True, the one reader of every checkpoint and weights file. A
    pickle may name any function to be called while it is read: a file crafted to run code when
    loaded (`__reduce__` returning, say, (os.system, ...)) runs it under weights_only=False.
    weights_only=True unpickles only tensors, numbers, strings and plain containers of them (all
    that train.py's checkpoints and the published weights hold) and refuses any other name
    before it is called. Raises ValueError, one line naming the file: a folder, a missing file,
    a file that is not a PyTorch checkpoint, one that would run code."""
    if os.path.isdir(path):
        raise ValueError(f"{path} is a folder, not a checkpoint file")
    if not os.path.isfile(path):
        raise ValueError(f"{path} not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        # the weights-only unpickler names the refused global: "... GLOBAL builtins.open was not
        # an allowed global ..."
        named = re.search(r"GLOBAL (\S+)", str(e))
        if named:
            raise ValueError(f"{path} is refused: loading it would call {named[1]}, which can run "
                             "any code (a checkpoint holds only tensors, numbers and strings)"
                             ) from None
        # torch.save writes a zip archive (PyTorch before 1.6, CenterNet's files: a bare pickle);
        # what torch says of another file is pickle jargon ("could not find MARK", "KeyError: 101")
        with open(path, "rb") as f:
            if f.read(4) != b"PK\x03\x04":
                raise ValueError(f"{path} is not a PyTorch checkpoint") from None
        raise ValueError(f"{path} is a damaged PyTorch checkpoint (cut short while copied or "
                         f"written?): {type(e).__name__}: {_first_line(e)}") from None


def one_line_errors(script):
    """End `script` (train.py, eval.py) with one line "script: error: message" and exit status 2
    when the user's files are wrong: an OSError (a missing or unreadable file or folder), a
    ValueError (data.py's and weights.py's refusals name the file, annotation or key) or
    data.ImageReadError, in the main process or in a DataLoader worker. The loader raises a
    worker's exception again in the main process with the worker's whole traceback as its
    message (dozens of lines), whose last line is the worker's message: that line is printed.
    Any other exception, and every one with the environment variable CENTERMASK_DEBUG=1, prints
    its traceback as Python does. A sys.excepthook: nothing in the script needs a `try`, and the
    SystemExit raised by the hook is the exit status Python ends with."""
    from data import ImageReadError
    previous = sys.excepthook

    def hook(kind, e, tb):
        if os.environ.get("CENTERMASK_DEBUG") == "1" or \
                not issubclass(kind, (OSError, ValueError, ImageReadError)):
            return previous(kind, e, tb)
        text = str(e).strip()
        if text.startswith("Caught ") and "Original Traceback" in text:      # a worker's
            text = text.splitlines()[-1].split(": ", 1)[-1]
        print(f"{script}: error: {text}", file=sys.stderr, flush=True)
        raise SystemExit(2)
    sys.excepthook = hook


def check_weights(state, source):
    """Refuse weights that cannot run: a tensor holding NaN or inf, or a BatchNorm running_var below
    0 (eval-mode BatchNorm divides by its square root: NaN, which DLA-34's deformable convolutions
    would read as sampling offsets). Such a file is corrupt, hand-made, or saved from a diverged
    run. state: {name: tensor}. Raises ValueError naming `source` and the first such tensor."""
    bad = []
    for k, v in state.items():
        if not torch.is_tensor(v) or not v.is_floating_point():
            continue
        if n := int((~torch.isfinite(v)).sum()):
            bad.append(f"tensor {k} holds {n} non-finite value(s) (NaN or inf) of {v.numel()}")
        elif k.endswith("running_var") and (n := int((v < 0).sum())):
            bad.append(f"tensor {k} holds {n} negative BatchNorm running variance(s) of "
                       f"{v.numel()} (min {float(v.min()):.3g}; a variance is >= 0)")
    if bad:
        more = f" (and {len(bad) - 1} more tensor(s))" if len(bad) > 1 else ""
        raise ValueError(f"{source}: {bad[0]}{more}: a corrupt or hand-made file, or one saved "
                         "from a diverged run; not loaded")


@dataclass
class LoadedWeights:
    """What read_weights found: the layout (a WEIGHT_LAYOUTS key), its tensors (names as in the
    file, "module." / "_orig_mod." removed), and for our own checkpoints the model_args, the
    train.py config and label_to_cat_id they were trained with."""
    kind: str
    source: str
    state: dict
    model_args: dict = None
    config: dict = None
    label_to_cat_id: list = None

    @property
    def description(self):
        what = WEIGHT_LAYOUTS[self.kind][0]
        if self.kind == "project":
            a = self.model_args or {}
            what += f" ({a.get('method')} / {a.get('backbone')})"
        return what

    def config_updates(self, config):
        """(key, value, why) for the train.py config keys that these weights decide, where
        `config` (train.py's resolved config) says otherwise: the input format and the form of FCOS
        the weights were trained with (torchvision's: fcos_form="torchvision"), and
        pretrained=False when the file holds the backbone (no ImageNet download to overwrite)."""
        want = []
        if self.kind in ("centernet_dla34", "centernet_hourglass104"):
            want.append(("input_format", "bgr_coco", "CenterNet trained these weights on BGR "
                         "images normalised with COCO statistics, its "
                         "src/lib/datasets/dataset/coco.py"))
        elif self.kind == "torchvision_fcos":
            want.append(("fcos_form", "torchvision", "torchvision's FCOS is the improved one, with "
                         "its own locations and candidate test (model.py, `FCOS`)"))
            want.append(("pretrained", False, "the ResNet-50 comes from the file"))
        elif self.kind == "project":
            args = self.model_args or {}
            want.append(("input_format", (self.config or {}).get("input_format", "rgb_imagenet"),
                         "as the checkpoint was trained"))
            if "fcos_form" in args:
                want.append(("fcos_form", args["fcos_form"], "as the checkpoint was trained"))
            if args.get("backbone") == config.get("backbone"):
                want.append(("pretrained", False, "the backbone comes from the checkpoint"))
        return [(k, v, why) for k, v, why in want if k in config and config[k] != v]


def _torchvision_fcos_state():
    """torchvision's FCOS R-50-FPN COCO weights through its weights API (downloaded once into
    torch.hub's cache). Offline, a one-line error names the file and where to put it."""
    from urllib.parse import urlparse
    from torchvision.models.detection import FCOS_ResNet50_FPN_Weights
    weights = FCOS_ResNet50_FPN_Weights.COCO_V1
    try:
        return weights.get_state_dict(progress=True, check_hash=True)
    except Exception as e:  # URLError, OSError, hash mismatch, ...
        name = os.path.basename(urlparse(weights.url).path)
        folder = os.path.join(torch.hub.get_dir(), "checkpoints")
        raise OSError(f"could not load torchvision's FCOS R-50-FPN COCO weights "
                      f"({type(e).__name__}: {_first_line(e)}); without a network, put {name} "
                      f"(from {weights.url}) into {folder}") from e


def read_weights(source):
    """
    Read the weights to start from: a path (torch.load with weights_only=True: tensors and
    plain containers only), TORCHVISION_FCOS ("torchvision:fcos_resnet50_fpn"), or an already
    loaded dict. Recognised: this project's checkpoints ({"model", "model_args", ...}),
    CenterNet's ({"state_dict": ...}, or the bare state dict; keys with or without DataParallel's
    "module."), the ImageNet DLA-34 and torchvision's FCOS (bare state dicts). -> LoadedWeights.
    Raises ValueError (RuntimeError for a failed torchvision download) with a one-line message
    naming the source; weights that cannot run (NaN / inf, a negative BatchNorm variance:
    check_weights) are refused the same way.
    """
    if isinstance(source, dict):
        obj, name = source, "<state dict>"
    elif source == TORCHVISION_FCOS:
        obj, name = _torchvision_fcos_state(), source
    elif str(source).startswith("torchvision:"):
        raise ValueError(f"unknown torchvision weights {source!r} (known: {TORCHVISION_FCOS!r})")
    else:
        name = str(source)
        obj = load_file(name)
    if not isinstance(obj, dict):
        raise ValueError(f"{name} holds a {type(obj).__name__}, not a checkpoint "
                         "(a dict of tensors)")
    # train.py's checkpoints
    if "model" in obj and "model_args" in obj:
        check_weights(obj["model"], name)
        return LoadedWeights("project", name, _strip_prefixes(obj["model"]),
                             model_args=dict(obj["model_args"]),
                             config=dict(obj.get("config") or {}),
                             label_to_cat_id=obj.get("label_to_cat_id"))
    # CenterNet's checkpoints hold the state dict under "state_dict"
    state = obj.get("state_dict", obj)
    state = state if isinstance(state, dict) else {}
    state = _strip_prefixes({k: v for k, v in state.items() if torch.is_tensor(v)})
    kind = next((kind for kind, keys in _SIGNATURES.items() if set(keys) <= set(state)), None)
    if kind is None:
        some = ", ".join(list(state)[:4]) or "no tensors"
        raise ValueError(f"{name} is none of the weights init_from knows (CenterNet's ctdet DLA-34 "
                         "/ Hourglass-104, the ImageNet DLA-34, torchvision's FCOS, a train.py "
                         f"checkpoint); its first keys: {some}")
    check_weights(state, name)
    return LoadedWeights(kind, name, state)


def _class_rows(cat_ids, num_classes, by_id):
    """The rows of a COCO-trained class layer that become this model's labels 0..C-1: label k is
    category cat_ids[k] (the training json's ids, data.CocoInstances.label_to_cat_id; default
    COCO's 80 when the model has 80 classes). by_id: the layer's row of category c is c
    (torchvision's 91 slots), else its position in COCO_CATEGORY_IDS (CenterNet's 80)."""
    if cat_ids is None:
        if num_classes != len(COCO_CATEGORY_IDS):
            raise ValueError("the file's class channels are COCO's 80 categories and this model "
                             f"has {num_classes} classes: give the COCO category id of each label "
                             "(train.py passes the training json's)")
        cat_ids = COCO_CATEGORY_IDS
    cat_ids = [int(c) for c in cat_ids]
    if len(cat_ids) != num_classes:
        raise ValueError(f"{len(cat_ids)} category ids for a model of {num_classes} classes")
    unknown = [c for c in cat_ids if c not in COCO_CATEGORY_IDS]
    if unknown:
        raise ValueError(f"category id(s) {unknown} of the training json are not COCO categories: "
                         "the file's class channels cannot be given to them")
    return [c if by_id else COCO_CATEGORY_IDS.index(c) for c in cat_ids], cat_ids


def _is_counter(key):
    return key.endswith("num_batches_tracked")


def _group_keys(keys, universe, limit=12):
    """A short listing of `keys` (a subset of `universe`): each key is shown by its shortest
    dotted prefix all of whose `universe` keys are in `keys`, as "prefix.* (n)". BatchNorm's
    step counters, scattered over every BN, are only counted (those a model has and a file lacks
    stay 0: unused with a fixed momentum)."""
    def prefixes(k):
        parts = k.split(".")
        return [".".join(parts[:n]) for n in range(1, len(parts) + 1)]
    counters = [k for k in keys if _is_counter(k)]
    keys = [k for k in keys if not _is_counter(k)]
    in_universe = Counter(p for k in universe if not _is_counter(k) for p in prefixes(k))
    in_keys = Counter(p for k in keys for p in prefixes(k))
    groups = dict.fromkeys(next(p for p in prefixes(k) if in_keys[p] == in_universe[p])
                           for k in keys)
    shown = [p if p in keys and in_keys[p] == 1 else f"{p}.* ({in_keys[p]})" for p in groups]
    if len(shown) > limit:
        shown[limit:] = [f"... ({len(shown) - limit} more groups)"]
    if counters:
        shown.append(f"{len(counters)} BatchNorm num_batches_tracked counters")
    return ", ".join(shown)


@dataclass
class ImportReport:
    """Every tensor of an import accounted for (import_weights): loaded (model keys), ignored
    (file key -> why), new (model keys left as the model initialised them), notes (class
    channels, settings), and the file's and the model's key lists (for the grouped listing)."""
    source: str
    description: str
    model: str
    loaded: list
    ignored: dict
    new: list
    notes: list
    file_keys: list
    model_keys: list

    def __str__(self):
        lines = [f"init_from {self.source}: {self.description} -> {self.model}",
                 f"  loaded: {len(self.loaded)} tensors"]
        lines += [f"  note: {n}" for n in self.notes]
        colon = ":" if self.ignored else ""  # a listing follows
        lines.append(f"  ignored: {len(self.ignored)} tensors of the file{colon}")
        by_reason = {}
        for k, why in self.ignored.items():
            by_reason.setdefault(why, []).append(k)
        for why, keys in by_reason.items():
            lines.append(f"    {_group_keys(keys, self.file_keys)}: {why}")
        colon = ":" if self.new else ""
        lines.append(f"  newly initialised: {len(self.new)} tensors of the model{colon}")
        if self.new:
            lines.append(f"    {_group_keys(self.new, self.model_keys)}")
        return "\n".join(lines)


def import_weights(model, weights, cat_ids=None, fresh=()):
    """
    Load published weights (or one of our checkpoints) into `model` (built, not yet wrapped in
    DDP): weights = a LoadedWeights or anything read_weights takes. cat_ids: the COCO category
    id of each of the model's labels (label k = category cat_ids[k]; the training json's
    `label_to_cat_id`), used to pick the class channels of CenterNet's heatmap and torchvision's
    classifier (ids that are not COCO's are refused unless `fresh` leaves that class layer out, so
    that it starts fresh); default COCO's 80 when the model has 80 classes. fresh: glob patterns
    over the model's key names (fnmatch, e.g. "head_sets.*.local_shape.*"): the file's tensors for
    those keys are not loaded (listed as ignored), the keys stay as the model initialised them
    (train.py's `init_fresh`: a head that the file holds but that should start over); a pattern
    that matches no key of the model is refused, so that a typo cannot load what it meant to leave
    out.
    Published layouts are refused when they do not fit the model (a file of another model, a
    model built with other widths): a tensor the model lacks, or of another shape, stops the
    import naming the keys and shapes. Our checkpoints load what matches by name and shape, the
    rest is listed as ignored. Returns an ImportReport (print it).
    """
    if not isinstance(weights, LoadedWeights):
        weights = read_weights(weights)
    cfg, kind = model.cfg, weights.kind
    what = f"{cfg.method} / {cfg.backbone}"
    desc, methods, backbone, needs = WEIGHT_LAYOUTS[kind]
    if methods and (cfg.method not in methods or cfg.backbone != backbone):
        raise ValueError(f"{weights.source} holds {desc}; it fits method="
                         f"{' / '.join(map(repr, methods))}, backbone={backbone!r}, not this "
                         f"{what} model")
    # the first FPN level: FCOSIS's P2, else P3 (the file's from the method it was trained as)
    first_level = getattr(getattr(model, "backbone", None), "first_level", 3)
    src_first_level = 2 if (weights.model_args or {}).get("method") == "fcosis" else 3
    rules = {"centernet_dla34": _CENTERNET_DLA_RULES,
             "centernet_hourglass104": _CENTERNET_HOURGLASS_RULES,
             "dla34_imagenet": _DLA34_IMAGENET_RULES,
             "torchvision_fcos": _TORCHVISION_FCOS_RULES,
             "project": ((r"(.+)", r"\1"),)}[kind]         # ours: the same names
    # the FPN's blocks renumbered (FCOS's C3-C5 are blocks 0-2, FCOSIS's C2-C5 blocks 0-3), so that
    # each level finds its own
    shift = src_first_level - first_level
    rules = ((r"backbone\.fpn\.(inner|layer)_blocks\.(\d+)\.(.+)",
              lambda m: f"backbone.fpn.{m[1]}_blocks.{int(m[2]) + shift}.{m[3]}"), *rules)
    model_state = model.state_dict()
    mapped, source_of, ignored, missing, notes = {}, {}, {}, [], []
    for key, tensor in weights.state.items():
        target = _rename(key, rules)
        if isinstance(target, _Ignore):
            ignored[key] = str(target)
        elif target not in model_state:
            if _is_counter(key):
                ignored[key] = ("BatchNorm's step counter: this model's (frozen) BatchNorm "
                                "keeps none")
            elif kind == "project":
                ignored[key] = f"this {what} model has no such tensor"
            else:
                missing.append((key, target))
        else:
            mapped[target], source_of[target] = tensor, key
    if missing:
        examples = "; ".join(f"{k} -> {t}" for k, t in missing[:3])
        raise ValueError(f"this {what} model has no tensor for {len(missing)} of the "
                         f"{len(weights.state)} tensors of {weights.source} ({desc}), "
                         f"e.g. {examples}: it needs {needs}")
    # init_fresh: left as initialised
    for pattern in fresh:
        keys = [t for t in model_state if fnmatch.fnmatchcase(t, pattern)]
        if not keys:
            raise ValueError(f"init_fresh pattern {pattern!r} matches no tensor of this {what} "
                             f"model (its keys look like {next(iter(model_state))})")
        for t in keys:
            if t in mapped:
                ignored[source_of[t]] = f"init_fresh {pattern!r}: started fresh"
                del mapped[t]
    # class channels: the rows of the model's labels, by COCO category id (unless init_fresh left
    # the class layer out: a training json whose categories are not COCO's starts it fresh). The
    # class layer as an init_fresh pattern:
    class_layer = {"centernet_dla34": "head_sets.*.heatmap.2.*",
                   "centernet_hourglass104": "head_sets.*.heatmap.2.*",
                   "torchvision_fcos": "head.cls_logits.*"}.get(kind)
    class_keys = [t for t in mapped if class_layer and fnmatch.fnmatchcase(t, class_layer)]
    if class_keys:
        by_id = kind == "torchvision_fcos"
        try:
            rows, ids = _class_rows(cat_ids, cfg.num_classes, by_id)
        except ValueError as e:
            raise ValueError(f"{e}; to start the class layer fresh and import the rest: "
                             f"--init_fresh='(\"{class_layer}\",)'") from None
        slots = "91 slots (channel = category id)" if by_id else "80 COCO channels"
        for t in class_keys:
            if mapped[t].shape[0] <= max(rows):
                raise ValueError(f"{source_of[t]} has {mapped[t].shape[0]} class channels, not the "
                                 f"{slots} of {desc}")
            mapped[t] = mapped[t][rows]
        shown = ", ".join(map(str, ids[:8])) + (", ..." if len(ids) > 8 else "")
        notes.append(f"class channels: labels 0..{len(ids) - 1} <- the file's channels of COCO "
                     f"category ids {shown} ({len(ids)} of its {slots})")
    mismatched = [(source_of[t], t, tuple(v.shape), tuple(model_state[t].shape))
                  for t, v in mapped.items() if v.shape != model_state[t].shape]
    if mismatched and kind != "project":
        listing = "; ".join(f"{k} {a} in the file, {t} {b} in the model"
                            for k, t, a, b in mismatched[:4])
        more = " ..." if len(mismatched) > 4 else ""
        raise ValueError(f"shape mismatch ({len(mismatched)} tensors) between {weights.source} "
                         f"({desc}) and this {what} model: {listing}{more}; it needs {needs}")
    # our checkpoints: skip them
    for k, t, a, b in mismatched:
        ignored[k] = f"shape {a} in the file, {b} in this model"
        del mapped[t]
    if not mapped:
        raise ValueError(f"nothing in {weights.source} ({weights.description}) fits this {what} "
                         "model")
    model.load_state_dict(mapped, strict=False)               # every key of `mapped` is the model's
    new = [k for k in model_state if k not in mapped]
    if kind == "torchvision_fcos":
        with torch.no_grad():
            model.head.scales.fill_(1.0)
        notes.append("head.scales set to 1 (torchvision's FCOS has no learnable scale: its "
                     "ltrb = relu(x) * stride)")
        if cfg.fcos_form != "torchvision":
            notes.append(f"this model has fcos_form={cfg.fcos_form!r}: torchvision's weights need "
                         "'torchvision' (train.py sets it)")
    if kind in ("centernet_dla34", "centernet_hourglass104"):
        notes.append("inputs as CenterNet's: BGR, COCO statistics (input_format='bgr_coco'; "
                     "train.py sets it)")
    if kind == "dla34_imagenet":
        notes.append("the ImageNet DLA-34 was trained on RGB images with ImageNet statistics "
                     "(input_format 'rgb_imagenet', the default); CenterNet fed it BGR / COCO "
                     "statistics")
    return ImportReport(weights.source, weights.description, what, list(mapped), ignored, new,
                        notes, list(weights.state), list(model_state))
