#!/usr/bin/env bash
# The GPU check, as one command for a session that has a GPU (see ../shared/GPU.md): every figure in one call.
#
#     bash benchmarks/gpu_check.sh            # on the GPU machine; 304 s on one H200 (2026-12-04) before steps 2
#                                             # and 6 were added (about 7 minutes now, estimated; the limits add up to 650 s)
#     SMOKE=1 bash benchmarks/gpu_check.sh    # the same steps on the CPU with tiny sizes (about 4 minutes on 2 busy cores)
#
# In order: versions; 1. the probes (fused non-finite skip, the nvJPEG stream race, waits per batch); 2. the data
# path's probes: host-blocked ms per batch of each JPEG decoder found beside a running step, the augmentation's
# operations and host-issue vs GPU ms (old per-image and current), main-thread CPU ms per batch and the GPU-busy
# fraction over 10 profiled steps with the producer thread on and off; 3. the two data paths' accuracy on the
# bundled sample (3 seeds each, in the background while the next two steps run); 4. `pytest -k cuda`; 5. a DDP
# smoke test on nccl; 6. the loader hand-over's main-thread CPU ms per batch (collate_cost.py); 7. the throughput
# benchmark (3 epochs, all cores and 2, each with the producer-off rows). Each step runs under its own time limit
# and never stops the script; everything goes to $OUT/log.txt (OUT defaults to gpu-check/), the tables to
# $OUT/summary.md, which is printed last. Runs write under /tmp.
set -uo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
out="${OUT:-gpu-check}"
mkdir -p "$out"
log="$out/log.txt"
summary="$out/summary.md"
: > "$log"
: > "$summary"
scratch="$(mktemp -d /tmp/gpu-check-XXXXXX)"

step() {  # step LIMIT_SECONDS COMMAND...: run it, log it, never stop the script
    local limit=$1
    shift
    echo "== $(date -u +%H:%M:%S) $* (limit ${limit}s)" | tee -a "$log"
    timeout "$limit" "$@" >> "$log" 2>&1
    echo "== exit $?" | tee -a "$log"
}

if [ -n "${SMOKE:-}" ]; then
    device=cpu
    probes=(--device cpu --small)
    # A few images of the bundled sample (2 a class for training, 1 for validation, 10 labeled test images) and a
    # copy of its config that points at them
    sample="$scratch/sample"
    for folder in data/sample/train/* data/sample/val/*; do
        split="$(basename "$(dirname "$folder")")"
        mkdir -p "$sample/$split/$(basename "$folder")"
        find "$folder" -type f | sort | head -n "$([ "$split" = train ] && echo 2 || echo 1)" |
            xargs cp -t "$sample/$split/$(basename "$folder")"
    done
    mkdir -p "$sample/test"
    head -n 11 data/sample/test_labels.csv > "$sample/test_labels.csv"
    tail -n +2 "$sample/test_labels.csv" | cut -d, -f1 | sed 's|^|data/sample/test/|; s|$|.jpg|' |
        xargs cp -t "$sample/test"
    sed "s|^data_dir: .*|data_dir: $sample|" configs/sample.yaml > "$scratch/sample.yaml"
    accuracy=(--device cpu --config "$scratch/sample.yaml" --seeds 0 --epochs 1 --jobs 2)
    bench=(--device cpu --path gpu --arch resnet18 --img-size 32 --images 8 --classes 2 --batch-size 4
           --width 64 --height 48 --cpus all --trainable-all-row --epochs 3 --worker-images 4 --no-save)
    # The step runs; the CUDA-only tests are skipped on the CPU, so one file of them is enough
    cuda_tests=(tests/test_cuda.py)
    collate=(--batch-size 8 --batches 2)
else
    device=cuda
    probes=(--device cuda)
    accuracy=(--device cuda --seeds 0 1 2 --jobs 6)
    bench=(--device cuda --epochs 3 --no-save)
    cuda_tests=(tests/)
    collate=(--workers 8)
fi

"$py" - <<'PY' 2>&1 | tee -a "$log" "$summary"
import os, sys
sys.path.insert(0, os.getcwd())
import torch, torchvision
import device_decode
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
capability = torch.cuda.get_device_capability(0) if torch.cuda.is_available() else "-"
print(f"# GPU check: GPU {gpu} (capability {capability}), {os.cpu_count()} CPUs, torch {torch.__version__}, "
      f"torchvision {torchvision.__version__}, JPEG decoder {device_decode.jpeg_decoder_name()}")
PY

# 1. The probes: each prints a 'probe NAME: ...' line.
step 90 "$py" benchmarks/gpu_probes.py "${probes[@]}" --probes fused-skip,decode-race,syncs
# 2. The data path's probes (decoders, augmentation, producer on and off).
step 80 "$py" benchmarks/gpu_probes.py "${probes[@]}" --probes decoders,augment,producer
# 3. Accuracy of the two paths, in the background (it measures no speed).
echo "== $(date -u +%H:%M:%S) accuracy of the two paths, in the background" | tee -a "$log"
timeout 200 "$py" benchmarks/path_accuracy.py "${accuracy[@]}" --no-save > "$scratch/accuracy.txt" 2>&1 &
accuracy_pid=$!
# 4. The tests that run only where CUDA is.
step 120 "$py" -m pytest -q -p no:cacheprovider -n 0 -k cuda "${cuda_tests[@]}"
# 5. DistributedDataParallel on nccl (gloo on the CPU) with one process: wrapping, a thaw and rebuild, SyncBatchNorm.
step 90 "$py" benchmarks/ddp_smoke.py --device "$device"
wait "$accuracy_pid"
echo "== accuracy exit $?" | tee -a "$log"
cat "$scratch/accuracy.txt" >> "$log"
# 6. The loader hand-over: main-thread CPU ms per batch of 128 JPEGs, before and after packing.
step 30 "$py" benchmarks/collate_cost.py "${collate[@]}"
# 7. Throughput: each row is printed as soon as it is measured.
step 240 "$py" benchmarks/bench.py "${bench[@]}"

{
    echo
    echo "## Probes"
    grep -h '^probe ' "$log"
    echo
    echo "## Loader hand-over"
    sed -n '/^## Loader hand-over/,/^| after/p' "$log"
    echo
    echo "## DDP smoke test"
    grep -h '^ddp ' "$log"
    echo
    echo "## pytest -k cuda"
    grep -hE '^[0-9]+ (passed|failed|skipped|deselected)|^(FAILED|ERROR) ' "$log" | tail -n 20
    echo
    echo "## Accuracy of the two data paths"
    sed -n '/^| seed/,/^| range/p' "$scratch/accuracy.txt"
    echo
    echo "## Throughput"
    if grep -q '^## .*bench.py' "$log"; then
        sed -n '/^## .*bench.py/,$p' "$log" | grep -v '^appended'
    else  # the benchmark did not finish: the rows it printed as it measured them
        echo "(the benchmark did not finish; the rows it measured:)"
        grep -hE '^\| (train|val|predict)' "$log"
    fi
} >> "$summary"
rm -rf "$scratch"
echo "log: $log"
cat "$summary"
