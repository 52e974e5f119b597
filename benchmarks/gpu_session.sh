#!/usr/bin/env bash
# Every measurement the GPU issue asks for, in a few calls of a lent GPU machine (benchmarks/README.md, "GPU").
#
#   here:  bash benchmarks/gpu_wheels.sh                      # .whl/: the packages that machine's image lacks
#   there: device run, carry [".whl"], command: bash benchmarks/gpu_session.sh [STEP ...]
#
# Steps, in this order by default: env decode networks widths train match loss augment loader fit trained (and, only when named,
# layers: per-layer times of dense vs pruned-6det; autotune: the widths table with cuDNN's autotuner on). One device command
# runs at most 10 minutes, so give each call a few steps (the sixteenth session: "env decode networks train match
# augment widths" took 443 s on an H100, "fit" 148 s; a call starts in ~30 s). Each step prints to the console and to $OUT/<step>.txt ($OUT: what comes back from the device;
# runs/gpu_session elsewhere); a step past STEP_TIMEOUT seconds (default 240, the fit 480) is stopped and the next
# one runs.
# FIT_ARGS adds options to the fit (e.g. FIT_ARGS="--data.num_workers 15 --model.compile true").
# QUICK=1 shrinks every step (batches, repeats, the fit) to check this script on a CPU:
#   QUICK=1 PYTHON=.venv/bin/python WHEELS= bash benchmarks/gpu_session.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/gpu_session}
mkdir -p "$out"
py=${PYTHON:-python3}
wheels=${WHEELS-.whl}  # WHEELS= : use the packages the interpreter has
if [ -n "$wheels" ] && ls "$wheels"/*.whl >/dev/null 2>&1; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$wheels"/*.whl \
        || { echo "error: installing $wheels failed" >&2; exit 1; }
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR=/tmp/torchinductor_gpu_session  # its own: a timed-out step empties it (step below)
quick=${QUICK:-}
q() { if [ -n "$quick" ]; then echo "$2"; else echo "$1"; fi; }  # q FULL QUICK: the arguments for this mode

step() {  # step NAME COMMAND...: run it under the time limit, console and $out/NAME.txt
    local name=$1; shift
    echo "=== $name: $*" | tee "$out/$name.txt"
    timeout "${STEP_TIMEOUT:-240}" "$@" 2>&1 | tee -a "$out/$name.txt"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || echo "=== $name: exit $rc$([ "$rc" -eq 124 ] && echo ' (timed out)')" | tee -a "$out/$name.txt"
    # a step stopped mid-compile can leave a half-written kernel in the inductor cache, which every later compiled
    # step then fails to load ("file too short"): start the next step with an empty cache
    [ "$rc" -ne 124 ] || rm -rf "$TORCHINDUCTOR_CACHE_DIR"
}

run_step() {
    case $1 in
    env)
        step env bash -c "nvidia-smi || true; $py -c 'import torch, torchvision, pytorch_lightning as pl, torchmetrics
print(\"torch\", torch.__version__, \"torchvision\", torchvision.__version__, \"lightning\", pl.__version__,
      \"torchmetrics\", torchmetrics.__version__)
print(\"device:\", torch.cuda.get_device_name() if torch.cuda.is_available() else \"cpu\")
import albumentations, jsonargparse, wandb, torch_pruning, faster_coco_eval, train  # everything a run imports
print(\"imports ok\")'" ;;
    decode) step decode "$py" -m benchmarks.bench_gpu --only decode $(q "" "--batch 2 --repeats 1") ;;
    networks) step networks "$py" -m benchmarks.bench_gpu --only networks --compile $(q "" "--batch 2 --repeats 1") ;;
    widths) step widths "$py" -m benchmarks.bench_gpu --only widths --compile $(q "" "--batch 2 --repeats 1") ;;
    layers) step layers "$py" -m benchmarks.bench_gpu --only layers $(q "" "--batch 2 --repeats 1") ;;
    autotune) step autotune "$py" -m benchmarks.bench_gpu --only widths --compile --cudnn-benchmark \
        $(q "" "--batch 2 --repeats 1") ;;
    train) step train "$py" -m benchmarks.bench_train_step --bf16 --channels-last --cudnn-benchmark --sync-debug \
        $(q "--batch 32 --repeats 10 --compile" "--batch 2 --repeats 1") ;;
    match) step match "$py" -m benchmarks.bench_train_step --only match $(q "--repeats 20" "--repeats 1") ;;
    loss) step loss "$py" -m benchmarks.bench_train_step --only loss --bf16 $(q "--batch 32 --repeats 20" "--batch 2 --repeats 1") ;;
    augment) step augment "$py" -m benchmarks.bench_augment $(q "--images 400 --repeats 3" "--images 8 --repeats 1") ;;
    loader) step loader "$py" -m benchmarks.bench_loader $(q "--workers 2 8 15 --epochs 2" "--workers 0 1 --batch 4 --epochs 1") ;;
    fit)
        # the demo's pipeline (3 surgeries) at full SSD300 width with the GPU configs' settings: bf16, channels-last,
        # global batch 32, 8 loader workers, the ssd augmentation; summary.json "training" says what limits the rate
        local args=(--config experiments/demo.yaml --trainer.logger false --trainer.default_root_dir runs/gpu
                    --run_name fit --model.channels_last true --data.augment ssd)
        if [ -n "$quick" ]; then
            args+=(--trainer.accelerator cpu --trainer.limit_train_batches 2 --trainer.limit_val_batches 1
                   --trainer.limit_test_batches 1)
        else
            # 11 epochs of 25 batches of 32 (the demo: 100 of 8): the warm-up and cosine schedule cover the same images
            args+=(--trainer.accelerator gpu --trainer.devices 1 --trainer.precision bf16-mixed --model.width_mult 1.0
                   --data.batch_size 32 --data.num_workers 8 --model.cosine_iters 275 --model.warmup_iters 8)
        fi
        # FIT_ARGS: more options for the fit, e.g. FIT_ARGS="--data.num_workers 15 --model.compile true"
        read -ra extra <<< "${FIT_ARGS:-}"
        args+=("${extra[@]}")
        rm -rf runs/gpu/fit
        STEP_TIMEOUT=${STEP_TIMEOUT:-480} step fit "$py" train.py "${args[@]}"  # give it a call of its own
        cp runs/gpu/fit/summary.json "$out/fit_summary.json" 2>/dev/null || echo "=== fit: no summary.json" ;;
    trained)  # after fit, in the same call (a fresh machine has no runs/): the fit's model end to end on its images
        STEP_TIMEOUT=${STEP_TIMEOUT:-300} step trained "$py" -m benchmarks.bench_gpu --only trained --compile --checkpoint runs/gpu/fit/export \
            --images data/synthetic/VOCdevkit/VOC2007/JPEGImages $(q "" "--batch 2 --repeats 1") ;;
    *) echo "unknown step $1 (env decode networks widths layers autotune train match loss augment loader fit trained)" >&2; return 2 ;;
    esac
}

for s in "${@:-env decode networks widths train match loss augment loader fit trained}"; do
    for one in $s; do run_step "$one" || exit; done
done
