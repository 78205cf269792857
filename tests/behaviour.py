"""
The behaviour of every method's small model against another commit's, bit for bit: the losses,
the gradient of every parameter, the detections and masks of a fixed two-image batch, one
thread, deterministic algorithms. For a restructuring that must not move a number:

    python tests/behaviour.py HEAD~3          # this tree against commit HEAD~3 (a git worktree)
    python tests/behaviour.py --capture OUT   # this tree's numbers into OUT (torch.save)

Not part of CI (pytest does not collect this file): about 10 s per tree. A case's keys are written
in today's spelling and, where a key was renamed, in the old one too: each tree gets the keys its
ModelConfig has. Exit status 1 when a number differs or a case is missing on one side.
"""
import argparse
import dataclasses
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CENTERMASK = dict(method="centermask", num_classes=3, dcn=False, dla_channels=(4, 8, 8, 16, 16, 32),
                  head_conv=8, shape_size=8)
HOURGLASS = dict(method="centermask", backbone="hourglass104", num_classes=3, num_stacks=2,
                 hg_dims=(8, 8, 16, 16), hg_modules=(1, 1, 1, 1), head_conv=8, shape_size=8)
# the original FCOS: one key today, four before (fcos_form replaced them)
ORIGINAL = dict(fcos_form="original", centerness_on="cls", reg_form="exp", center_sampling=0.0,
                box_loss="iou")


def family(method, **kw):
    return dict(method=method, backbone="resnet18", num_classes=3, norm="bn", freeze_at=0,
                fpn_channels=32, head_conv=32, shape_size=8, **kw)


CASES = {
    "centermask": CENTERMASK,
    "centermask_specific": dict(CENTERMASK, saliency="specific", saliency_loss=True),
    "centermask_shape_only": dict(CENTERMASK, use_saliency=False),
    "centermask_saliency_only": dict(CENTERMASK, use_shape=False),
    "centermask_hourglass": HOURGLASS,
    "fcos": family("fcos"), "fcos_original": family("fcos", **ORIGINAL),
    "fcosreg": family("fcosreg"), "maskfcos": family("maskfcos"),
    "centermask_fcos": family("centermask_fcos"),
    "centermask_fcos_specific": family("centermask_fcos", saliency="specific", saliency_loss=True),
    "fcosis": family("fcosis"), "fcosis_mu0": family("fcosis", attention="mu0"),
    "fcosis_bbox": family("fcosis", attention="bbox"),
    "fcosis_none": family("fcosis", attention="none"),
    "fcosis_specific": family("fcosis", seg_classes="specific"),
    "fcosis_original": family("fcosis", **ORIGINAL),
}


def batch(H=96, W=128):
    """Two images: three objects (two rectangles, an L shape) and one large object."""
    import torch
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, H, W, generator=g)
    masks = torch.zeros(3, H, W, dtype=torch.uint8)
    masks[0, 10:40, 10:40] = 1
    masks[1, 20:60, 40:90] = 1
    masks[2, 50:90, 60:70] = 1
    masks[2, 80:90, 60:110] = 1
    big = torch.zeros(1, H, W, dtype=torch.uint8)
    big[0, 5:70, 8:100] = 1
    return images, [
        {"boxes": torch.tensor([[10., 10, 40, 40], [40, 20, 90, 60], [60, 50, 110, 90]]),
         "labels": torch.tensor([0, 1, 2]), "masks": masks},
        {"boxes": torch.tensor([[8., 5, 100, 70]]), "labels": torch.tensor([1]), "masks": big}]


def capture(root, out):
    """Run every case with the model.py of `root`; save {case/kind/name: tensor} to `out`."""
    sys.path.insert(0, root)
    import torch
    import model
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    fields = {f.name for f in dataclasses.fields(model.ModelConfig)}
    numbers = {}
    images, targets = batch()
    for case, keys in CASES.items():
        torch.manual_seed(0)
        net = model.build_model(model.ModelConfig(**{k: v for k, v in keys.items() if k in fields}))
        torch.manual_seed(2)
        losses = net.train()(images, targets)
        losses["loss"].backward()
        numbers.update({f"{case}/loss/{k}": v.detach() for k, v in losses.items()})
        numbers.update({f"{case}/grad/{n}": p.grad for n, p in net.named_parameters()
                        if p.grad is not None})
        with torch.no_grad():
            for n, p in net.named_parameters():  # class biases up: detections above every threshold
                if n.endswith("bias") and p.numel() == 3:
                    p.add_(3.0)
            dets = net.eval()(images, image_sizes=[(96, 128), (90, 120)])
        for i, d in enumerate(dets):
            numbers.update({f"{case}/image{i}/{k}": v for k, v in d.items()})
        print(f"{case}: loss {losses['loss'].item():.6f}, detections {[len(d['boxes']) for d in dets]}",
              flush=True)
    torch.save(numbers, out)


def compare(ours, theirs):
    """Print every number that differs; returns how many differ or are missing."""
    import torch
    a, b = torch.load(ours), torch.load(theirs)
    bad = 0
    for key in sorted(set(a) | set(b)):
        if key not in a or key not in b:
            print(f"missing in {'this tree' if key not in a else 'the other'}: {key}")
        elif a[key].shape != b[key].shape or not torch.equal(a[key], b[key]):
            diff = "shape" if a[key].shape != b[key].shape else \
                f"{(a[key].double() - b[key].double()).abs().max().item():.3g}"
            print(f"differs: {key} (max |difference| {diff})")
        else:
            continue
        bad += 1
    print(f"{len(set(a) | set(b))} numbers compared, {bad} differ or are missing")
    return bad


def main():
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("commit", nargs="?", help="the commit to compare this tree with")
    ap.add_argument("--capture", metavar="OUT", help="only save this tree's numbers")
    ap.add_argument("--root", default=ROOT, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.capture:
        return capture(args.root, args.capture)
    if not args.commit:
        ap.error("give a commit to compare with, or --capture OUT")
    with tempfile.TemporaryDirectory() as tmp:
        other = os.path.join(tmp, "tree")
        subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", other, args.commit],
                       check=True, capture_output=True)
        try:
            runs = []
            for name, root in (("this tree", ROOT), (args.commit, other)):
                out = os.path.join(tmp, f"{len(runs)}.pt")
                print(f"-- {name}")
                subprocess.run([sys.executable, os.path.abspath(__file__), "--capture", out,
                                "--root", root], check=True, cwd=root)
                runs.append(out)
            sys.exit(1 if compare(*runs) else 0)
        finally:
            subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", other],
                           capture_output=True)


if __name__ == "__main__":
    main()
