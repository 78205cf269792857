"""
Speed and memory of one config's model, nanoGPT's bench.py style: config globals ->
configurator -> one fixed batch -> timed train steps, inference and post-processing.

    python bench.py config/centermask_dla34.py                                  # GPU, 2 x 512px
    python bench.py config/centermask_dla34.py --device=cpu --batch_size=2 --input_size=512
    python bench.py config/centermask_dla34.py --batch_size=16 --peers=True     # + torchvision peers
    python bench.py config/centermask_dla34.py --real_data=data/coco            # first images of val_ann
    python bench.py config/centermask_dla34.py --loader=True --real_data=data/coco128  # + DataLoader img/s
    python bench.py --coloring=True --real_data=data/coco128 --val_ann=annotations/instances_train2017.json

Measured, each as the median of `steps` timed runs after `burn_in` untimed ones
(torch.cuda.synchronize() around every timed run on GPU):
  * train ms/img: forward with targets (target building and losses) + backward + Adam step
  * inference ms/img: model.eval() forward with decoding and mask assembly, no_grad + autocast
  * post-processing ms/img: `model.decode(model.heads(images), hw)` timed alone (heads
    computed once beforehand), then eval.py's `to_original` of its output (boxes and masks to an
    original image 1.25x the input, COCO's 640 -> 512), and their share of (inference +
    to_original) in %: CenterMask's peak decoding and
    mask assembly; the FCOS family's candidate selection, NMS and mask branch (the mask
    heads of MaskFCOS / CenterMask-FCOS / FCOSIS run on the detections, so they count here)
  * peak memory: GPU torch.cuda.max_memory_allocated (train and inference phases); CPU the
    peak resident set size of the whole process (resource.getrusage), Python and torch included
  * FLOPs per image of one forward and one train step (forward + backward) from
    torch.utils.flop_counter.FlopCounterMode (ops it does not know, e.g. torchvision's
    deform_conv2d, count as 0), the achieved FLOP/s, and on GPU the MFU against a small table
    of peak dense FLOP/s keyed by the device name ("n/a (unknown peak)" elsewhere)
  * with --peers=True: torchvision's fcos_resnet50_fpn and maskrcnn_resnet50_fpn (random
    weights, 91 classes) on the same images and boxes/labels/masks, train step and inference,
    and the ratios ours / theirs of the ms per image (< 1: ours is faster). The three models
    are timed in alternation (ours, fcos, maskrcnn, ours, ...), so a drifting machine load
    hits all of them alike

The images are synthetic by default (random pixels, a few random boxes/masks per image,
deterministic from `seed`), so the numbers measure compute, not accuracy. Timings are reported,
never asserted. Output: a table, then as the very LAST line one JSON object with all numbers
(null where not measured), for `tail -n 1`.
"""

import json
import os
import platform
import resource
import statistics
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import fields

import torch
from torch.utils.flop_counter import FlopCounterMode

from configurator import defaults_of
from model import ModelConfig, build_model, method_transform
from configurator import auto_dtype, check_settings

# -----------------------------------------------------------------------------
# train.py's config keys with train.py's defaults (model.ModelConfig's fields among them), so that
# the same config files run here. bench.py reads the model keys, batch_size, input_size, device,
# dtype, threads, compile, seed, learning_rate, gradient_accumulation_steps and, with real_data,
# val_img_dir / val_ann / the train split
# (loader=True); the others are accepted and ignored (the timed train step always uses Adam, [CM 3.5]).
globals().update(defaults_of(os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")))
# bench settings, and the train.py keys whose default differs here
batch_size = 2                    # images per timed step (train.py: 32)
seed = 0                          # of the synthetic batch (random pixels, boxes and masks)
num_classes = 80                  # COCO's (train.py: the training json's; real_data must have as many)
burn_in = 2                       # untimed runs before each measurement
steps = 5                         # timed runs; the median is reported
peers = False                     # also time torchvision's fcos_resnet50_fpn and maskrcnn_resnet50_fpn
real_data = ""                    # COCO-format folder (like train.py's data_root): use its first batch_size val images
loader = False                    # also time the training DataLoader on real_data's train split (images/s)
loader_batches = 20               # batches timed (after one untimed)
coloring = False                  # instead of a model: FCOSIS's Largest-First colouring of every image's
                                  # ground-truth boxes in real_data's val_ann (colours vs instances, time)
# -----------------------------------------------------------------------------
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configurator.py")).read())
transform = method_transform(method)   # as train.py
config = config_from_globals(globals())
# -----------------------------------------------------------------------------

# Peak dense tensor-core FLOP/s by device-name substring, first match wins (more specific names
# first). Columns: bf16/fp16, and fp32 run as TF32 (this script enables TF32, as train.py).
PEAK_FLOPS = [
    ("H100 PCIe", {"half": 756e12, "float32": 378e12}),
    ("H100", {"half": 989e12, "float32": 494e12}),      # SXM
    ("H200", {"half": 989e12, "float32": 494e12}),
    ("GH200", {"half": 989e12, "float32": 494e12}),
    ("A100", {"half": 312e12, "float32": 156e12}),
    ("L40S", {"half": 362e12, "float32": 183e12}),
    ("L4", {"half": 121e12, "float32": 60e12}),
    ("A10", {"half": 125e12, "float32": 62.5e12}),
    ("V100", {"half": 125e12, "float32": 15.7e12}),    # fp16 tensor cores; no bf16, no TF32
    ("T4", {"half": 65e12, "float32": 8.1e12}),
]


def peak_flops(device_name, dtype):
    for key, peaks in PEAK_FLOPS:
        if key in device_name:
            return peaks["float32" if dtype == "float32" else "half"]
    return None


def sync():
    if device_type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn):
    """Median wall time of `steps` calls of fn, after `burn_in` untimed calls."""
    for _ in range(burn_in):
        fn()
    times = []
    for _ in range(steps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def count_flops(fn):
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def synthetic_batch(B, S, num_classes, gen, n_objects=3):
    """Random images (B, 3, S, S) and per image `n_objects` boxes (xyxy, 1/8 to 1/2 of the side),
    labels in 0..C-1 and elliptic uint8 masks inside the boxes (N, S, S): the targets that
    `data.collate_fn` hands the model, so the train step builds real targets."""
    images = torch.randn(B, 3, S, S, generator=gen)
    yy, xx = torch.meshgrid(torch.arange(S) + 0.5, torch.arange(S) + 0.5, indexing="ij")  # (S, S)
    targets = []
    for i in range(B):
        wh = (torch.rand(n_objects, 2, generator=gen) * 3 + 1) * S / 8                  # (N, 2)
        x0y0 = torch.rand(n_objects, 2, generator=gen) * (S - wh)                       # (N, 2)
        boxes = torch.cat([x0y0, x0y0 + wh], 1)                                          # (N, 4)
        c, r = x0y0 + wh / 2, wh / 2                                                     # centres, radii
        inside = ((xx - c[:, 0, None, None]) / r[:, 0, None, None]) ** 2 + \
                 ((yy - c[:, 1, None, None]) / r[:, 1, None, None]) ** 2 <= 1            # (N, S, S)
        targets.append({"boxes": boxes, "labels": torch.randint(0, num_classes, (n_objects,), generator=gen),
                        "masks": inside.to(torch.uint8), "image_id": i,
                        "orig_size": torch.tensor([S, S]), "size": torch.tensor([S, S]), "scale": 1.0})
    return images, targets


def real_batch(B, size_divisibility):
    """The first B images of real_data's val split, through the test transforms and collate."""
    from data import CocoInstances, build_transforms, collate_fn
    p = lambda rel: rel if os.path.isabs(rel) else os.path.join(real_data, rel)  # noqa: E731
    try:
        ds = CocoInstances(p(val_img_dir), p(val_ann), max_images=B,
                           transforms=build_transforms(transform, False, input_size))
        if ds.num_classes != num_classes:
            sys.exit(f"bench.py: {p(val_ann)} has {ds.num_classes} categories but num_classes={num_classes}")
        if len(ds) < B:
            sys.exit(f"bench.py: real_data={real_data!r} has {len(ds)} images in {p(val_ann)}, batch_size={B}")
        return collate_fn([ds[i] for i in range(B)], size_divisibility=size_divisibility)
    except (OSError, ValueError, RuntimeError) as e:
        sys.exit(f"bench.py: {e}")


def model_steps(model, images, targets, scaler):
    """The two timed closures of a model: a train step (forward with targets, backward, Adam) and
    an inference forward. Works for ours (losses dict with "loss") and torchvision's detection
    models (a dict of loss terms)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=learning_rate, fused=True)  # fused: CUDA, and CPU since torch 2.4

    def train_step():
        with amp:
            losses = model(images, targets)
        loss = losses["loss"] if "loss" in losses else sum(losses.values())
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    def infer():
        with torch.no_grad(), amp:
            return model(images)

    return train_step, infer


FIRST_CALL_S = {}  # phase -> seconds of our model's first call (time_interleaved)


def time_interleaved(models, mode):
    """Median seconds of `mode` ("train" or "infer") for several models, timed in alternation
    (round r times model 1, 2, 3, ... then round r + 1): on a machine whose load drifts, every
    model sees the same drift, so their ratios hold (timing one model after the other would
    compare different moments). models: list of (model, train_step, infer). Also the GPU peak
    memory (MiB) of each model in that phase, from its burn-in alone (None on CPU), and the
    seconds of its first call (with compile=True: the compilation of that phase's graphs)."""
    peaks, first_call = [], []
    for model, train_step, infer in models:
        model.train(mode == "train")
        if device_type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for i in range(burn_in):
            t0 = time.perf_counter()
            (train_step if mode == "train" else infer)()
            if i == 0:
                sync()
                first_call.append(time.perf_counter() - t0)
        sync()
        peaks.append(torch.cuda.max_memory_allocated(device) / 2**20 if device_type == "cuda" else None)
    FIRST_CALL_S[mode] = first_call[0] if first_call else None
    times = [[] for _ in models]
    for _ in range(steps):
        for i, (model, train_step, infer) in enumerate(models):
            model.train(mode == "train")
            sync()
            t0 = time.perf_counter()
            (train_step if mode == "train" else infer)()
            sync()
            times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times], peaks


# -- device, dtype ------------------------------------------------------------------------------
if device == "auto":
    device = "cuda" if torch.cuda.is_available() else "cpu"
if device.startswith("cuda") and not torch.cuda.is_available():
    sys.exit(f"bench.py: device={device!r} was asked for but no CUDA GPU is visible; use --device=cpu")
device_type = "cuda" if device.startswith("cuda") else "cpu"
if steps < 1 or burn_in < 0 or batch_size < 1:
    sys.exit(f"bench.py: need steps >= 1, burn_in >= 0, batch_size >= 1 (got {steps}, {burn_in}, {batch_size})")
torch.manual_seed(seed)
if device_type == "cpu":
    torch.set_num_threads(threads or os.cpu_count() or 1)
else:
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
if dtype == "auto":
    dtype = auto_dtype(device_type)
if dtype not in ("float32", "bfloat16", "float16"):
    sys.exit(f"bench.py: dtype must be 'auto', 'float32', 'bfloat16' or 'float16', got {dtype!r}")
ptdtype = getattr(torch, dtype)
amp = nullcontext() if ptdtype == torch.float32 else torch.autocast(device_type, dtype=ptdtype)
new_scaler = lambda: torch.amp.GradScaler(device_type, enabled=(dtype == "float16"))  # noqa: E731
device_name = torch.cuda.get_device_name(device) if device_type == "cuda" else (platform.processor() or platform.machine())

# -- FCOSIS's colouring on real boxes (no model) ---------------------------------------------------
if coloring:
    from pycocotools.coco import COCO
    from model import largest_first_coloring
    if not real_data:
        sys.exit("bench.py: coloring=True needs --real_data=DIR (a COCO folder; val_ann relative to it)")
    ann_file = val_ann if os.path.isabs(val_ann) else os.path.join(real_data, val_ann)
    if not os.path.isfile(ann_file):
        sys.exit(f"bench.py: coloring=True: annotation file {ann_file} not found")
    import contextlib, io
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(ann_file)
    n_inst, n_col, times = [], [], []
    for img_id in sorted(coco.getImgIds()):
        anns = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=img_id)) if not a.get("iscrowd", 0)]
        xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1).to(device)
        largest_first_coloring(boxes)                        # warm-up of this size
        t0 = time.perf_counter()
        colors = largest_first_coloring(boxes)
        sync()
        times.append(time.perf_counter() - t0)
        n_inst.append(len(anns))
        n_col.append(int(colors.max()) + 1 if len(colors) else 0)
    res = {"images": len(n_inst), "instances_per_image": statistics.mean(n_inst),
           "colours_per_image": statistics.mean(n_col), "max_instances": max(n_inst), "max_colours": max(n_col),
           "passes_saved": 1 - sum(n_col) / max(1, sum(n_inst)),
           "coloring_ms_per_image_mean": 1e3 * statistics.mean(times), "coloring_ms_per_image_max": 1e3 * max(times),
           "device": device}
    print(f"{ann_file}: {res['images']} images, {res['instances_per_image']:.2f} instances / image (max "
          f"{res['max_instances']}), {res['colours_per_image']:.2f} colours = segmentation passes / image (max "
          f"{res['max_colours']}): {100 * res['passes_saved']:.0f}% of the per-instance passes saved; colouring "
          f"{res['coloring_ms_per_image_mean']:.2f} ms / image (max {res['coloring_ms_per_image_max']:.2f}) on {device}")
    print(json.dumps(res))
    sys.exit(0)

# -- model and batch ------------------------------------------------------------------------------
model_args = {f.name: config[f.name] for f in fields(ModelConfig)}
try:
    raw_model = build_model(check_settings(model_args)).to(device)   # train.py's checks of the model keys
except ValueError as e:
    sys.exit(f"bench.py: {e}")
d = raw_model.size_divisibility
if real_data:
    images, targets = real_batch(batch_size, d)
    source = f"{real_data} (first {batch_size} images of {val_ann}, test transforms)"
else:
    S = (input_size + d - 1) // d * d
    images, targets = synthetic_batch(batch_size, S, model_args["num_classes"], torch.Generator().manual_seed(seed))
    source = f"synthetic, seed {seed}" + (f" (input_size {input_size} rounded up to {S}, a multiple of {d})" if S != input_size else "")
images = images.to(device)
targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
if device_type == "cuda":
    raw_model = raw_model.to(memory_format=torch.channels_last)
    images = images.contiguous(memory_format=torch.channels_last)
model = torch.compile(raw_model) if compile else raw_model
B, H, W = images.shape[0], images.shape[-2], images.shape[-1]
n_params = sum(p.numel() for p in raw_model.parameters())
print(f"{model_args['method']} / {model_args['backbone']}: {n_params / 1e6:.2f}M parameters | batch {B} x 3 x {H} x {W} "
      f"({source}) | device {device} ({device_name}) | dtype {dtype} | burn-in {burn_in}, median of {steps}", flush=True)

# -- ours (and, with peers=True, torchvision's models in alternation with ours) -------------------
timed = [(model, *model_steps(model, images, targets, new_scaler()))]
if peers:
    from torchvision.models.detection import fcos_resnet50_fpn, maskrcnn_resnet50_fpn
    peer_images = list(images.contiguous())  # torchvision takes a list of (3, H, W)
    # torchvision's labels: 1..90 (0 is background for Mask R-CNN); masks are used by Mask R-CNN only
    peer_targets = [{"boxes": t["boxes"], "labels": t["labels"] % 90 + 1, "masks": t["masks"]} for t in targets]
    for builder in (fcos_resnet50_fpn, maskrcnn_resnet50_fpn):
        # min_size = max_size = the input side: GeneralizedRCNNTransform keeps the pixels as they are
        # (its default would resize to 800) so all models see the same pixels
        peer = builder(weights=None, weights_backbone=None, num_classes=91, min_size=max(H, W),
                       max_size=max(H, W)).to(device)
        if device_type == "cuda":
            peer = peer.to(memory_format=torch.channels_last)
        timed.append((peer, *model_steps(peer, peer_images, peer_targets, new_scaler())))
train_times, train_peaks = time_interleaved(timed, "train")
infer_times, infer_peaks = time_interleaved(timed, "infer")
t_train, t_infer, peak_train, peak_infer = train_times[0], infer_times[0], train_peaks[0], infer_peaks[0]
# host syncs per training step (CUDA): the host waiting on the device, counted by torch's sync debug
# mode over one more step of ours (detection's data-dependent shapes, NMS, leave a few; model.py)
host_syncs = None
if device_type == "cuda":
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            timed[0][1]()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    host_syncs = sum("synchroniz" in str(w.message) for w in caught)
with torch.no_grad(), amp:
    heads_output = raw_model.heads(images)


def post_process():  # under the same autocast as in inference, where decode runs inside forward
    with torch.no_grad(), amp:
        return raw_model.decode(heads_output, images.shape[-2:])


t_post = median_seconds(post_process)
# gradient_accumulation_steps > 1: train.py's extra cost per step, the normaliser recording pass
# (train.py's record_normalizers: a forward without gradients of each micro-batch), on this batch
t_record = None
if gradient_accumulation_steps > 1:
    raw_model.train()

    def record_pass():
        with torch.no_grad(), amp:
            raw_model(images, targets)
    t_record = median_seconds(record_pass)
# eval.py then maps every detection back to the original image (boxes / scale, masks resized to
# the original size and thresholded): timed for an original 1.25x the input (COCO's 640 -> 512)
try:  # eval.py reads COCO with pycocotools; a bare GPU machine (PyTorch only) may lack it
    from eval import to_original, _masks_to_original  # noqa: E402
except ImportError as e:
    print(f"bench.py: the mapping to the original size is not timed ({e})", flush=True)
    to_original = _masks_to_original = None
outputs = post_process()
originals = [{"orig_size": (round(H * 1.25), round(W * 1.25)), "size": (H, W), "scale": 0.8}] * B


def map_to_original():
    return [to_original(o, t, raw_model.mask_threshold) for o, t in zip(outputs, originals)]


t_orig = median_seconds(map_to_original) if to_original is not None else 0.0
n_dets = sum(len(o["boxes"]) for o in outputs) / B
# to_original computes each mask only in its box's window: its time depends on the box sizes,
# which random weights make small. The worst case, every mask resized over the whole image
# (eval.py's dense path, taken when boxes are large), is timed too.
box_side = [((o["boxes"][:, 2:] - o["boxes"][:, :2]).clamp(min=0).prod(1).sqrt()) for o in outputs]
box_side = torch.cat(box_side).mean().item() if n_dets else 0.0
t_orig_dense = median_seconds(lambda: [_masks_to_original(o["masks"], t["size"], t["orig_size"], raw_model.mask_threshold)
                                       for o, t in zip(outputs, originals)]) if "masks" in outputs[0] and to_original else t_orig
del heads_output, outputs


def forward_backward():
    """One train step's forward and backward on the eager model (FlopCounterMode does not see
    inside compiled graphs; the optimizer's elementwise update is left out)."""
    with amp:
        loss = raw_model(images, targets)["loss"]
    loss.backward()
    raw_model.zero_grad(set_to_none=True)


def forward_eval():
    with torch.no_grad(), amp:
        return raw_model(images)


raw_model.train()
flops_train = count_flops(forward_backward)
raw_model.eval()
flops_infer = count_flops(forward_eval)
if device_type == "cuda":
    peak_mem = max(peak_train, peak_infer)
    mem_note = "GPU max_memory_allocated"
else:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    peak_mem = rss / 2**20 if sys.platform == "darwin" else rss / 2**10
    mem_note = "CPU peak RSS of the whole process"
peak = peak_flops(device_name, dtype) if device_type == "cuda" else None
mfu_train = flops_train / t_train / peak if peak else None
mfu_infer = flops_infer / t_infer / peak if peak else None

results = {
    "method": model_args["method"], "backbone": model_args["backbone"], "device": device, "device_name": device_name,
    "dtype": dtype, "batch_size": B, "input_hw": [H, W], "synthetic": not real_data, "params_m": n_params / 1e6,
    "train_ms_per_img": t_train * 1e3 / B, "infer_ms_per_img": t_infer * 1e3 / B,
    "post_ms_per_img": t_post * 1e3 / B, "to_original_ms_per_img": t_orig * 1e3 / B, "detections_per_img": n_dets,
    # post-processing = decode (+ masks) + mapping to the original size, as a share of the whole inference
    "post_share": 100 * (t_post + t_orig) / (t_infer + t_orig), "mean_box_side": box_side,
    "to_original_dense_ms_per_img": t_orig_dense * 1e3 / B,
    "post_share_dense": 100 * (t_post + t_orig_dense) / (t_infer + t_orig_dense),
    "peak_mem_mb": peak_mem, "peak_mem_train_mb": peak_train, "peak_mem_infer_mb": peak_infer,
    "flops_train_per_img": flops_train / B, "flops_infer_per_img": flops_infer / B,
    "gflops_train_achieved": flops_train / t_train / 1e9, "gflops_infer_achieved": flops_infer / t_infer / 1e9,
    "peak_flops": peak, "mfu_train": mfu_train, "mfu_infer": mfu_infer, "compile": bool(compile),
    "record_ms_per_img": t_record * 1e3 / B if t_record else None,
    "record_over_train": t_record / t_train if t_record else None,
    "train_first_call_s": FIRST_CALL_S.get("train"), "infer_first_call_s": FIRST_CALL_S.get("infer"),
    "host_syncs_per_train_step": host_syncs,
}
if to_original is None:  # not timed (no pycocotools): the shares above count the mapping as 0
    results["to_original_ms_per_img"] = results["to_original_dense_ms_per_img"] = None
for name in ("fcos", "maskrcnn"):
    for k in ("train_ms_per_img", "infer_ms_per_img", "train_ratio", "infer_ratio", "detections_per_img"):
        results[f"peer_{name}_{k}"] = None

# -- torchvision peers on the same pixels (timed above, in alternation with ours) ------------------
if peers:
    for i, name in enumerate(("fcos", "maskrcnn"), start=1):
        pt_train, pt_infer = train_times[i], infer_times[i]
        timed[i][0].eval()
        # detections per image: with random weights each model keeps a different number (its own
        # score threshold), and the mask branches cost per detection: compare at equal counts
        # with --max_detections (RESULTS.md, "The headline table", command (2))
        results[f"peer_{name}_detections_per_img"] = sum(len(o["boxes"]) for o in timed[i][2]()) / B
        results[f"peer_{name}_train_ms_per_img"] = pt_train * 1e3 / B
        results[f"peer_{name}_infer_ms_per_img"] = pt_infer * 1e3 / B
        results[f"peer_{name}_train_ratio"] = t_train / pt_train
        results[f"peer_{name}_infer_ratio"] = t_infer / pt_infer
    del timed, peer

# -- the training data loader on real images ----------------------------------------------------------
results["loader_images_per_s"] = results["train_images_per_s"] = results["loader_over_train"] = None
results["loader_worker_images_per_s"] = results["loader_workers_needed"] = None
if loader:
    from functools import partial
    from torch.utils.data import DataLoader
    from data import CocoInstances, build_transforms, collate_fn
    if not real_data:
        sys.exit("bench.py: loader=True needs --real_data=DIR (a COCO folder; train_img_dir/train_ann relative to it)")
    p = lambda rel: rel if os.path.isabs(rel) else os.path.join(real_data, rel)  # noqa: E731
    kw = dict(scale_range=scale_range, color_jitter=color_jitter)
    try:
        train_set = CocoInstances(p(train_img_dir), p(train_ann), transforms=build_transforms(transform, True, input_size, **kw))
    except (OSError, ValueError) as e:
        sys.exit(f"bench.py: {e}")
    dl = DataLoader(train_set, batch_size=B, shuffle=True, num_workers=num_workers, collate_fn=partial(collate_fn, size_divisibility=d),
                    persistent_workers=num_workers > 0, drop_last=True, pin_memory=device_type == "cuda")
    n, t0, it_ = 0, None, iter(dl)
    for k in range(loader_batches + 1):
        try:
            batch = next(it_)
        except StopIteration:  # a small set: start another epoch
            it_ = iter(dl)
            batch = next(it_)
        if k == 0:
            t0 = time.perf_counter()  # the first batch pays for the workers' start
        else:
            n += len(batch[1])
    results["loader_images_per_s"] = n / (time.perf_counter() - t0)
    results["train_images_per_s"] = 1e3 / results["train_ms_per_img"]
    results["loader_over_train"] = results["loader_images_per_s"] / results["train_images_per_s"]
    # One worker's rate: what each DataLoader worker does (dataset[i] and collate_fn, one torch
    # thread), here in this process (so without the batch's transfer to the main process), and
    # how many such workers one train step's rate needs.
    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    for k in range(loader_batches):
        collate_fn([train_set[(k * B + j) % len(train_set)] for j in range(B)], size_divisibility=d)
    results["loader_worker_images_per_s"] = loader_batches * B / (time.perf_counter() - t0)
    torch.set_num_threads(threads_before)
    results["loader_workers_needed"] = results["train_images_per_s"] / results["loader_worker_images_per_s"]

# -- report -----------------------------------------------------------------------------------------
def fmt(v, spec):
    return "n/a" if v is None else format(v, spec)


r = results
unknown_peak = "n/a (unknown peak)" if device_type == "cuda" else "n/a (CPU)"
rows = [
    ("train step (fwd+targets+losses, bwd, Adam)", f"{fmt(r['train_ms_per_img'], '.2f')} ms/img"),
    ("inference (eval fwd + decode + masks)", f"{fmt(r['infer_ms_per_img'], '.2f')} ms/img"),
    ("post-processing: decode + masks | to original size", f"{fmt(r['post_ms_per_img'], '.2f')} | "
     f"{fmt(r['to_original_ms_per_img'], '.2f')} ms/img ({r['detections_per_img']:.0f} detections) = "
     f"{r['post_share']:.1f}% of inference + mapping (mean box side {r['mean_box_side']:.0f} px)"),
    ("... mapping every mask over the whole image (worst case)", f"{fmt(r['to_original_dense_ms_per_img'], '.2f')} "
     f"ms/img = {r['post_share_dense']:.1f}% of inference + mapping"),
    (f"peak memory ({mem_note})", f"{fmt(r['peak_mem_mb'], '.0f')} MiB"
     + (f" (train {peak_train:.0f}, inference {peak_infer:.0f})" if device_type == "cuda" else "")),
    ("FLOPs/img train (fwd+bwd) | inference", f"{r['flops_train_per_img'] / 1e9:.2f} | {r['flops_infer_per_img'] / 1e9:.2f} GFLOP"),
    ("achieved train | inference", f"{r['gflops_train_achieved']:.1f} | {r['gflops_infer_achieved']:.1f} GFLOP/s"),
    ("MFU train | inference" + (f" (peak {peak / 1e12:.0f} TFLOP/s {dtype})" if peak else ""),
     f"{mfu_train:.1%} | {mfu_infer:.1%}" if peak else unknown_peak),
    ("first call train | inference" + (" (compilation included)" if compile else ""),
     f"{fmt(r['train_first_call_s'], '.1f')} | {fmt(r['infer_first_call_s'], '.1f')} s"),
]
if t_record:
    rows.append(("normaliser recording pass (gradient_accumulation_steps > 1)",
                 f"{r['record_ms_per_img']:.2f} ms/img = {r['record_over_train']:.2f}x the train step"))
if loader:
    rows.append((f"training DataLoader ({num_workers} workers) | train step", f"{r['loader_images_per_s']:.1f} | "
                 f"{r['train_images_per_s']:.1f} img/s = {r['loader_over_train']:.1f}x"))
    rows.append(("one loader worker (dataset[i] + collate, 1 thread) | workers per train step",
                 f"{r['loader_worker_images_per_s']:.1f} img/s | {r['loader_workers_needed']:.1f}"))
if peers:
    for name, title in (("fcos", "torchvision fcos_resnet50_fpn"), ("maskrcnn", "torchvision maskrcnn_resnet50_fpn")):
        rows.append((f"{title} train | inference",
                     f"{r[f'peer_{name}_train_ms_per_img']:.2f} | {r[f'peer_{name}_infer_ms_per_img']:.2f} ms/img "
                     f"({r[f'peer_{name}_detections_per_img']:.0f} detections; ours {r['detections_per_img']:.0f})"))
        rows.append((f"  ours / {name} train | inference",
                     f"{r[f'peer_{name}_train_ratio']:.2f}x | {r[f'peer_{name}_infer_ratio']:.2f}x"))
width = max(len(k) for k, _ in rows)
print("-" * (width + 30))
for k, v in rows:
    print(f"{k:<{width}}  {v}")
print("-" * (width + 30))
print("FLOPs from torch.utils.flop_counter (deform_conv2d and other ops it does not know count as 0).")
if peers:
    print(f"peers: random weights, 91 classes, same {B} images of {H}x{W}; min_size = max_size = {max(H, W)} so "
          "torchvision's internal resize (default 800) keeps the pixels as they are. ratio < 1: ours is faster.")
print(json.dumps(results), flush=True)
