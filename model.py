"""
Anchor-free, one-stage instance segmentation in one file: every backbone, head, target
builder, loss, mask assembly and decoder, in reading order.

    1. ModelConfig and build_model(cfg)           the knobs of every method, one entry point
    2. DLA-34 + DLA-up (CenterNet's `DLASeg`)     stride-4, 64-channel features
    3. Hourglass-104 (CenterNet's `large_hourglass`)  two stacks of stride-4, 256-channel features
    4. CenterNet targets                          gaussian_radius, draw_gaussian, batched heatmaps
    5. CenterNet losses                           penalty-reduced focal loss, L1 at the centres
    6. CenterMask                                 Local Shape x Global Saliency (paper 001)

Papers (full texts in the shared `papers/` folder):
    [CM]   Wang et al., "CenterMask: single shot instance segmentation with point
           representation", CVPR 2020 (file 001_*). Sections are cited as [CM 3.1] etc.
    [CN]   Zhou et al., "Objects as Points" (CenterNet), arXiv 1904.07850, which [CM] builds on
           and whose hyper-parameters it reuses ([CM 3.5]: "the same hyper-parameters of
           CenterNet").
    [DLA]  Yu et al., "Deep Layer Aggregation", CVPR 2018.
    CornerNet  Law and Deng, "CornerNet: Detecting Objects as Paired Keypoints", ECCV 2018,
           whose Hourglass-104 (CornerNet 3.5) CenterNet and [CM] reuse unchanged.

Coordinate frames used throughout:
    * input frame: pixels of the network input (the padded batch), x right, y down; pixel X
      covers [X, X+1), so its centre is X + 0.5. Boxes are xyxy floats in this frame.
    * output frame: the stride-R feature map (R = 4 for CenterNet backbones); a point u in
      output units is the point R*u in the input frame, so cell j covers [j, j+1) and its
      centre j + 0.5 sits at input R*j + R/2.
"""

import math
from dataclasses import dataclass, field, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import deform_conv2d

# -----------------------------------------------------------------------------
# 1. Configuration


@dataclass
class ModelConfig:
    """Architecture knobs of every method. Saved in checkpoints as `model_args`."""
    method: str = "centermask"        # which system build_model() makes
    backbone: str = "dla34"           # "dla34" or "hourglass104" ([CM 3.5], Table 1b)
    num_classes: int = 80             # COCO
    dcn: bool = True                  # DLA-up nodes: modulated deformable conv ([CN] 4) or plain 3x3
    dla_channels: tuple = (16, 32, 64, 128, 256, 512)  # [DLA] Table 1, DLA-34; narrower only for CPU demos
    # Hourglass-104 (CornerNet 3.5); smaller widths / fewer residuals only for tests and CPU demos
    num_stacks: int = 2               # hourglass stacks, each with its own heads (CornerNet 3.5)
    hg_dims: tuple = (256, 256, 384, 384, 384, 512)  # width per level: 5 downsamplings (CornerNet 3.5)
    hg_modules: tuple = (2, 2, 2, 2, 2, 4)  # residual blocks per level; 4 in the middle (CornerNet 3.5)
    head_conv: int = 256              # hidden width of every head ([CN] 4: 256 for DLA and Hourglass)
    # CenterMask [CM 3]
    shape_size: int = 32              # S: local shape is S x S ([CM 3.5], Table 1a)
    use_shape: bool = True            # Local Shape branch ([CM 3.1]); False = saliency-only (Table 1c)
    use_saliency: bool = True         # Global Saliency branch ([CM 3.2]); False = shape-only (Table 1d)
    saliency: str = "agnostic"        # "agnostic" (1 channel) or "specific" (C channels), [CM 3.2], Table 1e
    saliency_loss: bool = False       # direct BCE on class-specific saliency ([CM 4.1], Table 1f)
    loss_weights: tuple = (1.0, 1.0, 0.1, 1.0)  # lambda_p, lambda_off, lambda_size, lambda_mask [CM 3.5]
    saliency_loss_weight: float = 1.0  # weight of the Table 1f loss (not given in [CM]; our choice)
    # CenterNet targets and decoding
    min_overlap: float = 0.7          # gaussian_radius IoU ([CN] 3, CornerNet 4.1)
    cornernet_bug: bool = True        # use the shipped (buggy) radius formula, as all published numbers
    max_detections: int = 100         # top-K peaks ([CM 3.5])
    mask_threshold: float = 0.4       # binarisation of assembled masks ([CM 3.5])

    def __post_init__(self):
        # tuples survive a round trip through a checkpoint's plain dict / the configurator
        self.dla_channels = tuple(self.dla_channels)
        self.hg_dims = tuple(int(d) for d in self.hg_dims)
        self.hg_modules = tuple(int(m) for m in self.hg_modules)
        self.loss_weights = tuple(float(w) for w in self.loss_weights)
        if self.saliency not in ("agnostic", "specific"):
            raise ValueError(f"ModelConfig.saliency must be 'agnostic' or 'specific', got {self.saliency!r}")
        if not (self.use_shape or self.use_saliency):
            raise ValueError("ModelConfig: use_shape and use_saliency cannot both be False "
                             "(no mask branch left)")
        if self.backbone == "hourglass104":
            if len(self.hg_dims) != len(self.hg_modules) or len(self.hg_dims) < 2:
                raise ValueError(f"ModelConfig: hg_dims {self.hg_dims} and hg_modules {self.hg_modules} "
                                 "need the same length (>= 2: one entry per level, the last the middle)")
            if self.num_stacks < 1 or min(self.hg_modules) < 1:
                raise ValueError("ModelConfig: num_stacks and every hg_modules entry must be >= 1")
        if self.saliency_loss and self.saliency != "specific":
            raise ValueError("ModelConfig.saliency_loss=True needs saliency='specific' "
                             "(the direct supervision of [CM] Table 1f is per class)")


def auto_dtype(device_type):
    """The autocast dtype train.py and bench.py use for dtype="auto": bf16 on GPUs that have
    it, else fp16; on the CPU bf16 only where oneDNN runs it natively (AMX / AVX512-BF16:
    1.45x faster training measured on a 2-core Xeon), else fp32 (emulated bf16 is slower)."""
    if device_type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    try:
        native = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):
        native = False
    return "bfloat16" if native else "float32"


def build_model(cfg: ModelConfig) -> nn.Module:
    """The one entry point: ModelConfig -> nn.Module of the requested method."""
    if cfg.method == "centermask":
        return CenterMask(cfg)
    raise ValueError(f"ModelConfig.method: unknown method {cfg.method!r} (known: 'centermask')")


# -----------------------------------------------------------------------------
# 2. DLA-34 + DLA-up ([DLA], as CenterNet's `dla_34` + `DLASeg`)
#
# DLA-34 is a ResNet-like network whose stages are merged by "Tree" aggregation (iterative
# deep aggregation inside a stage, hierarchical across stages). CenterNet adds "DLA-up": three
# IDA-up stages that walk the pyramid from stride 32 back to stride 4, and one final IDA-up.
# Every projection and aggregation node of DLA-up is a modulated deformable 3x3 conv ([CN] 4).

BN_MOMENTUM = 0.1  # CenterNet's DLA uses PyTorch's default BatchNorm momentum


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
    """
    Hierarchical deep aggregation ([DLA] 3.2, Fig. 2d-f). A Tree of depth 1 is two blocks
    merged by a Root; a Tree of depth d is two Trees of depth d-1 whose outputs (and, for
    a `level_root`, the stage's input) are merged by the Root of the innermost right tree.
    """

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
        # The residual of the first block when the width changes. A deeper Tree's first child
        # is itself a Tree that makes its own, so there the projection would be dead weight
        # (CenterNet builds it anyway and never uses it; we do not, so DDP needs no
        # find_unused_parameters).
        self.project = (nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False),
                                      nn.BatchNorm2d(cout, momentum=BN_MOMENTUM))
                        if cin != cout and levels == 1 else None)

    def forward(self, x, residual=None, children=None):
        children = [] if children is None else children
        bottom = self.downsample(x) if self.downsample is not None else x
        residual = self.project(bottom) if self.project is not None else bottom  # unused if levels > 1
        if self.level_root:
            children.append(bottom)
        x1 = self.tree1(x, residual)
        if self.levels == 1:
            x2 = self.tree2(x1)
            return self.root(x2, x1, *children)
        children.append(x1)
        return self.tree2(x1, children=children)


class DLA34(nn.Module):
    """
    DLA-34 base ([DLA] Table 1): levels (1, 1, 1, 2, 2, 1), BasicBlock.
    (B, 3, H, W) -> list of 6 maps at strides 1, 2, 4, 8, 16, 32 with `channels` widths.
    """

    def __init__(self, channels=(16, 32, 64, 128, 256, 512), levels=(1, 1, 1, 2, 2, 1)):
        super().__init__()
        c = channels
        self.base_layer = nn.Sequential(nn.Conv2d(3, c[0], 7, 1, 3, bias=False),
                                        nn.BatchNorm2d(c[0], momentum=BN_MOMENTUM), nn.ReLU(inplace=True))
        self.level0 = self._conv_level(c[0], c[0], levels[0], stride=1)
        self.level1 = self._conv_level(c[0], c[1], levels[1], stride=2)
        self.level2 = Tree(levels[2], c[1], c[2], 2, level_root=False)
        self.level3 = Tree(levels[3], c[2], c[3], 2, level_root=True)
        self.level4 = Tree(levels[4], c[3], c[4], 2, level_root=True)
        self.level5 = Tree(levels[5], c[4], c[5], 2, level_root=True)
        self.channels = c

    @staticmethod
    def _conv_level(cin, cout, n, stride):
        layers = []
        for i in range(n):
            layers += [nn.Conv2d(cin if i == 0 else cout, cout, 3, stride if i == 0 else 1, 1, bias=False),
                       nn.BatchNorm2d(cout, momentum=BN_MOMENTUM), nn.ReLU(inplace=True)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.base_layer(x)                                # (B, 16, H, W)
        levels = []
        for i in range(6):
            x = getattr(self, f"level{i}")(x)                 # strides 1, 2, 4, 8, 16, 32
            levels.append(x)
        return levels


class DeformConv(nn.Module):
    """
    DLA-up node: modulated deformable 3x3 conv (DCNv2) + BN + ReLU ([CN] 4, "deformable
    convolution"). Offsets (18 ch) and modulation mask (9 ch, sigmoid) come from a 3x3 conv
    initialised to zero, as CenterNet's DCN: at init every offset is 0 and every mask 0.5.
    Runs through `torchvision.ops.deform_conv2d` (CPU and GPU, no compiled extension).
    With dcn=False the same slot is a plain 3x3 conv.
    """

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
            offset, mask = om[:, :18], om[:, 18:].sigmoid()   # (B, 18, H, W), (B, 9, H, W)
            # in fp32 under any autocast: torchvision has no bf16 CPU kernel for it (and its
            # CUDA autocast rule casts to fp32 anyway)
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
    """
    Iterative deep aggregation, upward ([DLA] 3.1; CenterNet's IDAUp). For maps i = startp+1..
    endp-1: project to `cout` channels, upsample by its factor with a bilinear-initialised
    depthwise transposed conv, add the previous (already merged) map, and merge with a node.
    Works in place on the list, as CenterNet's (the caller reads the last entries).
    """

    def __init__(self, cout, channels, up_factors, dcn=True):
        super().__init__()
        self.proj, self.up, self.node = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for c, f in zip(channels[1:], up_factors[1:]):
            f = int(f)
            self.proj.append(DeformConv(c, cout, dcn))
            # depthwise transposed conv, kernel 2f, stride f: a trainable bilinear x f upsampling
            up = nn.ConvTranspose2d(cout, cout, f * 2, stride=f, padding=f // 2, groups=cout, bias=False)
            bilinear_upsample_init(up)
            self.up.append(up)
            self.node.append(DeformConv(cout, cout, dcn))

    def forward(self, layers, startp, endp):
        for i in range(startp + 1, endp):
            k = i - startp - 1
            layers[i] = self.up[k](self.proj[k](layers[i]))
            layers[i] = self.node[k](layers[i] + layers[i - 1])


class DLAUp(nn.Module):
    """
    CenterNet's DLAUp over the stride-4..32 maps: three IDA-up stages, each merging one more
    level from the top (stride 32 -> 16 -> 8 -> 4). Returns the merged maps, finest first.
    """

    def __init__(self, channels, scales, dcn=True):
        super().__init__()
        channels, scales = list(channels), list(scales)        # e.g. (64,128,256,512), (1,2,4,8)
        in_channels = list(channels)
        self.ida = nn.ModuleList()
        for i in range(len(channels) - 1):
            j = len(channels) - i - 2                          # 2, 1, 0: the level merged into
            self.ida.append(IDAUp(channels[j], in_channels[j:], [s // scales[j] for s in scales[j:]], dcn))
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
    """
    DLA-34 + DLA-up + final IDA-up (CenterNet's `DLASeg`, down_ratio 4).
    (B, 3, H, W) -> (B, 64, H/4, W/4)    (H, W multiples of 32)
    """

    def __init__(self, channels=(16, 32, 64, 128, 256, 512), dcn=True):
        super().__init__()
        self.base = DLA34(channels)
        first, last = 2, 5                                     # stride 4 = 2**2 ... stride 32 = 2**5
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
# 3. Hourglass-104 (CornerNet 3.5, as CenterNet's `large_hourglass`)
#
# Two hourglasses ("stacks") in a row. Each is a symmetric encoder-decoder: at every level the
# features go two ways, a skip branch that stays at the current resolution (`up1`) and a branch
# that halves the resolution with a stride-2 residual block (no max-pool), recurses into the
# next level, and comes back with nearest upsampling (`up2`); the two are added. Five levels
# take stride 4 down to stride 128 and back. A 3x3 conv after each hourglass gives the features
# its heads read; the second hourglass starts from the first one's input and output merged
# ("inters", CornerNet 3.5), so the first stack's heads give intermediate supervision.
#
# The "104": the longest chain of convs from the image to the last stack's features is
# 3 (stem) + 48 (24 residual blocks down and up one hourglass) + 1 (3x3 after it)
# + 1 (1x1 merge) + 2 (residual between stacks) + 48 + 1 = 104.


class Residual(BasicBlock):
    """
    CornerNet's residual block: DLA's BasicBlock (3x3 conv stride s + BN + ReLU, 3x3 conv + BN,
    add, ReLU) with its own skip: a 1x1 conv (stride s) + BN when the block changes width or
    resolution, the identity otherwise. (B, cin, H, W) -> (B, cout, H/s, W/s).
    """

    def __init__(self, cin, cout, stride=1):
        super().__init__(cin, cout, stride)
        self.skip = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                   nn.BatchNorm2d(cout, momentum=BN_MOMENTUM))
                     if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        return super().forward(x, residual=self.skip(x))


def residuals(cin, cout, n, stride=1):
    """n residual blocks; the FIRST changes width (and stride). CenterNet's `make_layer`."""
    return nn.Sequential(Residual(cin, cout, stride), *[Residual(cout, cout) for _ in range(n - 1)])


def residuals_reversed(cin, cout, n):
    """n residual blocks; the LAST changes width. CenterNet's `make_layer_revr` (the way up)."""
    return nn.Sequential(*[Residual(cin, cin) for _ in range(n - 1)], Residual(cin, cout))


class HourglassModule(nn.Module):
    """
    One hourglass, built recursively (CenterNet's `kp_module`). dims[0] / modules[0] are the
    width / number of residual blocks of this level, dims[1:] / modules[1:] those of the levels
    below; the last entry is the middle (4 x 512 in Hourglass-104).
        up1  = modules[0] residuals at (dims[0], H, W)                 skip branch
        low1 = stride-2 residual to dims[1], then modules[0]-1 more    (dims[1], H/2, W/2)
        low2 = the next level's hourglass, or, innermost, modules[1] residuals at dims[1]
        low3 = modules[0]-1 residuals, then one back to dims[0]        (dims[0], H/2, W/2)
        out  = up1 + nearest_upsample_x2(low3)                         (dims[0], H, W)
    (B, dims[0], H, W) -> (B, dims[0], H, W), H and W multiples of 2 ** (len(dims) - 1).
    """

    def __init__(self, dims, modules):
        super().__init__()
        cur, nxt = dims[0], dims[1]
        self.up1 = residuals(cur, cur, modules[0])
        self.low1 = residuals(cur, nxt, modules[0], stride=2)  # strided conv, no max-pool (CornerNet 3.5)
        self.low2 = (HourglassModule(dims[1:], modules[1:]) if len(dims) > 2
                     else residuals(nxt, nxt, modules[1]))
        self.low3 = residuals_reversed(nxt, cur, modules[0])

    def forward(self, x):
        up1 = self.up1(x)                                      # (B, cur, H, W)
        low = self.low3(self.low2(self.low1(x)))               # (B, cur, H/2, W/2)
        return up1 + F.interpolate(low, scale_factor=2, mode="nearest")  # merge by addition


def conv_bn_relu(cin, cout, k, stride=1):
    """k x k conv (no bias) + BN + ReLU: CenterNet's `convolution`."""
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False),
                         nn.BatchNorm2d(cout, momentum=BN_MOMENTUM), nn.ReLU(inplace=True))


class Hourglass104(nn.Module):
    """
    Stacked hourglass backbone of CornerNet / CenterNet (CornerNet 3.5; CenterNet's
    `HourglassNet` with its heads taken out).
        pre:    7x7 stride-2 conv (dims[0]/2 = 128) + BN + ReLU, stride-2 residual (dims[0] = 256)
        stack:  hourglass -> 3x3 conv (256) + BN + ReLU -> features for this stack's heads
        inters: next input = Residual(ReLU(BN(1x1(input)) + BN(1x1(features))))
    (B, 3, H, W) -> list of `num_stacks` maps (B, dims[0], H/4, W/4), first stack first; the
    last one is the test-time feature map. H and W must be multiples of `size_divisibility` =
    4 * 2**5 = 128 (stride 4 of the stem times five halvings inside the hourglass).

    Deviations from CenterNet: none in the layout (checked layer by layer against its
    `large_hourglass.py`). The width after each hourglass (CenterNet's `cnv_dim` = 256) is tied
    to dims[0], and the stem width to dims[0] / 2, which is what CenterNet uses; the tie only
    matters for the reduced widths of the tests.
    """

    def __init__(self, dims=(256, 256, 384, 384, 384, 512), modules=(2, 2, 2, 2, 2, 4), num_stacks=2):
        super().__init__()
        c = dims[0]
        self.pre = nn.Sequential(conv_bn_relu(3, c // 2, 7, stride=2),   # (B, 128, H/2, W/2)
                                 Residual(c // 2, c, stride=2))         # (B, 256, H/4, W/4)
        self.hourglasses = nn.ModuleList(HourglassModule(dims, modules) for _ in range(num_stacks))
        self.convs = nn.ModuleList(conv_bn_relu(c, c, 3) for _ in range(num_stacks))  # CenterNet `cnvs`
        # between stacks (CenterNet `inters_`, `cnvs_`, `inters`): 1x1 conv + BN of the previous
        # stack's input and of its features, added, ReLU, one residual block
        self.skip_input = nn.ModuleList(nn.Sequential(nn.Conv2d(c, c, 1, bias=False),
                                                      nn.BatchNorm2d(c, momentum=BN_MOMENTUM))
                                        for _ in range(num_stacks - 1))
        self.skip_features = nn.ModuleList(nn.Sequential(nn.Conv2d(c, c, 1, bias=False),
                                                         nn.BatchNorm2d(c, momentum=BN_MOMENTUM))
                                           for _ in range(num_stacks - 1))
        self.inter = nn.ModuleList(Residual(c, c) for _ in range(num_stacks - 1))
        self.out_channels = c
        self.stride = 4
        self.size_divisibility = 4 * 2 ** (len(dims) - 1)      # 128 for Hourglass-104

    def forward(self, x):
        d = self.size_divisibility
        if x.shape[-2] % d or x.shape[-1] % d:
            raise ValueError(f"Hourglass104: input {tuple(x.shape[-2:])} is not a multiple of {d} "
                             f"(pad the batch to a multiple of size_divisibility, as data.collate_fn does)")
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
# 4. CenterNet targets ([CN] 3; CornerNet 4.1 for the radius)


def gaussian_radius(h, w, min_overlap=0.7, cornernet_bug=True):
    """
    Radius r (output pixels) such that a box whose corners are shifted by up to r from the
    ground truth (h, w) still has IoU >= min_overlap with it (CornerNet 4.1), taking the
    smallest radius over three cases: both corners move inward/outward (case 1), both
    inward (case 2), both outward (case 3). Each case is a quadratic a r^2 + b r + c = 0:

        case 1: a=1,    b=(h+w),        c=w h (1-m)/(1+m)
        case 2: a=4,    b=2(h+w),       c=(1-m) w h
        case 3: a=4m,   b=-2m(h+w),     c=(m-1) w h

    cornernet_bug=True reproduces the formula CornerNet/CenterNet shipped and every published
    CenterNet/CenterMask number used: r_i = (b_i + sqrt(b_i^2 - 4 a_i c_i)) / 2 for all three
    (it neither divides by 2a nor takes the right root), so case 3 usually decides and the
    radius is larger than intended (10x10 box: 2.73 instead of 0.82). cornernet_bug=False
    solves the quadratics properly: r1 = (b1 - sq1)/(2 a1), r2 = (b2 - sq2)/(2 a2),
    r3 = (-b3 + sq3)/(2 a3). Accepts floats or tensors (element-wise).
    """
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


def draw_gaussian(heatmap, center, radius):
    """
    Splat one object onto a (H, W) heatmap in place, as CenterNet's `draw_umich_gaussian`:
    heatmap[y, x] = max(heatmap[y, x], exp(-((x-cx)^2 + (y-cy)^2) / (2 sigma^2))) for
    |x - cx| <= r and |y - cy| <= r, with sigma = (2r + 1) / 6 and (cx, cy) the integer centre.
    The peak is exactly 1 at the centre (the focal loss takes Y == 1 as the positive).
    This is the readable one-object form (tests, teaching); training uses the batched
    `centernet_heatmaps`, which evaluates the same formula for all objects at once.
    """
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


def flatten_targets(targets, stride):
    """
    Gather every object of a batch (a list of B >= 1 target dicts) into flat tensors, without
    a Python loop over objects. Returns a dict with M = total number of objects:
        batch (M,) int64 image index; labels (M,) int64;
        boxes (M, 4) xyxy in the output frame (input / stride);
        center (M, 2) continuous box centre, output frame; center_int (M, 2) floor(center);
        wh (M, 2) box width, height in output pixels.
    """
    boxes = torch.cat([t["boxes"].reshape(-1, 4).float() for t in targets]) / stride          # (M, 4)
    labels = torch.cat([t["labels"].reshape(-1).long() for t in targets])                     # (M,)
    batch = torch.cat([torch.full((len(t["labels"]),), i, dtype=torch.long, device=boxes.device)
                       for i, t in enumerate(targets)])                                        # (M,)
    center = (boxes[:, :2] + boxes[:, 2:]) / 2
    return dict(batch=batch, labels=labels, boxes=boxes, center=center,
                center_int=center.floor().long(), wh=boxes[:, 2:] - boxes[:, :2])


def centernet_heatmaps(objs, num_images, num_classes, out_h, out_w, min_overlap=0.7, cornernet_bug=True):
    """
    Ground-truth heatmaps of a batch, all objects at once ([CN] 3):
    (B, C, H/R, W/R), B = num_images, with, per class, the element-wise max of every object's
    Gaussian (`draw_gaussian`'s formula, radius = max(0, int(gaussian_radius(ceil h, ceil w)))).
    `objs` is `flatten_targets`' dict (centres already on the map).
    """
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
# 5. CenterNet losses ([CM 3.4] eq. 3-5, as [CN] 3)


def centernet_focal_loss(pred_logits, gt_heatmap, alpha=2, beta=4):
    """
    Penalty-reduced pixel-wise focal loss ([CM] eq. 3, CornerNet eq. 1):
        L = -1/N sum_{ijc} (1 - p)^alpha log(p)                 if Y = 1
                           (1 - Y)^beta p^alpha log(1 - p)       otherwise
    with p = sigmoid(logits) clamped to [1e-4, 1 - 1e-4] (CenterNet's `_sigmoid`), N the number
    of positives (Y == 1) in the whole batch; with no positive the negative term alone, not
    normalised (CenterNet's `_neg_loss`). alpha = 2, beta = 4 ([CN] 3). Computed in fp32.
    pred_logits, gt_heatmap: (B, C, H, W).
    """
    p = pred_logits.float().sigmoid().clamp(1e-4, 1 - 1e-4)
    gt = gt_heatmap.float()
    pos = gt.eq(1).float()
    pos_loss = (torch.log(p) * (1 - p) ** alpha * pos).sum()
    neg_loss = (torch.log(1 - p) * p ** alpha * (1 - gt) ** beta * (1 - pos)).sum()
    num_pos = pos.sum()
    if num_pos == 0:
        return -neg_loss
    return -(pos_loss + neg_loss) / num_pos


def gather_at(feature, batch, cells_xy):
    """Read a (B, C, H, W) map at M cells: batch (M,), cells_xy (M, 2) int (x, y) -> (M, C)."""
    return feature[batch, :, cells_xy[:, 1], cells_xy[:, 0]]


def l1_at_centers(pred_map, objs, target):
    """
    L1 loss of a 2-channel head read at the ground-truth centre cells ([CM] eq. 4-5).
    Normalised as CenterNet's `RegL1Loss`: the sum of |pred - target| over objects and both
    coordinates divided by 2N, i.e. the mean over objects *and* coordinates. ([CM] eq. 4-5
    write 1/N per object; the published lambda_size = 0.1 was tuned with the code's 2N.)
    pred_map: (B, 2, h, w); target: (M, 2). Zero objects -> 0 (kept in the graph).
    """
    pred = gather_at(pred_map, objs["batch"], objs["center_int"]).float()   # (M, 2)
    if len(target) == 0:
        return pred_map.sum() * 0
    return (pred - target).abs().sum() / (target.numel() + 1e-4)


# -----------------------------------------------------------------------------
# 6. CenterMask ([CM] 3)


def head(cin, cout, hidden, bias_fill=0.0):
    """CenterNet head: Conv3x3(cin -> hidden) + ReLU + Conv1x1(hidden -> cout) ([CN] 4)."""
    last = nn.Conv2d(hidden, cout, 1)
    nn.init.constant_(last.bias, bias_fill)
    return nn.Sequential(nn.Conv2d(cin, hidden, 3, padding=1), nn.ReLU(inplace=True), last)


def box_grid(boxes, out_h, out_w, pixel=1.0):
    """
    For M boxes (xyxy in a frame whose pixel j has centre (j + 0.5) * pixel), the grid_sample
    coordinates of every pixel of an (out_h, out_w) map relative to each box: -1 at the box's
    left/top edge, +1 at its right/bottom edge (align_corners=False convention, so an S x S
    local shape stretched over the box puts its cell centres at the box's S x S cell centres).
    Returns grid (M, out_h, out_w, 2) and `inside` (M, out_h, out_w) bool.
    """
    dev = boxes.device
    xs = (torch.arange(out_w, device=dev, dtype=torch.float32) + 0.5) * pixel   # (W,)
    ys = (torch.arange(out_h, device=dev, dtype=torch.float32) + 0.5) * pixel   # (H,)
    x1, y1, x2, y2 = boxes.float().unbind(1)                                     # (M,)
    gx = 2 * (xs[None, :] - x1[:, None]) / (x2 - x1)[:, None] - 1               # (M, W)
    gy = 2 * (ys[None, :] - y1[:, None]) / (y2 - y1)[:, None] - 1               # (M, H)
    M = len(boxes)
    grid = torch.stack([gx[:, None, :].expand(M, out_h, out_w),
                        gy[:, :, None].expand(M, out_h, out_w)], dim=-1)         # (M, H, W, 2)
    inside = (gx.abs() <= 1)[:, None, :] & (gy.abs() <= 1)[:, :, None]          # (M, H, W)
    return grid, inside


def min_size_boxes(center, wh, min_size=1.0):
    """xyxy boxes of centre (M, 2) and size (M, 2), each side at least `min_size` (so that at
    least one pixel centre falls inside and the local shape is never stretched over zero)."""
    half = wh.clamp(min=min_size) / 2
    return torch.cat([center - half, center + half], dim=1)


def topk_peaks(heat, k):
    """
    CenterNet's peak extraction ([CM 3.4-3.5]): keep the 3x3 max-pool local maxima of the
    sigmoid heatmap (B, C, h, w), then the top-k over all classes and positions (no NMS).
    Returns scores, labels, ys, xs, each (B, K) with K = min(k, C*h*w), best first.
    """
    B, C, h, w = heat.shape
    peaks = heat * (F.max_pool2d(heat, 3, 1, 1) == heat)                # keep local maxima
    scores, idx = peaks.view(B, -1).topk(min(k, C * h * w))              # (B, K)
    labels = idx // (h * w)
    ys, xs = (idx % (h * w)) // w, idx % w                               # (B, K)
    return scores, labels, ys, xs


class CenterMaskHeads(nn.Module):
    """
    The five heads of [CM] Fig. 3 on one stride-4 feature map: (B, cin, h, w) -> dict
        heatmap  (B, C, h, w)      centre points per class, sigmoid ([CM 3.4])
        offset   (B, 2, h, w)      sub-cell centre offset in [0, 1) ([CM] eq. 4)
        size     (B, 2, h, w)      box (w, h) in output pixels ([CM] eq. 5)
        shape    (B, S*S, h, w)    Local Shape vector, reshaped S x S at a centre ([CM 3.1])
        saliency (B, 1 or C, h, w) Global Saliency logits ([CM 3.2])
    shape / saliency are None (and absent from the dict) when their branch is switched off.
    """

    def __init__(self, cin, cfg: ModelConfig):
        super().__init__()
        hc, C, S = cfg.head_conv, cfg.num_classes, cfg.shape_size
        # heatmap bias -2.19 = -log((1 - 0.1) / 0.1): initial score 0.1 ([CN] 4, focal-loss prior)
        self.heatmap = head(cin, C, hc, bias_fill=-2.19)
        self.offset = head(cin, 2, hc)
        self.size = head(cin, 2, hc)
        self.shape = head(cin, S * S, hc) if cfg.use_shape else None
        n_sal = 1 if cfg.saliency == "agnostic" else C
        self.saliency = head(cin, n_sal, hc) if cfg.use_saliency else None

    def forward(self, p):
        out = {"heatmap": self.heatmap(p), "offset": self.offset(p), "size": self.size(p)}
        if self.shape is not None:
            out["shape"] = self.shape(p)                       # (B, S*S, h, w)
        if self.saliency is not None:
            out["saliency"] = self.saliency(p)                 # (B, 1 or C, h, w)
        return out


class CenterMask(nn.Module):
    """
    CenterMask ([CM]): CenterNet + Local Shape x Global Saliency.

    Backbone: DLA-34 (one stride-4 map, 64 channels) or Hourglass-104 (one stride-4 map of 256
    channels per stack, 2 stacks). Each feature map gets its own set of the five heads
    (`CenterMaskHeads`, [CM] Fig. 3); with Hourglass-104 that is one set per stack, as CenterNet.
    Mask of object k ([CM] eq. 1): M_k = sigmoid(L_k) * sigmoid(G_k), where L_k is the S x S
    local shape resized to the object's box and G_k the saliency map cropped to it. Both are
    evaluated on the pixel grid by one `grid_sample` for all objects at once: the pixels inside
    the box get the bilinearly resampled local shape, the ones outside are not part of the mask.

    Training: model(images, targets) -> dict of losses (each weighted, and `loss` = their sum):
        heatmap ([CM] eq. 3), offset (eq. 4), size (eq. 5), mask (eq. 2), and optionally
        saliency (Table 1f). Teacher forcing: the masks are assembled at the ground-truth
        centres with the ground-truth boxes. With several stacks every stack's heads are
        trained (intermediate supervision, CornerNet 3.5) and each named loss, `loss`
        included, is the AVERAGE over stacks (CenterNet's `CtdetLoss` divides by num_stacks).
    Inference: model(images) -> list of B dicts: boxes (K, 4) xyxy input frame, scores (K,),
        labels (K,), masks (K, H, W) float probabilities at input resolution ([CM 3.5]: top
        100 peaks, no NMS; threshold `mask_threshold` = 0.4 is applied by eval.py). Only the
        last stack's heads are evaluated.

    Deviations from [CM]:
      * The mask loss is evaluated on the stride-4 grid against the ground-truth mask
        average-pooled to stride 4 (soft targets); [CM] does not say at which resolution.
      * L1 losses are normalised by 2N as CenterNet's code (see `l1_at_centers`).
      * Boxes narrower than one output pixel are widened to one pixel before assembly.
      * The Table 1f saliency loss weight is not given in [CM]; we use 1.
      * Hourglass-104 heads: the non-heatmap output biases start at 0 (CenterNet's hourglass
        leaves PyTorch's default init there; its DLA heads use 0, as we do for both).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.backbone == "dla34":
            self.backbone = DLASeg(cfg.dla_channels, dcn=cfg.dcn)
        elif cfg.backbone == "hourglass104":
            self.backbone = Hourglass104(cfg.hg_dims, cfg.hg_modules, cfg.num_stacks)
        else:
            raise ValueError(f"ModelConfig.backbone: {cfg.backbone!r} is not available for CenterMask "
                             "(known: 'dla34', 'hourglass104')")
        self.stride = self.backbone.stride                     # R = 4 ([CM 3.4])
        self.size_divisibility = self.backbone.size_divisibility  # 32 (DLA-34) or 128 (Hourglass-104)
        self.mask_threshold = cfg.mask_threshold
        num_sets = cfg.num_stacks if cfg.backbone == "hourglass104" else 1
        self.head_sets = nn.ModuleList(CenterMaskHeads(self.backbone.out_channels, cfg)
                                       for _ in range(num_sets))

    # The branches in use, read by `assemble` (None when switched off: Table 1c/1d ablations).
    @property
    def shape(self):
        return self.head_sets[-1].shape

    @property
    def saliency(self):
        return self.head_sets[-1].saliency

    # -- heads ------------------------------------------------------------------------------
    def features(self, images):
        """(B, 3, H, W) -> list of stride-4 feature maps (B, cin, H/4, W/4), one per head set."""
        features = self.backbone(images)
        return [features] if torch.is_tensor(features) else features  # DLA-34 returns one map

    def heads(self, images):
        """(B, 3, H, W) -> dict of the LAST head set's outputs, each (B, ch, H/4, W/4): the
        ones used at test time (the earlier stacks' heads only serve as training signal)."""
        return self.head_sets[-1](self.features(images)[-1])

    def forward(self, images, targets=None):
        if not self.training:
            return self.decode(self.heads(images), images.shape[-2:])
        if targets is None:
            raise ValueError("CenterMask in train mode needs targets (call model.eval() for inference)")
        outs = [head_set(p) for head_set, p in zip(self.head_sets, self.features(images))]  # per stack
        with torch.autocast(images.device.type, enabled=False):  # losses in fp32 (DESIGN 6)
            per_stack = [self.losses({k: v.float() for k, v in out.items()}, targets) for out in outs]
        # intermediate supervision: every stack's losses, averaged (one stack: unchanged)
        return {k: sum(losses[k] for losses in per_stack) / len(per_stack) for k in per_stack[0]}

    # -- mask assembly ([CM 3.3] eq. 1) --------------------------------------------------------
    def assemble(self, out, batch, centers_int, boxes, channels, grid_hw, pixel, log_space=False):
        """
        Assemble the masks of M objects on a (grid_h, grid_w) pixel grid.
            batch (M,) image index; centers_int (M, 2) output-frame cell whose shape vector is
            read; boxes (M, 4) xyxy in the grid's frame scaled so that grid pixel j has centre
            (j + 0.5) * pixel in output units; channels (M,) saliency channel per object.
        Returns (M, grid_h, grid_w) mask probabilities, zero outside each box, or, with
        log_space=True, (log M, log(1 - M), inside) for a numerically stable BCE.
        """
        M = len(batch)
        gh, gw = grid_hw
        grid, inside = box_grid(boxes, gh, gw, pixel)                            # (M, gh, gw, 2)
        log_m = torch.zeros(M, gh, gw, device=boxes.device)
        if self.shape is not None:
            S = self.cfg.shape_size
            local = gather_at(out["shape"], batch, centers_int).view(M, 1, S, S)  # (M, 1, S, S)
            # resize the S x S local shape to the box: bilinear, border-clamped ([CM 3.1])
            L = F.grid_sample(local, grid, mode="bilinear", padding_mode="border",
                              align_corners=False)[:, 0]                          # (M, gh, gw)
            log_m = log_m + F.logsigmoid(L)
            log_1m_shape = F.logsigmoid(-L)
        if self.saliency is not None:
            sal = out["saliency"]                                                 # (B, n, h, w)
            if sal.shape[-2:] != (gh, gw):
                # saliency cell j is the point j + 0.5: bilinear, align_corners=False is exact
                sal = F.interpolate(sal, size=(gh, gw), mode="bilinear", align_corners=False)
            G = sal[batch, channels]                                              # (M, gh, gw)
            log_m = log_m + F.logsigmoid(G)
        if not log_space:
            return log_m.exp() * inside
        # log(1 - M): with a single branch it is logsigmoid(-x) exactly; with both,
        # 1 - s(L)s(G) computed as log1p(-exp(log M)), clamped away from log 0
        if self.shape is not None and self.saliency is None:
            log_1m = log_1m_shape
        elif self.shape is None:
            log_1m = F.logsigmoid(-G)
        else:
            log_1m = torch.log1p(-log_m.exp().clamp(max=1 - 1e-6))
        return log_m, log_1m, inside

    # -- training -------------------------------------------------------------------------------
    def losses(self, out, targets):
        """Head outputs (fp32) + list of B target dicts -> dict of weighted scalar losses."""
        B, C, h, w = out["heatmap"].shape
        R = self.stride
        device = out["heatmap"].device
        objs = {k: v.to(device) for k, v in flatten_targets(targets, R).items()}
        # a centre on the last pixel edge (or a box past the border) must still index the map
        objs["center_int"] = torch.minimum(objs["center_int"].clamp(min=0), torch.tensor([w - 1, h - 1], device=device))
        lp, loff, lsize, lmask = self.cfg.loss_weights
        gt_heat = centernet_heatmaps(objs, B, C, h, w, self.cfg.min_overlap, self.cfg.cornernet_bug)
        losses = {
            "heatmap": lp * centernet_focal_loss(out["heatmap"], gt_heat),
            # offset target: p/R - floor(p/R) in [0, 1) ([CM] eq. 4)
            "offset": loff * l1_at_centers(out["offset"], objs, objs["center"] - objs["center_int"].float()),
            "size": lsize * l1_at_centers(out["size"], objs, objs["wh"]),
        }
        # ground-truth masks average-pooled to the stride-4 grid: soft targets in [0, 1]
        M = len(objs["labels"])
        if M:
            gt_masks = torch.cat([F.pad(t["masks"], (0, w * R - t["masks"].shape[-1], 0, h * R - t["masks"].shape[-2]))
                                  for t in targets]).to(device)            # (M, H, W)
            gt_small = F.avg_pool2d(gt_masks[:, None].float(), R)[:, 0]                   # (M, h, w)
        if M == 0:
            # keep every mask parameter in the graph (DDP expects a gradient for each)
            losses["mask"] = sum(out[k].sum() * 0 for k in ("shape", "saliency") if k in out)
        else:
            channels = objs["labels"] if self.cfg.saliency == "specific" else torch.zeros_like(objs["labels"])
            boxes = min_size_boxes(objs["center"], objs["wh"])                            # teacher forcing
            log_m, log_1m, inside = self.assemble(out, objs["batch"], objs["center_int"], boxes,
                                                  channels, (h, w), 1.0, log_space=True)
            bce = -(gt_small * log_m + (1 - gt_small) * log_1m)                          # (M, h, w)
            inside = inside.float()
            per_object = (bce * inside).sum((1, 2)) / inside.sum((1, 2)).clamp(min=1)     # (M,)
            losses["mask"] = lmask * per_object.mean()                                    # [CM] eq. 2
        if self.cfg.saliency_loss:
            # [CM 4.1] Table 1f: BCE of the class-specific saliency against the per-class union
            # of ground-truth masks at stride 4
            gt_sal = torch.zeros(B * C, h * w, device=device)
            if M:
                row = (objs["batch"] * C + objs["labels"])[:, None].expand(M, h * w)
                gt_sal.scatter_reduce_(0, row, gt_small.view(M, -1), "amax")
            losses["saliency"] = self.cfg.saliency_loss_weight * F.binary_cross_entropy_with_logits(
                out["saliency"], gt_sal.view(B, C, h, w))
        losses["loss"] = sum(losses.values())
        return losses

    # -- inference ([CM 3.5]) -------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, out, input_hw, k=None):
        """
        Heads -> detections. Peaks = 3x3 max-pool local maxima of the sigmoid heatmap, top-K
        over all classes, no NMS ([CM 3.5]). Centre = cell + offset, box from the predicted size;
        masks assembled at input resolution (K, H, W) as probabilities.
        """
        k = k or self.cfg.max_detections
        heat = out["heatmap"].float().sigmoid()                              # (B, C, h, w)
        B, C, h, w = heat.shape
        R = self.stride
        scores, labels, ys, xs = topk_peaks(heat, k)                         # (B, K) each
        k = scores.shape[1]
        batch = torch.arange(B, device=heat.device)[:, None].expand(B, k).reshape(-1)
        cells = torch.stack([xs.reshape(-1), ys.reshape(-1)], 1)             # (B*K, 2) as (x, y)
        offset = gather_at(out["offset"].float(), batch, cells)              # (B*K, 2)
        wh = gather_at(out["size"].float(), batch, cells).clamp(min=0)       # (B*K, 2)
        center = cells.float() + offset                                      # output frame
        boxes_out = min_size_boxes(center, wh)                               # (B*K, 4) output frame
        channels = labels.reshape(-1) if self.cfg.saliency == "specific" else torch.zeros_like(batch)
        H, W = input_hw
        results = []
        for b in range(B):  # one image at a time bounds the (K, H, W) memory
            sl = slice(b * k, (b + 1) * k)
            masks = self.assemble(out, batch[sl], cells[sl], boxes_out[sl], channels[sl],
                                  (H, W), 1.0 / R)                           # (K, H, W)
            results.append({"boxes": (boxes_out[sl] * R).clamp(min=0).clamp(max=torch.tensor([W, H, W, H], device=heat.device)),
                            "scores": scores[b], "labels": labels[b], "masks": masks})
        return results

    # -- teaching pictures ([CM] Fig. 3 and 5) --------------------------------------------------
    @torch.no_grad()
    def teaching_maps(self, images, k=4):
        """
        The intermediate results of [CM] Fig. 3 for eval.visualize's `maps_fn` hook: what the
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
        was_training = self.training
        self.eval()
        try:
            out = self.heads(images)
            dets = self.decode(out, images.shape[-2:], k=k)
        finally:
            self.train(was_training)
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
            if self.saliency is not None:
                m["saliency"] = out["saliency"][b].float().sigmoid().amax(0)  # (h, w)
            if self.shape is not None:
                S = self.cfg.shape_size
                local = out["shape"][b, :, ys[b], xs[b]].float().t().sigmoid().view(K, S, S)
                gap = torch.full((K, S, 1), float("nan"), device=local.device)
                m["local shapes"] = torch.cat([local, gap], 2).permute(1, 0, 2).reshape(S, -1)[:, :-1]
            prob, rank = dets[b]["masks"].max(0)                             # (H, W) each
            m["masks"] = torch.where(prob >= self.mask_threshold, rank + 1, torch.zeros_like(rank))
            maps.append(m)
        return maps
