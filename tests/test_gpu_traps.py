"""
What a first GPU run would meet, made visible on the CPU: MaskFCOS's RoIs under bf16 autocast
(fp32 coordinates) and DeformConv's non-finite guard read on the host (the path GPUs take,
where a device-side assert would end the process without train.py's one line).
"""
import os
import subprocess
import sys

import pytest
import torch
from torchvision.ops import roi_align

from test_faults import tiny_model


def test_maskfcos_rois_keep_fp32_coordinates_under_bf16_autocast():
    """One RoI, x from 1001.3 to 1009.3 (a P3 box: 125.1625 to 126.1625 on the stride-8 map), on a
    P3 whose value is its column index minus 120. RoIAlign (aligned: -0.5; 14 bins of 1/14 cell,
    2 x 2 samples each at 1/4 and 3/4 of the bin) is linear in x, so bin j holds
    125.1625 - 0.5 - 120 + (j + 0.5) / 14: bin 0 = 4.69821. bf16 keeps 8 significant bits (steps
    of 4 between 512 and 1024): a bf16 RoI starts at 1000 and bin 0 would be 4.53571, 0.1625
    lower. The output is bf16 (the features' dtype), in steps of 1/32 between 4 and 8, so it
    must lie within 1/64 of the fp32 values."""
    model = tiny_model("maskfcos").eval()
    c, W = model.cfg.fpn_channels, 1040
    col = torch.arange(W // 8, dtype=torch.float32) - 120                           # (W/8,)
    features = [col.expand(1, c, 8, W // 8).contiguous(),                            # P3 (1, c, 8, 130)
                torch.zeros(1, c, 4, W // 16), torch.zeros(1, c, 2, W // 32)]       # P4, P5
    boxes, batch = torch.tensor([[1001.3, 8.0, 1009.3, 16.0]]), torch.zeros(1, dtype=torch.long)
    expected = 125.1625 - 0.5 - 120 + (torch.arange(14) + 0.5) / 14                  # (14,) per bin
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.roi_features([f.bfloat16() for f in features], batch, boxes)     # (1, c, 14, 14)
        rounded = roi_align(features[0].bfloat16(), torch.tensor([[0, 1000.0, 8.0, 1008.0, 16.0]]).bfloat16(), 14,
                            1 / 8, sampling_ratio=2, aligned=True)
    assert out.dtype == torch.bfloat16
    assert (out[0, :].float() - expected).abs().max() <= 1 / 64, out[0, 0, 0]
    # what a bf16 RoI gives (the rounding this guards against), 0.1625 lower
    assert ((rounded[0, 0].float() - expected) + 0.1625).abs().max() <= 1 / 64


def test_deform_conv_counts_non_finite_offsets_where_it_cannot_assert(monkeypatch):
    """Guards DeformConv's check on the path GPUs take (model.HOST_ASSERT_DEVICES without "cpu"): a
    forward whose offsets hold NaN runs with offsets and mask logits 0 (the kernel reads inside
    its input), counts itself, and check_deform_finite raises NON_FINITE_DEFORM, as the CPU's
    assert does at once. The node is fresh, its offset conv zero-initialised (offsets 0, mask
    sigmoid(0) = 0.5): a NaN in that conv's bias gives exactly the fresh node's output."""
    import model
    monkeypatch.setattr(model, "HOST_ASSERT_DEVICES", ())
    monkeypatch.setattr(model, "non_finite_deform", {})
    torch.manual_seed(0)
    node = model.DeformConv(4, 6, dcn=True).eval()
    x = torch.randn(2, 4, 8, 8)
    fresh = node(x)
    model.check_deform_finite()                                                   # finite: nothing
    assert int(model.non_finite_deform_count("cpu")) == 0
    with torch.no_grad():
        node.offset_mask.bias[0] = float("nan")
    assert torch.equal(node(x), fresh)
    assert int(model.non_finite_deform_count("cpu")) == 1
    with pytest.raises(RuntimeError) as e:
        model.check_deform_finite()
    assert model.NON_FINITE_DEFORM in str(e.value)


COUNTED_DEFORM = """
import runpy, sys, os
sys.path.insert(0, os.path.dirname({train!r}))
import model
model.HOST_ASSERT_DEVICES = ()   # the GPU path: count, do not assert
sys.argv = [{train!r}] + sys.argv[1:]
runpy.run_path({train!r}, run_name="__main__")
"""


@pytest.mark.slow
def test_train_stops_with_one_line_on_counted_non_finite_offsets(tmp_path):
    """Guards train.py's host read of the count (Tally.check, at every log line): DLA-34 with
    deformable convolutions at learning rate 1e30 (Adam moves every weight by about 1e30 in the
    first step, so the second forward overflows to inf and NaN before the first deformable
    convolution), on the counting path: one line naming the iteration and NON_FINITE_DEFORM,
    exit status 1, no checkpoint written."""
    from test_train import ROOT, TINY
    wrapper = tmp_path / "counted.py"
    wrapper.write_text(COUNTED_DEFORM.format(train=os.path.join(ROOT, "train.py")))
    r = subprocess.run([sys.executable, str(wrapper), f"--shapes_dir={tmp_path / 'shapes'}",
                        f"--out_dir={tmp_path / 'out'}", *TINY, "--dcn=True", "--learning_rate=1e30",
                        "--max_iters=4"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train.py: by iteration 2 (rank 0): non-finite values"), r.stderr
    assert not (tmp_path / "out" / "ckpt.pt").exists()


def test_deform_conv_counting_path_compiles_without_graph_break(monkeypatch):
    """Guards the counting path under torch.compile (train.py's compile=True on a GPU): dynamo
    (aot_eager, as tests/test_gpu_paths.py) captures the count's creation in model.non_finite_deform
    and its in-place update without a graph break, the output equals the eager one on a finite
    input, and each compiled forward on a NaN input adds 1 to the count."""
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters
    import model
    monkeypatch.setattr(model, "HOST_ASSERT_DEVICES", ())
    monkeypatch.setattr(model, "non_finite_deform", {})
    dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    node = model.DeformConv(4, 6, dcn=True)
    with torch.no_grad():
        node.offset_mask.weight.normal_(std=0.1)                                  # non-zero offsets
    x = torch.randn(2, 4, 8, 8)
    compiled = torch.compile(node, backend="aot_eager")
    assert torch.allclose(compiled(x), node(x), rtol=1e-5, atol=1e-6)
    x[0, 0, 0, 0] = float("nan")
    compiled(x)
    compiled(x)
    assert int(model.non_finite_deform_count("cpu")) == 2
    assert not counters["graph_break"], dict(counters["graph_break"])
    dynamo.reset()
