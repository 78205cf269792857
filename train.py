"""
Training loop for every method in model.py, nanoGPT-shaped: config globals -> configurator ->
DDP -> data -> model/optimizer/resume -> learning-rate schedule -> loop.

    python train.py config/shapes_centermask.py                 # CPU quick start, minutes
    python train.py config/centermask_dla34.py                  # 1 GPU, COCO
    # 8 GPUs, the same 128 images per step:
    torchrun --standalone --nproc_per_node=8 train.py config/centermask_dla34.py \
        --gradient_accumulation_steps=1
    python train.py config/centermask_dla34.py --init_from=resume               # go on after a stop
    python train.py config/centermask_dla34.py --init_from=ctdet_coco_dla_2x.pth    # CenterNet's weights
    python train.py config/fcos_r50.py --init_from=torchvision:fcos_resnet50_fpn     # torchvision's FCOS

Every name assigned below (before the configurator line) is a config key: a config file sets
them with plain assignments, `--key=value` overrides them. Every field of model.ModelConfig is
also a key, but num_classes: the training json's categories. The whole resolved config is saved
in each checkpoint.
"""

import datetime
import json
import multiprocessing
import os
import shutil
import signal
import sys
import time
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import asdict, fields
from functools import partial
from itertools import islice

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, RandomSampler

import model as model_py  # the module (below, `model` is the network)
from model import (NON_FINITE_DEFORM, ModelConfig, build_model, method_transform,
                   non_finite_deform_count)
from configurator import check_settings, device_and_dtype
from weights import check_weights, import_weights, load_file, one_line_errors, read_weights

# a bad image, annotation or path, met here or in a DataLoader worker: one line naming it, exit
# status 2 (CENTERMASK_DEBUG=1: the traceback)
one_line_errors("train.py")

# -----------------------------------------------------------------------------
# default config values (the CenterMask DLA-34 COCO recipe, [CM 3.5])
# I/O
out_dir = "out"                   # checkpoints, logs, loss curve, pictures
# "scratch", "resume" (from out_dir/ckpt.pt), or weights to start from (iteration 0, new
# optimizer): a path (CenterNet's ctdet_coco_dla_1x/2x.pth or ctdet_coco_hg.pth, the ImageNet
# dla34-ba72cf86.pth, a ckpt.pt of this project) or "torchvision:fcos_resnet50_fpn"
# (torchvision's FCOS COCO weights); weights.py
init_from = "scratch"
# with init_from=weights: glob patterns of model keys not to import, started fresh
# (e.g. ("head_sets.*.local_shape.*",)); import_weights lists them as ignored
init_fresh = ()
# a start that is not a resume refuses an out_dir holding a ckpt.pt (it would write over that
# run's training at its first epoch's end); True: start over in it anyway
overwrite = False
log_interval = 20                 # iterations between progress lines
# epochs between evaluations (a fraction too; and one at the end, on the whole val set); the
# periodic ones read the first EVAL_IMAGES val images. Each writes ckpt.pt, and best.pt at the
# best AP so far; ckpt.pt is also written at every epoch's end and when a signal stops the run
eval_every_epochs = 10.0
# data (COCO 2017 layout; see README)
data_root = "data/coco"           # train/val paths below are relative to it unless absolute
train_img_dir = "train2017"
train_ann = "annotations/instances_train2017.json"
val_img_dir = "val2017"
val_ann = "annotations/instances_val2017.json"
# if set: the synthetic shapes set, written here when missing (data.SHAPES_DEFAULTS' seed and
# size; `python data.py shapes --out=data/shapes` writes the same set)
shapes_dir = ""
shapes_n_train = 1000
shapes_n_val = 200
# centernet: square training input ([CM 3.5]); fcos: short side (800, [IS 4])
input_size = 512
test_input_size = 0               # evaluation: long side (centernet) / short side (fcos); 0: input
# centernet evaluation: each image at its own size (scale 1, batches padded to the backbone
# stride) instead of long side = test_input_size; CenterNet's --keep_res
keep_res = False
# 0: all; >0: the first N train and val images (overfitting checks; the shapes set: its own n)
max_images = 0
# centernet: crop sizes s = lo, lo+0.1, ..., hi of the long side, zoom 1/s ([CM 3.5] as [CN]);
# fcos: U(lo, hi) times the short side
scale_range = (0.6, 1.3)
# centernet: [CN]'s brightness/contrast/saturation var, with its PCA lighting; 0: neither
color_jitter = 0.4
num_workers = 4
# optimisation ([CM 3.5]: Adam, lr 2.5e-4, 130 epochs, x0.1 at 100 and 120)
# per process and micro-batch; CenterNet's DLA-34 COCO run: 128 on 8 GPUs at lr 5e-4
# (experiments/ctdet_coco_dla_1x.sh)
batch_size = 32
# micro-batches per optimizer step (nanoGPT's key): the global batch is batch_size x this x
# processes, with the gradient of one such batch (the loss normalisers too, record_normalizers
# below); 1 GPU x 4 = CenterNet's 4 x 32
gradient_accumulation_steps = 1
epochs = 130
max_iters = 0                     # 0: derived from epochs and the dataset length
learning_rate = 2.5e-4
lr_steps = (100, 120)             # epochs at which lr *= 0.1 ([CM 3.5], as FCOS's solver)
warmup_iters = 0                  # warm-up iterations (not in [CM]; FCOS: 500, SOLVER.WARMUP_ITERS)
# "adam" ([CM 3.5]: no weight decay, warm-up linear from 0) or "sgd" (FCOS's solver, [IS 4]:
# the SGD_* constants below)
optimizer = "adam"
grad_clip = 0.0                   # clip the gradient norm at this value (0: off; [CM] none)
# system
device = "auto"                   # "auto", "cpu", "cuda", "cuda:1", ...
# "auto": GPU bf16 (else fp16); CPU bf16 where native (AMX/AVX512-BF16), else fp32
dtype = "auto"
compile = False                   # torch.compile the model
seed = 1337
threads = 0                       # CPU threads for torch (0: all cores)
# model: every ModelConfig field is a config key (method, backbone, dcn, ...), but num_classes
globals().update({f.name: f.default for f in fields(ModelConfig) if f.name != "num_classes"})
# -----------------------------------------------------------------------------
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configurator.py")).read())
# The recipe's global batch is what its config file gives one process, batch_size x
# gradient_accumulation_steps (every documented launch keeps it: 8 GPUs divide batch_size or the
# micro-batches); a launch that changes it without a --learning_rate of its own is warned about.
_recipe = apply_overrides(defaults_of(os.path.abspath(__file__)),
                          [a for a in sys.argv[1:] if not a.startswith("-")], verbose=False)
_recipe_batch = _recipe["batch_size"] * _recipe["gradient_accumulation_steps"]
_given = {a[2:].split("=", 1)[0] for a in sys.argv[1:] if a.startswith("--")}  # command-line keys
from data import (SHAPES_DEFAULTS, CocoInstances, GroupedBatchSampler,  # noqa: E402
                  aspect_ratio_groups, build_transforms, collate_fn, dataset_paths,
                  shapes_dataset_missing, write_atomic, write_shapes_dataset)
from eval import evaluate, hours_minutes  # noqa: E402
from pictures import save_pictures, teaching_maps  # noqa: E402

# Settings that follow from the keys, saved in the config with them (eval.py and predict.py read
# them from a checkpoint): the method's own transform ("centernet": the square canvas of [CM 3.5];
# "fcos": the short side of [IS 4], the long side at most data.py's 1333), and the network input
# (data.normalize_input): "rgb_imagenet" (RGB, ImageNet statistics), or "bgr_coco" (CenterNet's:
# BGR, COCO statistics), which the weights of init_from set below.
transform = method_transform(method)
input_format = "rgb_imagenet"
def fail(line):
    """A user's error (data, paths, weights, keys, the command line): the one line naming it,
    exit status 2 (a run that fails on its own, a non-finite loss, exits 1). A ValueError or an
    OSError raised anywhere (data.py's, weights.py's refusals) ends the same way
    (weights.one_line_errors, above)."""
    print(f"train.py: error: {line}", file=sys.stderr)
    sys.exit(2)


# The model keys are checked before any work (a value ModelConfig refuses, or a key the method
# does not read: its ValueError, one line naming the key, exit status 2).
check_settings({f.name: 1 if f.name == "num_classes" else globals()[f.name]
                for f in fields(ModelConfig)})
config = config_from_globals(globals())  # the resolved config, saved in checkpoints
# Nothing a user trained is written over: a start that is not a resume (from scratch, or from
# weights) writes a new ckpt.pt into out_dir at its first epoch's end, so an out_dir holding one
# stops the run here, before any work (a rerun after a kill without --init_from=resume would
# lose that run).
ckpt_path = os.path.join(out_dir, "ckpt.pt")
if init_from != "resume" and os.path.exists(ckpt_path) and not overwrite:
    fail(f"{ckpt_path} exists and init_from={init_from!r} would write over it: continue that "
         f"run with --init_from=resume, train into another --out_dir, or start over in this one "
         f"with --overwrite=True")
# -----------------------------------------------------------------------------

# -- processes and device ---------------------------------------------------------------------
ddp = "RANK" in os.environ  # launched by torchrun?
# "auto": a GPU when there is one; dtype "auto": bf16 on a GPU (else fp16), on a CPU bf16 where
# native (AMX / AVX512-BF16), else fp32 (configurator.auto_dtype)
device, dtype = device_and_dtype(device, dtype)
# DDP: a collective waits this long for the other processes, then the waiting ones stop (a dead
# rank on another node ends the run then); above rank 0's work alone, which the others await
# (COCOeval of the whole val set at the end, checkpoint writes)
DIST_TIMEOUT = datetime.timedelta(minutes=20)
rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
world_size = int(os.environ.get("WORLD_SIZE", 1))
if ddp:
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    gpu = {"device_id": torch.device(device)} if device.startswith("cuda") else {}
    dist.init_process_group(backend="nccl" if gpu else "gloo", timeout=DIST_TIMEOUT, **gpu)
master = rank == 0
device_type = "cuda" if device.startswith("cuda") else "cpu"
torch.manual_seed(seed + rank)
if device_type == "cpu":
    # without a GPU, use the cores (split between processes under torchrun)
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // world_size))
else:
    torch.backends.cuda.matmul.allow_tf32 = True  # (torch.backends.cudnn.allow_tf32: by default)
    torch.backends.cudnn.benchmark = True

ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
autocast = nullcontext() if ptdtype == torch.float32 else torch.autocast(device_type, dtype=ptdtype)
# fp16 needs loss scaling (dynamic, from 2^16). fp32 and bf16 do not: their scaler keeps the scale
# at 1 (x 1 and / 1 are exact; never grown) and is there for its device-side check: a step whose
# gradients hold an inf or NaN is not applied (the fused optimizers read the scaler's found_inf on
# the device), so the loop below needs no host sync per step to keep a non-finite step out of the
# weights.
unit_scale = {} if dtype == "float16" else dict(init_scale=1.0, growth_interval=2**31 - 1)
scaler = torch.amp.GradScaler(device_type, **unit_scale)


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
# e.g. a fine-tuning config resumed: nothing to leave out
if init_fresh and init_from in ("scratch", "resume"):
    log(f"init_fresh={init_fresh!r}: no effect with init_from={init_from!r} (nothing is imported)")
if init_from == "resume":
    if not os.path.exists(ckpt_path):
        fail(f"init_from='resume' but there is no checkpoint at {ckpt_path}")
    # NaN / inf, a BatchNorm variance below 0: refused here, not met as a crash later
    # (weights.check_weights); model_args normalised by ModelConfig (tuples vs lists, ints vs
    # floats), to be compared with this run's below
    try:
        checkpoint = load_file(ckpt_path)  # weights_only: a pickle that would run code refused
        check_weights(checkpoint["model"], f"{ckpt_path} ('model' weights)")
        saved_args = asdict(ModelConfig(**checkpoint["model_args"]))
    except Exception as e:  # weights.py's lines name the file and say why
        fail(e if str(e).startswith(ckpt_path) else f"cannot read checkpoint {ckpt_path}: {e!r}")
    updates = [(k, checkpoint["config"][k], "as the checkpoint was trained")
               for k in ("input_format", "fcos_form") if k in checkpoint.get("config", {})]
elif init_from != "scratch":
    if ddp and not master:
        dist.barrier()                # rank 0 first: a download lands once in torch.hub's cache
    try:
        imported = read_weights(init_from)
    except (OSError, ValueError, RuntimeError) as e:
        fail(f"init_from={init_from!r}: {e}")
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
n_images = (max_images, max_images)  # the first n train and val images (0: all)
if shapes_dir:
    # the quick start: the synthetic set is written once (rank 0), everyone else waits. A bigger
    # set written by another config serves too: its first n images are the n-image set.
    n_images = (shapes_n_train, shapes_n_val)
    shapes_size, shapes_seed = SHAPES_DEFAULTS["size"], SHAPES_DEFAULTS["seed"]
    why = shapes_dataset_missing(shapes_dir, *n_images, shapes_size) if master else ""
    if why:
        log(f"writing the synthetic shapes set to {shapes_dir} ({n_images[0]} train / "
            f"{n_images[1]} val, {shapes_size}px, shapes_seed {shapes_seed}; {why})")
        write_shapes_dataset(shapes_dir, *n_images, shapes_size, shapes_seed)
    if ddp:
        dist.barrier()
# the normalisation (data.normalize_input), train and val alike
augment = dict(scale_range=scale_range, color_jitter=color_jitter, input_format=input_format)
# keep_res with the fcos transform: data.py's one-line error
test = dict(input_format=input_format, **({"keep_res": True} if keep_res else {}))
# (data.py's errors, OSError or ValueError, name the file / annotation: one_line_errors)
train_set = CocoInstances(paths["train_img_dir"], paths["train_ann"],
                          build_transforms(transform, True, input_size, **augment),
                          max_images=n_images[0] or None)
val_set = CocoInstances(paths["val_img_dir"], paths["val_ann"],
                        build_transforms(transform, False, test_input_size or input_size, **test),
                        max_images=n_images[1] or None)
# labels are read through the val json's categories
if val_set.label_to_cat_id != train_set.label_to_cat_id:
    fail(f"{paths['val_ann']} lists other categories than {paths['train_ann']} (ids "
         f"{val_set.label_to_cat_id[:20]} against {train_set.label_to_cat_id[:20]}): evaluation "
         f"would score the model's labels as other classes; give both jsons the same categories")
num_classes = config["num_classes"] = train_set.num_classes

# -- model and optimiser ----------------------------------------------------------------------------
model_args = {f.name: config[f.name] for f in fields(ModelConfig)}
if checkpoint is not None:  # resume
    now = asdict(ModelConfig(**model_args))
    diff = {k: (saved_args[k], now[k]) for k in now if saved_args[k] != now[k]}
    if diff:
        fail(f"checkpoint {ckpt_path} was made with another model config; differing keys "
             f"(checkpoint, now): {diff}. Use another out_dir or the same config.")

model = build_model(ModelConfig(**model_args))
if checkpoint is not None:
    model.load_state_dict(checkpoint["model"])
elif imported is not None:
    # published weights: renamed into the model, every tensor accounted for (weights.import_weights);
    # the class channels of the training json's categories (label k = COCO category label_to_cat_id[k])
    try:
        log(import_weights(model, imported, cat_ids=train_set.label_to_cat_id, fresh=init_fresh))
    except ValueError as e:
        fail(f"init_from={init_from!r}: {e}")
    imported = None  # free memory
model.to(device)
if device_type == "cuda":  # NHWC convolutions on GPUs (the images follow in to_device)
    model = model.to(memory_format=torch.channels_last)
n_params = sum(p.numel() for p in model.parameters()) / 1e6
log(f"{method} / {backbone}: {n_params:.2f}M parameters, {num_classes} classes, {len(train_set)} "
    f"train / {len(val_set)} val images, device {device}, dtype {dtype}, {world_size} process(es)")

# The optimizer. Adam, CenterMask's ([CM 3.5]): every parameter in one group, no weight decay.
# SGD, the solver of FCOS's and CenterMask-FCOS's code (maskrcnn-benchmark's solver/build.py and
# config/defaults.py, which fcos_core keeps): momentum 0.9, weight decay 1e-4 ([IS 4]), and every
# parameter named "*bias*" (conv, norm and Scale biases) at BIAS_LR_FACTOR 2 x the learning rate
# without weight decay (WEIGHT_DECAY_BIAS 0); each group carries its "lr_factor", which the
# schedule below multiplies in.
SGD_MOMENTUM, SGD_WEIGHT_DECAY, SGD_BIAS_LR_FACTOR = 0.9, 1e-4, 2.0
named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
params = [p for _, p in named]                              # all of them (gradient clipping)
if optimizer == "adam":
    make_optimizer, groups = torch.optim.Adam, [{"params": params, "lr_factor": 1.0}]
elif optimizer == "sgd":
    make_optimizer = partial(torch.optim.SGD, momentum=SGD_MOMENTUM, weight_decay=SGD_WEIGHT_DECAY)
    groups = [{"params": [p for n, p in named if "bias" not in n], "lr_factor": 1.0},
              {"params": [p for n, p in named if "bias" in n], "lr_factor": SGD_BIAS_LR_FACTOR,
               "weight_decay": 0.0}]
else:
    fail(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
# fused: one kernel over all parameters (~8% of a CPU step), and the scaler's found_inf is read on
# the device (no sync per step); Adam and SGD have it on CUDA and on the CPU (the torch of
# requirements.txt)
opt = make_optimizer(groups, lr=learning_rate, fused=True)
if checkpoint is not None:
    opt.load_state_dict(checkpoint["optimizer"])
    # fp16's dynamic scale; the others restart at 1
    if dtype == "float16":
        scaler.load_state_dict(checkpoint["scaler"])

raw_model = model
if ddp:
    model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None)
# after DDP: dynamo splits the graph at DDP's gradient buckets, so their all-reduce overlaps the
# backward
if compile:
    model = torch.compile(model)

# -- loader and schedule ------------------------------------------------------------------------------
# DataLoader workers. train.py is a script of globals, not an importable module: a worker started
# by spawning or from a fork server (the default start method of Windows and macOS, and of Linux
# from Python 3.14) imports the main script again, and would rerun the whole training in every
# worker. So the workers are forked wherever the platform can fork; where it cannot (Windows), the
# main process loads.
if num_workers > 0 and "fork" not in multiprocessing.get_all_start_methods():
    log(f"num_workers={num_workers}: this platform cannot fork DataLoader workers (a spawned one "
        f"would rerun train.py), so the main process loads the data (num_workers=0)")
    num_workers = 0
workers = dict(num_workers=num_workers, multiprocessing_context="fork" if num_workers > 0 else None)
sampler = (DistributedSampler(train_set, world_size, rank, shuffle=True, seed=seed, drop_last=True)
           if ddp else RandomSampler(train_set, generator=torch.Generator().manual_seed(seed)))
# "fcos" transform: batches of landscape or of other images (FCOS's aspect-ratio grouping;
# centernet's are square)
batches = (GroupedBatchSampler(sampler, aspect_ratio_groups(train_set), batch_size)
           if transform == "fcos" else BatchSampler(sampler, batch_size, drop_last=True))
collate = partial(collate_fn, size_divisibility=raw_model.size_divisibility)
loader = DataLoader(train_set, batch_sampler=batches, collate_fn=collate, **workers,
                    pin_memory=device_type == "cuda", persistent_workers=num_workers > 0)
accum = gradient_accumulation_steps
if accum < 1:  # an int: the configurator checks the type
    fail(f"gradient_accumulation_steps must be an integer >= 1, got {accum!r}")
global_batch = batch_size * accum * world_size
if len(loader) < accum:
    fail(f"batch_size={batch_size} x {accum} micro-batch(es) x {world_size} process(es) is "
         f"larger than the training set ({len(train_set)} images)")
# optimizer steps; an epoch's last len(loader) % accum batches are dropped
iters_per_epoch = len(loader) // accum
max_iters = max_iters or epochs * iters_per_epoch
# The schedule follows the run's length. A config's lr_steps are epochs of its own run (its
# max_iters, else its epochs; the epoch is this set's, so a smaller set or batch moves nothing): a
# run made longer or shorter on the command line (--epochs, --max_iters: README's own-data command,
# on 3 images or 3,000) keeps them at the same fractions of it, the quick start's at 75% and 95%.
# eval_every_epochs, an interval, stays one in epochs, but for a run given in iterations
# (--max_iters), whose epochs may be 1 iteration or 1,000: then it follows the run too. What the
# command line sets itself is taken as it is (_given).
_run = _recipe["max_iters"] or _recipe["epochs"] * iters_per_epoch  # the config's, iterations
_follow = {"lr_steps": "lr_steps" not in _given, "eval_every_epochs": "max_iters" in _given
           and "eval_every_epochs" not in _given} if max_iters != _run else {}


def in_iterations(epochs_of_run, key):
    """Epochs of the config's run (the value of `key`) -> iterations of this one."""
    its = epochs_of_run * iters_per_epoch
    return its * max_iters / _run if _follow.get(key) else its


step_iters = [int(in_iterations(e, "lr_steps")) for e in lr_steps]
eval_every = max(1, round(in_iterations(eval_every_epochs, "eval_every_epochs")))
if any(_follow.values()):
    log(f"this run has {max_iters} iterations, its config's {_run}: "
        f"{' and '.join(k for k, v in _follow.items() if v)} scaled by {max_iters / _run:.4g}")
# The warm-up is in iterations (Adam's first steps, whatever the run's length), at most a fifth of
# the run: under the quick start's 400 (11% of its 3,500), a 3-image run of 40 iterations would
# never reach its learning rate.
WARMUP_MAX_FRACTION = 0.2
if warmup_iters > WARMUP_MAX_FRACTION * max_iters and "warmup_iters" not in _given:
    log(f"warmup_iters={warmup_iters} is over a fifth of this {max_iters}-iteration run: "
        f"{int(WARMUP_MAX_FRACTION * max_iters)} instead")
    warmup_iters = int(WARMUP_MAX_FRACTION * max_iters)
# A resume continues the saved iteration count: on another global batch (another number of
# processes, batch_size or gradient_accumulation_steps) or another epoch length, the epoch, the
# learning-rate steps and the images per step would shift without a word, so it stops here.
if checkpoint is not None and (checkpoint["global_batch"], checkpoint["iters_per_epoch"]) != (
        global_batch, iters_per_epoch):
    fail(f"checkpoint {ckpt_path} was trained with a global batch of {checkpoint['global_batch']} "
         f"images, {checkpoint['iters_per_epoch']} iterations per epoch; now {global_batch} "
         f"(batch_size {batch_size} x {accum} micro-batch(es) x {world_size} process(es)), "
         f"{iters_per_epoch} per epoch: resume with the saved global batch (e.g. "
         f"gradient_accumulation_steps for fewer processes)")

# Warm-up (warmup_iters > 0): from WARMUP_FACTOR x lr. Adam: f = 0, linear, (it + 1) / W x lr.
# SGD: f = 1/3 (SOLVER.WARMUP_FACTOR), held constant in FCOS's configs/fcos/*.yaml (WARMUP_METHOD
# "constant"), linear in Mask R-CNN's solver, which CenterMask-FCOS follows ([CM 4.3]).
WARMUP_FACTOR = 1 / 3 if optimizer == "sgd" else 0.0
WARMUP_CONSTANT = optimizer == "sgd" and method != "centermask_fcos"


def get_lr(it):
    """The warm-up, then x 0.1 at each step ([CM 3.5]: epochs 100 and 120; FCOS's and Mask
    R-CNN's SOLVER.GAMMA 0.1). The base rate: each parameter group multiplies in its lr_factor."""
    if it < warmup_iters:  # linear: f + (1 - f) (it + 1) / W, never 0 at the first step
        f = WARMUP_FACTOR
        return learning_rate * (f if WARMUP_CONSTANT else f + (1 - f) * (it + 1) / warmup_iters)
    return learning_rate * 0.1 ** sum(it >= s for s in step_iters)


def write_out(name, write):
    """Write out_dir/name with `write(tmp_path)`, then rename the temporary file over the old one:
    a run killed mid-write leaves the previous file intact (and a `name.tmp<pid>` that the next
    run removes, see below). A failed write (full disk, read-only folder) stops the run with one
    line naming the file; the previous version of the file is kept."""
    final = os.path.join(out_dir, name)
    try:
        write_atomic(final, write)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        # torch's message for a full disk is cryptic ("unexpected pos ..."): say how full it is
        free = shutil.disk_usage(out_dir).free / 2**20
        fail(f"cannot write {final}: {type(e).__name__}: {e} ({free:.0f} MiB free on that disk). "
             f"The previous {name}, if any, is intact.")


def write_text(text, path):
    with open(path, "w") as f:
        f.write(text)


# metrics.jsonl, the run's record: one JSON object per line, appended by rank 0 and kept across
# resumes. A log line's: {iter, epoch, every loss term, lr, data_time and step_time (seconds per
# iteration: waiting on the loader, and all of it), images_per_s, gpu_mem_gib on a GPU}; an
# evaluation's: {iter, epoch, every AP number and the rest of eval.evaluate's stats}. Each line is
# written whole and flushed: a crash mid-append can cut only the last one, which readers skip and
# the next start drops. `metrics`: its records, read at the start (below), the curves' data.
# LOG_KEYS: the keys of a log line that are no loss term.
METRICS = "metrics.jsonl"
LOG_KEYS = ("iter", "epoch", "lr", "data_time", "step_time", "images_per_s", "gpu_mem_gib")
metrics = []


def append_metrics(record):
    metrics.append(record)
    path = os.path.join(out_dir, METRICS)
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:  # README: a full disk stops the run with one line naming the file
        fail(f"cannot append to {path}: {type(e).__name__}: {e}")


def draw_curves():
    """loss.png (every loss term of the log lines, log scale) and ap.png (box and mask AP of the
    evaluations), drawn from metrics.jsonl's records (`metrics`): the whole run, its resumes
    included."""
    from matplotlib.figure import Figure  # no pyplot: no window, no backend to choose
    logs = [r for r in metrics if "lr" in r]
    evals = [r for r in metrics if "bbox_AP" in r]
    terms = [k for k in logs[-1] if k not in LOG_KEYS] if logs else []
    for name, rows, keys, ylabel in (("loss.png", logs, terms, "loss"),
                                     ("ap.png", evals, ["bbox_AP", "segm_AP"], "AP")):
        if not rows:
            continue
        fig = Figure(figsize=(7, 4), layout="tight")
        ax = fig.subplots()
        for k in (k for k in keys if k in rows[-1]):
            ax.plot([r["iter"] for r in rows], [r.get(k, float("nan")) for r in rows], label=k,
                    lw=2 if k == "loss" else 1, marker="o" if ylabel == "AP" else None)
        ax.set(xlabel="iteration", ylabel=ylabel, yscale="log" if ylabel == "loss" else "linear")
        ax.legend()
        ax.grid(alpha=0.3)
        write_out(name, partial(fig.savefig, format="png", dpi=100))


def save_checkpoint(it, best_ap, name="ckpt.pt"):
    """Everything a resume needs, written atomically (write_out): ckpt.pt, the last one (every
    epoch's end, every evaluation, a stop), or best.pt (the evaluation of the best AP so far).
    What a label means, for predict.py on a checkpoint alone: label k is class_names[k], COCO
    category id label_to_cat_id[k] of the training json."""
    ckpt = {"model": raw_model.state_dict(), "optimizer": opt.state_dict(),
            "scaler": scaler.state_dict(), "iter": it, "best_ap": best_ap,
            "model_args": model_args, "config": config,
            # what a resume must match
            "global_batch": global_batch, "iters_per_epoch": iters_per_epoch,
            "class_names": list(train_set.class_names),
            "label_to_cat_id": list(train_set.label_to_cat_id)}
    write_out(name, partial(torch.save, ckpt))


def run_eval(n):
    """COCO AP on the val set (all ranks take part; rank 0 gets the numbers). It runs on a
    fork of the CPU RNG (its DataLoader draws a seed from it), so evaluating never changes the
    training's augmentations: a run resumed after an evaluation stays on the same stream."""
    subset = val_set if n >= len(val_set) else torch.utils.data.Subset(val_set, range(n))
    eval_sampler = DistributedSampler(subset, world_size, rank, shuffle=False) if ddp else None
    eval_loader = DataLoader(subset, batch_size=max(1, batch_size // 2), sampler=eval_sampler,
                             collate_fn=collate, **workers)
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
        fail(f"cannot create out_dir {out_dir}: {e}")
    write_out("config.json", partial(write_text, json.dumps(config, indent=1, default=str)))
    # A run killed while writing leaves its temporary file (e.g. ckpt.pt.tmp<pid>) behind. It is
    # never loaded (a checkpoint exists only once renamed), so it is only litter: remove it.
    for leftover in sorted(os.listdir(out_dir)):
        _, dot_tmp, pid = leftover.rpartition(".tmp")
        if dot_tmp and pid.isdigit():
            with suppress(OSError):
                os.remove(os.path.join(out_dir, leftover))
                log(f"removed {os.path.join(out_dir, leftover)}, half-written by a killed run")

# -- the loop ---------------------------------------------------------------------------------------
# val images of the periodic evaluations (the COCO configs' choice; the last one reads all)
EVAL_IMAGES = 500
it, best_ap = 0, -1.0
if checkpoint is not None:
    it, best_ap = checkpoint["iter"], checkpoint["best_ap"]
    log(f"resuming from {ckpt_path} at iteration {it} of {max_iters} (epoch "
        f"{it / iters_per_epoch:g}), best AP so far {best_ap:.4f}")
checkpoint = None  # free memory
if master:
    # metrics.jsonl: a resume keeps the records up to its checkpoint's iteration (a run killed
    # after it had logged further logs those iterations again), any other start none
    with suppress(FileNotFoundError), open(os.path.join(out_dir, METRICS)) as f:
        for line in f:
            with suppress(ValueError):  # a line cut by a crash mid-append
                metrics.append(json.loads(line))
    metrics = [r for r in metrics if r["iter"] <= it]
    write_out(METRICS, partial(write_text, "".join(json.dumps(r) + "\n" for r in metrics)))
micro = f" x {accum} micro-batches" if accum > 1 else ""
log(f"training for {max_iters} iterations ({iters_per_epoch} per epoch, batch {batch_size} x "
    f"{world_size}{micro}); lr steps at iterations {step_iters}\nglobal batch {global_batch} "
    f"({world_size} process(es) x batch_size {batch_size} x {accum} micro-batch(es)), learning "
    f"rate {learning_rate:g}")
if global_batch != _recipe_batch and "learning_rate" not in _given:
    log(f"warning: the config's recipe steps on {_recipe_batch} images at learning rate "
        f"{learning_rate:g}; this launch steps on {global_batch}, another recipe: give it its own "
        f"--learning_rate, or keep processes x batch_size x gradient_accumulation_steps = "
        f"{_recipe_batch}")


class Tally:
    """The loss terms of the steps since the last log line, kept on the device: a step adds its terms
    without reading anything back to the host (nanoGPT reads its loss only at log_interval). A step
    whose loss is not finite never reaches the weights (the scaler skips it, see `scaler` above);
    `check`, at every log line and before every evaluation or checkpoint, stops the run there,
    naming the first such step's terms."""

    def __init__(self):
        self.names, self.iters, self.values = None, [], []

    def add(self, terms, it):  # terms: {name: 0-d tensor}, the step's mean over micro-batches
        self.names = self.names or list(terms)
        # the log, the curve and the checks read the first step's keys
        if set(terms) != set(self.names):
            raise RuntimeError(f"the loss keys changed after the first step: {sorted(self.names)}"
                               f" -> {sorted(terms)}; a method returns the same keys every time")
        self.iters.append(it)
        self.values.append(torch.stack([terms[k].detach().float() for k in self.names]))  # (T,)

    def check(self):
        """Stop the run if a step since the last read had a non-finite loss, or if a DeformConv met
        NaN / inf offsets on a GPU (model.non_finite_deform_count; the CPU stops at once), every
        rank together. The host sync: one per log line / evaluation."""
        steps = torch.stack(self.values) if self.values else torch.zeros(0, 1, device=device)
        finite = torch.isfinite(steps).all(1)                                         # (steps,)
        local = torch.stack([(~finite).sum(), non_finite_deform_count(device)])       # (2,)
        bad = local.clone()
        if ddp:
            dist.all_reduce(bad)
        bad_losses, bad_deform = bad.tolist()
        if bad_deform:
            # the rank that met it names it; the others stop with status 1
            sys.exit(f"train.py: by iteration {it} (rank {rank}): {NON_FINITE_DEFORM}" if local[1]
                     else 1)
        if bad_losses and local[0]:  # this rank saw it
            first = finite.tolist().index(False)
            terms = zip(self.names, self.values[first].tolist())
            print(f"train.py: non-finite loss at iteration {self.iters[first]} (rank {rank}): "
                  f"{', '.join(f'{k}={v:.4g}' for k, v in terms)}. Stopping; the last good "
                  f"checkpoint in {out_dir} is kept. Try a lower learning_rate, warmup_iters or "
                  f"grad_clip.", flush=True)
        if bad_losses:
            sys.exit(1)

    def read(self):
        """Mean of each term over the steps since the last read (all finite: `check` came first),
        then reset."""
        mean = dict(zip(self.names, torch.stack(self.values).mean(0).tolist()))
        self.iters, self.values = [], []
        return mean


def to_device(images, targets):
    images = images.to(device, non_blocking=True)
    if device_type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    return images, [{k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v)
                     for k, v in t.items()} for t in targets]


# -- gradient accumulation with the whole step's loss normalisers ------------------------------
# gradient_accumulation_steps = k: k micro-batches of b images give the gradient of one batch of
# k * b images, as k processes with b images each do under DDP. Not part of any method: model.py's
# losses only call `model.reduce_mean`, whose contract (every count normaliser through it, in the
# same order in every forward) is written where it is defined.
#
# Every loss is sum_i l_i / N with N a count over the batch (positives, objects, pixels,
# `model.reduce_mean`). The plain form: one micro-batch's loss with its own count n_m, divided by
# k, gives sum_m sum_i grad l_i / (k n_m), not sum grad l_i / sum_m n_m. The counts are computed
# inside each method's losses, from the targets and the feature-map sizes, and for MaskFCOS from
# its predictions too (its RoIs are the proposals that match a box), so they cannot be computed
# from the targets alone before the step:
#   1. `record_normalizers(model, micro_batches)`: a forward of every micro-batch without
#      gradients stores each reduce_mean call's value n_{m,j} (the call sequence is the same in
#      every forward: DDP already needs that); BatchNorm statistics are put back as they were.
#   2. `replaying(means)` around each micro-batch's real forward: reduce_mean's j-th call returns
#      N_j = mean_m n_{m,j}; the loss is divided by k before backward. Then
#      sum_m sum_i grad l_i / (k N_j) = sum grad l_i / sum_m n_{m,j}: the big batch's gradient.
# The record pass costs one forward without gradients per micro-batch (about a third of a
# training step); k = 1 takes none of this path. The clamps on normalisers (max(N, 1)) act on the
# per-micro-batch mean, as FCOS's act on the per-process mean (same as DDP with k processes).
# A forward that calls reduce_mean a different number of times than the recorded ones stops with
# a one-line RuntimeError (the replay would hand a count to the wrong loss).
SAME_CALLS = "every loss must call model.reduce_mean the same number of times in every forward"


@torch.no_grad()
def record_normalizers(net, micro_batches, autocast=nullcontext()):
    """The normalisers n_{m,j} of the micro-batches (images, targets), (micro-batches, calls),
    each already averaged over the processes; net (the model) in training mode."""
    recorded, buffers = [], [b.clone() for b in net.buffers()]      # BatchNorm running statistics

    def record(x):
        x = model_py.mean_over_processes(x)
        recorded[-1].append(x.detach().float())
        return x
    model_py.normalizer_hook = record
    try:
        for images, targets in micro_batches:
            recorded.append([])
            with autocast:
                net(images, targets)
    finally:
        model_py.normalizer_hook = None
        for b, saved in zip(net.buffers(), buffers):
            b.copy_(saved)
    if len({len(r) for r in recorded}) != 1:
        raise RuntimeError(f"micro-batches made {[len(r) for r in recorded]} calls: {SAME_CALLS}")
    return torch.stack([torch.stack(r) for r in recorded])


@contextmanager
def replaying(means):
    """reduce_mean's j-th call in the forward inside returns means[j], the whole step's N_j."""
    calls = []

    def replay(x):
        if len(calls) == len(means):
            raise RuntimeError(f"a forward made more than {len(means)} calls: {SAME_CALLS}")
        calls.append(x)
        return means[len(calls) - 1].to(x.device)
    model_py.normalizer_hook = replay
    try:
        yield
    finally:
        model_py.normalizer_hook = None
    if len(calls) != len(means):  # reached only when the forward raised nothing
        raise RuntimeError(f"a forward made {len(calls)} calls, not {len(means)}: {SAME_CALLS}")


def train_step(micro_batches):
    """One optimizer step over `accum` micro-batches: the gradient of their union (the loss of
    each divided by accum, the normalisers of the whole step from a recording pass when accum > 1,
    see above); under DDP the gradients are all-reduced once, at the last one.
    Returns the step's loss terms (means over micro-batches), on the device."""
    if accum > 1:
        means = record_normalizers(raw_model, micro_batches, autocast).mean(0)     # (calls,)
    terms = {}
    for m, (images, targets) in enumerate(micro_batches):
        # under DDP: the gradients all-reduced at the last micro-batch only
        with (model.no_sync() if ddp and m < len(micro_batches) - 1 else nullcontext()), \
                (replaying(means) if accum > 1 else nullcontext()):
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


def eta(it, dt, eval_s_per_image):
    """Time to the end of the run, as h:mm: the iterations left at dt seconds each, and the
    evaluations to come (at the multiples of eval_every in [it, max_iters) on EVAL_IMAGES val
    images, the last one on all of them) at the last evaluation's seconds per image. Before the
    first evaluation none is timed: the ETA leaves them out and says how many there are."""
    periodic = (max_iters - 1) // eval_every - (it - 1) // eval_every
    images = periodic * min(EVAL_IMAGES, len(val_set)) + len(val_set)
    untimed = f" + {periodic + 1} evaluation(s) not timed yet" if not eval_s_per_image else ""
    return hours_minutes((max_iters - it) * dt + images * eval_s_per_image) + untimed


# -- stopping -------------------------------------------------------------------------------------
# SIGTERM (scancel, a preempted or spot machine, torchrun passing its own on), SIGUSR1 (README's
# SLURM script, before the time limit) and Ctrl-C (SIGINT) do not stop the run where they land:
# they are noted in `signals`, which the loop reads at each iteration boundary, where it writes
# ckpt.pt and exits with one line naming it, with status 128 + the signal's number (130 Ctrl-C,
# 138 SIGUSR1, 143 SIGTERM, as a shell reports a run a signal ended: the run did not finish; the
# same command with --init_from=resume goes on from the checkpoint). A signal during an evaluation
# stops the run after it. Under DDP every rank must stop at the same iteration: the signal is
# all-reduced (max) at each boundary, over gloo on the CPU (no wait on the GPU's work). More
# signals change nothing (a torchrun worker may get one from the terminal and one from torchrun);
# SIGKILL stops at once.
signals = []
for name in ("SIGTERM", "SIGUSR1", "SIGINT"):
    if hasattr(signal, name):  # Windows has no SIGUSR1
        signal.signal(getattr(signal, name), lambda signum, frame: signals.append(signum))
cpu_group = dist.new_group(backend="gloo") if ddp and device_type == "cuda" else None


def agreed_signal():
    """The signal that asks the run to stop (0: none), the same on every rank."""
    signum = max(signals, default=0)
    if ddp:
        flag = torch.tensor([signum])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=cpu_group)
        signum = int(flag)
    return signum


model.train()
tally = Tally()
t_start, t_log, epoch = time.time(), time.time(), it // iters_per_epoch
waited, t_fetch = 0.0, time.time()  # seconds waiting on the loader since the last log line
eval_s_per_image = 0.0  # the last evaluation's time (its checkpoint and curves included)
stop = 0  # the signal that stopped the run
while it < max_iters and not stop:
    if ddp:
        sampler.set_epoch(epoch)
    else:
        sampler.generator.manual_seed(seed + epoch)  # same order after a resume
    # The random scales/flips/crops/jitter (and the workers' seeds) come from torch's global RNG:
    # reseed it from (seed, epoch, rank) alone, so that a resumed run re-draws exactly the
    # augmentations of the uninterrupted one (bitwise on the CPU with num_workers=0; persistent
    # workers keep their own RNG across epochs, so with workers only the data order is exact).
    torch.manual_seed(seed + 1_000_003 * (epoch + 1) + rank)
    micro_batches = []
    # after a resume: the batches already seen this epoch skipped
    for images, targets in islice(loader, (it - epoch * iters_per_epoch) * accum, None):
        micro_batches.append(to_device(images, targets))
        if len(micro_batches) < accum:
            continue
        waited += time.time() - t_fetch  # since the previous step ended: the step's data
        lr = get_lr(it)
        for g in opt.param_groups:
            g["lr"] = lr * g["lr_factor"]
        with stop_on_non_finite_deform(f"iteration {it + 1}"):
            tally.add(train_step(micro_batches), it)
        micro_batches = []
        it += 1

        if it % log_interval == 0 or it == max_iters:
            tally.check()
            steps = len(tally.values)
            dt = (time.time() - t_log) / steps
            mean = tally.read()
            mem = torch.cuda.max_memory_allocated() / 2**30 if device_type == "cuda" else 0
            record = {"iter": it, "epoch": round(it / iters_per_epoch, 3), **mean, "lr": lr,
                      "data_time": round(waited / steps, 4), "step_time": round(dt, 4),
                      "images_per_s": round(global_batch / dt, 1)}
            if master:
                append_metrics(record | ({"gpu_mem_gib": round(mem, 2)} if mem else {}))
            mem = f", mem {mem:.1f}GiB" if mem else ""
            scale = f", loss scale {scaler.get_scale():g}" if dtype == "float16" else ""
            losses = " ".join(f"{k} {v:.4f}" for k, v in mean.items())
            log(f"iter {it}/{max_iters} (epoch {it / iters_per_epoch:.1f}): {losses} | "
                f"lr {lr:.2e} | {dt * 1000:.0f}ms/iter (data {record['data_time'] * 1000:.0f}ms), "
                f"{global_batch / dt:.1f} img/s | ETA {eta(it, dt, eval_s_per_image)}{mem}{scale}")
            t_log, waited = time.time(), 0.0

        evaluating = it % eval_every == 0 or it == max_iters
        if evaluating:
            tally.check()  # nothing non-finite is evaluated or saved
            t_eval = time.time()
            with stop_on_non_finite_deform(f"evaluation at iteration {it}"):
                stats = run_eval(EVAL_IMAGES if it < max_iters else len(val_set))
            if master:
                ap = stats.get("segm_AP", stats.get("bbox_AP", -1.0))
                aps = " ".join(f"{k} {v:.4f}" for k, v in stats.items() if "AP" in k)
                log(f"eval @ iter {it}: {aps} | {stats.get('images_per_s', 0):.1f} img/s")
                best_ap = max(best_ap, ap)
                save_checkpoint(it, best_ap)
                if ap >= best_ap:
                    save_checkpoint(it, best_ap, "best.pt")
                text = json.dumps({"iter": it, **stats}, indent=1, default=str)
                write_out("eval.json", partial(write_text, text))
                append_metrics({"iter": it, "epoch": round(it / iters_per_epoch, 3), **stats})
                draw_curves()
            t_log += time.time() - t_eval  # evaluation time is not training time
            eval_s_per_image = (time.time() - t_eval) / max(1, stats["num_images"])
        # the last checkpoint, at every epoch's end and at a stop (unless an evaluation wrote it)
        stop = agreed_signal() if it < max_iters else 0
        epoch_done = it >= (epoch + 1) * iters_per_epoch
        if (epoch_done or stop) and not evaluating:
            tally.check()
            if master:
                save_checkpoint(it, best_ap)
        t_fetch = time.time()
        if it >= max_iters or epoch_done or stop:
            break
    epoch += 1

if master:
    # the loss and AP curves of the whole run next to the checkpoint
    draw_curves()
    log(f"wrote {os.path.join(out_dir, 'loss.png')}, {os.path.join(out_dir, 'ap.png')}")
if stop:
    log(f"train.py: {signal.Signals(stop).name} at iteration {it} of {max_iters}: wrote "
        f"{ckpt_path}; the same command with --init_from=resume goes on from it")
else:
    log(f"done: {max_iters} iterations in {(time.time() - t_start) / 60:.1f} min, "
        f"best AP {best_ap:.4f}")
    if master:  # predictions and teaching maps of the first 8 val images
        with stop_on_non_finite_deform("drawing the pictures"):
            drawn = save_pictures(raw_model, val_set, os.path.join(out_dir, "pictures"), n=8,
                                  device=device, maps_fn=teaching_maps(raw_model))
        log(f"wrote {len(drawn)} pictures to {os.path.join(out_dir, 'pictures')}")
if ddp:
    # every rank waits until rank 0 has drawn its pictures: a gloo group torn down on one rank
    # while a peer is still busy can abort that process ("terminate called ..." after training)
    dist.barrier()
    dist.destroy_process_group()
if stop:
    sys.exit(128 + stop)
