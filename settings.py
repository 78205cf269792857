"""
The settings train.py and bench.py check before a run: which ModelConfig keys each method reads
(CONFIG_GROUPS, fields_of), a run's model keys checked against them (check_settings), and the
autocast dtype that dtype="auto" picks (auto_dtype). model.py's ModelConfig holds the keys
themselves, grouped the same way.
"""

from dataclasses import fields

import torch

from model import FCOS_FAMILY, MASK_METHODS, METHODS, ModelConfig

# The groups of ModelConfig and the methods (and backbone) that read each one: (group, methods,
# backbone or None for any, fields). Every field is in exactly one group (tests/test_configurator.py).
CONFIG_GROUPS = (
    ("every method", METHODS, None, ("method", "backbone", "num_classes", "max_detections")),
    ("every method that segments", MASK_METHODS, None, ("mask_threshold",)),
    ("DLA-34", ("centermask",), "dla34", ("dcn", "dla_channels")),
    ("Hourglass-104", ("centermask",), "hourglass104", ("num_stacks", "hg_dims", "hg_modules")),
    ("CenterMask: CenterNet's targets and losses", ("centermask",), None,
     ("mask_loss_grid",)),
    ("Local Shape x Global Saliency", ("centermask", "centermask_fcos"), None,
     ("head_conv", "shape_size", "use_shape", "use_saliency", "saliency", "saliency_loss", "loss_weights")),
    ("the FCOS family", FCOS_FAMILY, None,
     ("pretrained", "norm", "freeze_at", "fpn_channels", "head_convs", "centerness_on", "reg_form", "center_sampling",
      "box_loss", "score_threshold", "nms_threshold",
      "score_threshold_on", "location_offset", "ambiguity", "reg_weights", "center_sampling_at")),
    ("MaskFCOS", ("maskfcos",), None, ("mask_proposals",)),
    ("FCOSIS", ("fcosis",), None,
     ("attention", "seg_classes", "com_assignment", "attention_assign", "attention_background", "assign_nms_threshold",
      "assign_score_floor", "attention_grid")),
)


def fields_of(method, backbone):
    """The ModelConfig fields that `method` on `backbone` reads (CONFIG_GROUPS), in field order."""
    return [f for _, methods, bb, names in CONFIG_GROUPS if method in methods and bb in (None, backbone)
            for f in names]


def check_settings(settings):
    """
    Check the model keys of a run before any work: settings = {field: value} of every
    ModelConfig field (train.py's and bench.py's config). Raises ValueError with a one-line
    message naming the key: a value ModelConfig refuses (its allowed values), or a key set to
    anything but its default that the chosen method does not read (say `--attention=mu0` with
    method="centermask": silently ignored, it would make a run that is not what was asked for).
    Returns the ModelConfig.
    """
    cfg = ModelConfig(**settings)                  # values: ModelConfig's own checks name the key
    defaults = {f.name: f.default for f in fields(ModelConfig)}
    used = fields_of(cfg.method, cfg.backbone)
    norm = lambda v: tuple(v) if isinstance(v, (list, tuple)) else v   # a list from a config file is a tuple
    unused = [k for k, v in settings.items() if k not in used and norm(v) != norm(defaults[k])]
    if unused:
        on = f"method={cfg.method!r}" + (f" on backbone={cfg.backbone!r}" if cfg.method == "centermask" else "")
        raise ValueError(f"{', '.join(f'{k}={settings[k]!r}' for k in unused)}: not read by {on}, whose keys are "
                         f"{', '.join(used)} (settings.CONFIG_GROUPS)")
    return cfg


def auto_dtype(device_type):
    """The autocast dtype train.py and bench.py use for dtype="auto": bf16 on GPUs that have
    it, else fp16; on the CPU bf16 only where oneDNN runs it natively (AMX / AVX512-BF16; RESULTS.md,
    "Machines"), else fp32 (emulated bf16 is slower)."""
    if device_type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    try:
        native = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):
        native = False
    return "bfloat16" if native else "float32"
