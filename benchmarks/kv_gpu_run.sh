#!/bin/bash
# Issue 14's GPU run, in one call on a two-GPU host: GPU tests, handoff bandwidth, goodput, TTFT split.
#   bash benchmarks/kv_gpu_run.sh MODELS_DIR OUT [BUDGET_S]
# MODELS_DIR holds tiny-llama/ and llama-3.1-8b/ (benchmarks/dummy_model.py). Every part has its
# own time limit; results land in OUT as at most 8 files (logs in one tarball). STUDY_ARGS: extra
# kv_gpu_study.py flags (e.g. "--rates 8,16,24,32 --layerwise"); SKIP_BW=1 skips the bandwidth part.
set -u
MODELS=$(cd "$1" && pwd); OUT=$2; BUDGET=${3:-480}
W=/tmp/kvrun; mkdir -p "$W" "$OUT"
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
T0=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
{ nvidia-smi; nvidia-smi topo -m; python3 -c "import torch; print(torch.__version__, torch.cuda.device_count())"; } > "$W/machine.txt" 2>&1
echo "== GPU tests ($(left) s left)"
PDCLUSTER_TEST_MODEL_DIR="$MODELS/tiny-llama" timeout ${TEST_S:-200} python3 -m pytest -q -p no:cacheprovider \
  tests/test_gpu_kv_transfer.py > "$W/gpu_tests.log" 2>&1; echo "gpu tests rc=$?"; tail -3 "$W/gpu_tests.log"
echo "== handoff bandwidth ($(left) s left)"
[ -n "${SKIP_BW:-}" ] || timeout 80 python3 benchmarks/kv_transfer_bw.py --device cuda --preset llama-3.1-8b --backends cuda_ipc,nccl,zmq \
  --tokens 512,2048,8192 --reps 5 --warmup 2 --json "$W/kv_transfer_bw.json" > "$W/kv_transfer_bw.log" 2>&1
echo "bw rc=$?"; grep '^{"backend' "$W/kv_transfer_bw.log" | head -40
echo "== goodput + TTFT split ($(left) s left)"
L=$(left)
timeout $((L - 8)) python3 benchmarks/kv_gpu_study.py --model-dir "$MODELS/llama-3.1-8b" --out "$W" \
  --parts ttft,goodput --deadline-s $((L - 70)) ${STUDY_ARGS:-} > "$W/kv_gpu_study.log" 2>&1
echo "study rc=$?"; tail -30 "$W/kv_gpu_study.log"
tar -czf "$W/logs.tar.gz" /tmp/pdcluster-* 2>/dev/null
for f in machine.txt gpu_tests.log kv_transfer_bw.json kv_transfer_bw.log kv_gpu_study.json kv_gpu_study.log \
         slo_attainment.png logs.tar.gz; do [ -f "$W/$f" ] && cp "$W/$f" "$OUT/"; done
echo "done in $(( $(date +%s) - T0 )) s"
