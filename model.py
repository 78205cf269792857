"""
Anchor-free, one-stage instance segmentation in one file: every backbone, head, target
builder, loss, mask assembly and decoder, in reading order.

    1. ModelConfig and Method                     the knobs of every method, what every model provides
    2. Shared by the methods                      reduce_mean (the normalisers' contract), inside (three box
                                                  rules), the layouts of a batch's objects, pooled masks
    3. DLA-34 + DLA-up (CenterNet's `DLASeg`)     stride-4, 64-channel features
    4. Hourglass-104 (CenterNet's `large_hourglass`)  two stacks of stride-4, 256-channel features
    5. CenterNet targets                          gaussian_radius, batched heatmaps
    6. CenterNet losses                           penalty-reduced focal loss, L1 at the centres
    7. CenterMask                                 Local Shape x Global Saliency ([CM])
    8. ResNet / ResNeXt + FPN                     P3-P7 (P2-P7 for FCOSIS), torchvision parts
    9. FCOS and FCOSreg                           fcos_targets, focal / IoU or GIoU / centerness, NMS
   10. MaskFCOS                                   FCOS proposals + RoIAlign mask head
   11. CenterMask-FCOS                            Local Shape x Global Saliency on FCOS
   12. FCOSIS                                     attention map, colouring, segmentation head
   13. build_model(cfg)                           the one entry point: ModelConfig -> the method's model

Elsewhere: weights.py (published weights, old checkpoint keys), train.py (gradient accumulation),
pictures.py (the teaching pictures), configurator.py (the keys each method reads), train.py /
eval.py / predict.py / bench.py. How each method works and where each constant comes from: METHODS.md.

Papers (sections, equations and tables are cited as [CM 3.1], [CM] eq. 2, [IS] Table 3):
    [CM]   Wang et al., "CenterMask: single shot instance segmentation with point
           representation", CVPR 2020, arXiv 2004.04446.
    [CN]   Zhou et al., "Objects as Points" (CenterNet), arXiv 1904.07850, which [CM] builds on, with
           "the same hyper-parameters of CenterNet" ([CM 3.5]).
    [DLA]  Yu et al., "Deep Layer Aggregation", CVPR 2018.
    CornerNet  Law and Deng, "CornerNet: Detecting Objects as Paired Keypoints", ECCV 2018,
           whose Hourglass-104 (CornerNet 3.5) CenterNet and [CM] reuse unchanged.
    [IS]   "FCOSIS: Fully-Convolutional One-Stage Instance Segmentation", anonymous CVPR
           submission (paper ID 8272), with FCOSreg ([IS 3.3]) and MaskFCOS ([IS 4]).
    [FCOS] Tian et al., "FCOS: Fully Convolutional One-Stage Object Detection", ICCV 2019, the
           detector [IS] and [CM 4.3] build on.

Coordinate frames used throughout:
    * input frame: pixels of the network input (the padded batch), x right, y down; pixel X
      covers [X, X+1), so its centre is X + 0.5. Boxes are xyxy floats in this frame.
    * output frame: the stride-R feature map (R = 4 for CenterNet backbones); a point u in
      output units is the point R*u in the input frame, so cell j covers [j, j+1) and its
      centre j + 0.5 sits at input R*j + R/2.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import deform_conv2d

# -----------------------------------------------------------------------------
# 1. Configuration


METHODS = ("centermask", "fcos", "fcosreg", "maskfcos", "centermask_fcos", "fcosis")
MASK_METHODS = ("centermask", "maskfcos", "centermask_fcos", "fcosis")          # they segment
FCOS_FAMILY = ("fcos", "fcosreg", "maskfcos", "centermask_fcos", "fcosis")      # ResNet-FPN + FCOS


@dataclass
class ModelConfig:
    """Architecture knobs of every method, grouped by the methods that read them (configurator.py's
    config_groups; train.py stops a run that sets a key its method does not read). Checkpoints'
    `model_args`."""
    # -- every method ------------------------------------------------------------------------
    method: str = "centermask"        # which system build_model() makes (METHODS)
    # CenterMask: "dla34" or "hourglass104" ([CM 3.5], Table 1b); the FCOS family: "resnet50",
    # "resnet101", "resnext101_32x8d" ("resnet18" / "resnet34" for CPU demos)
    backbone: str = "dla34"
    num_classes: int = 80             # COCO
    max_detections: int = 100         # top-K peaks ([CM 3.5]); detections after NMS ([FCOS] 4)
    # -- every method that segments (MASK_METHODS) -------------------------------------------
    # binarisation of mask probabilities; None: 0.4 for CenterMask(-FCOS) ([CM 3.5]), 0.5 for
    # MaskFCOS (Mask R-CNN's, [IS 4]) and FCOSIS ([IS] gives none)
    mask_threshold: float = None
    # -- CenterMask, backbone="dla34": DLA-34 + DLA-up ---------------------------------------
    dcn: bool = True                  # DLA-up nodes: modulated deformable conv ([CN] 4) or 3x3
    # [DLA] Table 1, DLA-34; narrower only for CPU demos
    dla_channels: tuple = (16, 32, 64, 128, 256, 512)
    # -- CenterMask, backbone="hourglass104" (CornerNet 3.5); smaller for tests and CPU demos --
    num_stacks: int = 2               # hourglass stacks, each with its own heads
    hg_dims: tuple = (256, 256, 384, 384, 384, 512)  # width per level: 5 downsamplings
    hg_modules: tuple = (2, 2, 2, 2, 2, 4)  # residual blocks per level; 4 in the middle
    # -- CenterMask: CenterNet's targets and losses ([CN] 3, [CM 3.4]) -----------------------
    # grid of CenterMask's mask loss ([CM] eq. 2 gives none): "output" (stride R, ground truth
    # average-pooled) or "input" (input pixels, binary ground truth)
    mask_loss_grid: str = "output"
    # -- Local Shape x Global Saliency: CenterMask and CenterMask-FCOS ([CM 3]) ---------------
    head_conv: int = 256              # hidden width of every head ([CN] 4)
    shape_size: int = 32              # S: local shape is S x S ([CM 3.5], Table 1a)
    use_shape: bool = True            # Local Shape ([CM 3.1]); False: saliency only (Table 1c)
    use_saliency: bool = True         # Global Saliency ([CM 3.2]); False: shape only (Table 1d)
    saliency: str = "agnostic"        # or "specific" (C channels), [CM 3.2], Table 1e
    saliency_loss: bool = False       # direct BCE on class-specific saliency ([CM 4.1], Table 1f)
    # lambda_p, lambda_off, lambda_size, lambda_mask [CM 3.5] (CenterMask-FCOS: lambda_mask only)
    loss_weights: tuple = (1.0, 1.0, 0.1, 1.0)
    # -- the FCOS family (FCOS_FAMILY): ResNet-FPN and the FCOS detector ([FCOS], [IS 3.1]) ---
    pretrained: bool = False          # ImageNet weights (FCOS recipes; [CM 3.5]: from scratch)
    # "frozen_bn": BatchNorm frozen to ImageNet statistics and the stem + res2 frozen, as FCOS
    # (FREEZE_CONV_BODY_AT 2); "bn": every layer trainable, BatchNorm too (from scratch)
    norm: str = "frozen_bn"
    fpn_channels: int = 256           # FPN and head tower width ([FCOS] 3.2)
    # "original" ([FCOS], FCOS's code defaults: the [IS] configs), "improved" (FCOS's
    # fcos_imprv_*, torchvision's), or "torchvision": the improved one with torchvision's two
    # conventions, set for its weights (see `FCOS`)
    fcos_form: str = "improved"
    score_threshold: float = 0.05     # candidate locations at inference ([FCOS] 4)
    nms_threshold: float = 0.6        # class-wise NMS IoU ([FCOS] 4)
    # FCOSreg's assignment ([IS 3.3]); "fcos" keeps FCOS's, the methods with masks may change them
    # "area" (FCOS: smallest box) or "mask" (FCOSreg [IS 3.3]); "": the method's own
    ambiguity: str = ""
    # (a, b, c) of FCOSreg's w ([IS 3.3] Fig. 6); (): (1, 0, 0) FCOS, (1/3, 1/3, 1/3) FCOSreg
    reg_weights: tuple = ()
    # sampling centre: "box" or "mass" (the mask's centre of mass, [IS 3.3] Fig. 5)
    center_sampling_at: str = "box"
    # -- MaskFCOS ([IS 4], "Mask Prediction Head") -------------------------------------------
    mask_proposals: int = 64          # detections per image used as RoIs in training (not in [IS])
    # -- FCOSIS ([IS 3.2]) -------------------------------------------------------------------
    # "segm" (the paper's map); Table 3: "mu0" (mu := 0), "bbox" (bbox only), "none" (no top-down)
    attention: str = "segm"
    # segmentation output: "agnostic" (1 channel, [IS 3.2.2]) or "specific" (C, [IS 3.2.1])
    seg_classes: str = "agnostic"

    # the keys with a fixed set of values
    CHOICES = {"method": METHODS, "saliency": ("agnostic", "specific"),
               "norm": ("frozen_bn", "bn"), "ambiguity": ("area", "mask"),
               "center_sampling_at": ("box", "mass"), "attention": ("segm", "mu0", "bbox", "none"),
               "seg_classes": ("agnostic", "specific"), "mask_loss_grid": ("output", "input"),
               "fcos_form": ("original", "improved", "torchvision")}

    def __post_init__(self):
        # tuples survive a round trip through a checkpoint's plain dict / the configurator
        for key, kind in (("dla_channels", int), ("hg_dims", int), ("hg_modules", int),
                          ("loss_weights", float), ("reg_weights", float)):
            setattr(self, key, tuple(kind(v) for v in getattr(self, key)))
        # the defaults that depend on the method
        centermasks = ("centermask", "centermask_fcos")
        if self.mask_threshold is None:
            self.mask_threshold = 0.4 if self.method in centermasks else 0.5
        fcosreg = self.method == "fcosreg"
        self.ambiguity = self.ambiguity or ("mask" if fcosreg else "area")
        fcos_weights = (1.0, 0.0, 0.0)
        self.reg_weights = self.reg_weights or ((1 / 3, 1 / 3, 1 / 3) if fcosreg else fcos_weights)
        for key, allowed in self.CHOICES.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"ModelConfig.{key} must be one of {allowed}, "
                                 f"got {getattr(self, key)!r}")
        on_centernet = self.backbone in ("dla34", "hourglass104")
        hg = self.backbone == "hourglass104"
        # (a configuration that cannot work, its one-line message naming the key)
        rules = (
            (not (self.use_shape or self.use_saliency),
             "use_shape and use_saliency cannot both be False (no mask branch left)"),
            (hg and (len(self.hg_dims) != len(self.hg_modules) or len(self.hg_dims) < 2),
             f"hg_dims {self.hg_dims} and hg_modules {self.hg_modules} need the same length "
             "(>= 2: one entry per level, the last the middle)"),
            (hg and (self.num_stacks < 1 or min(self.hg_modules) < 1),
             "num_stacks and every hg_modules entry must be >= 1"),
            (on_centernet != (self.method == "centermask"),
             f"backbone {self.backbone!r} does not fit method {self.method!r}: CenterMask runs on "
             "'dla34' or 'hourglass104', the others on a ResNet-FPN ('resnet50', 'resnet101', "
             "'resnext101_32x8d'; CenterMask on a ResNet-FPN is method='centermask_fcos')"),
            (not 0.0 <= self.mask_threshold <= 1.0,
             f"mask_threshold must be a probability in [0, 1], got {self.mask_threshold}"),
            (len(self.reg_weights) != 3 or abs(sum(self.reg_weights) - 1) > 1e-6,
             f"reg_weights must be 3 numbers (a, b, c) summing to 1 ([IS 3.3]), "
             f"got {self.reg_weights}"),
            (self.method == "fcos" and (self.ambiguity == "mask" or self.reg_weights != fcos_weights
                                        or self.center_sampling_at == "mass"),
             "ambiguity='mask', center_sampling_at='mass' and reg_weights need the masks: use "
             "method='fcosreg' ([IS 3.3])"),
            (self.mask_loss_grid != "output" and self.method != "centermask",
             f"mask_loss_grid={self.mask_loss_grid!r} is CenterMask's (method='centermask'); "
             f"{self.method!r} has its own mask loss"),
            (self.saliency_loss and self.method not in centermasks,
             "saliency_loss (Table 1f) is CenterMask's (method='centermask' or 'centermask_fcos')"),
            (self.saliency_loss and self.saliency != "specific",
             "saliency_loss=True needs saliency='specific' (the direct supervision of [CM] "
             "Table 1f is per class)"))
        for broken, message in rules:
            if broken:
                raise ValueError(f"ModelConfig: {message}")


class Method(nn.Module):
    """What every method's model provides; train.py, eval.py, predict.py and bench.py use nothing else.
    B images, H x W the padded batch, frames as in the module docstring.

    model(images, targets)   train mode: images (B, 3, H, W) normalised (data.py), H, W multiples of
                             `size_divisibility`; targets B dicts (data.py: "boxes" (N, 4) xyxy input frame,
                             "labels" (N,) int64 in 0..C-1, "masks" (N, H, W) uint8) -> dict of named, weighted
                             scalar losses and "loss", their sum (what train.py backpropagates)
    model(images, image_sizes=None)
                             eval mode -> B dicts, input frame: "boxes" (K, 4) xyxy, "scores" (K,), "labels" (K,),
                             and for the methods that segment "masks" (K, H, W) probabilities; image_sizes: B
                             (h, w), each image before padding (data.py's target["size"]), which the FCOS family
                             clips its boxes to before NMS (None: the padded batch)
    model.heads(images)      the raw network outputs, a dict of tensors
    model.decode(out, hw, image_sizes=None)
                             heads(images) -> the eval-mode list: all the post-processing (bench.py times it)
    model.cfg                the ModelConfig (checkpoints' `model_args`)
    model.size_divisibility  pad the batch to a multiple of this (data.collate_fn)
    model.mask_threshold     binarisation of the mask probabilities (cfg.mask_threshold)
    Method.transform         the recipe's data transform: "centernet" (square canvas) or "fcos" (short side)

    Two contracts, each checked with a one-line error: the loss keys are the same in every forward, a batch
    without objects included; every count that normalises a loss goes through `reduce_mean` (section 2), the
    same number of times in every forward. Adding a method (FCOS's hooks among them): README, "Adding a method".
    """
    transform = None                  # each method's class sets it

    @property
    def mask_threshold(self):
        return self.cfg.mask_threshold


# -----------------------------------------------------------------------------
# 2. Shared by the methods (loss normalisers, box rules, batch layouts, pooled masks)

# -- loss normalisers -----------------------------------------------------------------------------
# Every loss is a sum over the batch divided by a count N (positives, objects, pixels; never a function of the
# predictions), and every N goes through `reduce_mean` unconditionally: also when 0, also for a batch without
# objects, in the same order in every forward. DDP needs it (every process makes the same collective calls), and
# so does gradient accumulation (train.py hands a micro-batch's j-th call the whole batch's j-th count).

# train.py's record_normalizers / replaying while they run; None otherwise
normalizer_hook = None


def mean_over_processes(x):
    """x averaged over all processes (FCOS's num_pos / world_size); x itself in one process."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        x = x.detach().clone()
        torch.distributed.all_reduce(x)
        x = x / torch.distributed.get_world_size()
    return x


def reduce_mean(x):
    """A loss normaliser N (0-d tensor) -> its mean over the processes, so that W processes with batch b compute
    the gradient of one with batch W * b; under gradient accumulation over the micro-batches too (`normalizer_hook`)."""
    if normalizer_hook is not None:
        return normalizer_hook(x)
    return mean_over_processes(x)


def graph_zero(*parts):
    """A zero loss that keeps `parts` (tensors, or modules: their parameters; None skipped) in the
    graph: a branch's loss when the batch holds no object (DDP expects a gradient for each)."""
    tensors = [t for p in parts if p is not None
               for t in ([p] if torch.is_tensor(p) else p.parameters())]
    return sum(t.float().sum() * 0 for t in tensors)


# -- which points a box holds ------------------------------------------------------------------
# Three rules, each where its source uses it, differing only for a point exactly on an edge:
#   "closed"     x0 <= x <= x1   CenterMask's pixels ([CM] eq. 1's crop, `boxes_inside`) and every method's final
#                                masks (the same pixels with and without the local shape; flips stay exact)
#   "open"       x0 <  x <  x1   FCOS's locations (`fcos_targets`): an edge location would regress a zero side
#   "half-open"  x0 <= x <  x1   FCOSIS's attention map and padded crop ([IS 3.2.2]'s slice S[y0:y1, x0:x1])
INSIDE_RULES = {"closed": (torch.ge, torch.le), "open": (torch.gt, torch.lt),
                "half-open": (torch.ge, torch.lt)}


def between(v, lo, hi, rule):
    """One axis of `inside`: lo <= v <= hi, lo < v < hi or lo <= v < hi (rule), broadcast -> bool."""
    above, below = INSIDE_RULES[rule]
    return above(v, lo) & below(v, hi)


def inside(points, boxes, rule):
    """Which points (..., 2) xy lie in which boxes (..., 4) xyxy (broadcast against each other) under
    `rule` ("closed", "open" or "half-open", above) -> bool (...). Grids use `between` one axis at a time."""
    return (between(points[..., 0], boxes[..., 0], boxes[..., 2], rule)
            & between(points[..., 1], boxes[..., 1], boxes[..., 3], rule))


# -- the objects of a batch ----------------------------------------------------------------------
#   per image  data.py's B target dicts: boxes (N_b, 4), labels (N_b,), masks (N_b, H_b, W_b)
#   padded     (B, N, ...), N = max N_b, with valid (B, N): `pad_boxes`; FCOS's "matched" (B, P) indexes these
#   flat       (M, ...), M = sum N_b, image after image, batch (M,) the image of each (`image_index`):
#              `flatten_targets`, `batch_masks`; object n of image b is flat object first_box_index(...)[b] + n


def image_index(counts, device=None):
    """The flat layout's `batch`: counts (Python ints, objects per image) -> (M,) int64, the image of each object;
    (2, 0, 1) -> [0, 0, 2]. torch.repeat_interleave(arange(B), counts) without reading back from the device."""
    return torch.cat([torch.full((n,), b, dtype=torch.long, device=device)
                      for b, n in enumerate(counts)])


def flatten_targets(targets, stride):
    """Every object of B >= 1 target dicts as flat tensors, M objects -> dict: batch (M,) image index; labels (M,);
    boxes (M, 4) xyxy, output frame (input / stride); center (M, 2) box centre, output frame; center_int (M, 2)
    floor(center); wh (M, 2) box width, height in output pixels."""
    # (M, 4)
    boxes = torch.cat([target["boxes"].reshape(-1, 4).float() for target in targets]) / stride
    # (M,)
    labels = torch.cat([target["labels"].reshape(-1).long() for target in targets])
    # (M,)
    batch = image_index([len(target["labels"]) for target in targets], boxes.device)
    center = (boxes[:, :2] + boxes[:, 2:]) / 2
    return dict(batch=batch, labels=labels, boxes=boxes, center=center,
                center_int=center.floor().long(), wh=boxes[:, 2:] - boxes[:, :2])


def batch_masks(targets, H, W, device):
    """The ground-truth masks in the flat layout, zero-padded bottom/right to the batch: (M, H, W) on `device`."""
    padded = [F.pad(t["masks"], (0, W - t["masks"].shape[-1], 0, H - t["masks"].shape[-2]))
              for t in targets]
    return torch.cat(padded).to(device)


def first_box_index(targets, device):
    """(B,) int64 flat index of each image's first object; box counts (2, 0, 1) -> [0, 2, 2]."""
    counts = torch.tensor([len(target["boxes"]) for target in targets], device=device)
    return torch.cumsum(counts, 0) - counts


def pad_boxes(targets, device):
    """The padded layout: B target dicts -> boxes (B, N, 4), labels (B, N), valid (B, N) bool, N = max(counts, 1)."""
    n = max([len(target["boxes"]) for target in targets] + [1])
    B = len(targets)
    boxes = torch.zeros(B, n, 4, device=device)
    labels = torch.zeros(B, n, dtype=torch.long, device=device)
    valid = torch.zeros(B, n, dtype=torch.bool, device=device)
    for b, target in enumerate(targets):  # one copy per image
        k = len(target["boxes"])
        boxes[b, :k], labels[b, :k], valid[b, :k] = target["boxes"].float(), target["labels"], True
    return boxes, labels, valid


def flat_detections(dets):
    """B images' detection dicts in the flat layout: batch (K,), boxes (K, 4), labels (K,)."""
    batch = image_index([len(d["boxes"]) for d in dets], dets[0]["boxes"].device)
    return batch, torch.cat([d["boxes"] for d in dets]), torch.cat([d["labels"] for d in dets])


# -- masks at a coarser grid, and their centres --------------------------------------------------


def average_pool_masks(masks, stride, out_hw=None):
    """masks (M, H, W) -> (M, h, w) float, the fraction of each stride x stride cell covered ([IS 3.3]'s segmentation
    label), zero-padded bottom/right (P6, P7: missing pixels are background); out_hw default (ceil(H/s), ceil(W/s))."""
    M, H, W = masks.shape
    h, w = out_hw if out_hw is not None else (-(-H // stride), -(-W // stride))
    m = F.pad(masks.float(), (0, w * stride - W, 0, h * stride - H))[:, :h * stride, :w * stride]
    return F.avg_pool2d(m[:, None], stride)[:, 0]                                  # (M, h, w)


def center_of_mass(masks, boxes=None):
    """Mass centres of masks (N, H, W) (bool, uint8 or float) -> (N, 2) (x, y) float32, input frame (pixel X at
    X + 0.5). An empty mask gets its box's centre when boxes (N, 4) are given, else NaN (loud, not wrong)."""
    N, H, W = masks.shape
    dev = masks.device
    col = masks.sum(1, dtype=torch.float32)                                        # (N, W)
    row = masks.sum(2, dtype=torch.float32)                                        # (N, H)
    area = col.sum(1)                                                              # (N,)
    xs = torch.arange(W, device=dev, dtype=torch.float32) + 0.5
    ys = torch.arange(H, device=dev, dtype=torch.float32) + 0.5
    com = torch.stack([(col * xs).sum(1), (row * ys).sum(1)], 1) / area[:, None]   # (N, 2)
    fallback = (torch.full_like(com, float("nan")) if boxes is None
                else (boxes[:, :2].float() + boxes[:, 2:].float()) / 2)
    return torch.where(area[:, None] > 0, com, fallback)


# -----------------------------------------------------------------------------
# 3. DLA-34 + DLA-up ([DLA], as CenterNet's `dla_34` + `DLASeg`)
# DLA-34: a ResNet-like network whose stages are merged by "Tree" aggregation. CenterNet's "DLA-up": three
# IDA-up stages from stride 32 back to stride 4 and a final IDA-up, every node a modulated deformable conv ([CN] 4).

BN_MOMENTUM = 0.1  # CenterNet's DLA uses PyTorch's default BatchNorm momentum


def conv_bn(cin, cout, k=1, stride=1):
    """k x k conv (no bias, padding k // 2) + BN, as nn.Sequential (indices 0, 1): the 1x1
    projections of the residuals."""
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False),
                         nn.BatchNorm2d(cout, momentum=BN_MOMENTUM))


def conv_bn_relu(cin, cout, k, stride=1):
    """k x k conv (no bias) + BN + ReLU: CenterNet's `convolution` (and DLA-34's first levels)."""
    return nn.Sequential(*conv_bn(cin, cout, k, stride), nn.ReLU(inplace=True))


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual, as ResNet-18/34. (B, Cin, H, W) -> (B, Cout, H/s, W/s)."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout, momentum=BN_MOMENTUM)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, momentum=BN_MOMENTUM)

    def forward(self, x, residual=None):
        # the Tree passes the residual in when the block changes resolution/width
        residual = x if residual is None else residual
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + residual)


class Root(nn.Module):
    """Aggregation node of a Tree: concat children -> 1x1 conv -> BN -> ReLU."""

    def __init__(self, cin, cout):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout, momentum=BN_MOMENTUM)

    def forward(self, *children):
        return F.relu(self.bn(self.conv(torch.cat(children, 1))))


class Tree(nn.Module):
    """Hierarchical deep aggregation ([DLA] 3.2, Fig. 2d-f): depth 1 is two blocks merged by a Root; depth d, two
    Trees of depth d-1 whose outputs (and a `level_root`'s stage input) the innermost right tree's Root merges."""

    def __init__(self, levels, cin, cout, stride=1, level_root=False, root_dim=0):
        super().__init__()
        root_dim = root_dim or 2 * cout
        if level_root:
            root_dim += cin  # the stage input is also aggregated (hierarchical aggregation)
        if levels == 1:
            self.tree1 = BasicBlock(cin, cout, stride)
            self.tree2 = BasicBlock(cout, cout, 1)
            self.root = Root(root_dim, cout)
        else:
            self.tree1 = Tree(levels - 1, cin, cout, stride)
            self.tree2 = Tree(levels - 1, cout, cout, 1, root_dim=root_dim + cout)
        self.levels, self.level_root = levels, level_root
        self.downsample = nn.MaxPool2d(stride, stride) if stride > 1 else None
        # the first block's residual when the width changes; not for deeper Trees, whose first child makes its
        # own (CenterNet builds that one unused; leaving it out spares DDP find_unused_parameters)
        self.project = conv_bn(cin, cout) if cin != cout and levels == 1 else None

    def forward(self, x, residual=None, children=None):
        children = [] if children is None else children
        bottom = self.downsample(x) if self.downsample is not None else x
        # unused if levels > 1
        residual = self.project(bottom) if self.project is not None else bottom
        if self.level_root:
            children.append(bottom)
        x1 = self.tree1(x, residual)
        if self.levels == 1:
            x2 = self.tree2(x1)
            return self.root(x2, x1, *children)
        children.append(x1)
        return self.tree2(x1, children=children)


class DLA34(nn.Module):
    """DLA-34 base ([DLA] Table 1): levels (1, 1, 1, 2, 2, 1), BasicBlock.
    (B, 3, H, W) -> list of 6 maps at strides 1, 2, 4, 8, 16, 32 with `channels` widths."""

    def __init__(self, channels=(16, 32, 64, 128, 256, 512)):
        super().__init__()
        c = channels
        self.base_layer = conv_bn_relu(3, c[0], 7)
        # levels 0 and 1: one 3x3 conv each (CenterNet's `_make_conv_level` with 1 conv)
        self.level0 = conv_bn_relu(c[0], c[0], 3)
        self.level1 = conv_bn_relu(c[0], c[1], 3, stride=2)
        # levels 2-5: Trees of depth 1, 2, 2, 1
        self.level2 = Tree(1, c[1], c[2], 2, level_root=False)
        self.level3 = Tree(2, c[2], c[3], 2, level_root=True)
        self.level4 = Tree(2, c[3], c[4], 2, level_root=True)
        self.level5 = Tree(1, c[4], c[5], 2, level_root=True)
        self.channels = c

    def forward(self, x):
        x = self.base_layer(x)                                # (B, 16, H, W)
        levels = []
        for i in range(6):
            x = getattr(self, f"level{i}")(x)                 # strides 1, 2, 4, 8, 16, 32
            levels.append(x)
        return levels


# NaN or inf offsets send deform_conv2d's sampling outside its input (on the CPU a segfault):
# DeformConv asserts first
NON_FINITE_DEFORM = ("non-finite values (NaN or inf) reach a deformable convolution of DLA-34 "
                     "(model.DeformConv): the weights or the activations hold NaN or inf (a "
                     "corrupt checkpoint, a BatchNorm running_var below 0, a diverged run); "
                     "stopped before torchvision's deform_conv2d reads outside its input")


# Where the check runs. On the CPU, torch._assert_async raises at once (RuntimeError(NON_FINITE_DEFORM), which the
# scripts turn into one line). On a GPU it is a device-side assert: its message goes to stderr only and the CUDA
# context is lost. There DeformConv zeroes the offsets and mask logits of a forward that holds NaN / inf (the
# kernel then reads inside its input) and counts it in `non_finite_deform`, read on the host by
# `non_finite_deform_count` (train.py, at every log line, evaluation and checkpoint) and `check_deform_finite`.
HOST_ASSERT_DEVICES = ("cpu",)
# device -> 0-d int64 tensor: the DeformConv forwards that met NaN / inf there
non_finite_deform = {}


def non_finite_deform_count(device):
    """How many DeformConv forwards off HOST_ASSERT_DEVICES met NaN / inf offsets: a 0-d int64 tensor on `device`
    (not read here: the caller's host sync reads it)."""
    zero = torch.zeros((), dtype=torch.long, device=device)
    return sum((n.to(device) for n in non_finite_deform.values()), zero)


def check_deform_finite():
    """RuntimeError(NON_FINITE_DEFORM), as the CPU's assert, if a DeformConv forward met NaN / inf offsets on a
    device where it only counts them (one host read)."""
    if int(non_finite_deform_count("cpu")):
        raise RuntimeError(NON_FINITE_DEFORM)


class DeformConv(nn.Module):
    """DLA-up node: modulated deformable 3x3 conv (DCNv2) + BN + ReLU ([CN] 4); offsets (18 ch) and mask (9 ch, sigmoid)
    from a zero-initialised 3x3 conv, as CenterNet's (offsets 0, mask 0.5 at init). dcn=False: a plain 3x3 conv."""

    def __init__(self, cin, cout, dcn=True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, 1, 1, bias=True)  # holds the (deformable) kernel
        self.offset_mask = nn.Conv2d(cin, 27, 3, 1, 1) if dcn else None  # 27 = 3 * 3x3
        if dcn:
            nn.init.zeros_(self.offset_mask.weight)
            nn.init.zeros_(self.offset_mask.bias)
        self.bn = nn.BatchNorm2d(cout, momentum=BN_MOMENTUM)

    def forward(self, x):
        if self.offset_mask is None:
            x = self.conv(x)
        else:
            om = self.offset_mask(x)                          # (B, 27, H, W)
            # NaN or inf in x reaches om: NON_FINITE_DEFORM, asserted (CPU) or counted (GPUs) on the device, no host
            # sync, no graph break (HOST_ASSERT_DEVICES)
            finite = torch.isfinite(om).all()
            if om.device.type in HOST_ASSERT_DEVICES:
                torch._assert_async(finite, NON_FINITE_DEFORM)
            else:
                zero = torch.zeros((), dtype=torch.long, device=om.device)
                count = non_finite_deform.setdefault(om.device, zero)
                count += ~finite
                om = torch.where(finite, om, torch.zeros_like(om))
            offset, mask = om[:, :18], om[:, 18:].sigmoid()   # (B, 18, H, W), (B, 9, H, W)
            # fp32 under any autocast: torchvision has no bf16 CPU kernel (its CUDA autocast casts to fp32 too)
            with torch.autocast(x.device.type, enabled=False):
                x = deform_conv2d(x.float(), offset.float(), self.conv.weight, self.conv.bias,
                                  padding=1, mask=mask.float())
        return F.relu(self.bn(x))


def bilinear_upsample_init(up: nn.ConvTranspose2d):
    """Initialise a depthwise ConvTranspose2d kernel to bilinear interpolation (as FCN / CenterNet)."""
    w = up.weight.data                                        # (C, 1, k, k)
    k = w.shape[-1]
    f = math.ceil(k / 2)
    c = (2 * f - 1 - f % 2) / (2.0 * f)
    r = torch.arange(k, dtype=torch.float32)
    kernel1d = 1 - (r / f - c).abs()
    w.copy_((kernel1d[:, None] * kernel1d[None, :]).expand_as(w))


class IDAUp(nn.Module):
    """Iterative deep aggregation, upward ([DLA] 3.1; CenterNet's IDAUp): each map i in startp+1..endp-1 is
    projected to `cout`, upsampled (bilinear-initialised depthwise transposed conv), added to the merged map i-1
    and merged by a node. In place on the list, as CenterNet's."""

    def __init__(self, cout, channels, up_factors, dcn=True):
        super().__init__()
        self.proj, self.up, self.node = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for c, f in zip(channels[1:], up_factors[1:]):
            f = int(f)
            self.proj.append(DeformConv(c, cout, dcn))
            # depthwise transposed conv, kernel 2f, stride f: a trainable bilinear x f upsampling
            up = nn.ConvTranspose2d(cout, cout, f * 2, stride=f, padding=f // 2, groups=cout,
                                    bias=False)
            bilinear_upsample_init(up)
            self.up.append(up)
            self.node.append(DeformConv(cout, cout, dcn))

    def forward(self, layers, startp, endp):
        for i in range(startp + 1, endp):
            k = i - startp - 1
            layers[i] = self.up[k](self.proj[k](layers[i]))
            layers[i] = self.node[k](layers[i] + layers[i - 1])


class DLAUp(nn.Module):
    """CenterNet's DLAUp over the stride-4..32 maps: three IDA-up stages, each merging one more level from the
    top (stride 32 -> 16 -> 8 -> 4). Returns the merged maps, finest first."""

    def __init__(self, channels, scales, dcn=True):
        super().__init__()
        channels, scales = list(channels), list(scales)        # e.g. (64,128,256,512), (1,2,4,8)
        in_channels = list(channels)
        self.ida = nn.ModuleList()
        for i in range(len(channels) - 1):
            j = len(channels) - i - 2                          # 2, 1, 0: the level merged into
            up_factors = [s // scales[j] for s in scales[j:]]
            self.ida.append(IDAUp(channels[j], in_channels[j:], up_factors, dcn))
            scales[j + 1:] = [scales[j]] * (len(scales) - j - 1)
            in_channels[j + 1:] = [channels[j]] * (len(in_channels) - j - 1)

    def forward(self, layers):
        layers = list(layers)
        out = [layers[-1]]
        for i, ida in enumerate(self.ida):
            ida(layers, len(layers) - i - 2, len(layers))
            out.insert(0, layers[-1])
        return out


class DLASeg(nn.Module):
    """DLA-34 + DLA-up + final IDA-up (CenterNet's `DLASeg`, down_ratio 4).
    (B, 3, H, W) -> (B, 64, H/4, W/4)    (H, W multiples of 32)"""

    def __init__(self, channels=(16, 32, 64, 128, 256, 512), dcn=True):
        super().__init__()
        self.base = DLA34(channels)
        # stride 4 = 2**2 ... stride 32 = 2**5
        first, last = 2, 5
        c = list(channels[first:])                             # (64, 128, 256, 512)
        self.dla_up = DLAUp(c, [2 ** i for i in range(len(c))], dcn)
        self.ida_up = IDAUp(c[0], c[:last - first], [2 ** i for i in range(last - first)], dcn)
        self.out_channels = c[0]
        self.stride = 4
        self.size_divisibility = 32                            # DLA-34 downsamples 5 times

    def forward(self, x):
        levels = self.base(x)[2:]                              # strides 4, 8, 16, 32
        merged = self.dla_up(levels)                           # strides 4, 8, 16, 32 (merged)
        y = merged[:3]                                         # strides 4, 8, 16
        self.ida_up(y, 0, len(y))
        return y[-1]                                           # (B, 64, H/4, W/4)


# -----------------------------------------------------------------------------
# 4. Hourglass-104 (CornerNet 3.5, as CenterNet's `large_hourglass`)
# Two hourglasses ("stacks") in a row. At each level of one, a skip branch stays at the resolution (`up1`) and a
# branch halves it (stride-2 residual, no max-pool), recurses and comes back by nearest upsampling; the two are
# added. Five levels: stride 4 to 128 and back. A 3x3 conv after each hourglass gives its heads' features; the
# next stack starts from its input and output merged ("inters", CornerNet 3.5), so the first stack's heads give
# intermediate supervision. "104": 3 (stem) + 48 (24 residuals down and up) + 1 (3x3) + 1 (1x1 merge) + 2
# (residual between stacks) + 48 + 1 convs from the image to the last stack's features.


class Residual(BasicBlock):
    """CornerNet's residual block: BasicBlock with its own skip, a 1x1 conv (stride s) + BN when the block changes
    width or resolution, else the identity. (B, cin, H, W) -> (B, cout, H/s, W/s)."""

    def __init__(self, cin, cout, stride=1):
        super().__init__(cin, cout, stride)
        self.skip = conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x):
        return super().forward(x, residual=self.skip(x))


def residuals(cin, cout, n, stride=1):
    """n residual blocks; the FIRST changes width (and stride). CenterNet's `make_layer`."""
    return nn.Sequential(Residual(cin, cout, stride), *[Residual(cout, cout) for _ in range(n - 1)])


def residuals_reversed(cin, cout, n):
    """n residual blocks; the LAST changes width. CenterNet's `make_layer_revr` (the way up)."""
    return nn.Sequential(*[Residual(cin, cin) for _ in range(n - 1)], Residual(cin, cout))


class HourglassModule(nn.Module):
    """One hourglass, built recursively (CenterNet's `kp_module`). dims[0] / modules[0]: width / residual blocks
    of this level, dims[1:] / modules[1:] of the levels below; the last entry is the middle (4 x 512).
        up1  = modules[0] residuals at (dims[0], H, W)                 skip branch
        low1 = stride-2 residual to dims[1], then modules[0]-1 more    (dims[1], H/2, W/2)
        low2 = the next level's hourglass, or, innermost, modules[1] residuals at dims[1]
        low3 = modules[0]-1 residuals, then one back to dims[0]        (dims[0], H/2, W/2)
        out  = up1 + nearest_upsample_x2(low3)                         (dims[0], H, W)
    (B, dims[0], H, W) -> (B, dims[0], H, W), H and W multiples of 2 ** (len(dims) - 1)."""

    def __init__(self, dims, modules):
        super().__init__()
        cur, nxt = dims[0], dims[1]
        self.up1 = residuals(cur, cur, modules[0])
        # strided conv, no max-pool (CornerNet 3.5)
        self.low1 = residuals(cur, nxt, modules[0], stride=2)
        self.low2 = (HourglassModule(dims[1:], modules[1:]) if len(dims) > 2
                     else residuals(nxt, nxt, modules[1]))
        self.low3 = residuals_reversed(nxt, cur, modules[0])

    def forward(self, x):
        up1 = self.up1(x)                                      # (B, cur, H, W)
        low = self.low3(self.low2(self.low1(x)))               # (B, cur, H/2, W/2)
        return up1 + F.interpolate(low, scale_factor=2, mode="nearest")  # merge by addition


class Hourglass104(nn.Module):
    """Stacked hourglass backbone (CornerNet 3.5; CenterNet's `HourglassNet` without its heads, the same layout
    layer by layer as its `large_hourglass.py`):
        pre:    7x7 stride-2 conv (dims[0]/2 = 128) + BN + ReLU, stride-2 residual (dims[0] = 256)
        stack:  hourglass -> 3x3 conv (256) + BN + ReLU -> features for this stack's heads
        inters: next input = Residual(ReLU(BN(1x1(input)) + BN(1x1(features))))
    (B, 3, H, W) -> `num_stacks` maps (B, dims[0], H/4, W/4), first stack first (the last one at test); H, W
    multiples of `size_divisibility` = 4 * 2**5 = 128. CenterNet's `cnv_dim` (256) and stem width (128) are
    tied to dims[0] and dims[0] / 2 here (equal at full width)."""

    def __init__(self, dims=(256, 256, 384, 384, 384, 512), modules=(2, 2, 2, 2, 2, 4),
                 num_stacks=2):
        super().__init__()
        c = dims[0]
        self.pre = nn.Sequential(conv_bn_relu(3, c // 2, 7, stride=2),   # (B, 128, H/2, W/2)
                                 Residual(c // 2, c, stride=2))         # (B, 256, H/4, W/4)
        self.hourglasses = nn.ModuleList(HourglassModule(dims, modules) for _ in range(num_stacks))
        # CenterNet's `cnvs`
        self.convs = nn.ModuleList(conv_bn_relu(c, c, 3) for _ in range(num_stacks))
        # between stacks ("inters" above; CenterNet's `inters_`, `cnvs_`, `inters`)
        self.skip_input = nn.ModuleList(conv_bn(c, c) for _ in range(num_stacks - 1))
        self.skip_features = nn.ModuleList(conv_bn(c, c) for _ in range(num_stacks - 1))
        self.inter = nn.ModuleList(Residual(c, c) for _ in range(num_stacks - 1))
        self.out_channels = c
        self.stride = 4
        self.size_divisibility = 4 * 2 ** (len(dims) - 1)      # 128 for Hourglass-104

    def forward(self, x):
        d = self.size_divisibility
        if x.shape[-2] % d or x.shape[-1] % d:
            raise ValueError(f"Hourglass104: input {tuple(x.shape[-2:])} is not a multiple of {d} "
                             "(pad the batch to a multiple of size_divisibility, as "
                             "data.collate_fn does)")
        inter = self.pre(x)                                    # (B, 256, H/4, W/4)
        features = []
        for i, (hourglass, conv) in enumerate(zip(self.hourglasses, self.convs)):
            y = conv(hourglass(inter))                         # (B, 256, H/4, W/4)
            features.append(y)
            if i < len(self.inter):                            # not after the last stack
                inter = F.relu(self.skip_input[i](inter) + self.skip_features[i](y))
                inter = self.inter[i](inter)                   # (B, 256, H/4, W/4)
        return features


# -----------------------------------------------------------------------------
# 5. CenterNet targets ([CN] 3; CornerNet 4.1 for the radius)


def gaussian_radius(h, w, min_overlap=0.7, cornernet_bug=True):
    """Radius r (output pixels) such that a box whose corners move by up to r from the ground truth (h, w) keeps
    IoU >= min_overlap with it (CornerNet 4.1): the smallest over three cases (corners moved inward/outward, both
    inward, both outward), each a r^2 + b r + c = 0:
        case 1: a=1,    b=(h+w),        c=w h (1-m)/(1+m)
        case 2: a=4,    b=2(h+w),       c=(1-m) w h
        case 3: a=4m,   b=-2m(h+w),     c=(m-1) w h
    cornernet_bug=True: the formula CornerNet/CenterNet shipped, behind every published CenterNet/CenterMask number,
    r_i = (b_i + sqrt(b_i^2 - 4 a_i c_i)) / 2 (10x10 box: 2.73 instead of 0.82; METHODS.md, CenterMask).
    False: the right roots, r1 = (b1 - sq1)/(2 a1), r2 = (b2 - sq2)/(2 a2), r3 = (-b3 + sq3)/(2 a3).
    Floats or tensors (element-wise)."""
    m = min_overlap
    sqrt = torch.sqrt if isinstance(h, torch.Tensor) or isinstance(w, torch.Tensor) else math.sqrt
    b1, c1 = h + w, w * h * (1 - m) / (1 + m)
    sq1 = sqrt(b1 ** 2 - 4 * c1)
    b2, c2 = 2 * (h + w), (1 - m) * w * h
    sq2 = sqrt(b2 ** 2 - 16 * c2)
    a3, b3, c3 = 4 * m, -2 * m * (h + w), (m - 1) * w * h
    sq3 = sqrt(b3 ** 2 - 4 * a3 * c3)
    if cornernet_bug:
        r1, r2, r3 = (b1 + sq1) / 2, (b2 + sq2) / 2, (b3 + sq3) / 2
    else:
        r1, r2, r3 = (b1 - sq1) / 2, (b2 - sq2) / 8, (-b3 + sq3) / (2 * a3)
    if isinstance(r1, torch.Tensor):
        return torch.minimum(torch.minimum(r1, r2), r3)
    return min(r1, r2, r3)


def centernet_heatmaps(objs, num_images, num_classes, out_h, out_w, min_overlap=0.7,
                       cornernet_bug=True):
    """Ground-truth heatmaps of a batch ([CN] 3) from `flatten_targets`' objs: (B, C, H/R, W/R), per class the max of
    every object's Gaussian, as CenterNet's `draw_umich_gaussian` splats them one at a time (its
    one-object form: tests/test_model.py): heatmap[y, x] = max over the objects of
    exp(-((x-cx)^2 + (y-cy)^2) / (2 sigma^2)) for |x - cx|, |y - cy| <= r, sigma = (2r + 1) / 6,
    (cx, cy) the integer centre, where it is exactly 1 (the focal loss's positive), radius
    r = max(0, int(gaussian_radius(ceil h, ceil w)))."""
    B = num_images
    device = objs["center"].device
    heat = torch.zeros(B * num_classes, out_h * out_w, device=device)
    if len(objs["labels"]) == 0:
        return heat.view(B, num_classes, out_h, out_w)
    wh = objs["wh"]
    radius = gaussian_radius(wh[:, 1].ceil(), wh[:, 0].ceil(), min_overlap, cornernet_bug)
    radius = radius.clamp(min=0).floor()                      # (M,)  CenterNet: max(0, int(r))
    sigma = (2 * radius + 1) / 6                              # (M,)
    cx, cy = objs["center_int"][:, 0:1].float(), objs["center_int"][:, 1:2].float()  # (M, 1)
    xs = torch.arange(out_w, device=device, dtype=torch.float32)[None, :]            # (1, W)
    ys = torch.arange(out_h, device=device, dtype=torch.float32)[None, :]            # (1, H)
    dx, dy = xs - cx, ys - cy                                 # (M, W), (M, H)
    r = radius[:, None]
    # separable Gaussian, zero outside the (2r+1) x (2r+1) window around the integer centre
    gx = torch.exp(-dx ** 2 / (2 * sigma[:, None] ** 2)) * (dx.abs() <= r)  # (M, W)
    gy = torch.exp(-dy ** 2 / (2 * sigma[:, None] ** 2)) * (dy.abs() <= r)  # (M, H)
    g = (gy[:, :, None] * gx[:, None, :]).view(len(radius), -1)             # (M, H*W)
    row = objs["batch"] * num_classes + objs["labels"]                     # (M,)
    heat.scatter_reduce_(0, row[:, None].expand_as(g), g, "amax")  # max over objects of a class
    return heat.view(B, num_classes, out_h, out_w)


# -----------------------------------------------------------------------------
# 6. CenterNet losses ([CM 3.4] eq. 3-5, as [CN] 3)


def centernet_focal_loss(pred_logits, gt_heatmap, alpha=2, beta=4):
    """Penalty-reduced pixel-wise focal loss ([CM] eq. 3, CornerNet eq. 1), alpha = 2, beta = 4 ([CN] 3):
        L_p = -1/N sum_{ijc} (1 - p)^alpha log(p)               if Y = 1
                             (1 - Y)^beta p^alpha log(1 - p)     otherwise
    p = sigmoid(logits) clamped to [1e-4, 1 - 1e-4] (CenterNet's `_sigmoid`), N the positives (Y == 1) of the
    batch (`reduce_mean`); with none, the negative term alone (CenterNet's `_neg_loss`). fp32.
    pred_logits, gt_heatmap: (B, C, H, W)."""
    p = pred_logits.float().sigmoid().clamp(1e-4, 1 - 1e-4)
    gt = gt_heatmap.float()
    pos = gt.eq(1).float()
    pos_loss = (torch.log(p) * (1 - p) ** alpha * pos).sum()
    neg_loss = (torch.log(1 - p) * p ** alpha * (1 - gt) ** beta * (1 - pos)).sum()
    num_pos = reduce_mean(pos.sum())
    # no positive: pos_loss is 0 and the loss -neg_loss (N taken as 1, on the device: no host read)
    return -(pos_loss + neg_loss) / torch.where(num_pos > 0, num_pos, 1.0)


def gather_at(feature, batch, cells_xy):
    """Read a (B, C, H, W) map at M cells: batch (M,), cells_xy (M, 2) int (x, y) -> (M, C)."""
    return feature[batch, :, cells_xy[:, 1], cells_xy[:, 0]]


def l1_at_centers(pred_map, objs, target):
    """L1 of a 2-channel head at the ground-truth centre cells ([CM] eq. 4-5), summed and divided by 2N (`reduce_mean`)
    as CenterNet's `RegL1Loss` ([CM] writes 1/N; the published lambda_size = 0.1 was tuned with 2N).
    pred_map (B, 2, h, w); target (M, 2). No objects -> 0, in the graph."""
    pred = gather_at(pred_map, objs["batch"], objs["center_int"]).float()   # (M, 2)
    # every rank joins
    n = reduce_mean(torch.full((), float(target.numel()), device=pred_map.device))
    if len(target) == 0:
        return pred_map.sum() * 0
    return (pred - target).abs().sum() / (n + 1e-4)


# -----------------------------------------------------------------------------
# 7. CenterMask ([CM] 3)
# Eq. 1 in plain sight: the Local Shape head's map holds an S^2 vector at every cell; the vector at
# an object's centre, reshaped to S x S, is resized to the object's box (`resize_to_boxes`, torch's
# grid_sample) and multiplied by the Global Saliency map cropped to the box (`assemble_masks`).
# The fast paths stand beside it, behind one switch, `CenterMask.fast` (True by default; tests check
# that both give the same numbers): the S^2-channel head evaluated only at the cells read
# (`CenterMaskHeads.shape_at`, `conv3x3_at`) and, at inference, the resize as two matrix products
# (`stretch_to_boxes`) and the product in place (`assemble_masks_fast`).
# Each buys time (RESULTS.md, "Numbers behind model.py's choices": each switched off alone on the
# quick-start model, fp32): the head at the cells 1.19x the train step and 1.24x the inference, the
# matrix resize 1.51x the inference (1.00x the train step, so the loss uses grid_sample), the
# in-place product 1.76x the inference.

# the weight of [CM] Table 1f's direct saliency loss: [CM 4.1] gives none (ours)
SALIENCY_LOSS_WEIGHT = 1.0


def conv_relu_conv(cin, cout, hidden, bias_fill=0.0):
    """One CenterNet head branch: Conv3x3(cin -> hidden) + ReLU + Conv1x1(hidden -> cout) ([CN] 4),
    as nn.Sequential (indices 0 and 2 hold the weights); the last bias starts at `bias_fill`."""
    last = nn.Conv2d(hidden, cout, 1)
    nn.init.constant_(last.bias, bias_fill)
    return nn.Sequential(nn.Conv2d(cin, hidden, 3, padding=1), nn.ReLU(inplace=True), last)


def pixel_centers(n, pixel, device):
    """(n,) float32: the centres (j + 0.5) * pixel of a grid's pixels along one axis, in the
    boxes' frame."""
    return (torch.arange(n, device=device, dtype=torch.float32) + 0.5) * pixel


def boxes_inside(boxes, out_h, out_w, pixel=1.0, rule="closed"):
    """(M, out_h, out_w) bool: which pixel centres (j + 0.5) * pixel lie in each box (M, 4),
    "closed" (`inside`, section 2): [CM] eq. 1's crop to the box; FCOSIS's padded crop is
    "half-open"."""
    b = boxes.float()
    ys, xs = pixel_centers(out_h, pixel, b.device), pixel_centers(out_w, pixel, b.device)
    in_y = between(ys[None], b[:, 1:2], b[:, 3:4], rule)                         # (M, H)
    in_x = between(xs[None], b[:, 0:1], b[:, 2:3], rule)                         # (M, W)
    return in_y[:, :, None] & in_x[:, None, :]


def resize_to_boxes(small, boxes, out_h, out_w, pixel=1.0):
    """[CM 3.1]'s resize of a local shape: M maps (M, s, s) stretched over their boxes (M, 4) xyxy,
    read at the pixel centres (j + 0.5) * pixel of an (out_h, out_w) grid -> (M, out_h, out_w)
    fp32. torch's bilinear grid_sample, border-clamped, align_corners=False: a box's edges are the
    map's outer edges."""
    b = boxes.float()
    ys, xs = pixel_centers(out_h, pixel, b.device), pixel_centers(out_w, pixel, b.device)
    # every pixel centre in its box's frame: -1 at its left / top edge, 1 at its right / bottom
    gx = (xs[None] - b[:, 0:1]) / (b[:, 2:3] - b[:, 0:1]) * 2 - 1                # (M, W)
    gy = (ys[None] - b[:, 1:2]) / (b[:, 3:4] - b[:, 1:2]) * 2 - 1                # (M, H)
    size = (len(b), out_h, out_w)
    grid = torch.stack([gx[:, None, :].expand(size), gy[:, :, None].expand(size)], -1)
    with torch.autocast(small.device.type, enabled=False):
        resized = F.grid_sample(small[:, None].float(), grid, "bilinear", "border",
                                align_corners=False)                             # (M, 1, H, W)
    return resized[:, 0]


def stretch_weights(lo, hi, n_in, n_out, pixel=1.0):
    """`resize_to_boxes` along one axis, as a matrix: n_in cells stretched over [lo, hi] (M
    intervals), read at the n_out pixel centres; cell i's centre at lo + (i + 0.5) (hi - lo) / n_in,
    clamped at the border. lo, hi (M,) -> weights (M, n_out, n_in) and in_box (M, n_out):
    lo <= pixel centre <= hi ("closed")."""
    pos = pixel_centers(n_out, pixel, lo.device)                                 # (n_out,)
    lo, hi = lo.float()[:, None], hi.float()[:, None]                            # (M, 1)
    # (M, n_out) source coordinate in cells
    u = ((pos[None] - lo) / (hi - lo) * n_in - 0.5).clamp(0, n_in - 1)
    i0 = u.floor().long().clamp(max=max(n_in - 2, 0))
    w1 = (u - i0).clamp(max=1.0)                                                 # (M, n_out)
    weights = torch.zeros(len(lo), n_out, n_in, device=lo.device)
    weights.scatter_(2, i0[..., None], (1 - w1)[..., None])
    weights.scatter_add_(2, (i0 + 1).clamp(max=n_in - 1)[..., None], w1[..., None])
    return weights, between(pos[None], lo, hi, "closed")


def stretch_to_boxes(small, boxes, out_h, out_w, pixel=1.0):
    """Fast `resize_to_boxes` (the same numbers up to float rounding; also MaskFCOS's paste): two
    batched matrix products (M, out_h, s) @ (M, s, s) @ (M, s, out_w) (`stretch_weights`) instead
    of a grid_sample over a full sampling grid. Returns values (M, out_h, out_w) and the pixel
    centres in the box ("closed") as float factors in_y (M, out_h, 1), in_x (M, 1, out_w)."""
    wy, in_y = stretch_weights(boxes[:, 1], boxes[:, 3], small.shape[1], out_h, pixel)  # (M, H, s)
    wx, in_x = stretch_weights(boxes[:, 0], boxes[:, 2], small.shape[2], out_w, pixel)  # (M, W, s)
    # fp32 even under autocast: every later step works on it (RESULTS.md, "Numbers behind
    # model.py's choices")
    with torch.autocast(small.device.type, enabled=False):
        values = wy @ small.float() @ wx.transpose(1, 2)                         # (M, H, W)
    return values, (in_y[:, :, None].float(), in_x[:, None, :].float())


def min_size_boxes(center, wh, min_size=1.0):
    """xyxy boxes of centre (M, 2) and size (M, 2), each side at least `min_size` (so that at
    least one pixel centre falls inside and the local shape is never stretched over zero)."""
    half = wh.clamp(min=min_size) / 2
    return torch.cat([center - half, center + half], dim=1)


def saliency_targets(pooled, batch, sal_channel, num_images, num_channels):
    """The target of [CM] Table 1f's saliency loss, the per-channel union of the masks on the
    output grid: pooled (M, h, w) each mask average-pooled (before the union); batch (M,);
    sal_channel (M,) (the label, or 0) -> (B, n, h, w), B = num_images, n = num_channels, the max
    over each image's objects of a channel, else 0."""
    M, h, w = pooled.shape
    out = torch.zeros(num_images * num_channels, h * w, device=pooled.device, dtype=pooled.dtype)
    row = (batch * num_channels + sal_channel)[:, None].expand(M, h * w)          # (M, h*w) its map
    out.scatter_reduce_(0, row, pooled.reshape(M, -1), "amax")
    return out.view(num_images, num_channels, h, w)


def saliency_loss(saliency, targets, stride):
    """[CM] Table 1f's direct saliency loss ([CM 4.1]; CenterMask and CenterMask-FCOS): BCE of the
    class-specific saliency logits (B, C, h, w), a grid of `stride` input pixels, against the
    per-class union of the masks average-pooled to it (`saliency_targets`), times
    SALIENCY_LOSS_WEIGHT."""
    B, C, h, w = saliency.shape
    device = saliency.device
    counts = [len(t["labels"]) for t in targets]
    gt = torch.zeros_like(saliency)                                              # (B, C, h, w)
    if sum(counts):
        masks = batch_masks(targets, h * stride, w * stride, device)             # (M, H, W)
        pooled = average_pool_masks(masks, stride, (h, w))                       # (M, h, w)
        labels = torch.cat([t["labels"].reshape(-1) for t in targets]).to(device)
        gt = saliency_targets(pooled, image_index(counts, device), labels, B, C)
    return SALIENCY_LOSS_WEIGHT * F.binary_cross_entropy_with_logits(saliency, gt)


def topk_peaks(heat, k):
    """CenterNet's peaks ([CM 3.4-3.5]): the 3x3 max-pool local maxima of the sigmoid heatmap
    (B, C, h, w), top-k over all classes and positions (no NMS) -> scores, labels, ys, xs, each
    (B, K), K = min(k, C*h*w), best first."""
    B, C, h, w = heat.shape
    peaks = heat * (F.max_pool2d(heat, 3, 1, 1) == heat)                # keep local maxima
    # reshape, not view: a channels_last map too
    scores, idx = peaks.reshape(B, -1).topk(min(k, C * h * w))           # (B, K)
    labels = idx // (h * w)
    ys, xs = (idx % (h * w)) // w, idx % w                               # (B, K)
    return scores, labels, ys, xs


def mask_log_terms(L=None, G=None):
    """log M and log(1 - M) of M = sigmoid(L) * sigmoid(G) ([CM] eq. 1), for a stable BCE; L (local
    shape) or G (saliency) may be None (Table 1c/1d). One branch: logsigmoid(-x); both:
    log1p(-exp(log M)), clamped."""
    log_m = sum(F.logsigmoid(x) for x in (L, G) if x is not None)
    if G is None:
        return log_m, F.logsigmoid(-L)
    if L is None:
        return log_m, F.logsigmoid(-G)
    return log_m, torch.log1p(-log_m.exp().clamp(max=1 - 1e-6))


def saliency_on_grid(saliency, grid_hw):
    """Saliency logits (B, n, h, w) (cell j centred at j + 0.5, output units) resampled onto the
    grid_hw grid: bilinear, align_corners=False is exact for cell centres. None stays None."""
    gh, gw = grid_hw
    if saliency is None or saliency.shape[-2:] == (gh, gw):
        return saliency
    return F.interpolate(saliency.float(), (gh, gw), mode="bilinear", align_corners=False)


def assemble_masks(local, saliency, batch, sal_channel, boxes, grid_hw, pixel, log_space=False):
    """Local Shape x Global Saliency ([CM 3.3] eq. 1) of M objects on a pixel grid (CenterMask,
    CenterMask-FCOS):
        M = sigmoid(L) * sigmoid(G) * in_box,  L = the S x S shape resized to the box
            (`resize_to_boxes`, [CM 3.1]), G = saliency[batch, sal_channel] resampled bilinearly
            onto the grid ([CM 3.2]), in_box the crop to the box (`boxes_inside`)
    local (M, S, S) logits or None (saliency only, Table 1c); saliency (B, n, h, w) logits (cell j
    centred at j + 0.5, output units) or None (shape only, Table 1d); batch, sal_channel (M,) (0 or
    the class); boxes (M, 4) xyxy, output units; grid_hw (gh, gw), grid pixel j centred at
    (j + 0.5) * pixel output units (pixel 1: the output grid; 1/R: the input resolution). Returns
    (M, gh, gw) probabilities, or with log_space=True (log M, log(1 - M), in_box (M, gh, gw) bool,
    "closed") for the loss. `assemble_masks_fast` gives the same numbers faster."""
    gh, gw = grid_hw
    if len(batch) == 0:
        empty = torch.zeros(0, gh, gw, device=boxes.device)
        return (empty, empty, empty.bool()) if log_space else empty
    in_box = boxes_inside(boxes, gh, gw, pixel)                                  # (M, gh, gw)
    L = resize_to_boxes(local, boxes, gh, gw, pixel) if local is not None else None
    saliency = saliency_on_grid(saliency, grid_hw)                               # (B, n, gh, gw)
    G = saliency[batch, sal_channel].float() if saliency is not None else None  # (M, gh, gw)
    if log_space:  # eq. 1 in log space for the loss (`mask_log_terms`)
        return (*mask_log_terms(L, G), in_box)
    masks = in_box.float()
    for logits in (L, G):
        if logits is not None:
            masks = masks * logits.sigmoid()
    return masks


def assemble_masks_fast(local, saliency, batch, sal_channel, boxes, grid_hw, pixel):
    """`assemble_masks` at inference, fast: the resize by `stretch_to_boxes`, the product in place
    (no (M, gh, gw) temporaries), the saliency's sigmoid once per map, the crop one axis at a
    time. (The loss uses `assemble_masks`: there the matrix resize buys nothing.)"""
    gh, gw = grid_hw
    if len(batch) == 0:
        return torch.zeros(0, gh, gw, device=boxes.device)
    saliency = saliency_on_grid(saliency, grid_hw)                               # (B, n, gh, gw)
    if local is not None:
        masks, (in_y, in_x) = stretch_to_boxes(local, boxes, gh, gw, pixel)
        masks.sigmoid_()                                                         # (M, gh, gw)
    else:
        masks = boxes_inside(boxes, gh, gw, pixel).float()
    if saliency is not None:
        sal_prob = saliency.float().sigmoid()                                    # (B, n, gh, gw)
        if bool((batch == batch[0]).all() and (sal_channel == sal_channel[0]).all()):
            # one map: broadcast
            masks.mul_(sal_prob[batch[0], sal_channel[0]])
        else:
            masks.mul_(sal_prob[batch, sal_channel])                             # (M, gh, gw)
    if local is not None:  # zero outside the boxes
        masks.mul_(in_y).mul_(in_x)
    return masks


def conv3x3_at(conv, feature, batch, ys, xs):
    """conv(feature)[batch, :, ys, xs] of a 3x3 conv (stride 1, padding 1) at M cells only: feature
    (B, C, h, w), batch, ys, xs (M,) -> (M, out). The fast path of the S^2-channel shape heads."""
    f = F.pad(feature, (1, 1, 1, 1))                                             # (B, C, h+2, w+2)
    d = torch.arange(3, device=feature.device)
    rows, cols = ys[:, None, None] + d[None, :, None], xs[:, None, None] + d[None, None, :]
    patch = f[batch[:, None, None], :, rows, cols]                               # (M, 3, 3, C)
    # (M, C*9), ordered as conv.weight
    patch = patch.permute(0, 3, 1, 2).reshape(len(batch), -1)
    return F.linear(patch, conv.weight.reshape(conv.out_channels, -1), conv.bias)  # (M, out)


class CenterMaskHeads(nn.Module):
    """The five heads of [CM] Fig. 3, each a `conv_relu_conv`, on one stride-4 map:
    (B, cin, h, w) -> dict
        heatmap  (B, C, h, w)      centre points per class, sigmoid ([CM 3.4])
        offset   (B, 2, h, w)      sub-cell centre offset in [0, 1) ([CM] eq. 4)
        size     (B, 2, h, w)      box (w, h) in output pixels ([CM] eq. 5)
        shape    (B, S*S, h, w)    Local Shape vector, S x S at a centre ([CM 3.1]; `local_shape`)
        saliency (B, 1 or C, h, w) Global Saliency logits ([CM 3.2])
    A switched-off branch's module is None, its map absent. fast=True (`CenterMask.fast`): no dense
    "shape" map; "features" (B, cin, h, w) instead, and `shape_at` evaluates the head at the cells
    read."""

    def __init__(self, cin, cfg: ModelConfig):
        super().__init__()
        hc, C, S = cfg.head_conv, cfg.num_classes, cfg.shape_size
        # heatmap bias -2.19 = -log((1 - 0.1) / 0.1): initial score 0.1 ([CN] 4, focal-loss prior)
        self.heatmap = conv_relu_conv(cin, C, hc, bias_fill=-2.19)
        self.offset = conv_relu_conv(cin, 2, hc)
        self.size = conv_relu_conv(cin, 2, hc)
        self.local_shape = conv_relu_conv(cin, S * S, hc) if cfg.use_shape else None
        n_sal = 1 if cfg.saliency == "agnostic" else C
        self.saliency = conv_relu_conv(cin, n_sal, hc) if cfg.use_saliency else None

    def forward(self, p, fast=False):
        out = {"heatmap": self.heatmap(p), "offset": self.offset(p), "size": self.size(p)}
        if self.local_shape is not None and fast:
            out["features"] = p                                # (B, cin, h, w), read by shape_at
        elif self.local_shape is not None:
            out["shape"] = self.local_shape(p)                 # (B, S*S, h, w)
        if self.saliency is not None:
            out["saliency"] = self.saliency(p)                 # (B, 1 or C, h, w)
        return out

    def shape_at(self, out, batch, cells_xy):
        """Local-shape logits (M, S*S) at M cells: batch (M,), cells_xy (M, 2) int (x, y) of the
        stride-4 map. The dense map read at [b, :, y, x] (`gather_at`) when `out` holds "shape";
        else, fast, the same head at those cells alone (`conv3x3_at`, then the 1x1 conv as a
        matrix product)."""
        if "shape" in out:
            return gather_at(out["shape"], batch, cells_xy)
        # Conv3x3, ReLU, Conv1x1 (`conv_relu_conv`)
        conv3, _, conv1 = self.local_shape
        hidden = F.relu(conv3x3_at(conv3, out["features"], batch, cells_xy[:, 1], cells_xy[:, 0]))
        return F.linear(hidden, conv1.weight.flatten(1), conv1.bias)  # (M, S*S)


class CenterMask(Method):
    """CenterMask ([CM]): CenterNet + Local Shape x Global Saliency, on DLA-34 (one stride-4 map,
    64 channels) or Hourglass-104 (a stride-4 map of 256 channels per stack); each map gets its own
    `CenterMaskHeads`. Mask of object k ([CM] eq. 1): M_k = sigmoid(L_k) * sigmoid(G_k), L_k the
    S x S local shape resized to its box, G_k the saliency map cropped to it (`assemble_masks`).

    Training: losses heatmap ([CM] eq. 3), offset (eq. 4), size (eq. 5), mask (eq. 2), optionally
        saliency (Table 1f); masks assembled at the ground-truth centres and boxes (teacher
        forcing). With several stacks each named loss, `loss` included, is the average over the
        stacks' heads (intermediate supervision, CornerNet 3.5; CenterNet's `CtdetLoss`).
    Inference: the last stack's heads; top 100 peaks, no NMS ([CM 3.5]); masks (K, H, W)
        probabilities at input resolution (eval.py binarises at `mask_threshold`, 0.4).
    Deviations and readings (mask loss grid, L1 over 2N, boxes widened to one output pixel, Table
    1f's weight, the heads' biases): METHODS.md, CenterMask."""
    # the square canvas of [CN] / [CM 3.5]
    transform = "centernet"
    # the fast paths (section 7's header): the shape head at the cells read; at inference the
    # resize as matrix products and the product in place
    fast = True

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        # ModelConfig admits 'dla34' and 'hourglass104' for CenterMask
        if cfg.backbone == "dla34":
            self.backbone = DLASeg(cfg.dla_channels, dcn=cfg.dcn)
        else:
            self.backbone = Hourglass104(cfg.hg_dims, cfg.hg_modules, cfg.num_stacks)
        self.stride = self.backbone.stride                     # R = 4 ([CM 3.4])
        # 32 (DLA-34) or 128 (Hourglass-104)
        self.size_divisibility = self.backbone.size_divisibility
        num_sets = cfg.num_stacks if cfg.backbone == "hourglass104" else 1
        # one CenterMaskHeads (the five heads of [CM] Fig. 3) per backbone output map
        self.head_sets = nn.ModuleList(CenterMaskHeads(self.backbone.out_channels, cfg)
                                       for _ in range(num_sets))

    # The branches in use (None when switched off: Table 1c/1d ablations).
    @property
    def local_shape(self):
        return self.head_sets[-1].local_shape

    @property
    def saliency(self):
        return self.head_sets[-1].saliency

    # -- heads ------------------------------------------------------------------------------
    def features(self, images):
        """(B, 3, H, W) -> list of stride-4 feature maps (B, cin, H/4, W/4), one per head set."""
        features = self.backbone(images)
        return [features] if torch.is_tensor(features) else features  # DLA-34 returns one map

    def heads(self, images):
        """`Method.heads`: (B, 3, H, W) -> the last head set's outputs, each (B, ch, H/4, W/4)
        (the others train)."""
        return self.head_sets[-1](self.features(images)[-1], self.fast)

    def forward(self, images, targets=None, image_sizes=None):
        if not self.training:
            return self.decode(self.heads(images), images.shape[-2:], image_sizes)
        if targets is None:
            raise ValueError("CenterMask in train mode needs targets (call model.eval() for "
                             "inference)")
        features = self.features(images)
        outs = [head_set(p, self.fast) for head_set, p in zip(self.head_sets, features)]
        # losses in fp32 (bf16/fp16 logs and sums lose precision)
        with torch.autocast(images.device.type, enabled=False):
            per_stack = [self.losses({k: v.float() for k, v in out.items()}, targets, head_set)
                         for out, head_set in zip(outs, self.head_sets)]
        # intermediate supervision: every stack's losses, averaged (one stack: unchanged)
        return {k: sum(losses[k] for losses in per_stack) / len(per_stack) for k in per_stack[0]}

    # -- mask assembly ([CM 3.3] eq. 1) --------------------------------------------------------
    def assemble(self, out, batch, centers_int, boxes, sal_channel, grid_hw, pixel, log_space=False,
                 head_set=None):
        """`assemble_masks` of M objects, the shape vectors read at centers_int (M, 2) output cells;
        boxes (M, 4) xyxy, output units; head_set: the CenterMaskHeads of `out` (default the last
        stack's)."""
        local = None
        if self.local_shape is not None:
            S = self.cfg.shape_size
            head_set = self.head_sets[-1] if head_set is None else head_set
            # the vector at each centre, reshaped to S x S
            local = head_set.shape_at(out, batch, centers_int).view(len(batch), S, S)  # (M, S, S)
        if log_space or not self.fast:
            return assemble_masks(local, out.get("saliency"), batch, sal_channel, boxes, grid_hw,
                                  pixel, log_space)
        return assemble_masks_fast(local, out.get("saliency"), batch, sal_channel, boxes, grid_hw,
                                   pixel)

    # -- training -------------------------------------------------------------------------------
    def losses(self, out, targets, head_set=None):
        """Head outputs (fp32) of `head_set` (default the last) + B target dicts -> dict of weighted
        scalar losses."""
        head_set = self.head_sets[-1] if head_set is None else head_set
        B, C, h, w = out["heatmap"].shape
        R = self.stride
        device = out["heatmap"].device
        objs = {k: v.to(device) for k, v in flatten_targets(targets, R).items()}
        # a centre on the last pixel edge (or a box past the border) must still index the map
        c = objs["center_int"]
        objs["center_int"] = torch.stack([c[:, 0].clamp(0, w - 1), c[:, 1].clamp(0, h - 1)], 1)
        lp, loff, lsize, lmask = self.cfg.loss_weights
        # min_overlap 0.7, CornerNet's radius
        gt_heat = centernet_heatmaps(objs, B, C, h, w)
        # offset target: p/R - floor(p/R) in [0, 1) ([CM] eq. 4)
        gt_offset = objs["center"] - objs["center_int"].float()
        losses = {
            "heatmap": lp * centernet_focal_loss(out["heatmap"], gt_heat),
            "offset": loff * l1_at_centers(out["offset"], objs, gt_offset),
            "size": lsize * l1_at_centers(out["size"], objs, objs["wh"]),
        }
        M = len(objs["labels"])
        # over processes
        num_objects = reduce_mean(torch.full((), float(M), device=device)).clamp(min=1)
        if M == 0:
            losses["mask"] = graph_zero(out.get("shape"), out.get("saliency"), head_set.local_shape)
        else:
            gt_masks = batch_masks(targets, h * R, w * R, device)                # (M, H, W)
            labels = objs["labels"]
            sal_channel = labels if self.cfg.saliency == "specific" else torch.zeros_like(labels)
            # teacher forcing
            boxes = min_size_boxes(objs["center"], objs["wh"])
            if self.cfg.mask_loss_grid == "input":
                # input pixels (centre (j + 0.5) / R), binary truth (M, H, W)
                grid, pixel, gt = (h * R, w * R), 1.0 / R, gt_masks.float()
            else:
                # the stride-R output grid, soft truth (M, h, w): the masks average-pooled
                grid, pixel, gt = (h, w), 1.0, F.avg_pool2d(gt_masks[:, None].float(), R)[:, 0]
            log_m, log_1m, in_box = self.assemble(out, objs["batch"], objs["center_int"], boxes,
                                                  sal_channel, grid, pixel, log_space=True,
                                                  head_set=head_set)
            bce = -(gt * log_m + (1 - gt) * log_1m)                              # (M, gh, gw)
            in_box = in_box.float()
            per_object = (bce * in_box).sum((1, 2)) / in_box.sum((1, 2)).clamp(min=1)  # (M,)
            # [CM] eq. 2
            losses["mask"] = lmask * per_object.sum() / num_objects
        if self.cfg.saliency_loss:
            losses["saliency"] = saliency_loss(out["saliency"], targets, R)
        losses["loss"] = sum(losses.values())
        return losses

    # -- inference ([CM 3.5]) -------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, out, input_hw, image_sizes=None, k=None):
        """Heads -> detections ([CM 3.5]): `topk_peaks`, centre = cell + offset, box from the
        predicted size; masks (K, H, W) probabilities assembled at input resolution. Nothing is
        clipped, as in CenterNet (no NMS reads the boxes; eval.py clips them to the original
        image), so image_sizes is not read."""
        k = k or self.cfg.max_detections
        heat = out["heatmap"].float().sigmoid()                              # (B, C, h, w)
        B, C, h, w = heat.shape
        R = self.stride
        scores, labels, ys, xs = topk_peaks(heat, k)                         # (B, K) each
        k = scores.shape[1]
        batch = image_index([k] * B, heat.device)                           # (B*K,) their image
        cells = torch.stack([xs.reshape(-1), ys.reshape(-1)], 1)             # (B*K, 2) as (x, y)
        offset = gather_at(out["offset"].float(), batch, cells)              # (B*K, 2)
        wh = gather_at(out["size"].float(), batch, cells).clamp(min=0)       # (B*K, 2)
        center = cells.float() + offset                                      # output frame
        boxes_out = min_size_boxes(center, wh)                               # (B*K, 4) output frame
        specific = self.cfg.saliency == "specific"
        sal_channel = labels.reshape(-1) if specific else torch.zeros_like(batch)
        H, W = input_hw
        image_box = torch.tensor([W, H, W, H], device=heat.device)
        results = []
        for b in range(B):  # one image at a time bounds the (K, H, W) memory
            sl = slice(b * k, (b + 1) * k)
            masks = self.assemble(out, batch[sl], cells[sl], boxes_out[sl], sal_channel[sl],
                                  (H, W), 1.0 / R)                           # (K, H, W)
            boxes = (boxes_out[sl] * R).clamp(min=0).clamp(max=image_box)
            results.append(dict(boxes=boxes, scores=scores[b], labels=labels[b], masks=masks))
        return results


# -----------------------------------------------------------------------------
# 8. ResNet / ResNeXt + FPN ([FCOS] 3.2, as FCOS's `R-50-FPN-RETINANET` body)

# name -> (torchvision builder, weights enum, channels of C2..C5). ResNet-18/34 only for CPU demos.
RESNETS = {
    "resnet18": ("resnet18", "ResNet18_Weights", (64, 128, 256, 512)),
    "resnet34": ("resnet34", "ResNet34_Weights", (64, 128, 256, 512)),
    "resnet50": ("resnet50", "ResNet50_Weights", (256, 512, 1024, 2048)),
    "resnet101": ("resnet101", "ResNet101_Weights", (256, 512, 1024, 2048)),
    "resnext101_32x8d": ("resnext101_32x8d", "ResNeXt101_32X8D_Weights", (256, 512, 1024, 2048)),
}


def load_resnet(name, pretrained=False, norm="frozen_bn"):
    """torchvision's ResNet/ResNeXt `name`, with ImageNet-1k weights (torchvision's weights API, torch.hub's cache)
    when `pretrained`; offline, the error names the option that turns them off."""
    import torchvision
    from torchvision.ops import FrozenBatchNorm2d
    builder, weights_enum, _ = RESNETS[name]
    norm_layer = {"frozen_bn": FrozenBatchNorm2d, "bn": nn.BatchNorm2d}[norm]
    weights = getattr(torchvision.models, weights_enum).IMAGENET1K_V1 if pretrained else None
    try:
        return getattr(torchvision.models, builder)(weights=weights, norm_layer=norm_layer)
    except Exception as e:  # URLError, OSError, hash mismatch, ...: an OSError, one line
        raise OSError(
            f"could not load the ImageNet weights of {name} ({type(e).__name__}: {e}). They are "
            f"downloaded from download.pytorch.org into {torch.hub.get_dir()}/checkpoints on first "
            "use; without a network, copy the file there or train from scratch with "
            "--pretrained=False (ModelConfig.pretrained)") from e


class ResNetFPN(nn.Module):
    """ResNet/ResNeXt body + FPN: (B, 3, H, W) -> [P_first, ..., P7], P_k (B, channels, H/2^k, W/2^k) (rounded up
    past P5). torchvision's FeaturePyramidNetwork on C3-C5 (first_level=3) or C2-C5 (FCOSIS, first_level=2); P6 and
    P7 stride-2 3x3 convs on P5 and ReLU(P6) ([FCOS] 3.2). norm="frozen_bn", freeze_at=2: BN frozen to ImageNet
    statistics, stem and res2 frozen, as FCOS; "bn" with freeze_at=0 trains from scratch."""

    def __init__(self, name="resnet50", first_level=3, channels=256, pretrained=False,
                 norm="frozen_bn", freeze_at=2):
        super().__init__()
        from torchvision.ops import FeaturePyramidNetwork
        from torchvision.ops.feature_pyramid_network import LastLevelP6P7
        if name not in RESNETS:
            raise ValueError(f"ModelConfig.backbone: unknown ResNet {name!r} "
                             f"(known: {sorted(RESNETS)})")
        body = load_resnet(name, pretrained, norm)
        self.stem = nn.Sequential(body.conv1, body.bn1, body.relu, body.maxpool)    # stride 4
        self.stages = nn.ModuleList([body.layer1, body.layer2, body.layer3, body.layer4])  # C2..C5
        for m in [self.stem, *self.stages][:freeze_at]:  # freeze_at=2: stem and res2
            m.requires_grad_(False)
        self.first_level = first_level
        in_channels = list(RESNETS[name][2][first_level - 2:])
        self.fpn = FeaturePyramidNetwork(in_channels, channels,
                                         extra_blocks=LastLevelP6P7(channels, channels))
        self.strides = [2 ** k for k in range(first_level, 8)]   # P_first .. P7
        self.out_channels = channels
        self.size_divisibility = 32                              # P5 aligns exactly

    def forward(self, images):
        x = self.stem(images)                                    # (B, 64, H/4, W/4)
        c = {}
        for k, stage in enumerate(self.stages, start=2):
            x = stage(x)                                         # C_k: (B, c_k, H/2^k, W/2^k)
            if k >= self.first_level:
                c[f"c{k}"] = x
        return list(self.fpn(c).values())                        # [P_first .. P5, P6, P7]


# -----------------------------------------------------------------------------
# 9. FCOS ([IS 3.1] as [FCOS]) and FCOSreg ([IS 3.3])

# size range of each level on max(l*, t*, r*, b*) ([FCOS] 3.2: m_2..m_7 = 0, 64, 128, 256, 512, inf for P3..P7)
FCOS_SIZE_RANGES = ((0.0, 64.0), (64.0, 128.0), (128.0, 256.0), (256.0, 512.0), (512.0, math.inf))
FOCAL_ALPHA, FOCAL_GAMMA = 0.25, 2.0  # the classification's focal loss ([FCOS] 3.1, RetinaNet's)
PRE_NMS_TOP_N = 1000                  # candidates per level before the NMS ([FCOS] 4)
HEAD_CONVS = 4                        # convs per head tower ([FCOS] Fig. 2)
# the improved form's centre sampling, in strides (FCOS's code)
CENTER_SAMPLING = 1.5


def fcos_locations(hw_per_level, strides, device=None, input_hw=None):
    """The locations of every level, level after level (row-major inside one): cell (i, j) of a
    stride-s map is the input-frame point (j*s + s//2, i*s + s//2) ([FCOS] 3.1, FCOS's
    compute_locations). Returns points (P, 2) xy float, strides (P,) float, levels (P,) int64
    (0 = the first).
    input_hw (H, W) given: torchvision's convention instead (fcos_form="torchvision" only, its
    weights were trained so): its AnchorGenerator puts cell (i, j) at (j * step_x, i * step_y),
    step = padded input size // grid size. That is the stride s where the input is a multiple of
    it; on P6 / P7 it can be smaller (320 rows: P7 has 3, step 106); strides stay the nominal s."""
    points, point_strides, levels = [], [], []
    for level, ((h, w), s) in enumerate(zip(hw_per_level, strides)):
        ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device),
                                indexing="ij")
        if input_hw is None:  # FCOS's: the cell centre
            sx, sy, half = s, s, s // 2
        else:  # torchvision's: the cell corner
            sx, sy, half = int(input_hw[1]) // w, int(input_hw[0]) // h, 0
        xy = [xs.reshape(-1) * sx + half, ys.reshape(-1) * sy + half]
        points.append(torch.stack(xy, 1).float())
        point_strides.append(torch.full((h * w,), float(s), device=device))
        levels.append(torch.full((h * w,), level, dtype=torch.long, device=device))
    return torch.cat(points), torch.cat(point_strides), torch.cat(levels)


def fcos_targets(points, strides, boxes, labels=None, valid=None, radius=1.5, centers=None,
                 seg_labels=None, levels=None):
    """FCOS's per-location targets ([IS 3.1] eq. 1, [FCOS] 3.1-3.3) of a batch.
        points (P, 2) xy input frame; strides (P,), whose rank picks the level's range [lo, hi] of
            max(l*, t*, r*, b*) in FCOS_SIZE_RANGES (8 -> P3 -> [0, 64], ...)
        boxes (B, N, 4) xyxy input frame (`pad_boxes`; one image: boxes[None]); labels (B, N) int64 (optional);
            valid (B, N) bool, the real boxes (default all)
        radius: centre sampling, positives within radius * stride of `centers` (default the box centres; FCOSreg:
            the masks' mass centres, [IS 3.3] Fig. 5), clipped to the box; 0: the whole box ([IS 3.1])
        seg_labels (B, N, P): FCOSreg ([IS 3.3]): ambiguous locations go to the highest segmentation label
            (ties: the smaller box); default FCOS's rule, the smallest box
        levels (P,) int64: that rank, known (`fcos_locations`' levels, every level present), without the
            host sync of torch.unique
    A candidate lies strictly inside the box and region ("open") with lo <= max(l*, t*, r*, b*) <= hi (both
    inclusive, as FCOS's code). Returns a dict:
        matched (B, P) int64 the assigned box (0..N-1, the image's own), -1 = negative
        labels (B, P) int64 its class, -1 for negatives (only when labels are given)
        ltrb (B, P, 4) distances to its sides; centerness (B, P) sqrt(min(l,r)/max(l,r) * min(t,b)/max(t,b));
            both 0 for negatives"""
    B, N = boxes.shape[:2]
    P = len(points)
    boxes = boxes.float()
    if valid is None:
        valid = torch.ones(B, N, dtype=torch.bool, device=boxes.device)
    # level of each point: the given levels, else the rank of its stride (torch.unique: a host sync)
    rank = torch.unique(strides, return_inverse=True)[1] if levels is None else levels
    size_ranges = torch.tensor(FCOS_SIZE_RANGES, device=points.device)[rank]      # (P, 2)
    x, y = points[:, 0][None, :, None], points[:, 1][None, :, None]              # (1, P, 1)
    x0, y0, x1, y1 = boxes[:, None].unbind(-1)                                   # (B, 1, N) each
    ltrb = torch.stack([x - x0, y - y0, x1 - x, y1 - y], -1)                     # (B, P, N, 4)
    if radius > 0:
        if centers is None:
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2                                # (B, 1, N)
        else:
            cx, cy = centers[:, None, :, 0], centers[:, None, :, 1]
        r = radius * strides[None, :, None]                                      # (1, P, 1)
        region = torch.stack([x - torch.maximum(cx - r, x0), y - torch.maximum(cy - r, y0),
                              torch.minimum(cx + r, x1) - x, torch.minimum(cy + r, y1) - y], -1)
        in_region = region.amin(-1) > 0                                          # (B, P, N)
    else:
        in_region = ltrb.amin(-1) > 0
    # "open" (`inside`): strict > 0 on every distance, as FCOS's `min(dim=1)[0] > 0`
    m = ltrb.amax(-1)                                                            # (B, P, N)
    in_range = (m >= size_ranges[None, :, 0:1]) & (m <= size_ranges[None, :, 1:2])
    candidate = in_region & in_range & valid[:, None, :]
    if seg_labels is not None:
        # FCOSreg: keep only the candidates with the highest segmentation label
        s = torch.where(candidate, seg_labels.transpose(1, 2).float(), torch.full_like(m, -1.0))
        candidate = candidate & (s == s.amax(-1, keepdim=True))
    area = ((x1 - x0) * (y1 - y0)).expand(B, P, N)
    # (B, P)
    min_area, matched = torch.where(candidate, area, torch.full_like(area, math.inf)).min(-1)
    positive = min_area < math.inf
    matched = torch.where(positive, matched, torch.full_like(matched, -1))
    ltrb = ltrb.gather(2, matched.clamp(min=0)[:, :, None, None].expand(B, P, 1, 4))[:, :, 0]
    ltrb = ltrb * positive[..., None]                                           # (B, P, 4)
    l, t, r, b = ltrb.clamp(min=1e-6).unbind(-1)  # clamp: negatives give 0 / 0
    centerness = torch.sqrt(torch.minimum(l, r) / torch.maximum(l, r)
                            * torch.minimum(t, b) / torch.maximum(t, b))
    out = {"matched": matched, "ltrb": ltrb, "centerness": centerness * positive}
    if labels is not None:
        lab = labels.gather(1, matched.clamp(min=0))
        out["labels"] = torch.where(positive, lab, torch.full_like(lab, -1))
    return out


def regression_weights(centerness, seg, weights=(1.0, 0.0, 0.0)):
    """FCOSreg's regularisation map ([IS 3.3]): w = a * centerness + b * s + c * sqrt(centerness * s), a + b + c = 1,
    s the segmentation label. Fig. 6: (a) = (1, 0, 0) (FCOS), (b) = (0, 1, 0), (c) = (1/3, 1/3, 1/3)."""
    a, b, c = weights
    return a * centerness + b * seg + c * torch.sqrt((centerness * seg).clamp(min=0))


def iou_loss(pred, target):
    """FCOS's IoU loss (IOULoss "iou", UnitBox's -ln IoU, [IS 3.1]) of boxes given as distances from one location:
    pred, target (M, 4) ltrb >= 0 -> (M,) -log((I + 1) / (U + 1)), I = (min(l, l*) + min(r, r*)) (min(t, t*) +
    min(b, b*)), U = area + area* - I. FCOS's +1 counts in input pixels, as its original form."""
    l, t, r, b = pred.unbind(1)
    l_, t_, r_, b_ = target.unbind(1)
    inter = (torch.minimum(l, l_) + torch.minimum(r, r_)) \
        * (torch.minimum(t, t_) + torch.minimum(b, b_))                           # (M,)
    union = (l + r) * (t + b) + (l_ + r_) * (t_ + b_) - inter
    return -torch.log((inter + 1) / (union + 1))


class FCOSHead(nn.Module):
    """FCOS's shared head ([FCOS] 3.1, Fig. 2) on every FPN level: a classification and a box tower, each num_convs
    x (Conv3x3 + GroupNorm(32) + ReLU); cls logits (C) on the first, ltrb (4) on the second, centerness (1) on
    either, one learnable Scale per level; `extra` channels on the box tower (FCOSIS: centre of mass 2 + coarse
    foreground 1). The two forms (`FCOS`) differ in which tower feeds centerness (the original: the
    classification tower; the improved: the box tower) and in ltrb = exp(scale_l x) (original) or
    relu(scale_l x) * stride_l (improved: x in strides, the ReLU kept at test as torchvision's);
    ltrb is in input pixels either way, and the state-dict keys are the same.
    features: one map per level (B, cin, h_l, w_l) -> dict, locations level after level (P = sum h_l * w_l):
        cls (B, P, C) logits; ltrb (B, P, 4) input pixels; centerness (B, P) logits;
        extra (B, P, extra) when asked; box_features: the box tower output of every level."""

    def __init__(self, cin, num_classes, strides, num_convs=HEAD_CONVS, extra=0, prior=0.01,
                 improved=True):
        super().__init__()
        self.strides = list(strides)
        self.improved = improved

        def tower():
            layers = []
            for _ in range(num_convs):
                layers += [nn.Conv2d(cin, cin, 3, padding=1), nn.GroupNorm(32, cin),
                           nn.ReLU(inplace=True)]
            return nn.Sequential(*layers)
        self.cls_tower, self.box_tower = tower(), tower()
        self.cls_logits = nn.Conv2d(cin, num_classes, 3, padding=1)
        self.ltrb = nn.Conv2d(cin, 4, 3, padding=1)
        self.centerness = nn.Conv2d(cin, 1, 3, padding=1)
        self.extra = nn.Conv2d(cin, extra, 3, padding=1) if extra else None
        self.scales = nn.Parameter(torch.ones(len(self.strides)))               # [FCOS] 3.2
        for m in self.modules():
            # [FCOS] 4: "initialized as in RetinaNet": N(0, 0.01), bias 0
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.constant_(m.bias, 0)
        # prior 0.01 for the foreground at the start ([FCOS] 4, RetinaNet's pi)
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior) / prior))

    def forward(self, features):
        out = {"cls": [], "ltrb": [], "centerness": [], "extra": [], "box_features": []}
        for level, (p, s) in enumerate(zip(features, self.strides)):
            c, b = self.cls_tower(p), self.box_tower(p)                          # (B, cin, h, w)
            out["cls"].append(self.cls_logits(c).flatten(2))                     # (B, C, h*w)
            x = self.scales[level] * self.ltrb(b)                                # (B, 4, h, w)
            ltrb = F.relu(x) * s if self.improved else torch.exp(x)              # input pixels
            out["ltrb"].append(ltrb.flatten(2))                                  # (B, 4, h*w)
            ctr = self.centerness(b if self.improved else c)                     # (B, 1, h, w)
            out["centerness"].append(ctr.flatten(2))
            if self.extra is not None:
                out["extra"].append(self.extra(b).flatten(2))
            out["box_features"].append(b)
        res = {k: torch.cat(v, 2).transpose(1, 2) for k, v in out.items()
               if v and k != "box_features"}
        res["centerness"] = res["centerness"][..., 0]                            # (B, P)
        res["box_features"] = out["box_features"]
        # (h_l, w_l) per level
        res["hw"] = [tuple(b.shape[-2:]) for b in out["box_features"]]
        return res


@dataclass
class FCOSForward:
    """One forward of the FCOS detector, as its hooks `extra_losses(x)` and `postprocess(x)` read it."""
    # head outputs (FCOSHead): "cls" (B, P, C), "ltrb" (B, P, 4), "centerness"
    out: dict
                               # (B, P), "extra" (B, P, n) where a method asks for it, "hw" per level
    # the FPN maps, finest first ((B, c, H/s, W/s) each; P3-P7, FCOSIS P2-P7)
    features: list
    # (P, 2) every location, input frame (`fcos_locations`), levels concatenated
    points: torch.Tensor
    levels: torch.Tensor       # (P,) int64 index of each location's level in the model's `strides`
    input_hw: tuple            # (H, W) of the padded batch
    targets: list = None       # training: the B target dicts (data.py; "boxes", "labels", "masks")
    # training: every location's FCOS targets and the padded boxes (`FCOS.assign`)
    assigned: dict = None
    # inference: B (h, w), each image before padding (None: input_hw for all)
    image_sizes: list = None


class FCOS(Method):
    """FCOS ([IS 3.1], [FCOS]) and FCOSreg ([IS 3.3], method="fcosreg") on ResNet-FPN P3-P7.

    Two forms of the detector, one key, fcos_form (FCOS's own option in brackets; METHODS.md):
                        "original"                       "improved"
        centerness      on the classification tower      on the box tower (CENTERNESS_ON_REG)
        ltrb            exp(scale_l x), pixels           relu(scale_l x) * stride (NORM_REG_TARGETS)
        positives       every location in the box        within 1.5 strides of the centre
                                                         (CENTER_SAMPLING_RADIUS)
        box loss        -log((I+1)/(U+1)) (`iou_loss`)   GIoU (IOU_LOSS_TYPE)
    The original: [FCOS] and FCOS's code defaults (FCOS_R_50_FPN_1x, the FCOS of [IS 3.1] and
    Table 1; the [IS] configs). The improved: FCOS's fcos_imprv_* and torchvision's FCOS.
    "torchvision" is the improved form with torchvision's two conventions, for its weights (set by
    train.py's import of them; METHODS.md): its locations (`fcos_locations` given input_hw)
    and its candidate test on sqrt(cls * ctr) instead of cls (in `detect`).

    Training ([IS] eq. 2, alpha = beta = 1): cls, sigmoid focal loss (0.25, 2) / N_pos; box, GIoU or IoU loss
        (`iou_loss`) of the positives weighted by the centerness target / the sum of those weights (FCOS's code;
        [IS] eq. 2 writes / N_pos); centerness, BCE against the centerness target. N_pos and the weight sum go
        through `reduce_mean`.
    Inference: boxes (K, 4) xyxy input frame, scores (K,), labels (K,). Per level the locations whose class
        probability > 0.05 ("torchvision": sqrt(cls * ctr) > 0.05), top 1000 of cls * ctr; then
        score = sqrt(cls * ctr), class-wise NMS at IoU 0.6, best 100.
    FCOSreg ([IS 3.3]): ambiguous locations go to the highest segmentation label s, and w = a ctr + b s +
        c sqrt(ctr s) (`reg_weights`, Fig. 6) replaces the centerness target, of the box loss and of the
        centerness branch, which so weights the scores at test (METHODS.md); center_sampling_at="mass"."""
    transform = "fcos"                                         # the short side of [FCOS] / [IS 4]

    def __init__(self, cfg: ModelConfig, extra=0, first_level=3):
        super().__init__()
        self.cfg = cfg
        freeze_at = 2 if cfg.norm == "frozen_bn" else 0                          # stem + res2
        self.backbone = ResNetFPN(cfg.backbone, first_level, cfg.fpn_channels, cfg.pretrained,
                                  cfg.norm, freeze_at)
        self.size_divisibility = self.backbone.size_divisibility
        self.fcos_levels = slice(3 - first_level, None)   # P3-P7 of the FPN maps
        # [8, 16, 32, 64, 128]
        self.strides = self.backbone.strides[self.fcos_levels]
        self.improved = cfg.fcos_form != "original"
        # one head shared by P3-P7
        self.head = FCOSHead(cfg.fpn_channels, cfg.num_classes, self.strides, extra=extra,
                             improved=self.improved)
        # FCOSreg's assignment or weights ([IS 3.3]) read every location's segmentation labels
        self.uses_masks = (cfg.ambiguity == "mask" or cfg.center_sampling_at == "mass"
                           or cfg.reg_weights != (1.0, 0.0, 0.0))

    def heads(self, images):
        """`Method.heads`: (B, 3, H, W) -> the outputs of `self.head` (FCOSHead) and "features", the FPN maps."""
        features = self.backbone(images)
        out = self.head(features[self.fcos_levels])
        out["features"] = features
        return out

    def locations(self, hw, input_hw, device, strides=None):
        """The locations of grids hw of the head's strides (or `strides`): `fcos_locations`, or
        torchvision's for its weights."""
        strides = self.strides if strides is None else strides
        torchvision = self.cfg.fcos_form == "torchvision"
        return fcos_locations(hw, strides, device, input_hw if torchvision else None)

    def decode(self, out, input_hw, image_sizes=None):
        """Head outputs -> detections (and masks), without the detections' `index`; boxes clipped to each image's
        own (h, w) of image_sizes (`detect`)."""
        points, _, levels = self.locations(out["hw"], input_hw, out["cls"].device)
        dets = self.postprocess(FCOSForward(out, out["features"], points, levels, tuple(input_hw),
                                            image_sizes=image_sizes))
        for d in dets:
            del d["index"]
        return dets

    def forward(self, images, targets=None, image_sizes=None):
        if not self.training:
            return self.decode(self.heads(images), images.shape[-2:], image_sizes)
        out = self.heads(images)
        features = out.pop("features")
        points, strides, levels = self.locations(out["hw"], images.shape[-2:], images.device)
        if targets is None:
            raise ValueError(f"{type(self).__name__} in train mode needs targets "
                             "(call model.eval() for inference)")
        # losses in fp32 (bf16/fp16 logs and sums lose precision)
        with torch.autocast(images.device.type, enabled=False):
            out = {k: (v.float() if torch.is_tensor(v) else v) for k, v in out.items()}
            losses, assigned = self.detection_losses(out, points, strides, targets, levels)
        # the mask branches run their convs under autocast and cast their logits to fp32
        x = FCOSForward(out, features, points, levels, tuple(images.shape[-2:]), targets, assigned)
        losses.update(self.extra_losses(x))
        losses["loss"] = sum(losses.values())
        return losses

    # -- training ([IS] eq. 2) --------------------------------------------------------------------
    def assign(self, points, strides, targets, hw, levels=None):
        """Targets of every location of the batch (fcos_targets), plus what the mask-aware
        variants need: boxes/labels/valid (B, N, ...) and, with masks, seg (B, N, P)."""
        device = points.device
        boxes, labels, valid = pad_boxes(targets, device)
        assigned = {"boxes": boxes}                 # (B, N, 4), read by CenterMask-FCOS
        seg = centers = None
        if self.uses_masks:
            seg = torch.zeros(len(targets), boxes.shape[1], len(points), device=device)
            mass = torch.zeros(len(targets), boxes.shape[1], 2, device=device)
            for b, target in enumerate(targets):  # one image at a time: (N_b, H, W) masks
                n = len(target["boxes"])
                if n:  # segmentation label of every location of every level ([IS 3.3])
                    seg[b, :n] = torch.cat([average_pool_masks(target["masks"], s, hw_l).flatten(1)
                                            for s, hw_l in zip(self.strides, hw)], 1)
                    mass[b, :n] = center_of_mass(target["masks"], target["boxes"])
            assigned["seg"] = seg
            centers = mass if self.cfg.center_sampling_at == "mass" else None
        radius = CENTER_SAMPLING if self.improved else 0.0
        seg_labels = seg if self.cfg.ambiguity == "mask" else None
        assigned.update(fcos_targets(points, strides, boxes, labels, valid, radius, centers,
                                     seg_labels, levels))
        return assigned

    def detection_losses(self, out, points, strides, targets, levels=None):
        from torchvision.ops import sigmoid_focal_loss, generalized_box_iou_loss
        assigned = self.assign(points, strides, targets, out["hw"], levels)
        pos = assigned["matched"] >= 0                                           # (B, P)
        num_pos = reduce_mean(pos.sum().float()).clamp(min=1.0)
        onehot = torch.zeros_like(out["cls"])                                    # (B, P, C)
        onehot[pos, assigned["labels"][pos]] = 1.0
        focal = sigmoid_focal_loss(out["cls"], onehot, FOCAL_ALPHA, FOCAL_GAMMA, reduction="sum")
        losses = {"cls": focal / num_pos}
        ctr = assigned["centerness"][pos]                                        # (M,)
        seg = None  # FCOSreg's segmentation label of each positive with its own object ([IS 3.3])
        if "seg" in assigned and self.cfg.reg_weights != (1.0, 0.0, 0.0):
            seg = assigned["seg"].gather(1, assigned["matched"].clamp(min=0)[:, None, :])[:, 0][pos]
        weight, ctr_target = self.box_weights(ctr, seg)                          # (M,), (M,)
        p = points[None].expand_as(assigned["ltrb"][..., :2])[pos]               # (M, 2)
        pred = torch.cat([p - out["ltrb"][pos][:, :2], p + out["ltrb"][pos][:, 2:]], 1)  # (M, 4)
        gt = torch.cat([p - assigned["ltrb"][pos][:, :2], p + assigned["ltrb"][pos][:, 2:]], 1)
        if self.improved:  # torchvision's GIoU loss on the decoded boxes
            per_box = generalized_box_iou_loss(pred, gt, reduction="none")
        else:  # FCOS's IoU loss on the distances ([IS 3.1])
            per_box = iou_loss(out["ltrb"][pos], assigned["ltrb"][pos])
        losses["box"] = (per_box * weight).sum() / reduce_mean(weight.sum()).clamp(min=1e-6)
        bce = F.binary_cross_entropy_with_logits(out["centerness"][pos], ctr_target,
                                                 reduction="sum")
        losses["centerness"] = bce / num_pos
        return losses, assigned

    def box_weights(self, ctr, seg):
        """Hook: (weight of each positive's box loss, target of the centerness branch), each (M,), from its
        centerness target ctr (M,) and segmentation label seg (M,) (None unless the masks are read and reg_weights
        != (1, 0, 0)). FCOS: ctr, ctr ([FCOS] 3.3); FCOSreg: w, w (`regression_weights`, [IS 3.3]). Elementwise:
        the positives are picked in `detection_losses` (one data-dependent step under torch.compile)."""
        if self.cfg.method == "fcosreg" and seg is not None:
            weight = regression_weights(ctr, seg, self.cfg.reg_weights)
            return weight, weight
        return ctr, ctr

    def extra_losses(self, x: FCOSForward):
        """Hook: the own losses (named scalars) of the methods built on FCOS, from the training forward `x` (its
        `targets` and `assigned` set). FCOS and FCOSreg have none."""
        return {}

    # -- inference ([FCOS] 4) ----------------------------------------------------------------------
    def score_weights(self, out):
        """Hook: what multiplies the class probabilities at inference, (B, P): the predicted centerness ([FCOS] 3.3)."""
        return out["centerness"].float().sigmoid()

    @torch.no_grad()
    def detect(self, x: FCOSForward, max_detections=None):
        """Head outputs -> per image the kept detections: boxes (K, 4), scores (K,), labels (K,) and `index` (K,),
        the flat location of each (for the mask branches). Each box is clipped to its own image (x.image_sizes, else
        the padded batch) before the NMS, as FCOS's FCOSPostProcessor (clip_to_image, then boxlist_ml_nms) and
        torchvision's FCOS do: a box reaching into the padding would otherwise keep its extent through NMS."""
        from torchvision.ops import batched_nms
        cfg, out, points, input_hw = self.cfg, x.out, x.points, x.input_hw
        cls = out["cls"].float().sigmoid()                                       # (B, P, C)
        ctr = self.score_weights(out)                                            # (B, P)
        B, P, C = cls.shape
        score = cls * ctr[..., None]                                             # (B, P, C)
        # candidates: FCOS tests the class probability, torchvision's FCOS sqrt(cls * ctr)
        tested = score.sqrt() if cfg.fcos_form == "torchvision" else cls
        passed = tested > cfg.score_threshold
        score = torch.where(passed, score, torch.zeros_like(score))
        cand_scores, cand_index = [], []
        start = 0
        # top 1000 per level
        for n in [h * w for h, w in out["hw"]]:
            s = score[:, start:start + n].reshape(B, -1)                         # (B, n*C)
            v, i = s.topk(min(PRE_NMS_TOP_N, s.shape[1]), dim=1)
            cand_scores.append(v)
            cand_index.append(i + start * C)
            start += n
        cand_scores, cand_index = torch.cat(cand_scores, 1), torch.cat(cand_index, 1)  # (B, K)
        loc, labels = cand_index // C, cand_index % C
        results = []
        for b in range(B):  # NMS per image
            H, W = x.image_sizes[b] if x.image_sizes is not None else input_hw        # ints
            keep = cand_scores[b] > 0
            s, lo, lab = cand_scores[b][keep].sqrt(), loc[b][keep], labels[b][keep]
            p, d = points[lo], out["ltrb"][b, lo].float()
            boxes = torch.cat([p - d[:, :2], p + d[:, 2:]], 1)
            boxes = boxes.clamp(min=0).clamp(max=boxes.new_tensor([W, H, W, H]))
            keep = batched_nms(boxes, s, lab, cfg.nms_threshold)
            keep = keep[:max_detections or cfg.max_detections]
            results.append({"boxes": boxes[keep], "scores": s[keep], "labels": lab[keep],
                            "index": lo[keep]})
        return results

    def postprocess(self, x: FCOSForward):
        """Hook: the inference forward `x` -> the per-image dicts of `detect`, to which the mask methods add masks."""
        return self.detect(x)


# -----------------------------------------------------------------------------
# 10. MaskFCOS ([IS 4], "Mask Prediction Head")

ROI_SIZE, MASK_SIZE = 14, 28  # RoIAlign output and mask head output ([IS 4], Mask R-CNN's)


def maskfcos_levels(boxes, k0=4, canonical=224.0, k_min=3, k_max=5):
    """FPN level of each box ([IS] eq. 4, from FPN): k = floor(k0 + log2(sqrt(w h) / 224)) clamped to P3-P5 (below
    224^2 -> P3, up to 448^2 -> P4, larger -> P5; +1e-6: exactly 224^2 gives P4). boxes (K, 4) -> (K,) int64."""
    wh = (boxes[:, 2:] - boxes[:, :2]).clamp(min=1e-6)
    k = torch.floor(k0 + torch.log2(torch.sqrt(wh[:, 0] * wh[:, 1]) / canonical) + 1e-6)
    return k.clamp(k_min, k_max).long()


def mask_targets(gt_masks, gt_index, boxes, size):
    """RoIAlign of ground-truth masks (M, H, W) onto boxes (K, 4) xyxy input frame, gt_index (K,) the mask of each
    box: the target of a size x size mask (Mask R-CNN's, [IS 4]), (K, size, size) float in [0, 1]."""
    from torchvision.ops import roi_align
    rois = torch.cat([gt_index[:, None].float(), boxes.float()], 1)              # (K, 5)
    masks = gt_masks[:, None].float()
    return roi_align(masks, rois, size, 1.0, sampling_ratio=2, aligned=True)[:, 0]


class MaskFCOS(FCOS):
    """MaskFCOS ([IS 4], "Mask Prediction Head"): FCOS proposes, a Mask R-CNN mask head segments. RoIAlign 14x14
    from P_k (`maskfcos_levels`) -> 4 x (Conv3x3 256 + ReLU) -> ConvTranspose 2x2 stride 2 + ReLU -> Conv1x1 ->
    (C, 28, 28) logits, the box's class channel its mask. Training: RoIs = the ground-truth boxes + the top
    `mask_proposals` detections per image (no gradient into them) at IoU >= 0.5 with a ground-truth box; target
    the RoIAlign of its mask >= 0.5; mean pixel BCE. Inference: each detection's mask pasted into its box,
    (K, H, W) probabilities. Proposals and RoIAlign ([IS] gives neither): METHODS.md, FCOS family."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        c = cfg.fpn_channels
        layers = []
        for _ in range(4):
            layers += [nn.Conv2d(c, c, 3, padding=1), nn.ReLU(inplace=True)]
        layers += [nn.ConvTranspose2d(c, c, 2, stride=2), nn.ReLU(inplace=True),
                   nn.Conv2d(c, cfg.num_classes, 1)]
        # (K, c, 14, 14) -> (K, C, 28, 28)
        self.mask_head = nn.Sequential(*layers)
        for m in self.mask_head.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):  # Mask R-CNN's init
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.constant_(m.bias, 0)

    def roi_features(self, features, batch, boxes):
        """RoIAlign 14x14 of each box from its level's map ([IS] eq. 4): (K, c, 14, 14)."""
        from torchvision.ops import roi_align
        level = maskfcos_levels(boxes)                                           # (K,) in 3..5
        rois = torch.cat([batch[:, None].float(), boxes.float()], 1)             # (K, 5)
        out = torch.zeros(len(boxes), self.cfg.fpn_channels, ROI_SIZE, ROI_SIZE,
                          device=boxes.device, dtype=features[0].dtype)
        # one roi_align per level, the RoIs sorted by level: one host read (the counts), not three per level
        order = torch.argsort(level, stable=True)                                # (K,)
        for k, sel in zip((3, 4, 5), order.split(torch.bincount(level - 3, minlength=3).tolist())):
            if len(sel):
                p = features[self.fcos_levels][k - 3]
                # fp32 features and RoIs under any autocast: a bf16 RoI would round a corner by 4 px between
                # 512 and 1024 and by 8 px above (torchvision's autocast kernel also computes in fp32)
                out[sel] = roi_align(p.float(), rois[sel], ROI_SIZE, 1.0 / 2 ** k,
                                     sampling_ratio=2, aligned=True).to(out.dtype)
        return out

    def mask_logits(self, features, batch, boxes, labels):
        """(K,) RoIs -> (K, 28, 28) mask logits of each RoI's class channel."""
        logits = self.mask_head(self.roi_features(features, batch, boxes))       # (K, C, 28, 28)
        return logits[torch.arange(len(boxes), device=boxes.device), labels]

    def extra_losses(self, x: FCOSForward):
        from torchvision.ops import box_iou
        targets, features, device = x.targets, x.features, x.points.device
        dets = self.detect(x, self.cfg.mask_proposals)
        counts, rois, gt_index = [], [], []
        for d, target in zip(dets, targets):  # per image: proposals matched to its boxes
            gt = target["boxes"].float()
            if len(gt):
                props = torch.cat([gt, d["boxes"]])
                iou, idx = box_iou(props, gt).max(1)                             # (R,)
                # GT boxes always match
                keep = iou >= 0.5
                rois.append(props[keep])
                # among the image's boxes
                gt_index.append(idx[keep])
            counts.append(len(rois[-1]) if len(gt) else 0)
        S = MASK_SIZE
        num_pixels = torch.full((), float(sum(counts) * S * S), device=device)
        num_pixels = reduce_mean(num_pixels).clamp(min=1)
        if not rois:  # no objects in the batch
            return {"mask": graph_zero(self.mask_head)}
        batch, rois = image_index(counts, device), torch.cat(rois)               # (K,), (K, 4)
        gt_index = first_box_index(targets, device)[batch] + torch.cat(gt_index)  # (K,) flat
        gt_masks = batch_masks(targets, *x.input_hw, device)                     # (M, H, W)
        gt_labels = torch.cat([target["labels"] for target in targets]).to(device)  # (M,)
        mask_target = (mask_targets(gt_masks, gt_index, rois, S) >= 0.5).float()  # (K, 28, 28)
        logits = self.mask_logits(features, batch, rois, gt_labels[gt_index]).float()
        # mean pixel BCE, the pixel count averaged over processes (reduce_mean)
        bce = F.binary_cross_entropy_with_logits(logits, mask_target, reduction="sum")
        return {"mask": bce / num_pixels}

    def postprocess(self, x: FCOSForward):
        dets = self.detect(x)
        batch, boxes, labels = flat_detections(dets)                         # (K,) over the batch
        probs = (self.mask_logits(x.features, batch, boxes, labels).float().sigmoid() if len(boxes)
                 else boxes.new_zeros(0, 1, 1))                                  # (K, 28, 28)
        for d, small in zip(dets, probs.split([len(d["boxes"]) for d in dets])):
            d["masks"] = paste_masks(small, d["boxes"], x.input_hw)
        return dets


def paste_masks(masks, boxes, hw):
    """Paste K small masks (K, m, m) into their boxes (K, 4) xyxy input frame on an (H, W) image: bilinear, as
    CenterMask's local shapes (`stretch_to_boxes`), zero outside the box -> (K, H, W)."""
    H, W = hw
    if len(boxes) == 0:
        return torch.zeros(0, H, W, device=boxes.device)
    centers, wh = (boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2]
    values, (in_y, in_x) = stretch_to_boxes(masks, min_size_boxes(centers, wh), H, W)
    return values * in_y * in_x                                                  # (K, H, W)


# -----------------------------------------------------------------------------
# 11. CenterMask-FCOS ([CM 4.3])


class CenterMaskFCOS(FCOS):
    """CenterMask on the FCOS detector ([CM 4.3]): FCOS, a Local Shape head (S^2 channels, one Conv3x3 on the box
    tower of P3-P7, evaluated where it is read) and CenterMask's Global Saliency head on P3; the box is FCOS's (no
    size head). Mask = sigmoid(local shape stretched over the box) x sigmoid(saliency cropped to it) ([CM] eq. 1,
    `assemble_masks`). Training: every positive with its ground-truth box (teacher forcing), on the box's S x S
    grid against the RoIAlign of its mask (`mask_targets`); mean BCE ([CM] eq. 2). Inference: each detection's
    own location's shape vector, at input resolution. Readings ([CM 4.3] gives no layers): METHODS.md, FCOS family."""
    # CenterMask's fast paths (section 7): the shape head at the locations read; at inference
    # the resize as matrix products and the product in place
    fast = True

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        S, c = cfg.shape_size, cfg.fpn_channels
        self.local_shape = nn.Conv2d(c, S * S, 3, padding=1) if cfg.use_shape else None
        if self.local_shape is not None:
            nn.init.normal_(self.local_shape.weight, std=0.01)
            nn.init.constant_(self.local_shape.bias, 0)
        n_sal = 1 if cfg.saliency == "agnostic" else cfg.num_classes
        self.saliency = conv_relu_conv(c, n_sal, cfg.head_conv) if cfg.use_saliency else None

    def local_shapes(self, out, batch, index):
        """Shape logits (M, S, S) of M flat locations (batch, index) of the box-tower maps: the head's dense
        map read there, or, fast, the head at those locations alone (`conv3x3_at`)."""
        S = self.cfg.shape_size
        if not self.fast:
            # the head's dense map over every level's locations (B, S*S, P)
            shape = torch.cat([self.local_shape(f).flatten(2) for f in out["box_features"]], 2)
            return shape[batch, :, index].float().view(-1, S, S)
        res = torch.zeros(len(batch), S * S, device=batch.device)
        start = 0
        for f in out["box_features"]:  # per level
            h, w = f.shape[-2:]
            sel = (index >= start) & (index < start + h * w)
            if sel.any():
                cell = index[sel] - start
                res[sel] = conv3x3_at(self.local_shape, f, batch[sel], cell // w, cell % w).float()
            start += h * w
        return res.view(-1, S, S)

    def extra_losses(self, x: FCOSForward):
        out, assigned, targets, device = x.out, x.assigned, x.targets, x.points.device
        pos = assigned["matched"] >= 0                                           # (B, P)
        batch, index = pos.nonzero(as_tuple=True)                                # (M,) each
        S = self.cfg.shape_size
        num_pixels = torch.full((), float(len(batch) * S * S), device=device)
        num_pixels = reduce_mean(num_pixels).clamp(min=1)
        sal = None
        if self.saliency is not None:
            sal = self.saliency(x.features[self.fcos_levels][0]).float()         # (B, n, H/8, W/8)
        losses = {}
        if self.cfg.saliency_loss:  # Table 1f ([CM 4.1]), as CenterMask's, on P3's grid
            losses["saliency"] = saliency_loss(sal, targets, self.strides[0])
        if len(batch) == 0:
            return {"mask": graph_zero(self.local_shape, self.saliency), **losses}
        matched = assigned["matched"][pos]                    # (M,) among the image's boxes
        gt_boxes = assigned["boxes"][batch, matched]          # (M, 4) input frame
        gt_index = first_box_index(targets, device)[batch] + matched  # (M,) into the flat masks
        gt_masks = batch_masks(targets, *x.input_hw, device)  # every box's, flat layout
        mask_target = mask_targets(gt_masks, gt_index, gt_boxes, S)              # (M, S, S) soft
        L = self.local_shapes(out, batch, index) if self.local_shape is not None else None
        G = None
        if self.saliency is not None:
            from torchvision.ops import roi_align
            specific = self.cfg.saliency == "specific"
            ch = assigned["labels"][pos] if specific else torch.zeros_like(batch)
            rois = torch.cat([batch[:, None].float(), gt_boxes], 1)
            G = roi_align(sal, rois, S, 1.0 / self.strides[0], sampling_ratio=2,
                          aligned=True)                                          # (M, n, S, S)
            G = G[torch.arange(len(batch), device=G.device), ch]                 # (M, S, S)
        log_m, log_1m = mask_log_terms(L, G)
        bce = -(mask_target * log_m + (1 - mask_target) * log_1m)                # (M, S, S)
        # the mean over every process's pixels
        return {"mask": self.cfg.loss_weights[3] * bce.sum() / num_pixels, **losses}

    def postprocess(self, x: FCOSForward):
        dets = self.detect(x)
        sal = None
        if self.saliency is not None:
            sal = self.saliency(x.features[self.fcos_levels][0]).float()         # (B, n, H/8, W/8)
        R = self.strides[0]
        for b, d in enumerate(dets):
            k = len(d["boxes"])
            batch = torch.full((k,), b, device=x.points.device, dtype=torch.long)
            local = None
            if self.local_shape is not None:
                local = self.local_shapes(x.out, batch, d["index"])
            ch = d["labels"] if self.cfg.saliency == "specific" else torch.zeros_like(batch)
            # boxes in P3 units; the input-resolution grid has pixel 1/R of them
            boxes = min_size_boxes((d["boxes"][:, :2] + d["boxes"][:, 2:]) / (2 * R),
                                   (d["boxes"][:, 2:] - d["boxes"][:, :2]) / R, 1.0 / R)
            assemble = assemble_masks_fast if self.fast else assemble_masks
            d["masks"] = assemble(local, sal, batch, ch, boxes, x.input_hw, 1.0 / R)
        return dets


# -----------------------------------------------------------------------------
# 12. FCOSIS ([IS 3.2]), in the paper's order
#
#     detection head  the centre of mass and coarse foreground each location predicts [IS 3.2.1]
#     attention       the parametrised attention map (top-down path), its Table 3 ablations, inference's duplicates
#     colouring       the Largest-First groups that share one segmentation forward [IS 3.2.1]
#     head and loss   the P2-P4 segmentation head, the BCE on the padded box crop [IS 3.2.2] (ASPP: Table 3a)
#     model           FCOSIS
#
# Box rule: "half-open" (section 2) for the attention map and the padded crop; the final masks are cropped with
# `boxes_inside` ("closed"). Instances are flat (section 2): batch (M,), masks (M, H, W) padded to the batch.


# -- the detection head's extra outputs: centre of mass and coarse foreground [IS 3.2.1] --------


def coarse_foreground_targets(masks, stride, batch=None, num_images=1, out_hw=None):
    """Target of the coarse foreground head at one level [IS 3.2.1] (BCE): the union of an image's masks (M, H, W),
    then average-pooled (soft); batch (M,) (None: one image) -> (B, 1, h, w), B = num_images."""
    M, H, W = masks.shape
    batch = torch.zeros(M, dtype=torch.long, device=masks.device) if batch is None else batch
    flat = masks.reshape(M, H * W).to(torch.uint8)
    union = torch.zeros(num_images, H * W, dtype=torch.uint8, device=masks.device)
    union.scatter_reduce_(0, batch[:, None].expand(M, H * W), flat, "amax")        # (B, H*W)
    return average_pool_masks(union.view(num_images, H, W), stride, out_hw)[:, None]


def argmin_per_image(cost, batch, num_images):
    """Per column p (a location) and image, the row of lowest cost among the image's rows (ties: the lower):
    cost (N, P) float (inf = not a candidate), batch (N,) -> (B, P) int64, N where no finite candidate."""
    N, P = cost.shape
    idx = batch[:, None].expand(N, P)
    best = torch.full((num_images, P), float("inf"), device=cost.device, dtype=cost.dtype)
    best.scatter_reduce_(0, idx, cost, "amin")                                     # (B, P)
    rows = torch.arange(N, device=cost.device)[:, None].expand(N, P)
    cand = torch.where((cost == best[batch]) & cost.isfinite(), rows, N)           # (N, P)
    winner = torch.full((num_images, P), N, dtype=torch.long, device=cost.device)
    return winner.scatter_reduce_(0, idx, cand, "amin")


def mask_assignment(locations, masks, batch, num_images):
    """[IS] Fig. 3 ("foreground pixels of masks are activated to regress the center of mass of the object they
    belong to"): every location whose pixel lies in a mask goes to that instance, on every level; overlaps to the
    smaller mask (FCOS's rule), then the lower index. locations (P, 2) input frame; masks (M, H, W); batch (M,)
    -> matched (B, P) int64 flat instance index, -1 where no mask covers the pixel."""
    M, H, W = masks.shape
    px = locations[:, 0].long().clamp(0, W - 1)                  # pixel covering the point
    py = locations[:, 1].long().clamp(0, H - 1)
    covered = masks[:, py, px] > 0                                                 # (M, P)
    area = masks.flatten(1).sum(1, dtype=torch.float32)                            # (M,)
    cost = torch.where(covered, area[:, None], float("inf"))
    winner = argmin_per_image(cost, batch, num_images)                             # (B, P)
    return torch.where(winner < M, winner, -1)


def center_of_mass_targets(locations, strides, matched, mass_centers, masks):
    """Centre-of-mass targets of the detection head [IS 3.2.1]: (r_x, r_y) = (x_C - x, y_C - y) / s, in stride units
    ([IS] gives pixels; / s as FCOS's ltrb, a similar range on every level), where the location is assigned to an
    instance and its pixel lies in that instance's mask. locations (P, 2) input frame; strides a number or (P,);
    matched (B, P) flat instance index, -1 = none (FCOS's positives made flat with `first_box_index`, or
    `mask_assignment`); mass_centers (M, 2) input frame; masks (M, H, W) -> target (B, P, 2) (0 where invalid),
    valid (B, P) bool."""
    B, P = matched.shape
    M, H, W = masks.shape
    if M == 0:
        none = torch.zeros(B, P, dtype=torch.bool, device=matched.device)
        return locations.new_zeros(B, P, 2).float(), none
    m = matched.clamp(min=0)                                                       # (B, P)
    px = locations[:, 0].long().clamp(0, W - 1).expand(B, P)
    py = locations[:, 1].long().clamp(0, H - 1).expand(B, P)
    valid = (matched >= 0) & (masks[m, py, px] > 0)                                # (B, P)
    s = torch.as_tensor(strides, dtype=torch.float32, device=locations.device).reshape(-1, 1)
    target = (mass_centers[m].float() - locations.float()) / s                     # (B, P, 2)
    return torch.where(valid[..., None], target, 0.0), valid


def center_of_mass_loss(pred, target, valid, beta=1.0, normalizer=None):
    """SmoothL1 of the centre-of-mass regression [IS 3.2.1], summed over (x, y) and the valid locations, / `normalizer`
    (default their count, at least 1). beta = 1 stride unit ([IS] gives none). pred, target (B, P, 2); valid (B, P)."""
    loss = F.smooth_l1_loss(pred.float(), target, beta=beta, reduction="none").sum(-1)  # (B, P)
    n = valid.sum().clamp(min=1) if normalizer is None else normalizer
    return (loss * valid).sum() / n


# -- the parametrised attention map [IS 3.2.1, 4.2] ---------------------------------------------


def regressed_centers(center_offsets, locations, stride):
    """Head output (r_x, r_y) (B, 2, h, w) in stride units at the locations (h * w, 2) of its grid
    (`FCOS.locations`) -> (x + s r_x, y + s r_y) (B, 2, h, w), input frame: the centre each
    location votes for [IS 3.2.1]."""
    B, _, h, w = center_offsets.shape
    loc = locations.t().reshape(1, 2, h, w)
    return loc + stride * center_offsets.float()


@torch.no_grad()
def center_distances(regressed, centers, batch):
    """Squared distance between each instance's centre (N, 2) and the centre regressed at every
    location of its image (B, 2, h, w) -> (N, P). No gradient: it only decides the assignment."""
    votes = regressed.float().flatten(2)[batch]                                   # (N, 2, P)
    return ((votes - centers.float()[:, :, None]) ** 2).sum(1)                    # (N, P)


def nearest_center(dist2, batch, num_images):
    """[IS 3.2.1]'s assignment: q goes to the instance of its image (`batch`) whose centre is nearest q's regressed
    centre (ties: the lower index). dist2 (N, P) -> (N, P) bool: q assigned to j."""
    ids = torch.arange(len(dist2), device=dist2.device)
    return argmin_per_image(dist2, batch, num_images)[batch] == ids[:, None]


# Inference: which detections compete for the locations (not in [IS], which gives no test-time rule:
# ours, METHODS.md). Duplicates merge at FCOS's own NMS IoU ([FCOS] 4); only detections scoring
# at least the floor take locations from others.
MERGE_IOU, COMPETE_SCORE = 0.6, 0.5


def detections_as_objects(boxes, scores, batch):
    """Which object each detection stands for when detections compete for the attention map's
    locations at inference, so that each object competes once, as the ground truth does in
    training: a class-agnostic greedy NMS per image at MERGE_IOU keeps one detection per object;
    a suppressed one (a second class, a lower-scored copy) stands for the highest-scored kept
    detection of its image with IoU > MERGE_IOU, a kept one for itself. Only kept detections
    scoring at least COMPETE_SCORE compete (a weak false detection takes no locations from a
    confident one). boxes (N, 4) xyxy, scores (N,), batch (N,) -> object (N,) int64, the index of
    the detection each stands for, and competes (N,) bool."""
    from torchvision.ops import batched_nms, box_iou
    N = len(boxes)
    kept = torch.zeros(N, dtype=torch.bool, device=boxes.device)
    kept[batched_nms(boxes.float(), scores.float(), batch, MERGE_IOU)] = True          # (N,)
    can_stand_for = kept[None, :] & (batch[:, None] == batch[None, :]) \
        & (box_iou(boxes.float(), boxes.float()) > MERGE_IOU)                          # (N, N)
    best = torch.where(can_stand_for, scores.float()[None, :], float("-inf")).argmax(1)  # (N,)
    obj = torch.where(kept, torch.arange(N, device=boxes.device), best)
    return obj, kept & (scores >= COMPETE_SCORE)


def nearest_competing_center(dist2, batch, num_images, obj, competes):
    """Inference's `nearest_center` among the competing detections C (`detections_as_objects`):
    j counts q as its own when its object obj[j] wins q among C, or, obj[j] not in C, among C
    and obj[j] (a weak detection takes nothing from others, but its confident neighbours are
    distractors in its own map). dist2 (N, P), batch, obj, competes (N,) -> (N, P) bool."""
    N, P = dist2.shape
    in_c = torch.where(competes[:, None], dist2, float("inf"))                    # (N, P)
    winner = argmin_per_image(in_c, batch, num_images)[batch]                     # (N, P), N: none
    best = torch.cat([in_c, in_c.new_full((1, P), float("inf"))]).gather(0, winner)  # (N, P)
    return (winner == obj[:, None]) | (~competes[obj][:, None] & (dist2[obj] < best))


def attention_maps(q, regressed, coarse_fg, boxes, centers, batch, groups, num_groups, lam, mu,
                   bbox_only=False, obj=None, competes=None):
    """The attention maps of [IS 3.2.1] of every colour group on one grid. For instance j,
    location q, coarse foreground f(q) and box B_j:
        A_j(q) = 0                          if q is outside B_j
               = lam f(q) - mu (1 - f(q))   if q is inside B_j and assigned to j
               = -mu                        if q is inside B_j and assigned to another instance
    "lam indicates foreground pixels on the object while -mu marks pixels which belong to the
    background or distractor instances": the own background gets -mu too, weighed by f (a
    probability; no threshold; the reading without it: METHODS.md). q goes to the instance of
    its image whose centre is nearest the centre regressed at q (`nearest_center`); a group's map
    is the sum of its instances' (their boxes do not overlap).
        q (P, 2) the grid's locations; regressed (B, 2, h, w) input frame (assignment only);
        coarse_fg (B, 1, h, w) probabilities; boxes (N, 4), centers (N, 2) input frame (ground
        truth in training, detections at test); batch (N,); groups (N,) (`coloring_groups`)
        bbox_only (Table 3c): lam on the whole box
        obj, competes: inference's competitors (`detections_as_objects`); None in training
    Returns (num_groups, 1, h, w) float32."""
    B, _, h, w = coarse_fg.shape
    in_box = inside(q[None], boxes.float()[:, None], "half-open")                # (N, P) q in B_j
    if bbox_only:
        per_instance = lam * in_box                                               # (N, P)
    else:
        dist2 = center_distances(regressed, centers, batch)                      # (N, P)
        if obj is None:  # training: the ground-truth objects of the image
            mine = nearest_center(dist2, batch, B)                                # (N, P) q is j's
        else:  # inference: the competing detections of the image
            mine = nearest_competing_center(dist2, batch, B, obj, competes)
        f = coarse_fg.float().flatten(1)[batch]                                   # (N, P) f(q)
        per_instance = torch.where(mine, lam * f - mu * (1 - f), -mu) * in_box    # (N, P) A_j(q)
    out = per_instance.new_zeros(num_groups, h * w).index_add(0, groups, per_instance.float())
    return out.view(num_groups, 1, h, w)


class AttentionMap(nn.Module):
    """The learnable scalars of [IS 3.2.1]'s attention map, lam (foreground) and mu (background /
    distractor), both initialised to 1. mode "segm" (the paper's), "mu0" (Table 3b: mu := 0, a
    buffer) or "bbox" (Table 3c: no mu, no unused parameter under DDP). forward: the arguments of
    `attention_maps` before lam -> (num_groups, 1, h, w)."""

    def __init__(self, mode="segm"):
        super().__init__()
        if mode not in ("segm", "mu0", "bbox"):
            raise ValueError(f"AttentionMap: mode must be 'segm', 'mu0' or 'bbox', got {mode!r}")
        self.mode = mode
        self.lam = nn.Parameter(torch.tensor(1.0))                 # [IS 3.2.1]: initialised to 1
        if mode == "segm":
            self.mu = nn.Parameter(torch.tensor(1.0))              # [IS 3.2.1]: initialised to 1
        else:
            self.register_buffer("mu", torch.tensor(0.0))          # fixed 0 [IS 4.2] / unused

    def forward(self, q, regressed, coarse_fg, boxes, centers, batch, groups, num_groups, obj=None,
                competes=None):
        return attention_maps(q, regressed, coarse_fg, boxes, centers, batch, groups, num_groups,
                              self.lam, self.mu, self.mode == "bbox", obj, competes)


def apply_attention(features, attention, group_batch):
    """The top-down connection [IS 3.2.1]: each colour group's image's FPN maps times its attention
    map, drawn on P2 and shrunk onto each coarser level by area averaging (a 4x bilinear shrink
    would read 2 of every 4 cells; [IS] says "bilinearly interpolated", METHODS.md).
    features [(B, C, h_i, w_i)] (P2, P3, P4); attention (num_groups, 1, H/4, W/4);
    group_batch (num_groups,) -> [(num_groups, C, h_i, w_i)]."""
    out = []
    for f in features:
        a = attention
        if a.shape[-2:] != f.shape[-2:]:
            # (num_groups, 1, h_i, w_i)
            a = F.interpolate(attention, size=f.shape[-2:], mode="area")
        # (num_groups, C, h_i, w_i)
        out.append(f[group_batch] * a.to(f.dtype))
    return out


# -- efficient attention map propagation: graph colouring [IS 3.2.1] ----------------------------


def box_overlap_graph(boxes, batch=None):
    """The overlap graph of [IS 3.2.1] eq. 3: edge (i, j), i != j, when IoU(B_i, B_j) > 0 (by hand: box_iou is NaN for
    empty boxes) and, with batch (N,), one image. boxes (N, 4) xyxy -> (N, N) bool, symmetric, False diagonal."""
    x0, y0, x1, y1 = boxes.unbind(-1)                                              # (N,)
    iw = torch.minimum(x1[:, None], x1[None, :]) - torch.maximum(x0[:, None], x0[None, :])
    ih = torch.minimum(y1[:, None], y1[None, :]) - torch.maximum(y0[:, None], y0[None, :])
    adj = (iw > 0) & (ih > 0)                                                      # (N, N)
    if batch is not None:
        adj &= batch[:, None] == batch[None, :]
    return adj & ~torch.eye(len(boxes), dtype=torch.bool, device=boxes.device)


def greedy_coloring(adjacency):
    """Largest-First greedy colouring (Welsh-Powell; [IS 3.2.1] cites Kosowski & Manuszewski): by degree, highest first
    (ties: lower index), the smallest colour no coloured neighbour has. adjacency (N, N) bool -> (N,) int64."""
    N = adjacency.shape[0]
    adj = adjacency.cpu()
    order = torch.sort(adj.sum(1), descending=True, stable=True).indices.tolist()
    neighbours = [[] for _ in range(N)]
    for i, j in adj.nonzero().tolist():
        neighbours[i].append(j)
    colors = [-1] * N                                   # -1 = not coloured yet
    for v in order:
        used = {colors[u] for u in neighbours[v]}
        c = 0
        while c in used:
            c += 1
        colors[v] = c
    return torch.tensor(colors, dtype=torch.long, device=adjacency.device)


def largest_first_coloring(boxes):
    """A colour per box, no two overlapping boxes (IoU > 0) alike [IS 3.2.1]: one colour shares an attention map and a
    segmentation forward. boxes (N, 4) xyxy -> (N,) int64 in 0..K-1 (`greedy_coloring`)."""
    return greedy_coloring(box_overlap_graph(boxes))


def coloring_groups(boxes, batch):
    """The colour groups of a batch [IS 3.2.1]: one image, one Largest-First colour (one colouring of the
    block-diagonal graph gives each image its own colours). boxes (M, 4), batch (M,) -> groups (M,) int64 in
    0..num_groups-1, ordered by (image, colour), and group_batch (num_groups,) int64, the image of each group."""
    colors = greedy_coloring(box_overlap_graph(boxes, batch))                      # (M,)
    K = int(colors.max()) + 1 if len(colors) else 1                                # colours used
    # (num_groups,), (M,)
    keys, groups = torch.unique(batch * K + colors, sorted=True, return_inverse=True)
    return groups, keys // K


# -- segmentation head [IS 3.2.1] and the padded-crop loss [IS 3.2.2] ---------------------------


class SegmentationHead(nn.Module):
    """The segmentation head of [IS 3.2.1] (Fig. 2c) on P2-P4 (after `apply_attention`): per level num_convs x
    (Conv3x3(channels) + GroupNorm(32) + ReLU; norm=False: ReLU only), upsampled bilinearly to P2, summed,
    Conv1x1 -> logits at stride 4 (readings: METHODS.md, FCOSIS).
        in:  P2, P3, P4 of every colour group: [(num_groups, in_channels, H/4, W/4), (.., H/8, W/8), (.., H/16, W/16)]
        out: (num_groups, num_classes, H/4, W/4); num_classes 1 (agnostic, [IS 3.2.2]) or C ([IS 3.2.1] "W/4 x H/4 x C")
    The 1x1 predictor starts at N(0, 0.01), every pixel at p ~ 0.5 (the crop's foreground share, [IS 3.2.2])."""

    def __init__(self, in_channels=256, channels=256, num_classes=1, num_convs=3, num_levels=3,
                 norm=True):
        super().__init__()

        def tower():
            layers = []
            for k in range(num_convs):
                cin = in_channels if k == 0 else channels
                layers.append(nn.Conv2d(cin, channels, 3, padding=1, bias=not norm))
                if norm:
                    layers.append(nn.GroupNorm(32, channels))
                layers.append(nn.ReLU(inplace=True))
            return nn.Sequential(*layers)

        self.towers = nn.ModuleList(tower() for _ in range(num_levels))
        self.predictor = nn.Conv2d(channels, num_classes, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.predictor.weight, std=0.01)  # start every pixel at p ~ 0.5

    def forward(self, features):
        size = features[0].shape[-2:]                                              # P2: (H/4, W/4)
        x = 0
        for tower, f in zip(self.towers, features):
            # (num_groups, channels, h_i, w_i)
            y = tower(f)
            if y.shape[-2:] != size:
                y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
            # (num_groups, channels, H/4, W/4)
            x = x + y
        # (num_groups, num_classes, H/4, W/4)
        return self.predictor(x)


def optimal_padding(fg_pixels, w, h, ratio=0.5):
    """Padding p (input pixels) of the padded-crop loss [IS 3.2.2]: the box w x h grown by p on every side is `ratio`
    (0.5) foreground, (w + 2p)(h + 2p) = fg / ratio, whose positive root is
        p = (sqrt((w - h)^2 + 4 fg / ratio) - (w + h)) / 4,
    rounded up ([IS 3.2.2]; 1e-6 px tolerance for exact integer roots) and at least 0 (a box already at most
    `ratio` foreground keeps p = 0). Python numbers -> int; tensors -> int64 tensor, element-wise in float64."""
    if not any(isinstance(v, torch.Tensor) for v in (fg_pixels, w, h)):
        p = (math.sqrt((w - h) ** 2 + 4 * fg_pixels / ratio) - (w + h)) / 4
        return max(0, math.ceil(p - 1e-6))
    dev = next(v.device for v in (fg_pixels, w, h) if isinstance(v, torch.Tensor))
    fg, w, h = (torch.as_tensor(v, dtype=torch.float64, device=dev) for v in (fg_pixels, w, h))
    p = (torch.sqrt((w - h) ** 2 + 4 * fg / ratio) - (w + h)) / 4
    return torch.ceil(p - 1e-6).clamp(min=0).long()


def padded_boxes(boxes, masks, ratio=0.5):
    """Boxes (N, 4) xyxy input frame, each grown on every side by the `optimal_padding` of its
    mask (N, H, W) ([IS 3.2.2]) -> (N, 4) float."""
    boxes = boxes.float()
    fg = masks.flatten(1).sum(1, dtype=torch.float32)                              # (N,)
    p = optimal_padding(fg, boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1], ratio).float()
    return boxes + p[:, None] * boxes.new_tensor([-1.0, -1.0, 1.0, 1.0])


def padded_crop_bce(mask_logits, gt_masks, boxes, stride=4, ratio=0.5):
    """Segmentation loss of [IS 3.2.2]: per instance, the BCE over its ground-truth box grown by p =
    optimal_padding(foreground pixels, w, h, ratio) input pixels (a crop ~half foreground), then the mean over
    instances. mask_logits (N, h, w) at stride `stride` (its group's map; class-specific, its class channel);
    gt_masks (N, H, W) zero-padded to the batch; boxes (N, 4) xyxy input frame. A cell is in the crop when its
    centre lies in the padded box (half-open); the box centre's cell always is. Compared at stride 4 against the
    mask average-pooled to stride 4 (METHODS.md, FCOSIS). N = 0 -> 0 (in the graph). fp32."""
    N, h, w = mask_logits.shape
    if N == 0:
        return mask_logits.sum() * 0
    target = average_pool_masks(gt_masks, stride, (h, w))                         # (N, h, w)
    padded = padded_boxes(boxes, gt_masks, ratio)                                  # (N, 4)
    crop = boxes_inside(padded, h, w, stride, "half-open")                         # (N, h, w)
    boxes = boxes.float()
    center_cell = ((boxes[:, :2] + boxes[:, 2:]) / 2 / stride).floor().long()      # (N, 2) (x, y)
    cx, cy = center_cell[:, 0].clamp(0, w - 1), center_cell[:, 1].clamp(0, h - 1)
    crop[torch.arange(N, device=crop.device), cy, cx] = True
    bce = F.binary_cross_entropy_with_logits(mask_logits.float(), target, reduction="none")
    crop = crop.float()
    per_instance = (bce * crop).sum((1, 2)) / crop.sum((1, 2))                     # (N,)
    return per_instance.mean()


class ASPP(nn.Module):
    """Atrous Spatial Pyramid Pooling (DeepLab v3) of [IS 4.2] Table 3a's no-top-down baseline: a 1x1 conv, three 3x3
    convs dilated 6/12/18 and a global-pooling branch, concatenated, projected to `channels`; GroupNorm (BatchNorm's
    pooled branch fails on a batch of one). (B, cin, h, w) -> (B, channels, h, w)."""

    def __init__(self, cin, channels, rates=(6, 12, 18)):
        super().__init__()

        def block(k, d):
            conv = nn.Conv2d(cin, channels, k, padding=d if k == 3 else 0, dilation=d, bias=False)
            return nn.Sequential(conv, nn.GroupNorm(32, channels), nn.ReLU(inplace=True))
        self.branches = nn.ModuleList([block(1, 1)] + [block(3, r) for r in rates])
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(cin, channels, 1),
                                  nn.ReLU(inplace=True))
        self.project = nn.Sequential(nn.Conv2d(channels * (len(rates) + 2), channels, 1,
                                               bias=False),
                                     nn.GroupNorm(32, channels), nn.ReLU(inplace=True))

    def forward(self, x):
        # (B, channels, h, w)
        pooled = self.pool(x).expand(-1, -1, *x.shape[-2:])
        return self.project(torch.cat([b(x) for b in self.branches] + [pooled], 1))


class FCOSIS(FCOS):
    """FCOSIS ([IS 3.2]): FCOS on P3-P7 whose box tower also predicts, per location, its object's centre of mass
    (r_x, r_y) in stride units and a coarse class-agnostic foreground (`extra` = 3 channels); a segmentation head
    on P2-P4; and between them the parametrised attention map (the top-down connection): per instance, 0 outside
    its box, +lambda * coarse fg where a location's regressed centre is nearest this instance's centre, -mu at a
    distractor's (`attention_maps`). Drawn on the P2 grid from the P3 outputs and shrunk onto P3 and P4, it
    multiplies P2-P4 before the head. Instances whose boxes do not overlap share one map and one segmentation
    forward: the colours of a Largest-First colouring of the box-overlap graph ([IS 3.2.1]).

    Training: FCOS's losses plus com (SmoothL1 of the centre-of-mass regression), foreground (BCE against the
        pooled union of the masks) and mask (`padded_crop_bce`, [IS 3.2.2]), the attention maps drawn from the
        ground-truth boxes and mass centres (teacher forcing).
    Inference: each detection's centre is the centre of mass its own location regresses; masks (K, H, W)
        probabilities, upsampled from stride 4 and cropped to the box.
    Table 3 (attention=...): "none" (3a: class-wise segmentation with ASPP, masks cropped by box and class),
        "mu0" (3b: mu fixed at 0), "bbox" (3c: the whole box filled with lambda).
    Readings (which locations regress the centre of mass, the attention grid and assignment, the test-time
    competition, what -mu marks, colouring the padded boxes, the "none" baseline's loss, loss weights 1,
    reg_weights): METHODS.md, FCOSIS."""

    # the box tower's `extra` channels ([IS 3.2.1]): centre-of-mass offset (r_x, r_y) in strides, foreground logit
    COM, FOREGROUND = slice(0, 2), 2

    def __init__(self, cfg: ModelConfig):
        # P2-P7; head on P3-P7
        super().__init__(cfg, extra=3, first_level=2)
        c = cfg.fpn_channels
        n = cfg.num_classes if (cfg.seg_classes == "specific" or cfg.attention == "none") else 1
        self.seg_head = SegmentationHead(c, c, n)
        self.aspp = ASPP(c, c) if cfg.attention == "none" else None
        self.attention = None if cfg.attention == "none" else AttentionMap(cfg.attention)

    def box_weights(self, ctr, seg):
        """FCOS's hook: the box loss weighted by FCOSreg's w when reg_weights != (1, 0, 0); the centerness branch
        keeps learning centerness (at inference the coarse foreground gives w's s, `score_weights`)."""
        weight = regression_weights(ctr, seg, self.cfg.reg_weights) if seg is not None else ctr
        return weight, ctr

    def score_weights(self, out):
        """FCOS's hook: [IS 3.3], w "can be applied if mask information is available during both
        training and inference, which is supported by FCOSIS": s = the predicted coarse foreground."""
        ctr = out["centerness"].float().sigmoid()                                # (B, P)
        if self.cfg.reg_weights != (1.0, 0.0, 0.0):
            fg = out["extra"][..., self.FOREGROUND].float().sigmoid()
            ctr = regression_weights(ctr, fg, self.cfg.reg_weights)
        return ctr

    def p3_maps(self, out, input_hw):
        """The P3 outputs the attention map is built from: regressed centres (B, 2, h, w), coarse
        fg (B, 1, h, w)."""
        h, w = out["hw"][0]
        p3 = out["extra"][:, :h * w].float().transpose(1, 2).reshape(-1, 3, h, w)   # (B, 3, h, w)
        points = self.locations([(h, w)], input_hw, p3.device)[0]                # (h * w, 2)
        fg = p3[:, self.FOREGROUND:self.FOREGROUND + 1].sigmoid()
        return regressed_centers(p3[:, self.COM], points, self.strides[0]), fg

    def attention_inputs(self, out, p2_hw, input_hw):
        """The P3 maps (`p3_maps`) resampled bilinearly onto the P2 grid, where the attention map is
        drawn (exact inside the map: the centres are input-frame coordinates), and the P2
        locations. The resampling follows the locations: FCOS's 8j + 4 -> 4k + 2
        (align_corners=False); torchvision's 8j -> 4k (align_corners=True onto 2h - 1 cells, the
        last row / column repeated)."""
        regressed, fg = self.p3_maps(out, input_hw)                             # (B, 2|1, H/8, W/8)
        q = self.locations([tuple(p2_hw)], input_hw, fg.device, strides=[self.strides[0] // 2])[0]
        if self.cfg.fcos_form == "torchvision":  # torchvision's locations
            h, w = regressed.shape[-2:]

            def up(x):
                y = F.interpolate(x, size=(2 * h - 1, 2 * w - 1), mode="bilinear",
                                  align_corners=True)
                return F.pad(y, (0, 1, 0, 1), mode="replicate")[..., :p2_hw[0], :p2_hw[1]]
        else:
            def up(x):
                return F.interpolate(x, size=tuple(p2_hw), mode="bilinear", align_corners=False)
        # (B, 2|1, H/4, W/4)
        return q, up(regressed), up(fg)

    def segment(self, features, out, input_hw, boxes, centers, batch, labels, color_boxes=None,
                obj=None, competes=None):
        """Mask logits (M, H/4, W/4) of M instances (boxes (M, 4), centres (M, 2) input frame,
        batch, labels (M,)), one segmentation forward per colour group; obj, competes: inference's
        (`detections_as_objects`). Also returns the attention maps (num_groups, 1, h, w) and
        groups (M,) (None for the "none" baseline)."""
        p2_p4 = features[:3]                                                     # P2, P3, P4
        ch = labels if self.seg_head.predictor.out_channels > 1 else torch.zeros_like(labels)
        if self.attention is None:  # Table 3a: one class-wise map per image, ASPP on P4
            seg = self.seg_head([p2_p4[0], p2_p4[1], self.aspp(p2_p4[2])])       # (B, C, H/4, W/4)
            return seg[batch, ch], None, None
        groups, group_batch = coloring_groups(boxes if color_boxes is None else color_boxes, batch)
        q, regressed, fg = self.attention_inputs(out, p2_p4[0].shape[-2:], input_hw)
        att = self.attention(q, regressed, fg, boxes, centers, batch, groups, len(group_batch), obj,
                             competes)
        # (num_groups, n, H/4, W/4)
        seg = self.seg_head(apply_attention(p2_p4, att, group_batch))
        return seg[groups, ch], att, groups

    def extra_losses(self, x: FCOSForward):
        out, features, targets, points = x.out, x.features, x.targets, x.points
        B, device = len(targets), points.device
        H, W = x.input_hw
        # stride 1: input frame
        flat = {k: v.to(device) for k, v in flatten_targets(targets, 1).items()}
        # (M, 4), (M,), (M,)
        boxes, labels, batch = flat["boxes"], flat["labels"], flat["batch"]
        masks = batch_masks(targets, H, W, device)                               # (M, H, W)
        # (B, P, 3): COM, FOREGROUND
        extra = out["extra"].float()
        # coarse foreground of every level: BCE against the pooled union of the masks
        fg_target = torch.cat([coarse_foreground_targets(masks, s, batch, B, hw).flatten(1)
                               for s, hw in zip(self.strides, out["hw"])], 1)   # (B, P)
        fg_bce = F.binary_cross_entropy_with_logits(extra[..., self.FOREGROUND], fg_target,
                                                    reduction="sum")
        num_cells = reduce_mean(torch.full((), float(fg_target.numel()), device=device))
        losses = {"foreground": fg_bce / num_cells}
        # centre-of-mass regression, in stride units
        mass = center_of_mass(masks, boxes)                                      # (M, 2)
        matched = mask_assignment(points, masks, batch, B)                       # (B, P) flat index
        strides = torch.tensor(self.strides, device=device, dtype=torch.float32)[x.levels]
        com_target, valid = center_of_mass_targets(points, strides, matched, mass, masks)
        num_valid = reduce_mean(valid.sum().float()).clamp(min=1)
        losses["com"] = center_of_mass_loss(extra[..., self.COM], com_target, valid,
                                            normalizer=num_valid)
        # the padded-crop segmentation loss of every instance
        M = len(boxes)
        num_instances = reduce_mean(torch.full((), float(M), device=device)).clamp(min=1)
        if M == 0:  # keep the segmentation branch and P2 in the graph
            losses["mask"] = graph_zero(features[0], self.seg_head, self.aspp, self.attention)
            return losses
        # coloured by the boxes of their padded crops ([IS 3.2.2])
        logits, _, _ = self.segment(features, out, x.input_hw, boxes, mass, batch, labels,
                                    padded_boxes(boxes, masks))
        losses["mask"] = padded_crop_bce(logits.float(), masks, boxes) * M / num_instances
        return losses

    def predict_masks(self, dets, x: FCOSForward):
        """Adds masks (K, H, W) to `dets` (`segment`); returns (attention maps, groups, batch) for the pictures."""
        out, points, levels, features = x.out, x.points, x.levels, x.features
        H, W = x.input_hw
        device = points.device
        batch, boxes, labels = flat_detections(dets)                         # (K,) over the batch
        index = torch.cat([d["index"] for d in dets])
        if len(boxes) == 0:
            for d in dets:
                d["masks"] = torch.zeros(0, H, W, device=device)
            return None, None, batch
        # each detection's centre: the centre of mass regressed at its own location
        s = torch.tensor(self.strides, device=device, dtype=torch.float32)[levels[index]]
        centers = points[index] + s[:, None] * out["extra"][batch, index, self.COM].float()
        # duplicates compete as one object for the attention map's locations
        obj, competes = detections_as_objects(boxes, torch.cat([d["scores"] for d in dets]), batch)
        logits, att, groups = self.segment(features, out, x.input_hw, boxes, centers, batch, labels,
                                           obj=obj, competes=competes)
        probs = F.interpolate(logits[:, None].float(), size=(H, W), mode="bilinear",
                              align_corners=False)[:, 0]
        # cropped to the box: closed (`boxes_inside`), not this section's half-open rule (see its header)
        probs = probs.sigmoid() * boxes_inside(boxes, H, W)
        for d, masks in zip(dets, probs.split([len(d["boxes"]) for d in dets])):
            d["masks"] = masks
        return att, groups, batch

    def postprocess(self, x: FCOSForward):
        dets = self.detect(x)
        self.predict_masks(dets, x)
        return dets


# -----------------------------------------------------------------------------
# 13. build_model: ModelConfig -> the model of its method (sections 7-12)


# the nn.Module class that implements each method (sections 7-12)
METHOD_CLASSES = {"centermask": CenterMask, "fcos": FCOS, "fcosreg": FCOS, "maskfcos": MaskFCOS,
                  "centermask_fcos": CenterMaskFCOS, "fcosis": FCOSIS}


def method_transform(method):
    """The data transform of a method's recipe (data.build_transforms; train.py's default)."""
    return METHOD_CLASSES[method].transform


def build_model(cfg: ModelConfig) -> nn.Module:
    """The one entry point: ModelConfig -> the Method of the requested method."""
    return METHOD_CLASSES[cfg.method](cfg)
