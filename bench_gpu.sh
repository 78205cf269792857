#!/usr/bin/env bash
# Every GPU number the speed table (RESULTS.md, Speed) lacks, in one command on one GPU (H100 / H200 class),
# within 8 minutes: needs only this repository and PyTorch + torchvision (no data, no weights, no
# pycocotools: synthetic inputs, random weights, pretrained=False).
#
#     bash bench_gpu.sh                      # all rows, on cuda
#     ONLY=dla34_infer bash bench_gpu.sh     # the rows whose name contains this
#     bash bench_gpu.sh --threads=1          # extra bench.py arguments, appended to every run
#     PYTHON=.venv/bin/python bash bench_gpu.sh   # the interpreter (default: python from PATH)
#
# Rows (each one bench.py run; its log and JSON line land in $OUT, default bench_gpu_out/):
#   * CenterMask DLA-34 / Hourglass-104 inference, 512 x 512, batch 1, as frames per second:
#     [CM] Table 2 gives 25.2 / 12.3 FPS (GPU not named; its FPS "measured on the same machine
#     whenever possible"). fp32 (TF32 matmuls, as train.py), bf16 autocast, bf16 + torch.compile.
#   * Training images/s and MFU (bench.py's FLOP count, peak dense FLOP/s from its table): the
#     DLA-34 recipe at 512, batch 32 per GPU, and FCOS R-50-FPN at 800 x 800, batch 8 per GPU
#     (COCO at short side 800 is ~800 x 1200: these are lower bounds on its cost per image);
#     fp32 / bf16 / bf16 + compile. The train step is forward + targets + losses + backward + Adam;
#     dla34_train_bf16 also times gradient accumulation's normaliser recording pass (record_over_train).
# A run past its time limit is reported as such; once the whole budget (BUDGET_S, 450 s) is spent,
# the remaining rows are skipped and say so. The table at the end reads the JSON lines.
set -u
cd "$(dirname "$0")"
OUT=${OUT:-bench_gpu_out}
BUDGET_S=${BUDGET_S:-450}
ONLY=${ONLY:-}
EXTRA=("$@")
mkdir -p "$OUT"
START=$(date +%s)
PY=${PYTHON:-python}

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "bench_gpu.sh: no CUDA GPU is visible to PyTorch; these rows are GPU rows (pass --device=cpu to try the script on a CPU)" >&2
fi
"$PY" -c "import torch, torchvision; print('torch', torch.__version__, '| torchvision', torchvision.__version__, '|', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"

# name, time limit (s), bench.py arguments
run() {
    local name=$1 limit=$2; shift 2
    [[ -n "$ONLY" && "$name" != *"$ONLY"* ]] && return
    local left=$(( BUDGET_S - ($(date +%s) - START) ))
    if (( left < 20 )); then
        echo "{\"row\": \"$name\", \"skipped\": \"time budget of ${BUDGET_S} s spent\"}" > "$OUT/$name.json"
        echo "$name: skipped (budget spent)"; return
    fi
    (( limit > left )) && limit=$left
    echo "$name: python bench.py $* ${EXTRA[*]:-}  (limit ${limit} s)"
    timeout "$limit" "$PY" bench.py "$@" "${EXTRA[@]}" > "$OUT/$name.log" 2>&1
    local rc=$?
    if (( rc == 0 )); then
        tail -n 1 "$OUT/$name.log" | "$PY" -c "import json, sys; r = json.load(sys.stdin); r['row'] = '$name'; print(json.dumps(r))" > "$OUT/$name.json"
    else
        local why="exit $rc"; (( rc == 124 )) && why="over its ${limit} s limit"
        echo "{\"row\": \"$name\", \"failed\": \"$why, see $OUT/$name.log\"}" > "$OUT/$name.json"
        echo "$name: failed ($why); last lines of $OUT/$name.log:"; tail -n 5 "$OUT/$name.log"
    fi
}

COMMON=(--steps=10 --burn_in=3 --num_classes=80 --pretrained=False)
DLA=(config/centermask_dla34.py "${COMMON[@]}")
HG=(config/centermask_hourglass104.py "${COMMON[@]}")
R50=(config/fcos_r50.py "${COMMON[@]}")

rm -f "$OUT"/*.json
# inference at batch 1 (the paper's FPS setting); the train step of the same run is timed too
run dla34_infer_fp32          90 "${DLA[@]}" --batch_size=1 --input_size=512 --dtype=float32
run dla34_infer_bf16          90 "${DLA[@]}" --batch_size=1 --input_size=512 --dtype=bfloat16
run hg104_infer_fp32          90 "${HG[@]}"  --batch_size=1 --input_size=512 --dtype=float32
run hg104_infer_bf16          90 "${HG[@]}"  --batch_size=1 --input_size=512 --dtype=bfloat16
# training throughput and MFU
run dla34_train_fp32          90 "${DLA[@]}" --batch_size=32 --input_size=512 --dtype=float32
run dla34_train_bf16          90 "${DLA[@]}" --batch_size=32 --input_size=512 --dtype=bfloat16 --gradient_accumulation_steps=2
run r50_train_fp32            90 "${R50[@]}" --batch_size=8 --input_size=800 --dtype=float32
run r50_train_bf16            90 "${R50[@]}" --batch_size=8 --input_size=800 --dtype=bfloat16
# compiled (the first call, compilation included, is in each JSON as *_first_call_s)
run dla34_infer_bf16_compile 150 "${DLA[@]}" --batch_size=1 --input_size=512 --dtype=bfloat16 --compile=True
run dla34_train_bf16_compile 150 "${DLA[@]}" --batch_size=32 --input_size=512 --dtype=bfloat16 --compile=True
run r50_train_bf16_compile   150 "${R50[@]}" --batch_size=8 --input_size=800 --dtype=bfloat16 --compile=True

"$PY" - "$OUT" <<'EOF'
import glob, json, os, sys
rows = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(sys.argv[1], "*.json")), key=os.path.getmtime)]
paper = {"centermask/dla34": 25.2, "centermask/hourglass104": 12.3}
print(f"\n{'row':<26} {'device':<24} {'dtype':<9} {'compile':<7} {'batch':>5} {'infer FPS':>9} {'train img/s':>11} "
      f"{'MFU train':>9} {'1st call s (train/infer)':>24}  paper FPS")
for r in rows:
    if "method" not in r:
        print(f"{r['row']:<26} {r.get('failed') or r.get('skipped')}")
        continue
    f = lambda v, s: "n/a" if v is None else format(v, s)  # noqa: E731
    fps = 1e3 / r["infer_ms_per_img"] if r["batch_size"] == 1 else None
    first = f"{f(r.get('train_first_call_s'), '.1f')} / {f(r.get('infer_first_call_s'), '.1f')}"
    print(f"{r['row']:<26} {r['device_name'][:24]:<24} {r['dtype']:<9} {str(r.get('compile', False)):<7} "
          f"{r['batch_size']:>5} {f(fps, '.1f'):>9} {1e3 / r['train_ms_per_img']:>11.1f} {f(r['mfu_train'], '.1%'):>9} "
          f"{first:>24}  {paper.get(r['method'] + '/' + r['backbone'], '') if fps else ''}")
print("infer FPS: batch 1, eval forward + decoding + masks, at the input size (no mapping to the original image).")
EOF
echo "total $(( $(date +%s) - START )) s; logs in $OUT/"
