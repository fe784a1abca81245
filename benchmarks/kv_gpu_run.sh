#!/bin/bash
# Issue 14's GPU run, in one call on a two-GPU host: GPU tests, handoff bandwidth, goodput, TTFT split.
#   bash benchmarks/kv_gpu_run.sh MODELS_DIR OUT [BUDGET_S]
# MODELS_DIR holds tiny-llama/ and llama-3.1-8b/ (benchmarks/dummy_model.py). Every part has its
# own time limit and writes under OUT, so a slow part costs only itself.
set -u
MODELS=$(cd "$1" && pwd); OUT=$2; BUDGET=${3:-530}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
T0=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
{ nvidia-smi; nvidia-smi topo -m; python3 -c "import torch; print(torch.__version__, torch.cuda.device_count())"; } > "$OUT/machine.txt" 2>&1
echo "== GPU tests ($(left) s left)"
PDCLUSTER_TEST_MODEL_DIR="$MODELS/tiny-llama" timeout 170 python3 -m pytest -q -p no:cacheprovider -x \
  tests/test_gpu_kv_transfer.py > "$OUT/gpu_tests.log" 2>&1; echo "gpu tests rc=$?"; tail -3 "$OUT/gpu_tests.log"
echo "== handoff bandwidth ($(left) s left)"
timeout 100 python3 benchmarks/kv_transfer_bw.py --device cuda --preset llama-3.1-8b --backends cuda_ipc,nccl,zmq \
  --tokens 512,2048,8192 --reps 5 --warmup 2 --json "$OUT/kv_transfer_bw.json" > "$OUT/kv_transfer_bw.log" 2>&1
echo "bw rc=$?"; grep '^{"backend' "$OUT/kv_transfer_bw.log" | head -20
echo "== goodput + TTFT split ($(left) s left)"
L=$(left)
timeout $((L - 5)) python3 benchmarks/kv_gpu_study.py --model-dir "$MODELS/llama-3.1-8b" --out "$OUT" \
  --parts goodput,ttft --deadline-s $((L - 75)) > "$OUT/kv_gpu_study.log" 2>&1
echo "study rc=$?"; tail -5 "$OUT/kv_gpu_study.log"
cp /tmp/pdcluster-bench-*/logs/*.log "$OUT/" 2>/dev/null || true
for d in /tmp/pdcluster-bench-*; do mkdir -p "$OUT/logs/$(basename $d)"; cp "$d"/logs/*.log "$OUT/logs/$(basename $d)/" 2>/dev/null; done
echo "done in $(( $(date +%s) - T0 )) s"
