"""
Training loop for every method in model.py, nanoGPT-shaped: config globals -> configurator ->
DDP -> data -> model/optimizer/resume -> learning-rate schedule -> loop.

    python train.py config/shapes_centermask.py                 # CPU quick start, minutes
    python train.py config/centermask_dla34.py                  # 1 GPU, COCO
    torchrun --standalone --nproc_per_node=8 train.py config/centermask_dla34.py \
        --gradient_accumulation_steps=1                                         # 8 GPUs, the same 128 per step
    python train.py config/centermask_dla34.py --init_from=resume               # go on after a stop
    python train.py config/centermask_dla34.py --init_from=ctdet_coco_dla_2x.pth    # from CenterNet's weights
    python train.py config/fcos_r50.py --init_from=torchvision:fcos_resnet50_fpn     # from torchvision's FCOS

Every name assigned below (before the configurator line) is a config key: a config file sets
them with plain assignments, `--key=value` overrides them. Every field of model.ModelConfig is
also a key. The whole resolved config is saved in each checkpoint.
"""

import datetime
import multiprocessing
import os
import shutil
import sys
import time
import json
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import fields, asdict
from functools import partial

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, RandomSampler

from accumulate import MicroBatchNormalizers
from model import NON_FINITE_DEFORM, ModelConfig, build_model, method_transform, non_finite_deform_count
from configurator import auto_dtype, check_settings
from weights import check_weights, import_weights, read_weights

# -----------------------------------------------------------------------------
# default config values (the CenterMask DLA-34 COCO recipe, [CM 3.5])
# I/O
out_dir = "out"                   # checkpoints, logs, loss curve, pictures
init_from = "scratch"             # "scratch", "resume" (from out_dir/ckpt.pt), or weights to start from (iteration 0,
                                  # new optimizer): a path (CenterNet's ctdet_coco_dla_1x/2x.pth or ctdet_coco_hg.pth,
                                  # the ImageNet dla34-ba72cf86.pth, a ckpt.pt of this project) or
                                  # "torchvision:fcos_resnet50_fpn" (torchvision's FCOS COCO weights); weights.py
init_fresh = ()                   # with init_from=weights: glob patterns of model keys not to import, started fresh
                                  # (e.g. ("head_sets.*.local_shape.*",)); import_weights lists them as ignored
overwrite = False                 # a start that is not a resume refuses an out_dir holding a ckpt.pt (it would write over
                                  # that run's training at its first evaluation); True: start over in it anyway
log_interval = 20                 # iterations between progress lines
eval_interval = 0                 # iterations between evaluations (0: every epoch ... see below)
eval_every_epochs = 10            # evaluate every this many epochs when eval_interval == 0
eval_max_images = 500             # images of the val set used by periodic evals (0: all)
ckpt_interval = 0                 # iterations between checkpoints (0: at each evaluation and at the end)
visualize = False                 # draw predictions and teaching maps of the first 8 val images at the end
# data (COCO 2017 layout; see README)
data_root = "data/coco"           # train/val paths below are relative to it unless absolute
train_img_dir = "train2017"
train_ann = "annotations/instances_train2017.json"
val_img_dir = "val2017"
val_ann = "annotations/instances_val2017.json"
shapes_dir = ""                   # if set: write the synthetic shapes set here when missing
shapes_n_train = 1000
shapes_n_val = 200
shapes_size = 128
shapes_seed = 1337                # the set's own seed (not the training seed: a --seed=1338 run reads the same images);
                                  # `python data.py shapes --out=data/shapes` writes the same set
transform = ""                    # "centernet" (square canvas, [CM 3.5]) or "fcos" (short side, [IS 4]); see data.py;
                                  # "": the method's own (model.method_transform: centernet for CenterMask, else fcos)
input_size = 512                  # centernet: square training input ([CM 3.5]); fcos: short side (800, [IS 4])
test_input_size = 0               # evaluation: long side (centernet) / short side (fcos); 0: input_size
keep_res = False                  # centernet evaluation: each image at its own size (scale 1, batches padded to the
                                  # backbone stride) instead of long side = test_input_size; CenterNet's --keep_res
max_size = 1333                   # fcos: longest side at most this ([IS 4])
input_format = "rgb_imagenet"     # network input (data.normalize_input): "rgb_imagenet" (RGB, ImageNet statistics) or
                                  # "bgr_coco" (CenterNet's: BGR, COCO statistics; set when init_from is a CenterNet file)
max_train_images = 0              # 0: all; >0: the first N images (overfitting checks)
max_val_images = 0                # 0: all; >0: the first N val images
scale_range = (0.6, 1.3)          # centernet: crop sizes s = lo, lo+0.1, ..., hi of the long side, zoom 1/s
                                  # ([CM 3.5] as [CN]); fcos: U(lo, hi) times the short side
flip_prob = 0.5                   # horizontal flips ([CN])
color_jitter = 0.4                # centernet: [CN]'s brightness/contrast/saturation var, with its PCA lighting; 0: neither
num_workers = 4
# optimisation ([CM 3.5]: Adam, lr 2.5e-4, 130 epochs, x0.1 at 100 and 120)
batch_size = 32                   # per process and micro-batch; CenterNet's DLA-34 COCO run: 128 on 8 GPUs at lr 5e-4
                                  # (experiments/ctdet_coco_dla_1x.sh)
gradient_accumulation_steps = 1   # micro-batches per optimizer step (nanoGPT's key): the global batch is
                                  # batch_size x this x processes, with the gradient of one such batch (the loss
                                  # normalisers too, accumulate.MicroBatchNormalizers); 1 GPU x 4 = CenterNet's 4 x 32
epochs = 130
max_iters = 0                     # 0: derived from epochs and the dataset length
learning_rate = 2.5e-4
lr_steps = (100, 120)             # epochs at which lr *= 0.1 ([CM 3.5], as FCOS's solver)
warmup_iters = 0                  # warm-up iterations (not in [CM]; FCOS: 500, its SOLVER.WARMUP_ITERS)
warmup_method = "linear"          # "linear": from warmup_factor x lr up to lr; "constant": warmup_factor x lr
                                  # throughout (FCOS's configs/fcos/*.yaml: WARMUP_METHOD "constant")
warmup_factor = 0.0               # start factor f (FCOS, Mask R-CNN: 1/3, SOLVER.WARMUP_FACTOR in fcos_core/config/defaults.py)
optimizer = "adam"                # "adam" ([CM 3.5]) or "adamw"/"sgd"
weight_decay = 0.0
bias_lr_factor = 1.0              # lr multiplier of every parameter whose name contains "bias" (FCOS: 2, SOLVER.BIAS_LR_FACTOR)
bias_weight_decay = None          # their weight decay (FCOS: 0, SOLVER.WEIGHT_DECAY_BIAS); None: weight_decay
grad_clip = 0.0                   # clip the gradient norm at this value (0: off; [CM] none)
# system
device = "auto"                   # "auto", "cpu", "cuda", "cuda:1", ...
dtype = "auto"                    # "auto": GPU bf16 (else fp16); CPU bf16 where native (AMX/AVX512-BF16), else fp32
compile = False                   # torch.compile the model
channels_last = True              # on GPU only
sync_bn = False                   # SyncBatchNorm under DDP (CenterNet: off)
seed = 1337
threads = 0                       # CPU threads for torch (0: all cores)
# model: every ModelConfig field is a config key (method, backbone, num_classes, dcn, ...)
globals().update({f.name: f.default for f in fields(ModelConfig)})
num_classes = 0                   # 0: take it from the training set
# -----------------------------------------------------------------------------
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configurator.py")).read())
# The recipe's global batch is what its config file gives one process, batch_size x
# gradient_accumulation_steps (every documented launch keeps it: 8 GPUs divide batch_size or the
# micro-batches); a launch that changes it without a --learning_rate of its own is warned about.
_recipe = apply_overrides(defaults_of(os.path.abspath(__file__)),
                          [a for a in sys.argv[1:] if not a.startswith("-")], verbose=False)
_recipe_batch = _recipe["batch_size"] * _recipe["gradient_accumulation_steps"]
_own_learning_rate = any(a.startswith("--learning_rate=") for a in sys.argv[1:])
# The model keys are checked before any work (a value ModelConfig refuses, or a key the method
# does not read: one line naming the key, exit status 2, as the configurator's own errors).
from data import (TRANSFORM_KINDS, CocoInstances, GroupedBatchSampler, aspect_ratio_groups,  # noqa: E402
                  build_transforms, collate_fn, dataset_paths, shapes_dataset_missing, write_shapes_dataset)
from data import write_atomic as data_write_atomic  # noqa: E402
from eval import evaluate  # noqa: E402
from pictures import save_pictures, teaching_maps  # noqa: E402

transform = transform or method_transform(method)
try:
    check_settings({**{f.name: globals()[f.name] for f in fields(ModelConfig)}, "num_classes": num_classes or 1})
    if transform not in TRANSFORM_KINDS:
        raise ValueError(f"transform={transform!r}: expected one of {TRANSFORM_KINDS} (or '': the method's own)")
except ValueError as _e:
    print(f"{os.path.basename(sys.argv[0])}: error: {_e}", file=sys.stderr)
    sys.exit(2)
config = config_from_globals(globals())  # the resolved config, saved in checkpoints
# Nothing a user trained is written over: a start that is not a resume (from scratch, or from weights)
# writes a new ckpt.pt into out_dir at its first evaluation, so an out_dir that holds one stops the
# run here, before any work (a rerun after a kill without --init_from=resume would lose that run).
ckpt_path = os.path.join(out_dir, "ckpt.pt")
if init_from != "resume" and os.path.exists(ckpt_path) and not overwrite:
    print(f"{os.path.basename(sys.argv[0])}: error: {ckpt_path} exists and init_from={init_from!r} would write over it: "
          f"continue that run with --init_from=resume, train into another --out_dir, or start over in this one "
          f"with --overwrite=True", file=sys.stderr)
    sys.exit(2)
# -----------------------------------------------------------------------------

# -- processes and device ---------------------------------------------------------------------
ddp = int(os.environ.get("RANK", -1)) != -1  # launched by torchrun?
if device == "auto":
    device = "cuda" if torch.cuda.is_available() else "cpu"
if device.startswith("cuda") and not torch.cuda.is_available():
    sys.exit(f"train.py: device={device!r} was asked for but no CUDA GPU is visible; "
             "use --device=cpu (or --device=auto)")
if ddp and sync_bn and not device.startswith("cuda"):  # SyncBatchNorm's forward refuses CPU tensors in a group
    sys.exit("train.py: sync_bn=True needs GPUs (torch's SyncBatchNorm does not run on the CPU); use --sync_bn=False")
# DDP: a collective waits this long for the other processes, then the waiting ones stop (a dead rank on
# another node ends the run then); above rank 0's work alone, which the others await (COCOeval of the
# whole val set at the end, checkpoint writes)
DIST_TIMEOUT = datetime.timedelta(minutes=20)
if ddp:
    rank, local_rank, world_size = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo",
                            timeout=DIST_TIMEOUT,
                            **({"device_id": torch.device(device)} if device.startswith("cuda") else {}))
else:
    rank, local_rank, world_size = 0, 0, 1
master = rank == 0
device_type = "cuda" if device.startswith("cuda") else "cpu"
torch.manual_seed(seed + rank)
if device_type == "cpu":
    # without a GPU, use the cores (split between processes under torchrun)
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // world_size))
else:
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True


if dtype == "auto":
    dtype = auto_dtype(device_type)  # GPU: bf16 (else fp16); CPU: bf16 where native, else fp32
ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
autocast = nullcontext() if ptdtype == torch.float32 else torch.autocast(device_type, dtype=ptdtype)
# fp16 needs loss scaling (dynamic, from 2^16). fp32 and bf16 do not: their scaler keeps the scale at 1
# (x 1 and / 1 are exact; never grown) and is there for its device-side check: a step whose gradients
# hold an inf or NaN is not applied (the fused optimizers read the scaler's found_inf on the device),
# so the loop below needs no host sync per step to keep a non-finite step out of the weights.
scaler = torch.amp.GradScaler(device_type, **({} if dtype == "float16" else dict(init_scale=1.0,
                                                                                 growth_interval=2**31 - 1)))


def log(*a):
    if master:
        print(*a, flush=True)


@contextmanager
def stop_on_non_finite_deform(where):
    """DeformConv's refusal of NaN / inf offsets (model.NON_FINITE_DEFORM) as one line naming where
    it happened, instead of a traceback; any other error passes through."""
    try:
        yield
    except RuntimeError as e:
        if NON_FINITE_DEFORM not in str(e):
            raise
        sys.exit(f"train.py: {where}: {NON_FINITE_DEFORM}")


# -- what to start from (init_from) -------------------------------------------------------------
# "resume": out_dir/ckpt.pt, read here and checked against the model config below. A path or
# "torchvision:fcos_resnet50_fpn": weights imported into the new model below (weights.py), a
# fresh start (iteration 0, new optimizer). Either way the settings the weights were trained
# with are taken here, before the data and the model are built: the input format (CenterNet's
# weights: BGR with COCO statistics), the form of FCOS and its location convention
# (torchvision's), and pretrained=False when the file holds the backbone.
checkpoint = imported = None
updates = []
if init_fresh and init_from in ("scratch", "resume"):   # e.g. a fine-tuning config resumed: nothing to leave out
    log(f"init_fresh={init_fresh!r}: no effect with init_from={init_from!r} (nothing is imported)")
if init_from == "resume":
    if not os.path.exists(ckpt_path):
        sys.exit(f"train.py: init_from='resume' but there is no checkpoint at {ckpt_path}")
    try:
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    except Exception as e:
        sys.exit(f"train.py: cannot read checkpoint {ckpt_path}: {e}")
    try:  # NaN / inf, a BatchNorm variance below 0: refused here, not met as a crash later (weights.check_weights)
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get("model"), dict):
            check_weights(checkpoint["model"], f"{ckpt_path} ('model' weights)")
    except ValueError as e:
        sys.exit(f"train.py: init_from='resume': {e}")
    saved_config = (checkpoint.get("config") or {}) if isinstance(checkpoint, dict) else {}
    updates = [(k, saved_config[k], "as the checkpoint was trained") for k in ("input_format", "fcos_form")
               if k in saved_config]
elif init_from != "scratch":
    if ddp and not master:
        dist.barrier()                # rank 0 first: a download lands once in torch.hub's cache
    try:
        imported = read_weights(init_from)
    except (OSError, ValueError, RuntimeError) as e:
        sys.exit(f"train.py: init_from={init_from!r}: {e}")
    if ddp and master:
        dist.barrier()
    log(f"init_from={init_from!r}: {imported.description}")
    updates = imported.config_updates(config)
for key, value, why in updates:
    if config[key] != value:
        log(f"init_from: {key}={value!r} ({why})")
        config[key] = globals()[key] = value


# -- data ---------------------------------------------------------------------------------------
paths = dataset_paths(config)  # the shapes set's layout under shapes_dir, else under data_root
if shapes_dir:
    # the quick start: the synthetic set is written once (rank 0), everyone else waits
    why = shapes_dataset_missing(shapes_dir, shapes_n_train, shapes_n_val, shapes_size) if master else ""
    if why:
        log(f"writing the synthetic shapes set to {shapes_dir} ({shapes_n_train} train / {shapes_n_val} val, "
            f"{shapes_size}px, shapes_seed {shapes_seed}; {why})")
        write_shapes_dataset(shapes_dir, shapes_n_train, shapes_n_val, shapes_size, shapes_seed)
    if ddp:
        dist.barrier()
    # a bigger set written by another config serves too: its first n images are the n-image set
    max_train_images = min(max_train_images or shapes_n_train, shapes_n_train)
    max_val_images = min(max_val_images or shapes_n_val, shapes_n_val)
augment = dict(scale_range=scale_range, flip_prob=flip_prob, color_jitter=color_jitter)
sizes = dict(max_size=max_size) if transform == "fcos" else {}
sizes["input_format"] = input_format  # the normalisation, train and val alike (data.normalize_input)
try:
    train_set = CocoInstances(paths["train_img_dir"], paths["train_ann"], max_images=max_train_images or None,
                              transforms=build_transforms(transform, True, input_size, **augment, **sizes))
    val_set = CocoInstances(paths["val_img_dir"], paths["val_ann"], max_images=max_val_images or None,
                            transforms=build_transforms(transform, False, test_input_size or input_size, **sizes,
                                                        **({"keep_res": True} if keep_res else {})))  # fcos: an error
except (OSError, ValueError) as e:  # data.py's messages name the file / annotation
    sys.exit(f"train.py: {e}")
if val_set.label_to_cat_id != train_set.label_to_cat_id:  # labels are read through the val json's categories
    sys.exit(f"train.py: {paths['val_ann']} lists other categories than {paths['train_ann']} (ids "
             f"{val_set.label_to_cat_id[:20]} against {train_set.label_to_cat_id[:20]}): the model's labels are the "
             f"training json's, so evaluation would score them as other classes; give both jsons the same categories")
num_classes = num_classes or train_set.num_classes
if num_classes != train_set.num_classes:
    sys.exit(f"train.py: num_classes={num_classes} but {paths['train_ann']} has {train_set.num_classes} categories")
config["num_classes"] = num_classes

# -- model and optimiser ----------------------------------------------------------------------------
model_args = {f.name: config[f.name] for f in fields(ModelConfig)}
if checkpoint is not None:  # resume
    try:  # compare normalised configs (tuples vs lists, ints vs floats do not count as changes)
        saved, now = asdict(ModelConfig(**checkpoint["model_args"])), asdict(ModelConfig(**model_args))
    except (KeyError, TypeError, ValueError) as e:
        sys.exit(f"train.py: checkpoint {ckpt_path} has no usable model_args ({e}); not written by this train.py?")
    diff = {k: (saved[k], now[k]) for k in now if saved[k] != now[k]}
    if diff:
        sys.exit(f"train.py: checkpoint {ckpt_path} was made with another model config; differing keys "
                 f"(checkpoint, now): {diff}. Use another out_dir or the same config.")

model = build_model(ModelConfig(**model_args))
if checkpoint is not None:
    model.load_state_dict(checkpoint["model"])
elif imported is not None:
    # published weights: renamed into the model, every tensor accounted for (weights.import_weights);
    # the class channels of the training json's categories (label k = COCO category label_to_cat_id[k])
    try:
        report = import_weights(model, imported, cat_ids=train_set.label_to_cat_id, fresh=init_fresh)
    except ValueError as e:
        sys.exit(f"train.py: init_from={init_from!r}: {e}")
    log(str(report))
    imported = None  # free memory
model.to(device)
if device_type == "cuda" and channels_last:
    model = model.to(memory_format=torch.channels_last)
if ddp and sync_bn:
    model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
log(f"{model_args['method']} / {model_args['backbone']}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
    f"{num_classes} classes, {len(train_set)} train / {len(val_set)} val images, device {device}, dtype {dtype}, "
    f"{world_size} process(es)")

# Parameter groups. FCOS's solver (fcos_core/solver/build.py, inherited from maskrcnn-benchmark) gives
# every parameter named "*bias*" (conv, norm and Scale biases) bias_lr_factor x the learning rate and
# bias_weight_decay; each group carries its "lr_factor", which the schedule below multiplies in.
# With the defaults (CenterMask's Adam, [CM 3.5]) it is one group, in model.parameters() order.
named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
params = [p for _, p in named]                              # all of them (gradient clipping)
if bias_lr_factor == 1.0 and bias_weight_decay in (None, weight_decay):
    groups = [{"params": params, "lr_factor": 1.0}]
else:
    groups = [{"params": [p for n, p in named if "bias" not in n], "lr_factor": 1.0},
              {"params": [p for n, p in named if "bias" in n], "lr_factor": float(bias_lr_factor),
               "weight_decay": weight_decay if bias_weight_decay is None else float(bias_weight_decay)}]
# fused: one kernel over all parameters (~8% of a CPU step), and the scaler's found_inf is read on the
# device (no sync per step). Adam/AdamW: CUDA, and CPU since torch 2.4; SGD where this torch has it,
# else the plain loop (then GradScaler.step reads found_inf on the host once per step).
optimizers = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW,
              "sgd": partial(torch.optim.SGD, momentum=0.9)}
if optimizer not in optimizers:
    sys.exit(f"train.py: optimizer must be 'adam', 'adamw' or 'sgd', got {optimizer!r}")
try:
    opt = optimizers[optimizer](groups, lr=learning_rate, weight_decay=weight_decay, fused=True)
except (RuntimeError, TypeError):  # no fused kernel for this optimizer and device in this torch
    opt = optimizers[optimizer](groups, lr=learning_rate, weight_decay=weight_decay)
if checkpoint is not None:
    opt.load_state_dict(checkpoint["optimizer"])
    if dtype == "float16" and checkpoint.get("scaler"):  # fp16's dynamic scale; the others restart at 1
        scaler.load_state_dict(checkpoint["scaler"])

raw_model = model
if ddp:
    model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None)
if compile:  # after DDP: dynamo splits the graph at DDP's gradient buckets, so their all-reduce overlaps the backward
    model = torch.compile(model)

# -- loader and schedule ------------------------------------------------------------------------------
# DataLoader workers. train.py is a script of globals, not an importable module: a worker started by
# spawning or from a fork server (the default start method of Windows and macOS, and of Linux from
# Python 3.14) imports the main script again, and would rerun the whole training in every worker. So the
# workers are forked wherever the platform can fork; where it cannot (Windows), the main process loads.
if num_workers > 0 and "fork" not in multiprocessing.get_all_start_methods():
    log(f"num_workers={num_workers}: this platform cannot fork DataLoader workers (a spawned one would rerun "
        f"train.py), so the main process loads the data (num_workers=0)")
    num_workers = 0
worker_context = "fork" if num_workers > 0 else None
sampler = (DistributedSampler(train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
           if ddp else RandomSampler(train_set, generator=torch.Generator().manual_seed(seed)))
# "fcos" transform: batches of landscape or of other images (FCOS's aspect-ratio grouping; centernet's are square)
batches = (GroupedBatchSampler(sampler, aspect_ratio_groups(train_set), batch_size) if transform == "fcos"
           else BatchSampler(sampler, batch_size, drop_last=True))
collate = partial(collate_fn, size_divisibility=raw_model.size_divisibility)
loader = DataLoader(train_set, batch_sampler=batches, collate_fn=collate,
                    num_workers=num_workers, pin_memory=device_type == "cuda", persistent_workers=num_workers > 0,
                    multiprocessing_context=worker_context)
accum = gradient_accumulation_steps
if not isinstance(accum, int) or accum < 1:
    sys.exit(f"train.py: gradient_accumulation_steps must be an integer >= 1, got {accum!r}")
if len(loader) < accum:
    sys.exit(f"train.py: batch_size={batch_size} x {accum} micro-batch(es) x {world_size} process(es) is larger "
             f"than the training set ({len(train_set)} images)")
iters_per_epoch = len(loader) // accum  # optimizer steps; an epoch's last len(loader) % accum batches are dropped
max_iters = max_iters or epochs * iters_per_epoch
step_iters = [int(e * iters_per_epoch) for e in lr_steps]
eval_every = eval_interval or max(1, eval_every_epochs * iters_per_epoch)
# A resume continues the saved iteration count: on another global batch (another number of processes,
# batch_size or gradient_accumulation_steps) or another epoch length, the epoch, the learning-rate
# steps and the images per step would shift without a word, so it stops here, naming both.
global_batch = batch_size * accum * world_size
if checkpoint is not None and (checkpoint.get("global_batch", global_batch), checkpoint.get(
        "iters_per_epoch", iters_per_epoch)) != (global_batch, iters_per_epoch):
    sys.exit(f"train.py: checkpoint {ckpt_path} was trained with a global batch of {checkpoint['global_batch']} "
             f"images, {checkpoint['iters_per_epoch']} iterations per epoch; now {global_batch} (batch_size "
             f"{batch_size} x {accum} micro-batch(es) x {world_size} process(es)), {iters_per_epoch} per epoch: "
             f"resume with the saved global batch (e.g. gradient_accumulation_steps for fewer processes)")


def get_lr(it):
    """Warm-up (optional: linear from 0, or FCOS's constant warmup_factor x lr), then x 0.1 at each
    step ([CM 3.5]: epochs 100 and 120; FCOS's and Mask R-CNN's SOLVER.GAMMA 0.1). The base rate:
    each parameter group multiplies in its lr_factor."""
    if it < warmup_iters:  # linear: f + (1 - f) (it + 1) / W, never 0 at the first step (f = 0 included)
        f = warmup_factor
        return learning_rate * (f if warmup_method == "constant" else f + (1 - f) * (it + 1) / warmup_iters)
    return learning_rate * 0.1 ** sum(it >= s for s in step_iters)


if warmup_method not in ("linear", "constant"):
    sys.exit(f"train.py: warmup_method must be 'linear' or 'constant', got {warmup_method!r}")
if not 0 <= warmup_factor <= 1 or (warmup_method == "constant" and warmup_factor == 0 and warmup_iters > 0):
    sys.exit(f"train.py: warmup_factor must be in [0, 1] (> 0 with warmup_method='constant'), got {warmup_factor}")


def write_atomic(name, write):
    """Write out_dir/name with `write(tmp_path)`, then rename the temporary file over the old one:
    a run killed mid-write leaves the previous file intact (and a `name.tmp<pid>` that the next
    run removes, see below). A failed write (full disk, read-only folder) stops the run with one
    line naming the file; the previous version of the file is kept."""
    final = os.path.join(out_dir, name)
    try:
        data_write_atomic(final, write)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        try:  # torch's message for a full disk is cryptic ("unexpected pos ..."): say how full it is
            free = f" ({shutil.disk_usage(out_dir).free / 2**20:.0f} MiB free on that disk)"
        except OSError:
            free = ""
        sys.exit(f"train.py: cannot write {final}: {type(e).__name__}: {e}{free}. "
                 f"The previous {name}, if any, is intact.")


def dump_json(obj, path):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, default=str)


def save_checkpoint(it, best_ap, name="ckpt.pt"):
    """Everything a resume needs, written atomically (write_atomic)."""
    ckpt = {"model": raw_model.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
            "iter": it, "best_ap": best_ap, "model_args": model_args, "config": config,
            "global_batch": global_batch, "iters_per_epoch": iters_per_epoch,  # what a resume must match
            # what a label means, for predict.py on a checkpoint alone: label k is class_names[k],
            # COCO category id label_to_cat_id[k] of the training json
            "class_names": list(train_set.class_names), "label_to_cat_id": list(train_set.label_to_cat_id)}
    write_atomic(name, partial(torch.save, ckpt))


def run_eval(max_images):
    """COCO AP on the val set (all ranks take part; rank 0 gets the numbers). It runs on a
    fork of the CPU RNG (its DataLoader draws a seed from it), so evaluating never changes the
    training's augmentations: a run resumed after an evaluation stays on the same stream."""
    subset = val_set if not max_images or max_images >= len(val_set) else torch.utils.data.Subset(val_set, range(max_images))
    eval_sampler = DistributedSampler(subset, world_size, rank, shuffle=False) if ddp else None
    eval_loader = DataLoader(subset, batch_size=max(1, batch_size // 2), sampler=eval_sampler, collate_fn=collate,
                             num_workers=num_workers, multiprocessing_context=worker_context)
    with torch.random.fork_rng(devices=[]):
        stats = evaluate(raw_model, eval_loader, device=device, verbose=False,
                         amp_dtype=None if ptdtype == torch.float32 else ptdtype)
    raw_model.train()
    return stats


if master:
    # a read-only or full out_dir fails here, in the first seconds, not at the first checkpoint
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        sys.exit(f"train.py: cannot create out_dir {out_dir}: {e}")
    write_atomic("config.json", partial(dump_json, config))
    # A run killed while writing leaves its temporary file (e.g. ckpt.pt.tmp<pid>) behind. It is
    # never loaded (a checkpoint exists only once renamed), so it is only litter: remove it.
    for leftover in sorted(os.listdir(out_dir)):
        _, dot_tmp, pid = leftover.rpartition(".tmp")
        if dot_tmp and pid.isdigit():
            with suppress(OSError):
                os.remove(os.path.join(out_dir, leftover))
                log(f"removed {os.path.join(out_dir, leftover)}, a file half-written by a killed run")

# -- the loop ---------------------------------------------------------------------------------------
it = checkpoint["iter"] if checkpoint is not None else 0
best_ap = checkpoint["best_ap"] if checkpoint is not None else -1.0
history = {"iter": [], "loss": {}}  # for the loss-curve PNG
checkpoint = None  # free memory
log(f"training for {max_iters} iterations ({iters_per_epoch} per epoch, batch {batch_size} x {world_size}"
    + (f" x {accum} micro-batches" if accum > 1 else "") + "); "
    + f"lr steps at iterations {step_iters}")
normalizers = MicroBatchNormalizers() if accum > 1 else None
global_batch = world_size * batch_size * accum
log(f"global batch {global_batch} ({world_size} process(es) x batch_size {batch_size} x {accum} micro-batch(es)), "
    f"learning rate {learning_rate:g}")
if global_batch != _recipe_batch and not _own_learning_rate:
    log(f"warning: the config's recipe steps on {_recipe_batch} images at learning rate {learning_rate:g}; this "
        f"launch steps on {global_batch}, another recipe: give it its own --learning_rate, or keep "
        f"processes x batch_size x gradient_accumulation_steps = {_recipe_batch}")


class Tally:
    """The losses of the steps since the last log line, kept on the device: a step adds its terms
    without reading anything back to the host (nanoGPT reads its loss only at log_interval). A step
    whose loss is not finite is counted and its terms are kept (the first one since the last read);
    its update never reaches the weights (the scaler skips it, see `scaler` above) and `check`, at
    every log line and before every evaluation or checkpoint, stops the run there."""

    def __init__(self):
        self.names, self.sums, self.steps, self.bad, self.first_bad, self.first_bad_iter = None, 0, 0, 0, 0, 0

    def add(self, terms, step):  # terms: {name: 0-d tensor}, the step's mean over micro-batches
        self.names = self.names or list(terms)
        if set(terms) != set(self.names):  # the log, the curve and the checks read the first step's keys
            raise RuntimeError(f"the loss keys changed after the first step: {sorted(self.names)} -> {sorted(terms)}; "
                               "a method must return the same keys in every forward (an empty batch included)")
        v = torch.stack([terms[k].detach().float() for k in self.names])           # (T,)
        finite = torch.isfinite(v).all()
        first = (torch.as_tensor(self.bad, device=v.device) == 0) & ~finite
        self.first_bad = torch.where(first, v, torch.as_tensor(self.first_bad, device=v.device, dtype=v.dtype))
        self.first_bad_iter = torch.where(first, step, torch.as_tensor(self.first_bad_iter, device=v.device))
        self.sums = self.sums + torch.where(finite, v, 0.0)
        self.bad = self.bad + (~finite).long()
        self.steps += 1

    def check(self):
        """Stop the run if a step since the last read had a non-finite loss, or if a DeformConv met NaN / inf
        offsets on a GPU (model.non_finite_deform_count; the CPU stops at once), every rank together."""
        local = torch.stack([torch.as_tensor(self.bad, device=device), non_finite_deform_count(device)])  # (2,)
        bad = local.clone()
        if ddp:
            dist.all_reduce(bad)
        bad_losses, bad_deform = bad.tolist()  # the host sync: one per log line / evaluation
        if bad_deform:
            sys.exit(f"train.py: by iteration {it} (rank {rank}): {NON_FINITE_DEFORM}" if local[1] else 1)
        if bad_losses == 0:
            return
        if torch.as_tensor(self.bad).item() > 0:  # this rank saw it
            terms = ", ".join(f"{k}={v:.4g}" for k, v in zip(self.names, self.first_bad.tolist()))
            print(f"train.py: non-finite loss at iteration {int(self.first_bad_iter)} (rank {rank}): {terms}. "
                  f"Stopping; the last good checkpoint in {out_dir} is kept. Try a lower learning_rate, "
                  f"warmup_iters or grad_clip.", flush=True)
        sys.exit(1)

    def read(self):
        """Mean of each term over the finite steps since the last read, then reset."""
        finite_steps = max(1, self.steps - int(torch.as_tensor(self.bad).item()))
        mean = dict(zip(self.names, (torch.as_tensor(self.sums) / finite_steps).tolist()))
        self.__init__()
        return mean


def to_device(images, targets):
    images = images.to(device, non_blocking=True)
    if device_type == "cuda" and channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, [{k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()}
                    for t in targets]


def train_step(micro_batches):
    """One optimizer step over `accum` micro-batches: the gradient of their union (the loss of
    each divided by accum, the normalisers of the whole step from a recording pass when accum > 1,
    accumulate.MicroBatchNormalizers); under DDP the gradients are all-reduced once, at the last one.
    Returns the step's loss terms (means over micro-batches), on the device."""
    if normalizers is not None:
        normalizers.record(raw_model, micro_batches, autocast)
    terms = {}
    for m, (images, targets) in enumerate(micro_batches):
        last = m == len(micro_batches) - 1
        with (model.no_sync() if ddp and not last else nullcontext()), \
                (normalizers.replay() if normalizers is not None else nullcontext()):
            with autocast:
                losses = model(images, targets)
            scaler.scale(losses["loss"] / len(micro_batches)).backward()
        for k, v in losses.items():
            terms[k] = terms.get(k, 0.0) + v.detach() / len(micro_batches)
    if grad_clip > 0:
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    scaler.step(opt)      # skipped (on the device) if a gradient is inf/NaN
    scaler.update()
    opt.zero_grad(set_to_none=True)
    return terms


model.train()
tally = Tally()
t_start, t_log, epoch = time.time(), time.time(), it // iters_per_epoch
while it < max_iters:
    if ddp:
        sampler.set_epoch(epoch)
    else:
        sampler.generator.manual_seed(seed + epoch)  # same order after a resume
    # The random scales/flips/crops/jitter (and the workers' seeds) come from torch's global RNG:
    # reseed it from (seed, epoch, rank) alone, so that a resumed run re-draws exactly the
    # augmentations of the uninterrupted one (bitwise on the CPU with num_workers=0; persistent
    # workers keep their own RNG across epochs, so with workers only the data order is exact).
    torch.manual_seed(seed + 1_000_003 * (epoch + 1) + rank)
    skip = (it - epoch * iters_per_epoch) * accum  # after a resume: the batches already seen this epoch
    micro_batches, steps_this_epoch = [], it - epoch * iters_per_epoch
    for images, targets in loader:
        if skip > 0:
            skip -= 1
            continue
        micro_batches.append(to_device(images, targets))
        if len(micro_batches) < accum:
            continue
        lr = get_lr(it)
        for g in opt.param_groups:
            g["lr"] = lr * g.get("lr_factor", 1.0)
        with stop_on_non_finite_deform(f"iteration {it + 1}"):
            tally.add(train_step(micro_batches), it)
        micro_batches = []
        it += 1
        steps_this_epoch += 1

        if it % log_interval == 0 or it == max_iters:
            tally.check()
            dt = (time.time() - t_log) / tally.steps
            mean = tally.read()
            history["iter"].append(it)
            for k, v in mean.items():
                history["loss"].setdefault(k, []).append(v)
            eta = (max_iters - it) * dt
            mem = f", mem {torch.cuda.max_memory_allocated() / 2**30:.1f}GiB" if device_type == "cuda" else ""
            scale = f", loss scale {scaler.get_scale():g}" if dtype == "float16" else ""
            log(f"iter {it}/{max_iters} (epoch {it / iters_per_epoch:.1f}): " +
                " ".join(f"{k} {v:.4f}" for k, v in mean.items()) +
                f" | lr {lr:.2e} | {dt * 1000:.0f}ms/iter, {batch_size * accum * world_size / dt:.1f} img/s | "
                f"ETA {eta / 60:.1f}min{mem}{scale}")
            t_log = time.time()

        if it % eval_every == 0 or it == max_iters:
            tally.check()  # nothing non-finite is evaluated or saved
            t_eval = time.time()
            with stop_on_non_finite_deform(f"evaluation at iteration {it}"):
                stats = run_eval(eval_max_images if it < max_iters else 0)
            if master:
                ap = stats.get("segm_AP", stats.get("bbox_AP", -1.0))
                log(f"eval @ iter {it}: " + " ".join(f"{k} {v:.4f}" for k, v in stats.items() if "AP" in k) +
                    f" | {stats.get('images_per_s', 0):.1f} img/s")
                best_ap = max(best_ap, ap)
                save_checkpoint(it, best_ap)
                if ap >= best_ap:
                    save_checkpoint(it, best_ap, "best.pt")
                write_atomic("eval.json", partial(dump_json, {"iter": it, **stats}))
            t_log += time.time() - t_eval  # evaluation time is not training time
        elif ckpt_interval and it % ckpt_interval == 0:
            tally.check()
            if master:
                save_checkpoint(it, best_ap)
        if it >= max_iters or steps_this_epoch >= iters_per_epoch:
            break
    epoch += 1

log(f"done: {max_iters} iterations in {(time.time() - t_start) / 60:.1f} min, best AP {best_ap:.4f}")
if master:
    # the loss curve next to the checkpoint
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for k, v in history["loss"].items():
        ax.plot(history["iter"], v, label=k, lw=2 if k == "loss" else 1)
    ax.set_xlabel("iteration"), ax.set_ylabel("loss"), ax.set_yscale("log"), ax.legend(), ax.grid(alpha=0.3)
    fig.tight_layout()
    write_atomic("loss.png", partial(fig.savefig, format="png", dpi=100))
    log(f"wrote {os.path.join(out_dir, 'loss.png')}")
    if visualize:
        with stop_on_non_finite_deform("drawing the pictures"):
            paths = save_pictures(raw_model, val_set, os.path.join(out_dir, "pictures"), n=8, device=device,
                                  maps_fn=teaching_maps(raw_model))
        log(f"wrote {len(paths)} pictures to {os.path.join(out_dir, 'pictures')}")
if ddp:
    # every rank waits until rank 0 has drawn its pictures: a gloo group torn down on one rank
    # while a peer is still busy can abort that process ("terminate called ..." after training)
    dist.barrier()
    dist.destroy_process_group()
