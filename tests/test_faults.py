"""Faults and hardening (README, "What happens when things fail"): runs killed with SIGKILL and
resumed, half-written checkpoints, a full disk and a read-only out_dir, bad inputs that go through
the whole model (images with only crowd annotations, very small and very large images), and real
multi-process training with gloo on the CPU (torchrun, and DDP gradients against one process).

Every run is a tiny CenterMask (0.1M parameters) on a tiny synthetic shapes set, so each train.py
subprocess takes a few seconds. Runs that are compared weight for weight use dtype float32, one
thread and no DataLoader workers (see test_sigkill_between_checkpoints_resumes_bitwise).
"""
import ast
import contextlib
import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from test_train import TINY, run

# pycocotools' decode triggers a numpy 2 DeprecationWarning inside pycocotools itself
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# The resume-equivalence setup: an evaluation and a checkpoint at iterations 3, 6, 9 and 12 (every 1.5
# epochs), and the last checkpoint at each epoch's end (2, 4, 8, 10). With 8 training images in batches of 4
# (2 iterations per epoch), iteration 3 is mid-epoch: the run resumed from it must skip one batch, and the
# evaluation there must not have moved the RNG.
EXACT = ["--dtype=float32", "--max_iters=12", "--eval_every_epochs=1.5", "--log_interval=1"]


def train_in(work, *args, script="train.py"):
    """train.py (or a wrapper of it) on the shared shapes set, writing into work/out."""
    return run(script, f"--shapes_dir={work.parent / 'shapes'}", f"--out_dir={work / 'out'}",
               *TINY, *args, cwd=work)


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)  # all a checkpoint may hold


def assert_same_state(a, b):
    """Bitwise equality of two checkpoints' weights (buffers included) and Adam state."""
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for i, (sa, sb) in enumerate(zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values())):
        for k in sa:
            assert torch.equal(sa[k], sb[k]), (i, k)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run every resumed run is compared with (it also writes the shapes set)."""
    work = tmp_path_factory.mktemp("faults") / "reference"
    work.mkdir()
    r = train_in(work, *EXACT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return work


def start_and_kill_after(work, line, *args):
    """Start a run and SIGKILL it as soon as `line` appears in its log (no clean-up runs)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), f"--shapes_dir={work.parent / 'shapes'}",
           f"--out_dir={work / 'out'}", *TINY, *args]
    p = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for text in p.stdout:
        seen.append(text)
        if text.startswith(line):
            os.kill(p.pid, signal.SIGKILL)
            break
    p.stdout.close()
    p.wait(timeout=60)
    assert p.returncode == -signal.SIGKILL, "".join(seen)[-2000:]


# -----------------------------------------------------------------------------
# runs killed and resumed

@pytest.mark.slow
def test_sigkill_between_checkpoints_resumes_bitwise(reference, tmp_path):
    """Guards resume equivalence: a run killed with SIGKILL mid-training, then resumed with
    --init_from=resume, must end with exactly (bitwise) the weights and Adam state of the run that
    was never interrupted. What it catches: a data order or augmentation stream that depends on
    how many batches the process drew before (the resumed run re-draws the epoch's random
    scales/flips/crops), an evaluation that moves the training RNG, a wrong skip count in the
    epoch, a lost optimizer state. CPU, float32, one thread, num_workers=0: every kernel is
    deterministic there, so nothing but a real difference can break the equality."""
    work = tmp_path / "killed"
    work.mkdir()
    (work.parent / "shapes").symlink_to(reference.parent / "shapes")
    start_and_kill_after(work, "iter 4/12", *EXACT)
    resumed_from = load(work / "out" / "ckpt.pt")["iter"]
    assert resumed_from in (3, 4, 6), resumed_from  # 3, or 4 or 6 if the kill came late
    r = train_in(work, *EXACT, "--init_from=resume")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert f"iter {resumed_from + 1}/12" in r.stdout and f"iter {resumed_from}/12" not in r.stdout
    final, ref = load(work / "out" / "ckpt.pt"), load(reference / "out" / "ckpt.pt")
    assert final["iter"] == ref["iter"] == 12
    assert_same_state(final, ref)


# train.py run inside a wrapper that first replaces torch.save: how a test kills a run in the
# middle of a checkpoint write, or gives it a full disk, without a hook in train.py
WRAPPER = """
import os, runpy, signal, sys
import torch
sys.path.insert(0, {root!r})
_save = torch.save
{patch}
torch.save = save
sys.argv = [{train!r}] + sys.argv[1:]
runpy.run_path({train!r}, run_name="__main__")
"""

KILL_DURING_SAVE = """
def save(obj, path, *args, **kwargs):
    _save(obj, path, *args, **kwargs)
    if os.path.basename(path).startswith("ckpt.pt.tmp") and obj["iter"] == 4:
        # SIGKILL in the middle of this write: half of the bytes are on disk, no rename happened
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
        os.kill(os.getpid(), signal.SIGKILL)
"""

DISK_FULL_AT_4 = """
def save(obj, path, *args, **kwargs):
    if os.path.basename(path).startswith("ckpt.pt.tmp") and obj["iter"] == 4:
        with open(path, "wb") as f:
            f.write(b"PK")        # the little that fitted on the disk
        path = "/dev/full"        # every write fails with ENOSPC: torch's own error for a full disk
    _save(obj, path, *args, **kwargs)
"""


def wrapper(tmp_path, patch):
    script = tmp_path / "wrapped_train.py"
    script.write_text(WRAPPER.format(root=ROOT, train=os.path.join(ROOT, "train.py"), patch=patch))
    return str(script)


@pytest.mark.slow
def test_sigkill_during_checkpoint_write_resumes_from_previous(reference, tmp_path):
    """Guards the atomic checkpoint: a run killed (SIGKILL) while torch.save is writing must leave
    the previous checkpoint loadable, the half-written file must never be loaded (nor left to
    fill the disk, one per kill), and the resumed run must still end bitwise on the weights of
    the uninterrupted run."""
    work = tmp_path / "killed"
    work.mkdir()
    (work.parent / "shapes").symlink_to(reference.parent / "shapes")
    r = train_in(work, *EXACT, script=wrapper(tmp_path, KILL_DURING_SAVE))
    assert r.returncode == -signal.SIGKILL, r.stdout[-2000:] + r.stderr[-2000:]
    half = [p for p in (work / "out").iterdir() if p.name.startswith("ckpt.pt.tmp")]
    assert len(half) == 1
    with pytest.raises(Exception):
        load(half[0])                                       # really half a checkpoint
    assert load(work / "out" / "ckpt.pt")["iter"] == 3      # the previous one, intact
    r = train_in(work, *EXACT, "--init_from=resume")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert f"removed {half[0]}" in r.stdout and not half[0].exists()
    assert "iter 4/12" in r.stdout and "iter 3/12" not in r.stdout
    assert_same_state(load(work / "out" / "ckpt.pt"), load(reference / "out" / "ckpt.pt"))


@pytest.mark.slow
def test_truncated_checkpoint_is_refused(reference, tmp_path):
    """Guards loading half a checkpoint (e.g. copied while it was written, or cut by a full
    disk on another machine): resume must stop with a message naming the file, not a torch
    traceback, and not start from scratch silently."""
    work = tmp_path / "w"
    (work / "out").mkdir(parents=True)
    (work.parent / "shapes").symlink_to(reference.parent / "shapes")
    good = (reference / "out" / "ckpt.pt").read_bytes()
    (work / "out" / "ckpt.pt").write_bytes(good[: len(good) // 2])
    r = train_in(work, *EXACT, "--init_from=resume")
    assert r.returncode != 0
    assert f"{work / 'out' / 'ckpt.pt'} is a damaged PyTorch checkpoint (cut short" in r.stderr
    assert "Traceback" not in r.stderr and "iter 1/12" not in r.stdout


@pytest.mark.slow
def test_checkpoint_that_would_run_code_is_refused_and_never_runs(tmp_path):
    """Guards safe loading where a user meets it: a ckpt.pt whose pickle calls open(path, "w")
    (tests/test_weights.py shows weights_only=False runs it), given to train.py's resume, eval.py
    and predict.py: each stops with one line naming the file and the function, and the file the
    pickle would create is never created."""
    from PIL import Image
    from test_weights import CreatesAFile
    created, ckpt, picture = tmp_path / "created_by_the_pickle", tmp_path / "out" / "ckpt.pt", tmp_path / "a.png"
    ckpt.parent.mkdir()
    torch.save({"model": CreatesAFile(str(created)), "model_args": {}, "iter": 1}, ckpt)
    Image.new("RGB", (8, 8)).save(picture)
    for r in (run("train.py", f"--out_dir={ckpt.parent}", "--init_from=resume", cwd=tmp_path),
              run("eval.py", f"--ckpt={ckpt}", cwd=tmp_path),
              run("predict.py", f"--ckpt={ckpt}", f"--input={picture}", cwd=tmp_path)):
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1, (r.returncode, r.stderr[-2000:])
        assert f"{ckpt} is refused: loading it would call " in lines[0] and "open" in lines[0]
        assert not created.exists()


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full to fail writes with ENOSPC")
def test_full_disk_names_the_checkpoint_and_keeps_the_previous(reference, tmp_path):
    """Guards a full disk during a checkpoint write. torch.save reports ENOSPC as a RuntimeError
    ("unexpected pos ..."), not an OSError, so it used to escape as a traceback and leave the
    partial temporary file behind. Now: one line naming the file and the free space, exit 2, the
    previous checkpoint intact, no temporary left. The write goes to /dev/full, so the error is
    the one torch really raises for a full disk."""
    work = tmp_path / "w"
    work.mkdir()
    (work.parent / "shapes").symlink_to(reference.parent / "shapes")
    r = train_in(work, *EXACT, script=wrapper(tmp_path, DISK_FULL_AT_4))
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    final = work / "out" / "ckpt.pt"
    assert f"cannot write {final}" in r.stderr and "MiB free" in r.stderr and "Traceback" not in r.stderr
    assert load(final)["iter"] == 3
    assert not [p for p in (work / "out").iterdir() if ".tmp" in p.name]


# root ignores permission bits: there the kernel's answer to a write into a read-only folder
# (EACCES, "Permission denied") is raised by open() itself for every write under out/
READ_ONLY_AS_ROOT = """
import builtins
_open = builtins.open
def _read_only_open(file, mode="r", *args, **kwargs):
    if any(c in mode for c in "wax+") and os.sep + "out" + os.sep in os.path.abspath(str(file)):
        raise PermissionError(13, "Permission denied", str(file))
    return _open(file, mode, *args, **kwargs)
builtins.open = _read_only_open
save = _save
"""


@pytest.mark.slow
def test_read_only_out_dir_fails_at_start_naming_the_file(reference, tmp_path):
    """Guards a read-only out_dir: the run must stop in its first seconds (not at the first
    checkpoint, hours later) with one line naming the file it could not write, and leave the
    checkpoint that is there untouched. The folder is chmod 555; as root (CI), which ignores
    the bits, open() also raises the kernel's PermissionError for writes under it."""
    work = tmp_path / "w"
    (work / "out").mkdir(parents=True)
    (work.parent / "shapes").symlink_to(reference.parent / "shapes")
    good = (reference / "out" / "ckpt.pt").read_bytes()
    (work / "out" / "ckpt.pt").write_bytes(good)
    os.chmod(work / "out", 0o555)
    root = hasattr(os, "geteuid") and os.geteuid() == 0
    try:
        r = train_in(work, *EXACT, "--init_from=resume",
                     **({"script": wrapper(tmp_path, READ_ONLY_AS_ROOT)} if root else {}))
    finally:
        os.chmod(work / "out", 0o755)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert f"cannot write {work / 'out' / 'config.json'}" in r.stderr and "Permission denied" in r.stderr
    assert "Traceback" not in r.stderr and "iter 4/12" not in r.stdout
    assert (work / "out" / "ckpt.pt").read_bytes() == good


# -----------------------------------------------------------------------------
# bad inputs that go through the model

def tiny_centermask(num_classes=3, frozen_bn=False):
    """The 0.1M-parameter CenterMask of the tests, seeded (the same weights in every process)."""
    from model import ModelConfig, build_model
    torch.manual_seed(0)
    model = build_model(ModelConfig(num_classes=num_classes, dcn=False, dla_channels=(4, 8, 8, 16, 16, 32),
                                    head_conv=8, shape_size=8, max_detections=10)).train()
    if frozen_bn:  # running statistics instead of batch statistics: samples stay independent
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.eval()
    return model


# every method's DDP gradients are checked: CenterMask and the FCOS family (FrozenBatchNorm)
KINDS = ("centermask", "fcos", "fcosreg", "maskfcos", "centermask_fcos", "fcosis")


def tiny_model(kind):
    """A tiny seeded model of each method for the DDP tests, with per-sample normalisation only
    (frozen BN statistics, GroupNorm), so the samples of a batch stay independent."""
    if kind == "centermask":
        return tiny_centermask(frozen_bn=True)
    from model import ModelConfig, build_model
    torch.manual_seed(0)
    return build_model(ModelConfig(method=kind, backbone="resnet18", num_classes=3, norm="frozen_bn",
                                   fpn_channels=32, head_conv=32, shape_size=8)).train()


def coco_dir(tmp_path, sizes, anns, write_images=True):
    """Solid-colour PNGs of the given (h, w) sizes, image ids 1.., and a COCO json (one category)."""
    from PIL import Image
    (tmp_path / "images").mkdir()
    images = []
    for i, (h, w) in enumerate(sizes, start=1):
        if write_images:
            Image.new("RGB", (w, h), (90, 120, 150)).save(tmp_path / "images" / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "height": h, "width": w})
    (tmp_path / "ann.json").write_text(json.dumps({"images": images, "annotations": list(anns),
                                                   "categories": [{"id": 1, "name": "thing"}]}))
    return str(tmp_path / "images"), str(tmp_path / "ann.json")


def box_ann(id, image_id, x, y, w, h, iscrowd=0):
    return {"id": id, "image_id": image_id, "category_id": 1, "bbox": [x, y, w, h], "iscrowd": iscrowd,
            "area": float(w * h), "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]}


def train_losses(dataset, model):
    """One training forward/backward over the whole dataset in one batch; returns the losses."""
    from data import collate_fn
    images, targets = collate_fn([dataset[i] for i in range(len(dataset))], size_divisibility=32)
    losses = model(images, targets)
    losses["loss"].backward()
    return losses, targets


def test_image_with_only_crowd_annotations_trains(tmp_path):
    """Guards an image whose every annotation is a crowd region (COCO has such images): it has
    zero training instances, yet its losses must be finite and every parameter must get a
    gradient (DDP waits for all of them), and its crowd regions stay in the COCOeval ground truth."""
    from data import CocoInstances, build_transforms
    anns = [box_ann(1, 1, 2, 2, 20, 20, iscrowd=1), box_ann(2, 1, 24, 24, 30, 30, iscrowd=1)]
    ds = CocoInstances(*coco_dir(tmp_path, [(64, 64)], anns), transforms=build_transforms("centernet", True, 64))
    model = tiny_centermask(num_classes=1)
    losses, targets = train_losses(ds, model)
    assert targets[0]["boxes"].shape == (0, 4) and targets[0]["masks"].shape[0] == 0
    assert all(torch.isfinite(v) for v in losses.values()), losses
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert len(ds.coco.getAnnIds(imgIds=[1], iscrowd=None)) == 2


def test_very_small_images_train_and_evaluate(tmp_path):
    """Guards images far smaller than the network input (1x1, 3x2, 5x7 pixels; the stride is 4
    and DLA downsamples 32x): both transforms scale them up, the losses are finite, and evaluate()
    maps the predictions back onto the tiny originals."""
    from data import CocoInstances, build_transforms
    from eval import evaluate
    anns = [box_ann(1, 1, 0, 0, 1, 1), box_ann(2, 2, 0, 0, 2, 3), box_ann(3, 3, 1, 1, 5, 4)]
    img_dir, ann_file = coco_dir(tmp_path, [(1, 1), (3, 2), (5, 7)], anns)
    train_set = CocoInstances(img_dir, ann_file, transforms=build_transforms("centernet", True, 64))
    losses, targets = train_losses(train_set, tiny_centermask(num_classes=1))
    assert all(torch.isfinite(v) for v in losses.values()), losses
    assert sum(len(t["labels"]) for t in targets) == 3     # no instance lost to rounding
    val_set = CocoInstances(img_dir, ann_file, transforms=build_transforms("centernet", False, 64))
    assert val_set[0][0].shape == (3, 64, 64) and val_set[1][0].shape == (3, 64, 43)
    stats = evaluate(tiny_centermask(num_classes=1).eval(), val_set, batch_size=3, verbose=False)
    assert stats["num_images"] == 3 and -1.0 <= stats["segm_AP"] <= 1.0


def test_very_large_image_is_resized(tmp_path):
    """Guards images far larger than the input (6000x4000, 24M pixels; COCO's are <= 640): they
    load, the test transform brings the long side to input_size with boxes scaled by exactly
    `scale`, and the training transform gives the square input."""
    from data import CocoInstances, build_transforms
    img_dir, ann_file = coco_dir(tmp_path, [(4000, 6000)], [box_ann(1, 1, 2000, 1000, 3000, 2000)])
    ds = CocoInstances(img_dir, ann_file, transforms=build_transforms("centernet", False, 96))
    image, t = ds[0]
    assert image.shape == (3, 64, 96) and t["scale"] == pytest.approx(96 / 6000)
    assert torch.allclose(t["boxes"], torch.tensor([[2000.0, 1000.0, 5000.0, 3000.0]]) * t["scale"])
    assert t["masks"].shape == (1, 64, 96) and t["masks"].sum() > 0
    ds.transforms = build_transforms("centernet", True, 96)
    image, t = ds[0]
    assert image.shape == (3, 96, 96) and len(t["labels"]) == 1


def test_decompression_bomb_names_the_image(tmp_path):
    """Guards an image too large to decode safely (PIL refuses more than ~179M pixels as a possible
    decompression bomb): the error names the file. The PNG is only a 20000x20000 header: PIL checks
    the size before decoding anything."""
    import struct
    import zlib
    from data import CocoInstances, ImageReadError
    img_dir, ann_file = coco_dir(tmp_path, [(20000, 20000)], [box_ann(1, 1, 0, 0, 10, 10)], write_images=False)

    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)  # w, h, 8 bits, RGB
    path = os.path.join(img_dir, "1.png")
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    with pytest.raises(ImageReadError, match=re.escape(path)) as e:
        CocoInstances(img_dir, ann_file)[0]
    assert "DecompressionBomb" in str(e.value)


class _Unreadable(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        from data import ImageReadError
        raise ImageReadError(f"cannot read image /data/{i}.png: OSError: image file is truncated")


def test_a_loader_workers_error_ends_with_its_own_line(monkeypatch, capsys):
    """Guards weights.one_line_errors, the sys.excepthook of train.py and eval.py: the exception a
    DataLoader worker raised comes back with the worker's whole traceback as its message; the hook
    prints only the worker's message after "script: error: " and exits with status 2. With
    CENTERMASK_DEBUG=1 and for an error that is not the user's (a KeyError) it passes the exception
    on to the hook that was there before."""
    import sys
    from weights import one_line_errors
    with pytest.raises(RuntimeError) as caught:
        next(iter(torch.utils.data.DataLoader(_Unreadable(), num_workers=1)))
    assert "Original Traceback" in str(caught.value) and str(caught.value).count("\n") > 3
    passed_on = []
    monkeypatch.setattr(sys, "excepthook", lambda *a: passed_on.append(a[0]))
    one_line_errors("train.py")
    with pytest.raises(SystemExit) as end:
        sys.excepthook(caught.type, caught.value, caught.tb)
    assert end.value.code == 2 and capsys.readouterr().err == \
        "train.py: error: cannot read image /data/0.png: OSError: image file is truncated\n"
    sys.excepthook(KeyError, KeyError("x"), None)
    monkeypatch.setenv("CENTERMASK_DEBUG", "1")
    sys.excepthook(caught.type, caught.value, caught.tb)
    assert passed_on == [KeyError, caught.type] and capsys.readouterr().err == ""


@pytest.mark.slow
def test_truncated_image_in_a_loader_worker_ends_with_one_line(reference, tmp_path):
    """Guards bad data met inside a DataLoader worker (num_workers=1): a truncated image ends
    train.py and eval.py with exit status 2 and one line naming the image, not the worker's
    traceback of dozens of lines whose last line says it; CENTERMASK_DEBUG=1 shows the traceback."""
    import shutil
    shapes = tmp_path / "shapes"
    shutil.copytree(reference.parent / "shapes", shapes)
    cut = {}
    for split in ("train", "val"):
        with open(shapes / "annotations" / f"instances_{split}.json") as f:
            cut[split] = shapes / split / json.load(f)["images"][0]["file_name"]
        whole = cut[split].read_bytes()
        cut[split].write_bytes(whole[:len(whole) // 2])      # a copy cut short
    val = [f"--val_img_dir={shapes / 'val'}", f"--val_ann={shapes / 'annotations' / 'instances_val.json'}",
           f"--ckpt={reference / 'out' / 'ckpt.pt'}", "--num_workers=1"]
    runs = {"train": run("train.py", f"--shapes_dir={shapes}", f"--out_dir={tmp_path / 'out'}", *TINY,
                         "--num_workers=1", "--max_iters=2", cwd=tmp_path),
            "val": run("eval.py", *val, cwd=tmp_path)}
    for split, r in runs.items():
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1, (split, r.returncode, r.stderr[-3000:])
        assert lines[0].startswith(f"{'train' if split == 'train' else 'eval'}.py: error: cannot read "
                                   f"image {cut[split]}: "), lines
    env = dict(os.environ, CENTERMASK_DEBUG="1")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), *val], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "Original Traceback" in r.stderr and str(cut["val"]) in r.stderr


# -----------------------------------------------------------------------------
# real multi-process training (gloo on the CPU)

@pytest.mark.slow
def test_torchrun_two_processes_train_and_evaluate(tmp_path):
    """Guards the documented multi-process launch, for real: torchrun, 2 gloo processes on the
    CPU, the quick-start config. Both processes train (batch 2 each, so 2 iterations per epoch
    over 8 images), and the evaluation gathers every one of the 5 val images exactly once on rank
    0 (5 is odd: DistributedSampler gives one image to both ranks)."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "train.py"), os.path.join(ROOT, "config", "shapes_centermask.py"), "--device=cpu",
           f"--shapes_dir={tmp_path / 'shapes'}", f"--out_dir={out}", "--shapes_n_train=8", "--shapes_n_val=5",
           "--input_size=64", "--test_input_size=0", "--dla_channels=(4, 8, 8, 16, 16, 32)", "--head_conv=8",
           "--shape_size=8", "--batch_size=2", "--num_workers=0", "--max_iters=4", "--eval_every_epochs=1",
           "--log_interval=1", "--dtype=float32", "--threads=1"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "2 process(es)" in r.stdout and "batch 2 x 2" in r.stdout and "iter 4/4" in r.stdout
    assert r.stdout.count("iter 4/4 ") == 1                 # only rank 0 logs
    assert json.loads((out / "eval.json").read_text())["num_images"] == 5
    assert load(out / "ckpt.pt")["iter"] == 4


# per-image object counts of the 4-image batches below: rank 0 gets images 0-1, rank 1 images 2-3
EQUAL_COUNTS = (1, 3, 2, 2)     # 4 objects on each rank
UNEQUAL_COUNTS = (1, 1, 3, 3)   # 2 objects on rank 0, 6 on rank 1


def make_batch(counts, size=64):
    """Random images and up to 4 well-apart objects per image (box-shaped masks; distinct centre
    cells, so every object is one heatmap positive): images (B, 3, size, size), B target dicts."""
    g = torch.Generator().manual_seed(len(counts) + sum(counts))
    slots = torch.tensor([[4.0, 4.0, 26.0, 22.0], [34.0, 6.0, 60.0, 30.0], [8.0, 36.0, 28.0, 60.0],
                          [36.0, 34.0, 58.0, 58.0]])
    images, targets = torch.randn(len(counts), 3, size, size, generator=g), []
    for i, n in enumerate(counts):
        boxes = slots[:n] + torch.rand(n, 4, generator=g)  # sub-pixel jitter: per-image offsets differ
        masks = torch.zeros(n, size, size, dtype=torch.uint8)
        for k, (x1, y1, x2, y2) in enumerate(boxes.long().tolist()):
            masks[k, y1:y2, x1:x2] = 1
        targets.append({"boxes": boxes, "labels": torch.arange(n) % 3, "masks": masks})
    return images, targets


def grads_of(model):
    """The gradient of every trainable parameter (norm="frozen_bn" freezes the stem and res2)."""
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


DDP_WORKER = """
import sys
sys.path[:0] = [{root!r}, {tests!r}]
import torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from test_faults import tiny_model, make_batch, grads_of, EQUAL_COUNTS, UNEQUAL_COUNTS, KINDS
torch.set_num_threads(1)
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="file://" + {store!r}, rank=rank, world_size=2)
grads = {{}}
for kind in KINDS:
    for counts in (EQUAL_COUNTS, UNEQUAL_COUNTS):
        model = tiny_model(kind)
        images, targets = make_batch(counts)
        b = len(counts) // 2                                 # this process: images rank*b .. rank*b+b-1
        ddp = DDP(model)                                     # kept alive: its hooks do the all-reduce
        losses = ddp(images[rank * b:(rank + 1) * b], targets[rank * b:(rank + 1) * b])
        losses["loss"].backward()                            # DDP all-reduces (averages) the gradients
        grads[kind, counts] = grads_of(model)
if rank == 0:
    torch.save(grads, {out!r})
dist.destroy_process_group()
"""


@pytest.fixture(scope="module")
def ddp_grads(tmp_path_factory):
    """Gradients of the tiny CenterMask after one backward in 2 gloo processes (DDP, batch 2
    each), for both batches above; the workers are real processes that import this file."""
    tmp = tmp_path_factory.mktemp("ddp")
    script = tmp / "worker.py"
    script.write_text(DDP_WORKER.format(root=ROOT, tests=os.path.join(ROOT, "tests"), store=str(tmp / "store"),
                                        out=str(tmp / "grads.pt")))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, str(script), str(r)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    logs = [p.communicate(timeout=180)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-3000:]
    return torch.load(tmp / "grads.pt")


def single_process_grads(kind, counts):
    """The one-process gradients, computed with one thread as the DDP workers are: with two threads
    the kernels round differently (on some CPUs enough to flip a hard choice, a MaskFCOS proposal's
    IoU match or an FCOSIS location's argmin, and move a gradient by 0.5% of its scale)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = tiny_model(kind)
        images, targets = make_batch(counts)
        model(images, targets)["loss"].backward()
        return grads_of(model)
    finally:
        torch.set_num_threads(threads)


def max_relative_difference(ddp, single):
    """Largest difference of a tensor's gradients relative to that tensor's largest gradient.
    Tensors whose gradient is zero in exact arithmetic (a conv bias followed by GroupNorm: the
    normalisation removes it) hold only rounding noise (~3e-9 where the largest gradient is 0.14),
    so the scale is floored at 1e-3 of the model's largest gradient. A wrong normaliser shows as a
    relative difference of order 0.1-1 on the large tensors (measured before the fix: 6.5)."""
    floor = 1e-3 * max(g.abs().max().item() for g in single.values())
    return max((ddp[k] - single[k]).abs().max().item() / max(single[k].abs().max().item(), floor, 1e-12)
               for k in single)


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_ddp_gradients_equal_one_process_with_equal_object_counts(ddp_grads, kind):
    """Guards DDP training computing a different step than one process with the whole batch:
    2 processes with batch 2 each must give (after DDP's all-reduce) the gradients of 1 process
    with batch 4, to float32 rounding. BatchNorm is frozen (running statistics) in both: with
    per-process batch statistics the two differ by construction (train.py's BatchNorm is per
    process, as CenterNet's). The per-rank object counts are
    equal here (4 and 4): see the next test for why that matters.
    Tolerance: relative 1e-4 of each tensor's largest gradient (the sums are split differently
    across processes, and the L1 losses' +1e-4 in their normaliser 2N + 1e-4 is added per process)."""
    single = single_process_grads(kind, EQUAL_COUNTS)
    assert max_relative_difference(ddp_grads[kind, EQUAL_COUNTS], single) < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_ddp_gradients_equal_one_process_with_unequal_object_counts(ddp_grads, kind):
    """The same property as above when the ranks hold different numbers of objects (2 and 6): it
    holds only if every loss normaliser (objects, positives, mask pixels, instances) is averaged
    across processes (model.reduce_mean), for every method."""
    single = single_process_grads(kind, UNEQUAL_COUNTS)
    assert max_relative_difference(ddp_grads[kind, UNEQUAL_COUNTS], single) < 1e-4


# -----------------------------------------------------------------------------
# gradient accumulation (train.py's gradient_accumulation_steps)

def train_py_definitions(*names, **settings):
    """Top-level functions and assignments of train.py by name, run with train.py's imports and
    `settings` as its globals: train.py is a script (importing it would train), so its
    definitions are taken from its source."""
    tree = ast.parse(open(os.path.join(ROOT, "train.py")).read())
    keep = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))
            or getattr(node, "name", None) in names
            or isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) in names]
    namespace = dict(settings)
    exec(compile(ast.Module(body=keep, type_ignores=[]), "train.py", "exec"), namespace)
    return [namespace[name] for name in names]


@pytest.mark.parametrize("optimizer, method, expected", [
    ("adam", "centermask", [1 / 3, 2 / 3, 1, 1, 0.1]),
    ("sgd", "fcos", [1 / 3, 1 / 3, 1 / 3, 1, 0.1]),
    ("sgd", "centermask_fcos", [5 / 9, 7 / 9, 1, 1, 0.1])])
def test_learning_rate_warm_up_of_each_solver(optimizer, method, expected):
    """Guards train.py's get_lr, in units of learning_rate, W = 3 warm-up iterations, x 0.1 from
    iteration 4, at iterations 0, 1, 2, 3, 4:
      Adam ([CM 3.5]; f = 0, linear): (it + 1) / 3 = 1/3, 2/3, 1; then 1, 0.1.
      SGD, FCOS (configs/fcos/*.yaml: WARMUP_METHOD "constant", f = 1/3): 1/3 for 3 iterations.
      SGD, CenterMask-FCOS (Mask R-CNN's linear warm-up, f = 1/3): 1/3 + 2/3 (it + 1) / 3 =
      1/3 + 2/9 = 5/9, 1/3 + 4/9 = 7/9, 1/3 + 6/9 = 1."""
    get_lr, = train_py_definitions("WARMUP_FACTOR", "WARMUP_CONSTANT", "get_lr", optimizer=optimizer,
                                   method=method, learning_rate=1.0, warmup_iters=3, step_iters=[4])[2:]
    assert [get_lr(it) for it in range(5)] == pytest.approx(expected)


def accumulated_grads(kind, counts, k, whole_batch_normalizers=True):
    """Gradients after k micro-batches of len(counts) / k images each, accumulated as train.py
    does: each loss divided by k, and with `whole_batch_normalizers` the normalisers of the whole
    batch (train.py's record_normalizers: a recording pass, then `replaying`); without it, the
    plain form (each micro-batch's own counts). One thread, as `single_process_grads`."""
    record_normalizers, replaying = train_py_definitions("record_normalizers", "replaying")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = tiny_model(kind)
        images, targets = make_batch(counts)
        b = len(counts) // k
        micro = [(images[i * b:(i + 1) * b], targets[i * b:(i + 1) * b]) for i in range(k)]
        means = record_normalizers(model, micro).mean(0) if whole_batch_normalizers else None
        for images_m, targets_m in micro:
            with replaying(means) if whole_batch_normalizers else contextlib.nullcontext():
                loss = model(images_m, targets_m)["loss"]
            (loss / k).backward()
        return grads_of(model)
    finally:
        torch.set_num_threads(threads)


def test_normalizer_recording_pass_leaves_batchnorm_statistics_and_gradients_alone():
    """Guards the recording pass of record_normalizers on a model with BatchNorm in training
    mode (the tiny DLA CenterMask): it runs forwards without gradients, so no parameter gets a
    gradient, and it puts every running mean / variance / batch count back bit for bit; it records
    the same number of reduce_mean calls for every micro-batch and their means are the plain
    averages (CenterMask: heatmap positives, the L1 losses' 2N, objects M; counts (1, 1) and (3, 3)
    objects per image give positives 2 and 6: mean 4)."""
    record_normalizers, = train_py_definitions("record_normalizers")
    model = tiny_centermask()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images, targets = make_batch(UNEQUAL_COUNTS)
    recorded = record_normalizers(model, [(images[:2], targets[:2]), (images[2:], targets[2:])])
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert recorded.shape[0] == 2 and recorded[0, 0] == 2 and recorded[1, 0] == 6   # (2 micro-batches, calls)
    assert recorded.mean(0)[0] == 4
