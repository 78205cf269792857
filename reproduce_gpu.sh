#!/usr/bin/env bash
# Every GPU number of README and RESULTS.md in one command on one GPU (H100 / H200 class with
# 16 cores), within 8 minutes of wall time:
#   speed    bench.py rows, one at a time: CenterMask DLA-34 / Hourglass-104 inference at 512 x 512,
#            batch 1 (FPS beside [CM] Table 2's 25.2 / 12.3), training img/s and MFU of DLA-34
#            (batch 32) and FCOS R-50-FPN (batch 8, 800 x 800, torchvision's fcos_resnet50_fpn and
#            maskrcnn_resnet50_fpn timed in the same run), bf16 and fp16, torch.compile on the
#            bf16 rows (run before the fp16 rows, so the budget cuts fp16 first)
#   quick    the quick start (config/shapes_centermask.py) and README's full-width recipe: time, AP
#   overfit  the COCO128 overfits (config/coco128_overfit*.py: CenterMask and the FCOS family)
#   table    the FCOS family on the shapes set (5 methods, 256 px, seeds 1337 and 1338), then
#            FCOSIS's Table 3 (5 rows, 128 px, 2 seeds) while its minutes last
# quick, overfit and table train side by side on the one GPU (JOBS at a time, in that order).
# Every number lands in $OUT/results.md (machine, dtype, commit, command and wall time of each
# run), every log, eval.json and loss curve in $OUT/logs.tar.gz; checkpoints in ${OUT}_runs/.
#
#     bash reproduce_gpu.sh                  # STEP=all: speed, then the trainings, ~8 min
#     STEP=quick bash reproduce_gpu.sh       # a step: speed, quick, overfit, table (< 10 min each)
#                                            # report: rewrite results.md from the logs there
#     DRY_RUN=1 bash reproduce_gpu.sh        # the same steps on the CPU, tiny sizes, one seed
#
# Environment: PYTHON (python3), OUT (out/gpu), COCO128 (data/coco128, README "Overfitting real
# images"), WHEELS (.whl: where pycocotools' wheel is installed from when it is missing, e.g.
# `pip download --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64
# pycocotools -d .whl` for a Python 3.12 machine), JOBS (trainings at once: 8), SPEED_S / TRAIN_S
# (the speed rows' and the trainings' budgets in s; a run is cut at the budget's end, a run not
# started by then is skipped), COMMIT (for a checkout without .git). A missing GPU, data folder
# or package is one line; every run has a time limit; a run that fails is a row saying why.
set -u
cd "$(dirname "$0")"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
OUT=${OUT:-out/gpu}
RUNS=${OUT%/}_runs
LOGS=$RUNS/logs
STEP=${STEP:-all}
DRY=${DRY_RUN:-0}
JOBS=${JOBS:-$(( DRY ? 2 : 8 ))}
COCO128=${COCO128:-data/coco128}
WHEELS=${WHEELS:-.whl}
if [[ -z ${COMMIT:-} ]]; then  # the commit, "+changes" when tracked files differ from it
    COMMIT=$(git rev-parse --short HEAD 2>/dev/null) || COMMIT=unknown
    [[ $COMMIT == unknown ]] || git diff --quiet HEAD || COMMIT+="+changes"
fi
say() { echo "reproduce_gpu.sh: $*" >&2; }
case $STEP in
    all) s1=200 s2=250 ;;
    speed | quick | overfit | table | report) s1=480 s2=480 ;;
    *) say "STEP=$STEP: expected all, speed, quick, overfit, table or report"; exit 2 ;;
esac
(( DRY )) && s1=900 s2=900  # the dry run is not timed against the 8 minutes: every row runs
SPEED_S=${SPEED_S:-$s1} TRAIN_S=${TRAIN_S:-$s2}
mkdir -p "$LOGS" 2>/dev/null || RUNS=out/gpu_runs LOGS=out/gpu_runs/logs  # beside OUT, else here
mkdir -p "$OUT" "$LOGS" || exit 1

# -- results: every run's .meta (step, exit status, start, end, limit, commit, arguments) and log
report() {
    "$PY" - "$RUNS" "$OUT/results.md" <<'EOF'
import glob, json, os, shlex, sys
runs, dest = sys.argv[1:]
logs = os.path.join(runs, "logs")
cell = lambda v: str(v).replace("|", "\\|")  # noqa: E731
f = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
rows = []
for meta in glob.glob(os.path.join(logs, "*.meta")):
    step, rc, t0, t1, limit, commit, *args = open(meta).read().splitlines()
    name = os.path.basename(meta)[:-len(".meta")]
    log = os.path.join(logs, name + ".log")
    lines = [x.strip() for x in open(log, errors="replace")] if os.path.exists(log) else []
    last = next((x for x in reversed(lines) if x), "(empty log)")
    status = (rc if rc.startswith("skipped") else "ok" if rc == "0" else
              f"failed: cut at its {limit} s limit" if rc in ("124", "137") else
              f"failed: exit {rc}: {last[:160]}")
    r = {}
    if args[0] == "bench.py" and status == "ok":
        try:
            r = json.loads(last)
        except ValueError:
            status = f"failed: its last line is not JSON: {last[:100]}"
    out_dir = next((a.split("=", 1)[1] for a in args if a.startswith("--out_dir=")), None)
    ev = os.path.join(out_dir or "", "eval.json")
    if out_dir and not rc.startswith("skipped") and os.path.exists(ev):
        r = json.load(open(ev))  # a cut run: its last evaluation
    dtype = next((a.split("=", 1)[1] for a in reversed(args) if a.startswith("--dtype=")), "-")
    rows.append(dict(r, name=name.split(".", 1)[1], step=step, status=status, commit=commit,
                     t0=float(t0), wall=None if rc.startswith("skipped") else float(t1) - float(t0),
                     dtype=dtype, cmd=shlex.join(["python", *args])))
order = ["speed", "quick", "overfit", "table"]
rows.sort(key=lambda r: (order.index(r["step"]), r["t0"]))
machine = os.path.join(logs, "machine.txt")
machine = open(machine).read().splitlines() if os.path.exists(machine) else []
text = ["# reproduce_gpu.sh results", ""] + [f"* {x}" for x in machine]
paper_fps = {"centermask/dla34": 25.2, "centermask/hourglass104": 12.3}  # [CM] Table 2
text += ["", "| row | status | dtype | compile | batch x H x W | "
         "inference img/s (batch 1: FPS; paper) | train img/s | MFU train | "
         "ours / torchvision FCOS: train, inference | "
         "first call s: train, inference | host syncs per train step | wall s | commit | command |",
         "|" + "---|" * 14]
for r in rows:
    if r["step"] != "speed":
        continue
    ms, tr = r.get("infer_ms_per_img"), r.get("train_ms_per_img")
    fc, fi = r.get("peer_fcos_train_ratio"), r.get("peer_fcos_infer_ratio")
    paper = paper_fps.get(f"{r.get('method')}/{r.get('backbone')}") if r.get("batch_size") == 1 \
        else None
    text.append("| " + " | ".join(cell(v) for v in (
        r["name"], r["status"], r["dtype"], r.get("compile", "-"),
        f"{r['batch_size']} x {r['input_hw'][0]} x {r['input_hw'][1]}" if "input_hw" in r else "-",
        f(ms and 1e3 / ms, ".1f") + (f" ({paper})" if paper else ""), f(tr and 1e3 / tr, ".1f"),
        f(r.get("mfu_train"), ".1%"), f"{fc:.2f}x, {fi:.2f}x" if fc else "-",
        f"{f(r.get('train_first_call_s'), '.1f')}, {f(r.get('infer_first_call_s'), '.1f')}",
        f(r.get("host_syncs_per_train_step"), "d"), f(r["wall"], ".0f"), r["commit"],
        f"`{r['cmd']}`")) + " |")
text += ["", "| run | status | dtype | wall s | evaluated at iteration | mask AP | mask AP50 | "
         "box AP | box AP50 | commit | command |", "|" + "---|" * 11]
for r in rows:
    if r["step"] != "speed":
        text.append("| " + " | ".join(cell(v) for v in (
            f"{r['step']}: {r['name']}", r["status"], r["dtype"], f(r["wall"], ".0f"),
            r.get("iter", "-"),
            f(r.get("segm_AP"), ".3f"), f(r.get("segm_AP50"), ".3f"), f(r.get("bbox_AP"), ".3f"),
            f(r.get("bbox_AP50"), ".3f"), r["commit"], f"`{r['cmd']}`")) + " |")
open(dest, "w").write("\n".join(text) + "\n")
print("\n".join(text))
EOF
    tar --exclude='*.pt' --exclude=pictures --exclude=shapes -czf "$OUT/logs.tar.gz" -C "$RUNS" . \
        || say "the archive of logs was not written"
}
[[ $STEP == report ]] && { report; exit; }

# -- the machine, the GPU, pycocotools: one line each when missing ------------------------------
if (( DRY )); then
    gpu="none: DRY_RUN=1 (CPU, tiny sizes, one seed; no number here is a measurement)"
elif ! gpu=$(timeout 120 "$PY" -c "import torch; torch.zeros(1, device='cuda')
print(torch.cuda.get_device_name(0))" 2>&1); then
    say "no usable CUDA GPU (${gpu##*$'\n'}); DRY_RUN=1 runs the same steps on the CPU"; exit 1
fi
if ! "$PY" -c "import pycocotools.mask" 2>/dev/null; then  # install its wheel from $WHEELS
    site=${TMPDIR:-/tmp}/reproduce_gpu_site
    "$PY" -m pip install -q --no-index --no-deps --target "$site" "$WHEELS"/pycocotools-*.whl \
        >/dev/null 2>&1 && export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
    "$PY" -c "import pycocotools.mask" 2>/dev/null || say "pycocotools is missing and no wheel in" \
        "$WHEELS installs it (WHEELS: this script's header): the trainings will fail, the speed" \
        "rows will not time the mapping to the original size"
fi
{
    smi=$(timeout 30 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
          2>/dev/null) || smi=""
    echo "GPU: ${smi:-$gpu}"
    echo "CPU: $(lscpu 2>/dev/null | sed -n 's/^Model name: *//p'), $(nproc) cores"
    timeout 60 "$PY" -c "import sys, torch, torchvision as tv
print(f'python {sys.version.split()[0]}, torch {torch.__version__}, torchvision {tv.__version__}')"
    echo "commit $COMMIT, $(date -u '+%Y-%m-%d %H:%M UTC'), STEP=$STEP, trainings at once: $JOBS"
} > "$LOGS/machine.txt" 2>&1

# run NAME STEP LIMIT ARGS...: one python run with its time limit (killed at it); its log and meta
run() {
    local name=$1 step=$2 limit=$3; shift 3
    local t0; t0=$(date +%s.%N)
    timeout -k 10 "$limit" "$PY" "$@" > "$LOGS/$step.$name.log" 2>&1
    local rc=$?
    printf '%s\n' "$step" "$rc" "$t0" "$(date +%s.%N)" "$limit" "$COMMIT" "$@" \
        > "$LOGS/$step.$name.meta"
}
skip() {  # skip NAME STEP WHY ARGS...: a row that did not run, and why
    local name=$1 step=$2 why=$3; shift 3
    printf '%s\n' "$step" "skipped: $why" "$(date +%s.%N)" 0 0 "$COMMIT" "$@" \
        > "$LOGS/$step.$name.meta"
}
steps=$STEP; [[ $STEP == all ]] && steps="speed quick overfit table"
has() { [[ " $steps " == *" $1 "* ]]; }
for s in $steps; do rm -f "$LOGS/$s".*; done
SHAPES=data/shapes; (( DRY )) && SHAPES=$RUNS/shapes
if has quick || has table; then  # the shapes set, once for every run (during the speed rows)
    echo "writing the shapes set to $SHAPES"
    s=table; has quick && s=quick
    if (( DRY )); then run shapes_set $s 60 data.py shapes --out="$SHAPES" --n_train=16 --n_val=4 &
    else run shapes_set $s 120 data.py shapes --out="$SHAPES" & fi
fi

# -- speed: one bench.py run at a time -----------------------------------------------------------
if has speed; then
    COMMON=(--steps=10 --burn_in=3 --num_classes=80 --pretrained=False)
    DLA=(config/centermask_dla34.py "${COMMON[@]}")
    HG=(config/centermask_hourglass104.py "${COMMON[@]}")
    # FCOS R-50-FPN as torchvision's fcos_resnet50_fpn (its head's form, trainable BN, none frozen)
    R50=(config/fcos_r50.py "${COMMON[@]}" --norm=bn --fcos_form=improved)
    TINY=()
    if (( DRY )); then
        export TORCH_COMPILE_DISABLE=1  # the plumbing only: inductor's C++ build takes minutes here
        DLA+=(--dla_channels="(4, 8, 8, 16, 16, 32)" --dcn=False --head_conv=8 --shape_size=8)
        HG+=(--hg_dims="(8, 8, 8, 8, 8, 8)" --hg_modules="(1, 1, 1, 1, 1, 1)" --head_conv=8
             --shape_size=8)
        R50+=(--backbone=resnet18 --fpn_channels=32)
        TINY=(--device=cpu --threads=1 --steps=1 --burn_in=1 --batch_size=2 --input_size=64)
    fi
    end=$(( $(date +%s) + SPEED_S ))
    row() {  # row NAME LIMIT ARGS...
        local name=$1 limit=$2 left=$(( end - $(date +%s) )); shift 2
        if (( left < 20 )); then
            skip "$name" speed "the speed budget of $SPEED_S s was spent" bench.py "$@" "${TINY[@]}"
            return
        fi
        echo "speed: $name"
        local cpu=()  # fp16 autocast on a CPU: torchvision's R-50 models take minutes, so no peers
        (( DRY )) && [[ " $* " == *" --dtype=float16 "* ]] && cpu=(--peers=False)
        run "$name" speed $(( limit < left ? limit : left )) bench.py "$@" "${TINY[@]}" "${cpu[@]}"
    }
    B1=(--batch_size=1 --input_size=512) B32=(--batch_size=32 --input_size=512)
    B8=(--batch_size=8 --input_size=800)
    # the compiled rows (first call, compilation included, in the JSON) before fp16's: not cut last
    row dla34_infer_bf16             90 "${DLA[@]}" "${B1[@]}" --dtype=bfloat16
    row hg104_infer_bf16             90 "${HG[@]}" "${B1[@]}" --dtype=bfloat16
    row dla34_train_bf16             90 "${DLA[@]}" "${B32[@]}" --dtype=bfloat16 \
        --gradient_accumulation_steps=2  # + accumulation's normaliser recording pass
    row fcos_r50_train_bf16         120 "${R50[@]}" "${B8[@]}" --dtype=bfloat16 --peers=True
    row dla34_infer_bf16_compile    150 "${DLA[@]}" "${B1[@]}" --dtype=bfloat16 --compile=True
    row dla34_train_bf16_compile    150 "${DLA[@]}" "${B32[@]}" --dtype=bfloat16 --compile=True
    row fcos_r50_train_bf16_compile 150 "${R50[@]}" "${B8[@]}" --dtype=bfloat16 --compile=True
    row dla34_infer_fp16             60 "${DLA[@]}" "${B1[@]}" --dtype=float16
    row dla34_train_fp16             90 "${DLA[@]}" "${B32[@]}" --dtype=float16
    row fcos_r50_train_fp16         120 "${R50[@]}" "${B8[@]}" --dtype=float16 --peers=True
    report > /dev/null
fi

# -- quick, overfit, table: trainings side by side, JOBS at a time -------------------------------
if has quick || has overfit || has table; then
    SEEDS="1337 1338" DTYPE=bfloat16 TINY=()
    if (( DRY )); then
        SEEDS=1337 DTYPE=float32
        TINY=(--device=cpu --threads=1 --num_workers=0 --batch_size=2 --max_iters=2 --warmup_iters=0
              --log_interval=1 --input_size=64 --test_input_size=0 --shapes_n_train=16
              --shapes_n_val=4)
    fi
    wait  # the shapes set
    end=$(( $(date +%s) + TRAIN_S ))
    train() {  # train NAME STEP LIMIT ARGS...: starts when one of the JOBS slots is free
        local name=$1 step=$2 limit=$3; shift 3
        local args=(train.py "$@" --out_dir="$RUNS/$name" --dtype=$DTYPE "${TINY[@]}")
        while (( $(jobs -rp | wc -l) >= JOBS )); do wait -n; done
        local left=$(( end - $(date +%s) ))
        if (( left < 30 )); then
            skip "$name" "$step" "the trainings' budget of $TRAIN_S s was spent" "${args[@]}"
            return
        fi
        echo "$step: $name"
        rm -rf "${RUNS:?}/$name"
        run "$name" "$step" $(( limit < left ? limit : left )) "${args[@]}" &
    }
    if has quick; then
        train quick_start quick 540 config/shapes_centermask.py --shapes_dir="$SHAPES"
        train full_width quick 540 config/shapes_centermask.py --shapes_dir="$SHAPES" \
            --dla_channels="(16, 32, 64, 128, 256, 512)" --epochs=10 --lr_steps="(7.5, 9.5)"
    fi
    if has overfit; then
        O=config/coco128_overfit_fcos.py
        runs=("centermask config/coco128_overfit.py" "fcos $O" "fcosreg $O --method=fcosreg"
              "maskfcos $O --method=maskfcos --mask_proposals=16"
              "centermask_fcos $O --method=centermask_fcos --head_conv=64 --saliency=specific"
              "fcosis $O --method=fcosis")
        for r in "${runs[@]}"; do
            set -- $r
            if [[ -f $COCO128/annotations/instances_train2017.json ]]; then
                train "coco128_$1" overfit 540 "${@:2}" --data_root="$COCO128"
            else
                skip "coco128_$1" overfit "no COCO128 at $COCO128" train.py "${@:2}" \
                    --data_root="$COCO128"
            fi
        done
        [[ -f $COCO128/annotations/instances_train2017.json ]] || say "no COCO128 at $COCO128" \
            "(annotations/instances_train2017.json; COCO128=path, README \"Overfitting real" \
            "images\"): overfits skipped"
    fi
    if has table; then
        for seed in $SEEDS; do
            for m in fcos fcosreg maskfcos centermask_fcos fcosis; do
                train "shapes_${m}_s$seed" table 540 "config/shapes_$m.py" --shapes_dir="$SHAPES" \
                    --seed="$seed"
            done
        done
        for seed in $SEEDS; do  # FCOSIS's Table 3 (RESULTS.md), while the budget lasts
            for t3 in segm mu0 bbox none; do
                case $t3 in
                    segm) sw=() ;;
                    *) sw=(--attention="$t3") ;;
                esac
                train "t3_${t3}_s$seed" table 540 config/shapes_fcosis.py --shapes_dir="$SHAPES" \
                    --input_size=128 --epochs=8 --lr_steps="(6, 7)" --seed="$seed" "${sw[@]}"
            done
        done
    fi
    wait
fi
report
