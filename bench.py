"""
Speed and memory of one config's model, nanoGPT's bench.py style: config globals ->
configurator -> one fixed batch -> timed train steps, inference and post-processing.

    python bench.py config/centermask_dla34.py                          # GPU, 2 x 512px
    python bench.py config/centermask_dla34.py --device=cpu --batch_size=2 --input_size=512
    python bench.py config/centermask_dla34.py --batch_size=16 --peers=True   # + torchvision's

Measured, each as the median of `steps` timed runs after `burn_in` untimed ones
(torch.cuda.synchronize() around every timed run on GPU), per image:
  * train_ms_per_img: forward with targets (target building and losses) + backward + Adam step
  * infer_ms_per_img: model.eval() forward with decoding and mask assembly, no_grad + autocast
  * post_ms_per_img: `model.decode(model.heads(images), hw)` timed alone (heads computed once
    beforehand); to_original_ms_per_img: eval.py's `to_original` of its output (boxes and masks
    to an original image 1.25x the input, COCO's 640 -> 512); post_share: both as a share of
    (inference + to_original) in %: CenterMask's peak decoding and mask assembly; the FCOS
    family's candidate selection, NMS and mask branch (the mask heads of MaskFCOS /
    CenterMask-FCOS / FCOSIS run on the detections, so they count here). to_original computes
    each mask only in its box's window, so its time depends on the box sizes (mean_box_side),
    which random weights make small: to_original_dense_ms_per_img and post_share_dense time the
    worst case, every mask resized over the whole image (eval.py's dense path)
  * peak_mem_mb: GPU torch.cuda.max_memory_allocated over the run (with peers: theirs too); CPU
    the peak resident set size of the whole process (resource.getrusage), Python and torch
    included
  * flops_train_per_img / flops_infer_per_img: one train step's forward + backward and one
    forward, from torch.utils.flop_counter.FlopCounterMode (ops it does not know, e.g.
    torchvision's deform_conv2d, count as 0); the achieved GFLOP/s, and on GPU the MFU against
    a small table of peak dense FLOP/s keyed by the device name (None elsewhere)
  * train_first_call_s / infer_first_call_s: the first call of each phase (compile=True: the
    compilation)
  * record_ms_per_img (gradient_accumulation_steps > 1): train.py's extra cost per step, the
    normaliser recording pass (train.py's record_normalizers: a forward without gradients)
  * with --peers=True: torchvision's fcos_resnet50_fpn and maskrcnn_resnet50_fpn (random
    weights, 91 classes) on the same images and boxes/labels/masks, train step and inference,
    and the ratios ours / theirs of the ms per image (< 1: ours is faster). The three models
    are timed in alternation (ours, fcos, maskrcnn, ours, ...), so a drifting machine load
    hits all of them alike

The images are synthetic (random pixels, a few random boxes/masks per image, deterministic from
`seed`), so the numbers measure compute, not accuracy. Timings are reported,
never asserted. Output: one line per number, then as the very LAST line one JSON object with all
numbers (null where not measured), for `tail -n 1`.
"""

import json
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import fields

import torch
from torch.utils.flop_counter import FlopCounterMode

from configurator import check_settings, defaults_of, device_and_dtype
from eval import _masks_to_original, to_original
from model import ModelConfig, build_model
from weights import one_line_errors

# -----------------------------------------------------------------------------
# train.py's config keys with train.py's defaults (model.ModelConfig's fields among them), so that
# the same config files run here. bench.py reads the model keys, batch_size, input_size, device,
# dtype, threads, compile, seed, learning_rate and gradient_accumulation_steps; the others are
# accepted and ignored (the timed train step always uses Adam).
_HERE = os.path.dirname(os.path.abspath(__file__))
globals().update(defaults_of(os.path.join(_HERE, "train.py")))
# bench settings, and the train.py keys whose default differs here
batch_size = 2           # images per timed step (train.py: 32)
seed = 0                 # of the synthetic batch (random pixels, boxes and masks)
num_classes = 80         # COCO's (train.py: 0 = the training set's)
burn_in = 2              # untimed runs before each measurement
steps = 5                # timed runs; the median is reported
peers = False            # also time torchvision's fcos_resnet50_fpn and maskrcnn_resnet50_fpn
# -----------------------------------------------------------------------------
exec(open(os.path.join(_HERE, "configurator.py")).read())
one_line_errors("bench.py")  # a ValueError below: "bench.py: error: ...", exit status 2
# -----------------------------------------------------------------------------

# Peak dense tensor-core FLOP/s (bf16/fp16, fp32 run as TF32: this script enables TF32, as
# train.py) by device-name substring, first match wins (more specific names first)
PEAK_FLOPS = [("H100 PCIe", 756e12, 378e12), ("H100", 989e12, 494e12), ("H200", 989e12, 494e12),
              ("GH200", 989e12, 494e12), ("A100", 312e12, 156e12), ("L40S", 362e12, 183e12),
              ("L4", 121e12, 60e12), ("A10", 125e12, 62.5e12), ("V100", 125e12, 15.7e12),
              ("T4", 65e12, 8.1e12)]


def sync():
    if cuda:
        torch.cuda.synchronize(device)


def seconds(fn):
    """The seconds of one call of fn; it ends synchronised, so the next call starts on an idle
    GPU."""
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def time_runs(fns):
    """Median seconds of each of fns over `steps` rounds after `burn_in` untimed calls of each,
    timed in alternation (round r runs fn 1, 2, ..., then round r + 1): on a machine whose load
    drifts, every fn sees the same drift, so their ratios hold. Also the seconds of each fn's
    first call (None without burn-in)."""
    sync()
    burn = [[seconds(fn) for _ in range(burn_in)] for fn in fns]
    rounds = [[seconds(fn) for fn in fns] for _ in range(steps)]    # (steps, len(fns))
    return [statistics.median(t) for t in zip(*rounds)], [b[0] if b else None for b in burn]


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
        wh = (torch.rand(n_objects, 2, generator=gen) * 3 + 1) * S / 8  # (N, 2)
        x0y0 = torch.rand(n_objects, 2, generator=gen) * (S - wh)  # (N, 2)
        c, r = (x0y0 + wh / 2)[:, :, None, None], (wh / 2)[:, :, None, None]  # centres, radii
        inside = ((xx - c[:, 0]) / r[:, 0]) ** 2 + ((yy - c[:, 1]) / r[:, 1]) ** 2 <= 1  # (N, S, S)
        labels = torch.randint(0, num_classes, (n_objects,), generator=gen)
        targets.append({"boxes": torch.cat([x0y0, x0y0 + wh], 1), "labels": labels,
                        "masks": inside.to(torch.uint8), "image_id": i, "scale": 1.0,
                        "orig_size": torch.tensor([S, S]), "size": torch.tensor([S, S])})
    return images, targets


def model_steps(model, images, targets):
    """The two timed closures of a model: a train step (forward with targets, backward, Adam) and
    an inference forward. Works for ours (losses dict with "loss") and torchvision's detection
    models (a dict of loss terms)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=learning_rate, fused=True)  # fused: CUDA, and CPU
    scaler = torch.amp.GradScaler(device_type, enabled=(dtype == "float16"))

    def train_step():
        model.train()
        with amp:
            losses = model(images, targets)
        loss = losses["loss"] if "loss" in losses else sum(losses.values())
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    def infer():
        model.eval()
        with torch.no_grad(), amp:
            return model(images)

    return train_step, infer


# -- device, dtype ------------------------------------------------------------------------------
device, dtype = device_and_dtype(device, dtype)
device_type = "cuda" if device.startswith("cuda") else "cpu"
cuda = device_type == "cuda"
if steps < 1 or burn_in < 0 or batch_size < 1:
    raise ValueError(f"need steps >= 1, burn_in >= 0, batch_size >= 1 (got {steps}, {burn_in}, "
                     f"{batch_size})")
torch.manual_seed(seed)
if device_type == "cpu":
    torch.set_num_threads(threads or os.cpu_count() or 1)
else:
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
amp = torch.autocast(device_type, dtype=getattr(torch, dtype), enabled=dtype != "float32")
device_name = torch.cuda.get_device_name(device) if cuda else platform.machine()
# the numbers measured only on request (null in the JSON line otherwise)
OPTIONAL = [f"peer_{name}_{k}" for name in ("fcos", "maskrcnn") for k in (
    "train_ms_per_img", "infer_ms_per_img", "train_ratio", "infer_ratio", "detections_per_img")]
OPTIONAL += ["record_ms_per_img", "record_over_train"]

# -- model and batch ------------------------------------------------------------------------------
model_args = {f.name: globals()[f.name] for f in fields(ModelConfig)}
raw_model = build_model(check_settings(model_args)).to(device)  # train.py's checks
d = raw_model.size_divisibility
S = (input_size + d - 1) // d * d  # input_size rounded up to a multiple of d
images, targets = synthetic_batch(batch_size, S, model_args["num_classes"],
                                  torch.Generator().manual_seed(seed))
images = images.to(device)
targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
model = torch.compile(raw_model) if compile else raw_model
B, H, W = images.shape[0], images.shape[-2], images.shape[-1]
results = dict(method=model_args["method"], backbone=model_args["backbone"], device=device,
               device_name=device_name, dtype=dtype, batch_size=B, input_hw=[H, W],
               compile=bool(compile),
               params_m=sum(p.numel() for p in raw_model.parameters()) / 1e6)

# -- ours, and with peers=True torchvision's models, in alternation with ours --------------------
timed = [(model, *model_steps(model, images, targets))]
if peers:
    from torchvision.models.detection import fcos_resnet50_fpn, maskrcnn_resnet50_fpn
    peer_images = list(images.contiguous())  # torchvision takes a list of (3, H, W)
    # torchvision's labels: 1..90 (0 is background for Mask R-CNN); masks: Mask R-CNN's only
    peer_targets = [{"boxes": t["boxes"], "labels": t["labels"] % 90 + 1, "masks": t["masks"]}
                    for t in targets]
    for builder in (fcos_resnet50_fpn, maskrcnn_resnet50_fpn):
        # min_size = max_size = the input side: GeneralizedRCNNTransform keeps the pixels as they
        # are (its default would resize to 800), so all models see the same pixels
        peer = builder(weights=None, weights_backbone=None, num_classes=91, min_size=max(H, W),
                       max_size=max(H, W)).to(device)
        timed.append((peer, *model_steps(peer, peer_images, peer_targets)))
train_times, train_first = time_runs([train for _, train, _ in timed])
infer_times, infer_first = time_runs([infer for _, _, infer in timed])
t_train, t_infer = train_times[0], infer_times[0]
results.update(train_ms_per_img=t_train * 1e3 / B, infer_ms_per_img=t_infer * 1e3 / B,
               train_first_call_s=train_first[0], infer_first_call_s=infer_first[0])
for i, name in enumerate(("fcos", "maskrcnn")[:len(timed) - 1], start=1):
    # with random weights each model keeps its own number of detections, and the mask
    # branches cost per detection: compare at equal counts with --max_detections
    detections = sum(len(o["boxes"]) for o in timed[i][2]()) / B
    results.update({f"peer_{name}_train_ms_per_img": train_times[i] * 1e3 / B,
                    f"peer_{name}_infer_ms_per_img": infer_times[i] * 1e3 / B,
                    f"peer_{name}_train_ratio": t_train / train_times[i],
                    f"peer_{name}_infer_ratio": t_infer / infer_times[i],
                    f"peer_{name}_detections_per_img": detections})
del timed[1:]

# -- post-processing: decoding, and the mapping to the original image ----------------------------
raw_model.eval()
with torch.no_grad(), amp:
    heads_output = raw_model.heads(images)


def post_process():  # under the same autocast as in inference, where decode runs inside forward
    with torch.no_grad(), amp:
        return raw_model.decode(heads_output, images.shape[-2:])


outputs = post_process()
n_dets = sum(len(o["boxes"]) for o in outputs) / B
box_sides = [(o["boxes"][:, 2:] - o["boxes"][:, :2]).clamp(min=0).prod(1).sqrt() for o in outputs]
originals = [{"orig_size": (round(H * 1.25), round(W * 1.25)), "size": (H, W), "scale": 0.8}] * B
threshold = raw_model.mask_threshold
(t_post, t_orig, t_dense), _ = time_runs([
    post_process,
    lambda: [to_original(o, t, threshold) for o, t in zip(outputs, originals)],
    lambda: [_masks_to_original(o["masks"], t["size"], t["orig_size"], threshold)
             for o, t in zip(outputs, originals) if "masks" in o]])
t_dense = t_dense if "masks" in outputs[0] else t_orig
results.update(post_ms_per_img=t_post * 1e3 / B, detections_per_img=n_dets,
               to_original_ms_per_img=t_orig * 1e3 / B,
               to_original_dense_ms_per_img=t_dense * 1e3 / B,
               mean_box_side=torch.cat(box_sides).mean().item() if n_dets else 0.0,
               post_share=100 * (t_post + t_orig) / (t_infer + t_orig),
               post_share_dense=100 * (t_post + t_dense) / (t_infer + t_dense))
del heads_output, outputs
# gradient_accumulation_steps > 1: train.py's recording pass, a forward without gradients of
# each micro-batch (train.py's record_normalizers), on this batch
if gradient_accumulation_steps > 1:
    raw_model.train()

    def record_pass():
        with torch.no_grad(), amp:
            raw_model(images, targets)
    (t_record,), _ = time_runs([record_pass])
    results.update(record_ms_per_img=t_record * 1e3 / B, record_over_train=t_record / t_train)

# -- memory, FLOPs (of the eager model: FlopCounterMode does not see inside compiled graphs; it
# counts no flops for the optimizer's elementwise update)
eager_train, eager_infer = model_steps(raw_model, images, targets)
flops_train, flops_infer = count_flops(eager_train), count_flops(eager_infer)
if cuda:
    peak_mem = torch.cuda.max_memory_allocated(device) / 2**20
else:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    peak_mem = rss / 2**20 if sys.platform == "darwin" else rss / 2**10
peak = next((tf32 if dtype == "float32" else half for name, half, tf32 in PEAK_FLOPS
             if cuda and name in device_name), None)
results.update(peak_mem_mb=peak_mem, flops_train_per_img=flops_train / B,
               flops_infer_per_img=flops_infer / B,
               gflops_train_achieved=flops_train / t_train / 1e9,
               gflops_infer_achieved=flops_infer / t_infer / 1e9, peak_flops=peak,
               mfu_train=flops_train / t_train / peak if peak else None,
               mfu_infer=flops_infer / t_infer / peak if peak else None)

# one line per number measured, then all of them as the last line, one JSON object (the OPTIONAL
# numbers not measured: null)
for k, v in results.items():
    print(f"{k:<36} {format(v, '.4g') if isinstance(v, float) else v}")
print(json.dumps(dict(dict.fromkeys(OPTIONAL), **results)), flush=True)
