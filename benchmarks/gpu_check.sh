#!/usr/bin/env bash
# The GPU check of the data path, as one command for a session that has a GPU (see ../shared/GPU.md):
#
#     bash benchmarks/gpu_check.sh            # on the GPU machine; about 5 minutes on one H100
#     SMOKE=1 bash benchmarks/gpu_check.sh    # the same steps on the CPU with tiny sizes, to try the script first
#
# Each step runs under its own time limit, in order of importance; everything goes to $OUT/log.txt (OUT defaults
# to gpu-check/), the benchmark's tables to $OUT/bench.md. Copy the tables into benchmarks/results.md and the
# README, naming the GPU, the CPU count and the torch version (bench.md's header has them).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-check}"
mkdir -p "$out"
log="$out/log.txt"

step() {  # step LIMIT_SECONDS COMMAND...: run it, log it, never stop the script
    local limit=$1
    shift
    echo "== $(date -u +%H:%M:%S) $* (limit ${limit}s)" | tee -a "$log"
    timeout "$limit" "$@" >> "$log" 2>&1
    echo "== exit $?" | tee -a "$log"
}

if [ -n "${SMOKE:-}" ]; then
    device=cpu
    bench=(--device cpu --path gpu --arch resnet18 --img-size 32 --images 16 --classes 2 --batch-size 8
           --width 64 --height 48 --cpus all,1 --trainable-all-row --no-save)
    sample=(--device cpu --augment-device gpu --epochs 2)
else
    device=cuda
    bench=(--device cuda --no-save)
    sample=(--device cuda)
fi

python -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" | tee -a "$log"
# 1. The throughput table (all cores and 2, first and steady epoch, prediction, --trainable all, breakdown).
step 420 python benchmarks/bench.py "${bench[@]}"
sed -n '/^## /,$p' "$log" > "$out/bench.md"
# 2. The tests that only run where CUDA is (the device path's outputs against the CPU's).
step 120 python -m pytest -q tests/test_gpu_augment.py tests/test_pipeline.py
# 3. The bundled sample end to end on the GPU path: training, prediction and their accuracy.
step 180 python train.py --config configs/sample.yaml "${sample[@]}" --output-dir "$out/sample" --no-progress
step 60 python predict.py --checkpoint "$out/sample/best.pt" --test-dir data/sample/test \
    --labels data/sample/test_labels.csv --output "$out/sample/prediction.csv" --device "$device" --no-progress
# 4. The same sample run under torchrun with one process: its history must match step 3's (nccl on CUDA).
step 180 python -m torch.distributed.run --standalone --nproc_per_node=1 train.py --config configs/sample.yaml \
    "${sample[@]}" --output-dir "$out/sample-torchrun" --no-progress
step 30 python - "$out/sample" "$out/sample-torchrun" <<'PY'
import csv, sys
plain, launched = ([{key: value for key, value in row.items() if key != "seconds"}
                    for row in csv.DictReader(open(f"{folder}/history.csv"))] for folder in sys.argv[1:3])
print("torchrun with one process, history equal to the plain run's:", plain == launched)
PY
echo "done: $log, $out/bench.md"
