"""
Mutation check of the methods' central code: each mutant changes one token (an operator, a sign,
an index, a constant, align_corners, a clamp, a comparison) in a scratch copy of the repository and
runs the fast tests that should catch it; a mutant that passes them all SURVIVED. Not part of CI
(pytest does not collect this file): minutes for the whole list.

    python tests/mutate.py                    # every mutant, one at a time, then the table
    python tests/mutate.py --list             # the mutants, each checked to match its code once
    python tests/mutate.py --only NAME ...    # some of them (names from --list)
    python tests/mutate.py --jobs 2           # two scratch copies side by side

A mutant is (name, file, the exact source snippet, its replacement, the test files to run): it
follows the code when lines move, and a snippet that is not found exactly once stops the run with
its name. A mutant that cannot change a result is listed with the reason (`equivalent`), and
still run. Exit status 1 when a mutant that is not marked equivalent survives.
"""
import argparse
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Mutant:
    name: str
    file: str                 # relative to the repository root
    find: str                 # exact source text, found exactly once in `file`
    replace: str
    tests: tuple              # pytest arguments: test files or node ids
    equivalent: str = ""      # why it cannot change a result ("" = it must be killed)


PINNED = "tests/test_pinned.py"
CENTERNET = ("tests/test_model.py", PINNED)
CENTERMASK = ("tests/test_model.py", "tests/test_hourglass.py", PINNED)
FCOS = ("tests/test_fcos.py", PINNED)
FCOSIS = ("tests/test_fcosis.py", PINNED)
M = "model.py"

MUTANTS = [
    # -- CenterNet targets and losses ([CN] 3, [CM] eq. 3-5) ---------------------------------------
    Mutant("focal_pos_log", M, "pos_loss = (torch.log(p) *",
           "pos_loss = (torch.log(1 - p) *", CENTERNET),
    Mutant("focal_pos_weight", M, "torch.log(p) * (1 - p) ** alpha",
           "torch.log(p) * p ** alpha", CENTERNET),
    Mutant("focal_neg_weight", M, "torch.log(1 - p) * p ** alpha",
           "torch.log(1 - p) * (1 - p) ** alpha", CENTERNET),
    Mutant("focal_beta", M, "(1 - gt) ** beta", "(1 - gt) ** alpha", CENTERNET),
    Mutant("focal_clamp_low", M, ".clamp(1e-4, 1 - 1e-4)", ".clamp(1e-3, 1 - 1e-4)", CENTERNET),
    Mutant("focal_clamp_high", M, ".clamp(1e-4, 1 - 1e-4)", ".clamp(1e-4, 1 - 1e-3)", CENTERNET),
    Mutant("focal_positive_rule", M, "pos = gt.eq(1).float()",
           "pos = gt.ge(0.5).float()", CENTERNET),
    Mutant("focal_no_positive", M, "torch.where(num_pos > 0, num_pos, 1.0)",
           "torch.where(num_pos > 0, num_pos, 2.0)", CENTERNET),
    Mutant("radius_case2", M, "sq2 = sqrt(b2 ** 2 - 16 * c2)",
           "sq2 = sqrt(b2 ** 2 - 4 * c2)", CENTERNET),
    Mutant("heatmap_sigma", M, "sigma = (2 * radius + 1) / 6",
           "sigma = (2 * radius + 1) / 3", CENTERNET),
    Mutant("heatmap_window", M, "(dx.abs() <= r)", "(dx.abs() < r)", CENTERNET),
    Mutant("heatmap_class_row", M, 'row = objs["batch"] * num_classes + objs["labels"]',
           'row = objs["batch"] * num_classes + 0 * objs["labels"]', CENTERNET),
    Mutant("l1_normaliser", M, "return (pred - target).abs().sum() / (n + 1e-4)",
           "return (pred - target).abs().sum() / (n / 2 + 1e-4)", CENTERNET),
    Mutant("gather_xy", M, "feature[batch, :, cells_xy[:, 1], cells_xy[:, 0]]",
           "feature[batch, :, cells_xy[:, 0], cells_xy[:, 1]]", CENTERNET),
    Mutant("offset_target_sign", M, 'gt_offset = objs["center"] - objs["center_int"].float()',
           'gt_offset = objs["center_int"].float() - objs["center"]', CENTERNET),
    Mutant("size_target_xy", M, 'l1_at_centers(out["size"], objs, objs["wh"])',
           'l1_at_centers(out["size"], objs, objs["wh"].flip(1))', CENTERNET),
    # -- CenterMask: assembly ([CM] eq. 1-2) and decoding ([CM 3.5]) -------------------------------
    Mutant("saliency_channel_loss", M,
           'sal_channel = labels if self.cfg.saliency == "specific"',
           'sal_channel = torch.zeros_like(labels) if self.cfg.saliency == "specific"',
           CENTERMASK),
    Mutant("saliency_channel_decode", M,
           'sal_channel = labels.reshape(-1) if specific',
           'sal_channel = torch.zeros_like(batch) if specific', CENTERMASK),
    Mutant("saliency_target_channel", M,
           'gt = saliency_targets(pooled, image_index(counts, device), labels, B, C)',
           'gt = saliency_targets(pooled, image_index(counts, device), labels * 0, B, C)',
           CENTERMASK),
    Mutant("stretch_half_pixel", M, "* n_in - 0.5).clamp(0, n_in - 1)",
           "* n_in + 0.5).clamp(0, n_in - 1)", CENTERMASK),
    Mutant("stretch_in_box_rule", M, 'return weights, between(pos[None], lo, hi, "closed")',
           'return weights, between(pos[None], lo, hi, "open")', CENTERMASK),
    Mutant("resize_border", M, 'grid, "bilinear", "border",', 'grid, "bilinear", "zeros",',
           CENTERMASK),
    Mutant("plain_crop_rule", M, 'in_y = between(ys[None], b[:, 1:2], b[:, 3:4], rule)',
           'in_y = between(ys[None], b[:, 1:2], b[:, 3:4], "open")', CENTERMASK),
    Mutant("mask_log_shape_only", M, "return log_m, F.logsigmoid(-L)",
           "return log_m, F.logsigmoid(L)", CENTERMASK),
    Mutant("mask_log_saliency_only", M, "return log_m, F.logsigmoid(-G)",
           "return log_m, F.logsigmoid(G)", CENTERMASK),
    Mutant("saliency_resample_corners", M, '(gh, gw), mode="bilinear", align_corners=False)',
           '(gh, gw), mode="bilinear", align_corners=True)', CENTERMASK),
    Mutant("mask_loss_crop", M, "per_object = (bce * in_box).sum((1, 2))",
           "per_object = bce.sum((1, 2))", CENTERMASK),
    Mutant("mask_loss_objects", M, "per_object.sum() / num_objects",
           "per_object.mean()", CENTERMASK),
    Mutant("peaks_pool", M, "F.max_pool2d(heat, 3, 1, 1)",
           "F.max_pool2d(heat, 1, 1, 0)", CENTERMASK),
    Mutant("peaks_row", M, "ys, xs = (idx % (h * w)) // w, idx % w",
           "ys, xs = (idx % (h * w)) // h, idx % w", CENTERMASK),
    Mutant("decode_offset_sign", M, "center = cells.float() + offset",
           "center = cells.float() - offset", CENTERMASK),
    Mutant("decode_box_stride", M, 'boxes = (boxes_out[sl] * R)',
           'boxes = (boxes_out[sl] * 2)', CENTERMASK),
    # -- FCOS: locations, targets, losses, decoding ([FCOS], [IS 3.1]) -----------------------------
    Mutant("locations_half", M, "sx, sy, half = s, s, s // 2",
           "sx, sy, half = s, s, s // 4", FCOS),
    Mutant("targets_region", M, "in_region = region.amin(-1) > 0",
           "in_region = region.amin(-1) >= 0", FCOS),
    Mutant("targets_range_low", M, "(m >= size_ranges[None, :, 0:1])",
           "(m > size_ranges[None, :, 0:1])", FCOS),
    Mutant("targets_radius_stride", M, "r = radius * strides[None, :, None]",
           "r = radius * 8 + 0 * strides[None, :, None]", FCOS),
    Mutant("targets_smallest_area", M,
           "torch.where(candidate, area, torch.full_like(area, math.inf)).min(-1)",
           "torch.where(candidate, -area, torch.full_like(area, math.inf)).min(-1)", FCOS),
    Mutant("centerness_tb", M, "torch.minimum(t, b) / torch.maximum(t, b))",
           "torch.minimum(l, b) / torch.maximum(t, b))", FCOS),
    Mutant("head_stride", M, "F.relu(x) * s", "F.relu(x) * 8", FCOS),
    Mutant("iou_union", M, "union = (l + r) * (t + b) + (l_ + r_) * (t_ + b_) - inter",
           "union = (l + r) * (t + b) + (l_ + r_) * (t_ + b_) + inter", FCOS),
    Mutant("focal_alpha", M, "onehot, FOCAL_ALPHA, FOCAL_GAMMA,",
           "onehot, 1 - FOCAL_ALPHA, FOCAL_GAMMA,", FCOS),
    Mutant("box_loss_weight", M, 'losses["box"] = (per_box * weight).sum()',
           'losses["box"] = (per_box * 1).sum()', FCOS),
    Mutant("centerness_loss_norm", M, 'losses["centerness"] = bce / num_pos',
           'losses["centerness"] = bce * num_pos', FCOS),
    Mutant("decode_box_sides", M, "boxes = torch.cat([p - d[:, :2], p + d[:, 2:]], 1)",
           "boxes = torch.cat([p - d[:, 2:], p + d[:, :2]], 1)", FCOS),
    Mutant("decode_score_sqrt", M, "s, lo, lab = cand_scores[b][keep].sqrt()",
           "s, lo, lab = cand_scores[b][keep]", FCOS),
    Mutant("decode_location_class", M, "loc, labels = cand_index // C, cand_index % C",
           "loc, labels = cand_index % C, cand_index // C", FCOS),
    Mutant("decode_clip_to_batch", M, "H, W = x.image_sizes[b] if x.image_sizes is not None else input_hw",
           "H, W = input_hw", FCOS),
    # -- FCOSreg ([IS 3.3]) ------------------------------------------------------------------------
    Mutant("fcosreg_sqrt_term", M, "c * torch.sqrt((centerness * seg)",
           "c * torch.sqrt((centerness + seg)", FCOS),
    Mutant("fcosreg_highest_label", M, "(s == s.amax(-1, keepdim=True))",
           "(s == s.amin(-1, keepdim=True))", FCOS),
    Mutant("fcosreg_weights_used", M, 'if self.cfg.method == "fcosreg" and seg is not None:',
           'if self.cfg.method == "fcos" and seg is not None:', FCOS),
    Mutant("fcosreg_mass_sampling", M,
           'centers = mass if self.cfg.center_sampling_at == "mass" else None',
           'centers = mass if self.cfg.center_sampling_at == "box" else None', FCOS),
    # -- MaskFCOS ([IS 4]) -------------------------------------------------------------------------
    Mutant("maskfcos_level", M, "k = torch.floor(k0 + torch.log2(",
           "k = torch.floor(k0 - torch.log2(", FCOS),
    Mutant("maskfcos_roi_scale", M, "ROI_SIZE, 1.0 / 2 ** k,",
           "ROI_SIZE, 1.0 / 2 ** (k - 1),", FCOS),
    Mutant("maskfcos_flat_index", M,
           "gt_index = first_box_index(targets, device)[batch] + torch.cat(gt_index)",
           "gt_index = 0 * first_box_index(targets, device)[batch] + torch.cat(gt_index)", FCOS),
    Mutant("maskfcos_class_channel", M, "rois, gt_labels[gt_index]).float()",
           "rois, 0 * gt_labels[gt_index]).float()", FCOS),
    Mutant("maskfcos_normaliser", M, "float(sum(counts) * S * S)", "float(sum(counts) * S)", FCOS),
    Mutant("paste_box_size", M, "centers, wh = (boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes",
           "centers, wh = (boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] + boxes", FCOS),
    # -- CenterMask-FCOS ([CM 4.3]) ----------------------------------------------------------------
    Mutant("cmfcos_channel_loss", M, 'ch = assigned["labels"][pos] if',
           'ch = 0 * assigned["labels"][pos] if', FCOS),
    Mutant("cmfcos_normaliser", M, "float(len(batch) * S * S)", "float(len(batch) * S)", FCOS),
    Mutant("cmfcos_lambda_mask", M, '{"mask": self.cfg.loss_weights[3] * bce.sum()',
           '{"mask": self.cfg.loss_weights[2] * bce.sum()', FCOS),
    Mutant("cmfcos_cell", M, "batch[sel], cell // w, cell % w)",
           "batch[sel], cell % w, cell // w)", FCOS),
    Mutant("cmfcos_channel_postprocess", M, 'ch = d["labels"] if', 'ch = 0 * d["labels"] if', FCOS),
    Mutant("cmfcos_dense_shape_index", M, "return shape[batch, :, index].float()",
           "return shape[batch, :, index.flip(0)].float()", FCOS),
    Mutant("cmfcos_box_units", M, 'd["boxes"][:, 2:]) / (2 * R)',
           'd["boxes"][:, 2:]) / (1 * R)', FCOS),
    # -- FCOSIS ([IS 3.2]) -------------------------------------------------------------------------
    Mutant("att_distractor_sign", M, "(1 - f), -mu) * in_box", "(1 - f), mu) * in_box", FCOSIS),
    Mutant("att_box_rule", M, 'in_box = inside(q[None], boxes.float()[:, None], "half-open")',
           'in_box = inside(q[None], boxes.float()[:, None], "closed")', FCOSIS),
    Mutant("att_nearest", M,
           "return argmin_per_image(dist2, batch, num_images)[batch] == ids[:, None]",
           "return argmin_per_image(-dist2, batch, num_images)[batch] == ids[:, None]", FCOSIS),
    Mutant("att_owner_tie", M, "dist2[obj] < best)", "dist2[obj] <= best)", FCOSIS),
    Mutant("att_own_background", M, "torch.where(mine, lam * f - mu * (1 - f)",
           "torch.where(mine, lam * f + mu * (1 - f)", FCOSIS),
    Mutant("seg_head_upsample", M,
           'y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)',
           'y = F.interpolate(y, size=size, mode="bilinear", align_corners=True)', FCOSIS),
    Mutant("coloring_group_image", M, "return groups, keys // K",
           "return groups, keys % K", FCOSIS),
    Mutant("mass_centre_half_pixel", M,
           "xs = torch.arange(W, device=dev, dtype=torch.float32) + 0.5",
           "xs = torch.arange(W, device=dev, dtype=torch.float32) + 0.0", FCOSIS),
    Mutant("regressed_stride", M, "return loc + stride * center_offsets.float()",
           "return loc + center_offsets.float()", FCOSIS),
    Mutant("att_inputs_corners", M, 'size=tuple(p2_hw), mode="bilinear", align_corners=False)',
           'size=tuple(p2_hw), mode="bilinear", align_corners=True)', FCOSIS),
    Mutant("att_inputs_stride", M, "strides=[self.strides[0] // 2])[0]",
           "strides=[self.strides[0]])[0]", FCOSIS),
    Mutant("apply_attention_area", M, 'size=f.shape[-2:], mode="area")',
           'size=f.shape[-2:], mode="nearest")', FCOSIS),
    Mutant("inference_centre_sign", M, "centers = points[index] + s[:, None] *",
           "centers = points[index] - s[:, None] *", FCOSIS),
    Mutant("inference_centre_level", M, "dtype=torch.float32)[levels[index]]",
           "dtype=torch.float32)[levels[index] - 1]", FCOSIS),
    Mutant("inference_crop", M, "probs = probs.sigmoid() * boxes_inside(boxes, H, W)",
           "probs = probs.sigmoid() * boxes_inside(boxes, H, W).fill_(True)", FCOSIS),
    Mutant("coloring_order", M, "torch.sort(adj.sum(1), descending=True",
           "torch.sort(adj.sum(1), descending=False", FCOSIS),
    Mutant("overlap_touching", M, "adj = (iw > 0) & (ih > 0)",
           "adj = (iw >= 0) & (ih > 0)", FCOSIS),
    Mutant("crop_rule", M, 'in_x = between(xs[None], b[:, 0:1], b[:, 2:3], rule)',
           'in_x = between(xs[None], b[:, 0:1], b[:, 2:3], "closed")', FCOSIS),
    Mutant("crop_rule_y", M, 'in_y = between(ys[None], b[:, 1:2], b[:, 3:4], rule)',
           'in_y = between(ys[None], b[:, 1:2], b[:, 3:4], "closed")', FCOSIS),
    Mutant("crop_padding_sign", M,
           "return boxes + p[:, None] * boxes.new_tensor([-1.0, -1.0, 1.0, 1.0])",
           "return boxes + p[:, None] * boxes.new_tensor([1.0, -1.0, 1.0, 1.0])", FCOSIS),
    Mutant("crop_centre_cell", M, "crop[torch.arange(N, device=crop.device), cy, cx] = True",
           "crop[torch.arange(N, device=crop.device), cy, cx] = False", FCOSIS),
    Mutant("padding_root", M, "p = (torch.sqrt((w - h) ** 2 + 4 * fg / ratio) - (w + h)) / 4",
           "p = (torch.sqrt((w - h) ** 2 + 2 * fg / ratio) - (w + h)) / 4", FCOSIS),
    Mutant("com_target_units", M, "target = (mass_centers[m].float() - locations.float()) / s",
           "target = (mass_centers[m].float() - locations.float()) * s", FCOSIS),
    Mutant("com_assignment_smaller", M, 'cost = torch.where(covered, area[:, None], float("inf"))',
           'cost = torch.where(covered, -area[:, None], float("inf"))', FCOSIS),
    Mutant("foreground_union", M, 'flat, "amax")', 'flat, "sum")', FCOSIS),
    Mutant("foreground_normaliser", M, "reduce_mean(torch.full((), float(fg_target.numel())",
           "reduce_mean(torch.full((), float(fg_target.shape[1])", FCOSIS),
    Mutant("com_normaliser", M, "normalizer=num_valid)", "normalizer=None)", FCOSIS),
    Mutant("mask_instances", M, "padded_crop_bce(logits.float(), masks, boxes) * M / num_instances",
           "padded_crop_bce(logits.float(), masks, boxes) / num_instances", FCOSIS),
    Mutant("fcosis_channels", M, "COM, FOREGROUND = slice(0, 2), 2",
           "COM, FOREGROUND = slice(1, 3), 0", FCOSIS),
]


def check_snippets(mutants):
    """file:line of each mutant; stops, naming it, where a snippet is not found exactly once."""
    where = {}
    for m in mutants:
        with open(os.path.join(ROOT, m.file)) as f:
            text = f.read()
        n = text.count(m.find)
        if n != 1:
            sys.exit(f"mutate.py: mutant {m.name}: its snippet {m.find!r} is found {n} times in "
                     f"{m.file} (must be exactly once)")
        where[m.name] = f"{m.file}:{text[:text.index(m.find)].count(chr(10)) + 1}"
    return where


def scratch_copy():
    """A copy of the repository in a temporary folder (never the worktree itself), without git,
    data and outputs."""
    dst = tempfile.mkdtemp(prefix="mutate-")
    ignore = shutil.ignore_patterns(".git", "data", "out", "__pycache__", ".pytest_cache",
                                    ".benchmarks", "*.pt")
    shutil.copytree(ROOT, os.path.join(dst, "repo"), ignore=ignore)
    return os.path.join(dst, "repo")


def run_tests(repo, tests, timeout):
    """The fast tier of `tests` in `repo`, stopping at the first failure -> (passed, the first
    failing test or why it stopped)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-m", "not slow", "-p", "no:cacheprovider",
           *tests]
    env = dict(os.environ, TEST_THREADS="1", OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    try:
        r = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"timeout ({timeout} s)"
    if r.returncode == 0:
        return True, ""
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", r.stdout, re.M)
    if failed:
        return False, failed[0]
    return False, f"pytest exit {r.returncode}: {(r.stdout + r.stderr).strip()[-200:]}"


def run_mutant(repo, m, timeout):
    path = os.path.join(repo, m.file)
    with open(path) as f:
        original = f.read()
    try:
        with open(path, "w") as f:
            f.write(original.replace(m.find, m.replace, 1))
        return run_tests(repo, m.tests, timeout)
    finally:
        with open(path, "w") as f:
            f.write(original)


def main():
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--list", action="store_true", help="list the mutants and their lines only")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutants")
    ap.add_argument("--jobs", type=int, default=1, help="scratch copies side by side (default 1)")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per mutant (default 300)")
    args = ap.parse_args()
    mutants = MUTANTS
    if args.only:
        unknown = sorted(set(args.only) - {m.name for m in MUTANTS})
        if unknown:
            sys.exit(f"mutate.py: unknown mutant(s) {', '.join(unknown)} (see --list)")
        mutants = [m for m in MUTANTS if m.name in args.only]
    names = [m.name for m in MUTANTS]
    assert len(names) == len(set(names)), "mutant names must be unique"
    where = check_snippets(mutants)
    if args.list:
        for m in mutants:
            print(f"{m.name:28s} {where[m.name]:16s} {' '.join(m.tests)}"
                  + (f"  [equivalent: {m.equivalent}]" if m.equivalent else ""))
        print(f"{len(mutants)} mutants")
        return

    repos = queue.Queue()
    for _ in range(max(1, args.jobs)):
        repos.put(scratch_copy())
    # the unmutated code must pass every test set, or a "kill" means nothing
    first = repos.get()
    passed, why = run_tests(first, sorted({t for m in mutants for t in m.tests}), args.timeout * 4)
    repos.put(first)
    if not passed:
        sys.exit(f"mutate.py: the unmutated code fails {why}: fix that first")

    results, lock = {}, threading.Lock()

    def worker():
        while True:
            with lock:
                if not todo:
                    return
                m = todo.pop(0)
            repo = repos.get()
            t0 = time.time()
            try:
                passed, why = run_mutant(repo, m, args.timeout)
            finally:
                repos.put(repo)
            with lock:
                results[m.name] = (passed, why, time.time() - t0)
                verdict = "SURVIVED" if passed else why
                print(f"  {m.name}: {verdict} ({time.time() - t0:.0f} s)", flush=True)

    todo = list(mutants)
    threads = [threading.Thread(target=worker) for _ in range(max(1, args.jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    while not repos.empty():
        shutil.rmtree(os.path.dirname(repos.get()), ignore_errors=True)

    print(f"\n| mutant | file:line | killed by |\n|---|---|---|")
    survivors = []
    for m in mutants:
        passed, why, _ = results[m.name]
        if passed:
            verdict = f"SURVIVED (equivalent: {m.equivalent})" if m.equivalent else "SURVIVED"
            if not m.equivalent:
                survivors.append(m.name)
        else:
            verdict = why
        print(f"| {m.name} | {where[m.name]} | {verdict} |")
    killed = sum(not results[m.name][0] for m in mutants)
    print(f"\n{killed} of {len(mutants)} killed"
          + (f"; survived: {', '.join(survivors)}" if survivors else ""))
    sys.exit(1 if survivors else 0)


if __name__ == "__main__":
    main()
