"""Tests of eval.py: mapping predictions back to the original image, COCO results, COCOeval.

Everything runs on a tiny COCO set written to tmp_path: three images of different sizes
(40x60, 60x60, and an unannotated 60x40), category ids 5 and 9 (not contiguous), masks as RLE
and as a polygon, and one crowd region. The stub dataset halves every image (scale 0.5, masks
by nearest resize), so predictions really have to be mapped back. Every mask is made of 2x2
pixel blocks: halving it by nearest resize and bringing it back by bilinear resize + 0.5
threshold is then exact, so a perfect model must score exactly AP 1.0.
"""
import contextlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from eval import evaluate, to_original, _masks_to_original  # noqa: E402
from pictures import save_pictures  # noqa: E402

CAT_IDS = (5, 9)
# (id, height, width): long side 60 everywhere, so data.py's test transform with
# input_size=30 also scales by exactly 0.5
IMAGES = ((11, 40, 60), (12, 60, 60), (13, 60, 40))


def _block_mask(H, W, x0, y0, x1, y1, ellipse=False):
    """(H, W) uint8 mask made of 2x2 blocks covering [x0, x1) x [y0, y1) (even numbers)."""
    h, w = H // 2, W // 2
    yy, xx = np.mgrid[0:h, 0:w]
    if ellipse:
        cx, cy = (x0 + x1) / 4 - 0.5, (y0 + y1) / 4 - 0.5
        rx, ry = (x1 - x0) / 4, (y1 - y0) / 4
        small = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
    else:
        small = (xx >= x0 // 2) & (xx < x1 // 2) & (yy >= y0 // 2) & (yy < y1 // 2)
    return np.kron(small.astype(np.uint8), np.ones((2, 2), np.uint8))


def _ann(ann_id, image_id, cat, mask, polygon=None, iscrowd=0):
    ys, xs = np.nonzero(mask)
    bbox = [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1),
            float(ys.max() - ys.min() + 1)]
    if polygon is not None:
        seg = [polygon]
    else:
        rle = mask_util.encode(np.asfortranarray(mask))
        seg = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
    return {"id": ann_id, "image_id": image_id, "category_id": cat, "bbox": bbox,
            "area": float(mask.sum()), "iscrowd": iscrowd, "segmentation": seg}


def write_tiny_coco(root):
    """Images as PNGs under root/images and root/ann.json; returns (img_dir, ann_file)."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    images = []
    for image_id, H, W in IMAGES:
        name = f"img_{image_id}.png"
        Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(root / "images" / name)
        images.append({"id": image_id, "file_name": name, "height": H, "width": W})
    anns = [
        _ann(1, 11, 5, _block_mask(40, 60, 4, 6, 30, 30, ellipse=True)),
        _ann(2, 11, 9, _block_mask(40, 60, 20, 10, 56, 36)),
        # a polygon rectangle: pycocotools rasterises (10,10)-(30,20) to pixels 10..29 x 10..19
        _ann(3, 11, 9, _block_mask(40, 60, 10, 10, 30, 20),
             polygon=[10, 10, 30, 10, 30, 20, 10, 20]),
        _ann(4, 12, 5, _block_mask(60, 60, 2, 2, 58, 40, ellipse=True)),
        _ann(5, 12, 5, _block_mask(60, 60, 30, 30, 50, 58, ellipse=True)),
        _ann(6, 12, 9, _block_mask(60, 60, 0, 44, 24, 60), iscrowd=1),
    ]
    data = {"images": images, "annotations": anns,
            "categories": [{"id": 5, "name": "five"}, {"id": 9, "name": "nine"}]}
    ann_file = root / "ann.json"
    ann_file.write_text(json.dumps(data))
    return str(root / "images"), str(ann_file)


class TinyCoco(torch.utils.data.Dataset):
    """The dataset contract eval.py relies on, in a few lines: images halved (scale 0.5)."""

    scale = 0.5

    def __init__(self, img_dir, ann_file):
        self.img_dir = img_dir
        with contextlib.redirect_stdout(io.StringIO()):
            self.coco = COCO(ann_file)
        self.ids = sorted(self.coco.getImgIds())
        self.label_to_cat_id = sorted(self.coco.getCatIds())
        self.class_names = [self.coco.cats[c]["name"] for c in self.label_to_cat_id]

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        H0, W0 = info["height"], info["width"]
        h, w = round(H0 * self.scale), round(W0 * self.scale)
        img = torch.from_numpy(np.array(Image.open(os.path.join(self.img_dir,
                                                                info["file_name"]))))
        img = img.permute(2, 0, 1).float()[None] / 255                         # (1, 3, H0, W0)
        img = F.interpolate(img, size=(h, w), mode="bilinear", align_corners=False)[0]
        anns = [a for a in self.coco.imgToAnns[image_id] if not a["iscrowd"]]
        masks = torch.stack([torch.from_numpy(self.coco.annToMask(a)) for a in anns]) \
            if anns else torch.zeros(0, H0, W0, dtype=torch.uint8)
        masks = F.interpolate(masks[None].float(), size=(h, w), mode="nearest")[0] \
            if anns else torch.zeros(0, h, w)                                    # (N, h, w)
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        labels = torch.tensor([self.label_to_cat_id.index(a["category_id"]) for a in anns],
                              dtype=torch.int64)
        return (img - 0.5) / 0.25, {
            "boxes": boxes * self.scale, "labels": labels, "masks": masks.to(torch.uint8),
            "image_id": image_id, "orig_size": torch.tensor([H0, W0]),
            "size": torch.tensor([h, w]), "scale": self.scale}


def pad_collate(batch, d=8):
    """Zero-pad images and masks bottom/right to a multiple of d (as data.collate_fn)."""
    H = -(-max(img.shape[1] for img, _ in batch) // d) * d
    W = -(-max(img.shape[2] for img, _ in batch) // d) * d
    images = torch.zeros(len(batch), 3, H, W)
    targets = []
    for i, (img, t) in enumerate(batch):
        images[i, :, :img.shape[1], :img.shape[2]] = img
        t = dict(t)
        m = t["masks"]
        t["masks"] = F.pad(m, (0, W - m.shape[2], 0, H - m.shape[1]))
        targets.append(t)
    return images, targets


class PerfectModel(torch.nn.Module):
    """Returns each image's ground truth (network frame) with score 1.

    It learns the ground truth through the collate function (`self.collate`), which runs in
    the main process right before the forward when num_workers=0, whatever the sampler.
    mask_kind: "float" (probabilities 0/1), "bool", or None (a box-only model like FCOS).
    It has what evaluate() reads of a model (model.Method): size_divisibility, mask_threshold.
    """
    size_divisibility = 32
    mask_threshold = 0.5

    def __init__(self, base_collate=pad_collate, mask_kind="float", empty=False):
        super().__init__()
        self.base_collate, self.mask_kind, self.empty = base_collate, mask_kind, empty
        self.targets = None

    def collate(self, batch):
        images, self.targets = self.base_collate(batch)
        return images, self.targets

    def forward(self, images, image_sizes=None):
        B, _, H, W = images.shape
        assert len(self.targets) >= B      # evaluate(max_images=...) may cut the last batch
        outputs = []
        for t in self.targets[:B]:
            keep = slice(0, 0) if self.empty else slice(None)
            out = {"boxes": t["boxes"][keep].float(),
                   "scores": torch.ones(len(t["labels"][keep])),
                   "labels": t["labels"][keep]}
            if self.mask_kind is not None:
                m = t["masks"][keep][:, :H, :W]                                 # (K, H, W)
                out["masks"] = m.bool() if self.mask_kind == "bool" else m.float()
            outputs.append(out)
        return outputs


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_coco(tmp_path_factory.mktemp("coco"))


def _loader(dataset, model, batch_size=2, sampler=None):
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=model.collate)


@pytest.mark.parametrize("mask_kind", ["float", "bool"])
def test_perfect_model_scores_ap_one(tiny, mask_kind):
    """Guards: any error in mapping back to the original image (forgetting `/ scale`, resizing
    the padded mask instead of the [:h, :w] crop, xyxy vs xywh, thresholding bool masks at
    the float threshold) and bool vs float masks; all of them drop the AP below 1.0."""
    ds = TinyCoco(*tiny)
    model = PerfectModel(mask_kind=mask_kind)
    stats = evaluate(model, _loader(ds, model), verbose=False)
    assert stats["bbox_AP"] == pytest.approx(1.0) and stats["segm_AP"] == pytest.approx(1.0)
    assert stats["bbox_AP50"] == pytest.approx(1.0) and stats["segm_AP75"] == pytest.approx(1.0)
    assert stats["bbox_APl"] == -1.0           # no large objects: COCOeval's -1 passes through
    assert stats["num_images"] == 3 and stats["num_detections"] == 5
    assert stats["images_per_s"] > 0 and stats["seconds"] > 0


def test_results_json_written_with_original_coords_and_cat_ids(tiny, tmp_path):
    """Guards: contiguous labels (0, 1) written as COCO category ids instead of 5 and 9,
    boxes left in network pixels, and a results file that is not valid JSON."""
    ds = TinyCoco(*tiny)
    model = PerfectModel()
    path = tmp_path / "sub" / "results.json"
    evaluate(model, _loader(ds, model), results_json=str(path), verbose=False)
    results = json.loads(path.read_text())
    assert len(results) == 5
    assert {r["category_id"] for r in results} == set(CAT_IDS)
    gt = {a["id"]: a for a in ds.coco.dataset["annotations"]}
    assert sorted(tuple(r["bbox"]) for r in results) == \
        sorted(tuple(a["bbox"]) for a in gt.values() if not a["iscrowd"])
    for r in results:
        assert isinstance(r["segmentation"]["counts"], str)
        assert r["segmentation"]["size"] == [ds.coco.imgs[r["image_id"]]["height"],
                                             ds.coco.imgs[r["image_id"]]["width"]]
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".tmp_")]


def test_no_detections_gives_zero_ap(tiny):
    """Guards: pycocotools' loadRes crashing (IndexError) on an empty result list, e.g. for
    an untrained model in the first periodic evaluation."""
    ds = TinyCoco(*tiny)
    model = PerfectModel(empty=True)
    stats = evaluate(model, _loader(ds, model), verbose=False)
    assert stats["bbox_AP"] == 0.0 and stats["segm_AP"] == 0.0
    assert stats["num_detections"] == 0 and stats["num_images"] == 3


def test_box_only_model_has_no_segm_keys(tiny):
    """Guards: a box-only model (FCOS) crashing on the missing masks or reporting segm AP."""
    ds = TinyCoco(*tiny)
    model = PerfectModel(mask_kind=None)
    stats = evaluate(model, _loader(ds, model), verbose=False)
    assert stats["bbox_AP"] == pytest.approx(1.0)
    assert not any(k.startswith("segm_") for k in stats)


def test_repeated_images_count_once(tiny):
    """Guards: DistributedSampler's padding (repeated images) adding duplicate detections,
    which COCOeval counts as false positives."""
    ds = TinyCoco(*tiny)
    model = PerfectModel()
    stats = evaluate(model, _loader(ds, model, sampler=[0, 1, 2, 0, 1]), verbose=False)
    assert stats["num_images"] == 3 and stats["num_detections"] == 5
    assert stats["bbox_AP"] == pytest.approx(1.0) and stats["segm_AP"] == pytest.approx(1.0)


def test_max_images_restricts_cocoeval(tiny):
    """Guards: COCOeval scoring all ground-truth images when only some were evaluated (the
    skipped images' objects would count as missed)."""
    ds = TinyCoco(*tiny)
    model = PerfectModel()
    stats = evaluate(model, _loader(ds, model, batch_size=2), max_images=1, verbose=False)
    assert stats["num_images"] == 1
    assert stats["bbox_AP"] == pytest.approx(1.0) and stats["segm_AP"] == pytest.approx(1.0)


def test_dataset_input_and_train_mode_restored(tiny):
    """Guards: evaluate() leaving the model in eval mode (train.py's loop would then train
    with frozen BatchNorm statistics) and the Dataset input path (loader built inside)."""
    ds = TinyCoco(*tiny)
    model = PerfectModel()
    model.train()
    stats = evaluate(model, ds, batch_size=2, collate_fn=model.collate, verbose=False)
    assert model.training
    assert stats["segm_AP"] == pytest.approx(1.0)


def test_progress_lines(tiny, monkeypatch, capsys):
    """Guards evaluation (eval.py, train.py's periodic one) and predict.py running through
    thousands of images without a line: at each tenth of the way (once `every_s` has passed since
    the last line), images done / total, images/s and the ETA in h:mm; a short loop says nothing.
    """
    from eval import Progress, hours_minutes
    assert [hours_minutes(s) for s in (59, 3725, 10 * 3600 + 5 * 60 + 59)] == ["0:00", "1:02", "10:05"]
    line = r"evaluating: {}/{} images, \d+\.\d images/s, ETA \d+:\d\d"
    progress = Progress("evaluating", 20)
    for done in range(1, 21):
        progress(done)
    assert capsys.readouterr().out == ""                                   # under 10 s in all
    monkeypatch.setattr(Progress, "every_s", 0.0)
    progress = Progress("evaluating", 20)
    for done in range(1, 21):
        progress(done)
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 10 and all(re.fullmatch(line.format(2 * k + 2, 20), o) for k, o in enumerate(out)), out
    ds = TinyCoco(*tiny)
    model = PerfectModel()
    evaluate(model, _loader(ds, model, sampler=[0, 1, 2, 0, 1]), verbose=False)        # batches of 2
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3 and all(re.fullmatch(line.format(n, 5), o) for n, o in zip((2, 4, 5), out)), out


def test_one_image_reader():
    """Guards a second image reader in eval.py or predict.py (a 16-bit PNG, a CMYK or EXIF-turned
    JPEG read another way gives other pixels than training saw): both read pictures only through
    data.load_rgb_image, predict.py directly, eval.py through data.CocoInstances."""
    for script in ("eval.py", "predict.py"):
        source = (ROOT / script).read_text()
        assert not re.search(r"Image\.open|imread|read_image|decode_(image|jpeg|png)", source), script
    assert "load_rgb_image(path, upright=True)" in (ROOT / "predict.py").read_text()
    assert "data.CocoInstances(" in (ROOT / "eval.py").read_text()


def test_to_original_clips_and_resizes():
    """Guards: boxes outside the image not being clipped, and masks resized with their batch
    padding (which shifts them) instead of cropped to `size` first."""
    out = {"boxes": torch.tensor([[-4.0, 2.0, 40.0, 12.0]]), "scores": torch.tensor([0.9]),
           "labels": torch.tensor([1]), "masks": torch.zeros(1, 16, 32)}
    out["masks"][0, 2:6, 0:4] = 0.9                          # network frame, h=10, w=20
    tgt = {"orig_size": torch.tensor([20, 40]), "size": torch.tensor([10, 20]), "scale": 0.5}
    pred = to_original(out, tgt, mask_threshold=0.5)
    assert pred["boxes"].tolist() == [[0.0, 4.0, 40.0, 20.0]]
    assert pred["masks"].shape == (1, 20, 40) and pred["masks"].dtype == torch.bool
    ys, xs = torch.nonzero(pred["masks"][0], as_tuple=True)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (4, 11, 0, 7)


def test_visualize_writes_pngs(tiny, tmp_path):
    """Guards: the picture path breaking (original image read from disk, class names, the
    teaching-maps hook) unnoticed, since nothing else checks it."""
    ds = TinyCoco(*tiny)
    model = PerfectModel()

    def maps_fn(images):
        # a float map (colour bar) and an (h, w, 3) RGB map (FCOSIS's angle field)
        return [{"heatmap": images[i, 0], "field": images[i].permute(1, 2, 0).sigmoid()}
                for i in range(images.shape[0])]

    paths = save_pictures(model, ds, tmp_path / "vis", n=2, collate_fn=model.collate)
    assert len(paths) == 2 and all(p.endswith(".png") and os.path.getsize(p) > 0 for p in paths)
    img = np.asarray(Image.open(paths[0]))
    assert img.shape[:2] == (40 * 7, 60 * 7)   # the original size, enlarged 7x (ceil(384 / 60)) for legible labels
    paths = save_pictures(model, ds, tmp_path / "vis2", n=3, collate_fn=model.collate,
                      maps_fn=maps_fn)
    assert len(paths) == 6 and sum(p.endswith("_maps.png") for p in paths) == 3


def test_with_data_py(tiny):
    """Guards: eval.py and data.py disagreeing on the target contract (orig_size, size,
    scale, padding, category-id mapping): the perfect round trip through data.CocoInstances
    + data.build_transforms("centernet", train=False) + data.collate_fn must give AP 1.0
    (all images have long side 60, so input_size=30 halves them exactly)."""
    data = pytest.importorskip("data", reason="data.py is not importable")
    ds = data.CocoInstances(*tiny, transforms=data.build_transforms(
        "centernet", train=False, input_size=30))
    model = PerfectModel(base_collate=data.collate_fn)
    stats = evaluate(model, _loader(ds, model), verbose=False)
    assert stats["bbox_AP"] == pytest.approx(1.0) and stats["segm_AP"] == pytest.approx(1.0)
    assert stats["num_images"] == 3


def test_keep_res_ground_truth_ceiling(tiny):
    """The mask AP that the test resolution alone allows: the ground truth itself, passed through
    the centernet test transform and mapped back (PerfectModel). With keep_res (scale 1) nothing
    is lost: AP 1.0. Shrunk to a long side of 26 (0.433x, masks by nearest) and brought back
    bilinearly, the masks lose pixels: segm AP 0.659 measured, asserted < 0.9, while the boxes,
    scaled exactly, keep bbox AP 1.0. (At 30 = 0.5x the 2x2-block masks come back exactly, see
    test_with_data_py.)"""
    data = pytest.importorskip("data", reason="data.py is not importable")
    for kw, segm in (({"keep_res": True}, 1.0), ({"input_size": 26}, None)):
        ds = data.CocoInstances(*tiny, transforms=data.build_transforms("centernet", train=False, **kw))
        model = PerfectModel(base_collate=data.collate_fn)
        stats = evaluate(model, _loader(ds, model), verbose=False)
        assert stats["bbox_AP"] == pytest.approx(1.0)
        if segm is None:
            assert stats["segm_AP"] < 0.9
        else:
            assert stats["segm_AP"] == pytest.approx(segm)


WORKER = """
import json, os, sys
sys.path[:0] = [{root!r}, {tests!r}]
import torch, torch.distributed as dist
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler
from test_eval import TinyCoco, PerfectModel
from eval import evaluate
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="file://" + {store!r}, rank=rank, world_size=2)
ds = TinyCoco({img_dir!r}, {ann!r})
model = PerfectModel()
loader = DataLoader(ds, batch_size=1, sampler=DistributedSampler(ds, shuffle=False),
                    collate_fn=model.collate)
stats = evaluate(model, loader, verbose=False)
json.dump(stats, open(os.path.join({out!r}, f"rank{{rank}}.json"), "w"))
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_two_process_gather(tiny, tmp_path):
    """Guards: multi-GPU evaluation scoring only rank 0's shard, counting DistributedSampler's
    padded repeats (3 images on 2 ranks: one is evaluated twice), or ranks returning different
    stats. Two real gloo processes."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(root=str(ROOT), tests=str(ROOT / "tests"),
                                    store=str(tmp_path / "store"), img_dir=tiny[0],
                                    ann=tiny[1], out=str(tmp_path)))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, str(script), str(r)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(2)]
    logs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    s0, s1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert s0["num_images"] == 3 and s0["num_detections"] == 5
    assert s0["bbox_AP"] == pytest.approx(1.0) and s0["segm_AP"] == pytest.approx(1.0)
    assert s0 == s1


def test_with_model_py(tiny):
    """Guards: model.py's eval-mode output drifting from the contract eval.py maps back
    (one dict per image; boxes/scores/labels/masks at the padded network-input size): an
    untrained tiny CenterMask must go through evaluate() and give every key, APs in [0, 1]
    or COCOeval's -1."""
    data = pytest.importorskip("data", reason="data.py is not importable")
    model_py = pytest.importorskip("model", reason="model.py is not importable")
    cfg = model_py.ModelConfig(num_classes=2, dcn=False, dla_channels=(8, 8, 16, 16, 32, 32),
                               head_conv=16, shape_size=8, max_detections=10)
    model = model_py.build_model(cfg)
    ds = data.CocoInstances(*tiny, transforms=data.build_transforms(
        "centernet", train=False, input_size=30))
    stats = evaluate(model, ds, batch_size=2, verbose=False)
    names = ("AP", "AP50", "AP75", "APs", "APm", "APl")
    for key in [f"{t}_{n}" for t in ("bbox", "segm") for n in names]:
        assert stats[key] == -1.0 or 0.0 <= stats[key] <= 1.0, key
    assert stats["num_images"] == 3 and stats["num_detections"] <= 30


@pytest.mark.slow
def test_cli_checkpoint_missing_a_folder_or_not_a_checkpoint_says_so(tmp_path):
    """Guards --ckpt of eval.py and predict.py: a wrong path, a folder and a text file each end
    with one line naming the path and saying what it is, in plain words, not a torch traceback
    or pickle jargon ("could not find MARK", "pop from empty list"), and no JSON line."""
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    says = {tmp_path / "no_such_ckpt.pt": "not found", tmp_path: "is a folder, not a checkpoint file",
            tmp_path / "notes.txt": "is not a PyTorch checkpoint"}
    for script, extra in (("eval.py", []), ("predict.py", [f"--input={tmp_path / 'a.png'}"])):
        for path, words in says.items():
            r = subprocess.run([sys.executable, str(ROOT / script), f"--ckpt={path}", "--device=cpu", *extra],
                               capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
            lines = r.stderr.strip().splitlines()
            assert r.returncode == 2 and len(lines) == 1, (script, path, r.stderr[-2000:])
            assert lines[0].startswith(f"{script}: error: {path} {words}"), lines
            assert "{" not in r.stdout


def write_big_boxes(root, n=8, size=64):
    """n pictures, each one big box (a class of its own colour on grey, 40-60 px of `size`), and
    their COCO json: a set a tiny CenterMask finds in a few dozen iterations."""
    from PIL import ImageDraw
    rng = np.random.default_rng(0)
    os.makedirs(root / "images")
    images, anns = [], []
    for i in range(1, n + 1):
        x0, y0, x1, y1 = (int(v) for v in (*rng.integers(2, 10, 2), *rng.integers(50, 62, 2)))
        picture = Image.new("RGB", (size, size), (40, 40, 40))
        ImageDraw.Draw(picture).rectangle([x0, y0, x1 - 1, y1 - 1], fill=(200, 80, 60))
        picture.save(root / "images" / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "height": size, "width": size})
        anns.append({"id": i, "image_id": i, "category_id": 1, "bbox": [x0, y0, x1 - x0, y1 - y0],
                     "iscrowd": 0, "area": (x1 - x0) * (y1 - y0),
                     "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]]})
    with open(root / "ann.json", "w") as f:
        json.dump({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "box"}]}, f)


@pytest.mark.slow
def test_one_checkpoint_one_ap_in_train_py_and_eval_py(tmp_path):
    """Guards one checkpoint, one AP: train.py's last evaluation (eval.json, the whole val set)
    and eval.py on its ckpt.pt with eval.py's defaults give the same numbers, both in the dtype
    "auto" picks (bf16 on a CPU with native bf16, where eval.py used to evaluate in fp32), and
    both say which. On the CPU, where the numbers are exact (a GPU's autotuned convolutions
    need not be). A tiny CenterMask trained on a set of big boxes (train = val) until it finds
    them (AP > 0: the comparison is not one of zeros). eval.py honours the dtype on the CPU too:
    its detections in fp32 differ from the default's exactly when "auto" is bf16."""
    from test_train import TINY, run
    write_big_boxes(tmp_path)
    on = ["--train_img_dir=images", "--train_ann=ann.json", "--val_img_dir=images", "--val_ann=ann.json"]
    r = run("train.py", f"--data_root={tmp_path}", *on, f"--out_dir={tmp_path / 'out'}", *TINY,
            "--max_iters=40", "--learning_rate=5e-3", "--eval_every_epochs=100", cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    with open(tmp_path / "out" / "eval.json") as f:
        trained = json.load(f)
    ckpt = f"--ckpt={tmp_path / 'out' / 'ckpt.pt'}", "--device=cpu"
    e = run("eval.py", *ckpt, f"--results_json={tmp_path / 'auto.json'}", cwd=tmp_path)
    assert e.returncode == 0, e.stderr[-2000:]
    evaluated = json.loads(e.stdout.strip().splitlines()[-1])
    said = r.stdout.split(", device ")[1].split(", ")[:2]            # ["cpu", "dtype bfloat16"]
    assert f"device {said[0]}, {said[1]}" in e.stdout
    keys = [k for k in trained if "_AP" in k] + ["num_images", "num_detections"]
    assert trained["iter"] == 40 and len(keys) == 14 and max(trained[k] for k in keys if "_AP" in k) > 0
    assert {k: evaluated[k] for k in keys} == {k: trained[k] for k in keys}
    e = run("eval.py", *ckpt, "--dtype=float32", f"--results_json={tmp_path / 'fp32.json'}", cwd=tmp_path)
    assert e.returncode == 0, e.stderr[-2000:]
    results = [json.loads((tmp_path / f"{name}.json").read_text()) for name in ("auto", "fp32")]
    assert (results[0] == results[1]) == (said[1] == "dtype float32")


@pytest.mark.parametrize("size,orig", [((40, 56), (50, 70)), ((40, 56), (20, 28)),
                                       ((40, 56), (40, 56)), ((37, 53), (61, 29))])
def test_masks_to_original_box_windows_equal_dense_resize(size, orig, monkeypatch):
    """Guards the box-bounded mapping (only each box's window of the original image is
    computed) against the dense `F.interpolate` of whole masks: for masks that are zero outside
    their boxes they must give the same bool masks, for up-, down-, identity and mixed scales,
    boxes touching the image border, sub-pixel boxes and boxes past the padding; with a box as
    large as the image the dense path is taken (and gives the same too).
    The window by hand: box x 10..20 on 100 input px mapped to 125 (scale 100/125 = 0.8): pixels
    widened to [9, 21], lo = floor((9 + 0.5) / 0.8 - 0.5) = floor(11.375) = 11,
    hi = ceil((21 + 0.5) / 0.8 - 0.5) + 1 = ceil(26.375) + 1 = 28."""
    import eval as eval_module
    lo, hi = eval_module._box_windows(torch.tensor([[10.0, 0.0, 20.0, 5.0]]), 125, 100, 0)
    assert (lo.item(), hi.item()) == (11, 28)
    calls = []
    paste = eval_module._paste_windows
    monkeypatch.setattr(eval_module, "_paste_windows", lambda *a: calls.append(1) or paste(*a))
    g = torch.Generator().manual_seed(0)
    h, w = size
    K = 9
    xy = torch.rand(K, 2, generator=g) * torch.tensor([w, h])
    wh = torch.rand(K, 2, generator=g) * torch.tensor([w, h]) * 0.3
    boxes = torch.cat([xy, xy + wh], 1)
    boxes[0] = torch.tensor([0.0, 0.0, w, h])                      # the whole image
    boxes[1] = torch.tensor([w - 0.6, h - 0.6, w + 5.0, h + 5.0])   # past the corner, into the padding
    boxes[2] = torch.tensor([10.2, 11.3, 10.7, 11.9])               # thinner than a pixel
    H, W = h + 3, w + 5                                             # batch padding
    ys = torch.arange(H, dtype=torch.float32)[:, None] + 0.5
    xs = torch.arange(W, dtype=torch.float32)[None, :] + 0.5
    inside = ((xs >= boxes[:, 0, None, None]) & (xs < boxes[:, 2, None, None]) &
              (ys >= boxes[:, 1, None, None]) & (ys < boxes[:, 3, None, None]))
    inside[2, 11, 10] = True                                        # the thin box keeps its one pixel
    masks = torch.rand(K, H, W, generator=g) * inside
    for first in (1, 0):  # without the whole-image box: windows; with it: dense
        dense = _masks_to_original(masks[first:], size, orig, 0.4)
        windowed = _masks_to_original(masks[first:], size, orig, 0.4, boxes[first:])
        assert dense.any() and torch.equal(windowed, dense)
        assert len(calls) == 1
    bool_masks = masks[1:] > 0.5                                    # bool input: threshold 0.5
    assert torch.equal(_masks_to_original(bool_masks, size, orig, 0.4, boxes[1:]),
                       _masks_to_original(bool_masks, size, orig, 0.4))
    assert len(calls) == 2


@pytest.mark.parametrize("size,stride,expected", [(16, 1, 1.0), (16, 4, 0.9), (6, 4, 0.9)])
def test_grid_oracle_by_hand(tmp_path, size, stride, expected):
    """Guards `grid_oracle` (the AP of perfect stride-R masks). One size x size image, one 4x4
    square at pixels [0, 4) x [0, 4).
    stride 1: pooling and resizing are the identity -> the mask itself, IoU 1, AP 1.0.
    stride 4: pooled, the square is cell (0, 0) = 1, every other cell 0. Bilinear back to 16 px
    (cell centres at 2, 6, ...; pixel centres at j + 0.5): along one axis pixels 0-2 read 1
    (border clamp / exactly on the centre), pixel 3 reads 1 - (3.5 - 2)/4 = 0.625, pixel 4
    reads 0.375. In 2-D the value is the product: pixel (3, 3) has 0.625^2 = 0.39 < 0.4 and
    drops out, pixels (3, 0..2) keep 0.625 >= 0.4; (4, *) stay out. Oracle mask = 15 of the 16
    pixels: IoU 15/16 = 0.9375, matched at the IoU thresholds 0.50 ... 0.90 (9 of 10), not at
    0.95, so AP = 9/10 = 0.9.
    6x6 at stride 4: padded to 8x8 (as a batch is), the same 2x2 cells and the same taps, cropped
    to 6x6: AP 0.9 again. (Resizing the 2 cells straight onto 6 pixels would stretch them by 3,
    not 4: the pixel centres would read 1, 1, 0.67, 0.33 -> a 3x3 mask, IoU 9/16, AP 0.2.)"""
    from eval import grid_oracle
    mask = np.zeros((size, size), np.uint8)
    mask[:4, :4] = 1
    rle = mask_util.encode(np.asfortranarray(mask))
    gt = {"images": [{"id": 1, "height": size, "width": size, "file_name": "a.png"}],
          "categories": [{"id": 3, "name": "square"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "iscrowd": 0, "area": 16.0,
                           "bbox": [0.0, 0.0, 4.0, 4.0],
                           "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")}}]}
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    assert grid_oracle(str(path), stride)["segm_AP"] == pytest.approx(expected, abs=1e-6)


def test_eval_cli_oracle_needs_val_ann():
    """Guards the CLI: --oracle_stride without an annotation file fails with a message naming
    the missing key."""
    r = subprocess.run([sys.executable, "eval.py", "--oracle_stride=4"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and "--val_ann" in r.stderr


def test_labelme_style_ids_from_zero(tmp_path):
    """Guards users' own COCO exports (labelme2coco numbers images and annotations from 0 and
    lists a "_background_" category with id 0). COCOeval stores matches by annotation id and
    reads 0 as "unmatched", so the annotation with id 0 can never be matched: fed back as
    predictions, the ground truth of 2 images x 2 objects (ids 0..3) scores box AP < 1 in plain
    COCOeval (checked below, so the test can fail), and exactly 1.0 / segm 1.0 through eval.py,
    which renumbers the annotation ids 1..4 for COCOeval. Loading the file says in one warning
    that "_background_" names the background and is not a class (labels 0, 1 = "cat", "dog")."""
    import warnings
    from pycocotools.cocoeval import COCOeval as _COCOeval
    from data import CocoInstances
    from eval import _coco_eval
    (tmp_path / "img").mkdir()
    images, anns = [], []
    for i in range(2):
        Image.new("RGB", (40, 30), (90, 90, 90)).save(tmp_path / "img" / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "height": 30, "width": 40})
        for j, (x, y) in enumerate(((2, 3), (20, 10))):
            box = [x, y, 12, 10]
            poly = [[x, y, x + 12, y, x + 12, y + 10, x, y + 10]]
            anns.append({"id": len(anns), "image_id": i, "category_id": 1 + j, "bbox": box,
                         "segmentation": poly, "area": 120.0, "iscrowd": 0})
    cats = [{"id": 0, "name": "_background_"}, {"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]
    ann_file = tmp_path / "labelme.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = CocoInstances(str(tmp_path / "img"), str(ann_file))
    notices = [str(w.message) for w in caught]
    assert len(notices) == 1 and "labelme.json" in notices[0]
    assert "category 0 ('_background_') names the background and has no annotation: not a class" in notices[0]
    assert ds.label_to_cat_id == [1, 2] and ds.class_names == ["cat", "dog"]
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0,
                "segmentation": ds.coco.annToRLE(a)} for a in anns]
    with contextlib.redirect_stdout(io.StringIO()):
        plain = _COCOeval(ds.coco, ds.coco.loadRes([dict(r) for r in results]), "bbox")
        plain.evaluate(), plain.accumulate(), plain.summarize()
    assert plain.stats[0] < 0.99                                   # the id-0 annotation is never matched
    assert _coco_eval(ds.coco, results, "bbox", [0, 1], False)[0] == pytest.approx(1.0)
    assert _coco_eval(ds.coco, results, "segm", [0, 1], False)[0] == pytest.approx(1.0)
    assert [a["id"] for a in ds.coco.dataset["annotations"]] == [0, 1, 2, 3]   # the dataset's own ids stay
