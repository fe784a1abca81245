#!/bin/bash
# Issue 14's GPU run on a two-GPU host, whole or split over calls by PARTS (a subset, in this order):
#   PARTS=tests,copy,bw,ttft,goodput bash benchmarks/kv_gpu_run.sh MODELS_DIR OUT [BUDGET_S]
#   tests    tests/test_gpu_kv_transfer.py (cuda_ipc & nccl x layer-wise off/on, killed decode)  <= 200 s
#   copy     benchmarks/page_copy_bench.py, if present                                           <=  70 s
#   bw       benchmarks/kv_transfer_bw.py: cuda_ipc,nccl,zmq at 512/2048/8192 (SKIP_BW=1 skips)  <=  80 s
#   ttft     kv_gpu_study.py --parts ttft: 6 backends (layer-wise off/on) at 2k and 8k tokens   the rest
#   goodput  kv_gpu_study.py --parts goodput: 1p1d, 2 unified, 1 unified at RATES              the rest
# MODELS_DIR holds tiny-llama/ and llama-3.1-8b/ (benchmarks/dummy_model.py). BUDGET_S (default
# 590) bounds the whole call: every part runs under `timeout` (SIGTERM first, so pytest and the
# study stop their clusters), capped by its limit above and by the time left; the study also stops
# launching clusters `--deadline-s` before its limit. Results: at most 10 files in OUT (parts.txt:
# rc and seconds per part; every log, the clusters' included, in logs.tar.gz). Knobs: RATES,
# SECONDS_PER_RATE, TTFT_BACKENDS, TTFT_LENS, STUDY_ARGS (extra kv_gpu_study.py flags), PY.
#
# CPU rehearsal (tiny model, shm/zmq, tiny sizes; ~12 min on a 2-core VM), from the repo root:
#   DEVICE=cpu PY=/work/main/.venv/bin/python PYTHONPATH=$PWD bash benchmarks/kv_gpu_run.sh \
#     /work/main/.carry-kvtransfer-models /tmp/kvrehearsal 1500
set -u
MODELS=$(cd "$1" && pwd); OUT=$(mkdir -p "$2" && cd "$2" && pwd); BUDGET=${3:-590}
PARTS=",${PARTS:-tests,copy,bw,ttft,goodput},"; DEVICE=${DEVICE:-cuda}; PY=${PY:-python3}
W=$(mktemp -d /tmp/kvrun-XXXXXX)                   # this call's work dir (a warm machine keeps /tmp)
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
T0=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
want() { [[ $PARTS == *",$1,"* ]]; }

# run_part NAME CAP CMD...: CMD under min(CAP, time left - 20) s, output in W/NAME.log; rc to parts.txt.
# SIGTERM at the limit (pytest and the study turn it into KeyboardInterrupt and stop their
# clusters; SIGINT may be ignored in a non-interactive run), SIGKILL 15 s later; then the
# launchers of this part's clusters that are still alive (own sessions: `timeout` misses them).
# Each part's clusters live under its own TMPDIR (W/tmp-NAME), so the clean-up can never touch
# another run's clusters on a shared machine.
run_part() {
  local name=$1 cap=$2; shift 2
  local lim=$(( $(left) - 20 )); [ "$cap" -lt "$lim" ] && lim=$cap
  if [ "$lim" -lt 20 ]; then echo "$name skipped: $(left) s left" | tee -a "$W/parts.txt"; return; fi
  echo "== $name (limit $lim s, $(left) s left)"
  local t=$(date +%s) tmp="$W/tmp-$name"; mkdir -p "$tmp"
  TMPDIR=$tmp timeout -s TERM -k 15 "$lim" "$@" > "$W/$name.log" 2>&1
  local rc=$?
  for d in $(find "$tmp" -maxdepth 1 -name 'pdcluster-*'); do
    for p in $(pgrep -f "$d/cluster.toml"); do echo "$name: killing leftover cluster $d"; kill -KILL -- "-$p"; done
  done 2>/dev/null
  echo "$name rc=$rc $(( $(date +%s) - t ))s (limit $lim)" | tee -a "$W/parts.txt"
}
TERM_AS_INTERRUPT="import signal, sys; signal.signal(signal.SIGTERM, signal.default_int_handler)"

if [ "$DEVICE" = cpu ]; then              # the rehearsal: tiny sizes, CPU backends
  export PDCLUSTER_GPU_REHEARSAL=1
  STUDY_MODEL=$MODELS/tiny-llama; BACKENDS=${TTFT_BACKENDS:-zmq,zmq+layerwise,shm,shm+layerwise}
  LENS=${TTFT_LENS:-64,256}; RATES=${RATES:-2,4}; SPR=${SECONDS_PER_RATE:-3}
  BW="--device cpu --preset tiny-llama --backends shm,zmq --tokens 512,2048 --reps 3 --warmup 1"
  COPY="--device cpu --preset tiny-llama --tokens 512,2048"
  GOODPUT_SIZES="--prompt-len 64 --max-tokens 16 --num-pages 2048 --max-running 32"
  TTFT_SIZES="--num-pages 2048 --max-running 32"
else
  STUDY_MODEL=$MODELS/llama-3.1-8b
  BACKENDS=${TTFT_BACKENDS:-cuda_ipc,cuda_ipc+layerwise,nccl,nccl+layerwise,zmq,zmq+layerwise}
  LENS=${TTFT_LENS:-2000,8000}; RATES=${RATES:-12,16,20,24,28,32}; SPR=${SECONDS_PER_RATE:-4}
  BW="--device cuda --preset llama-3.1-8b --backends cuda_ipc,nccl,zmq --tokens 512,2048,8192 --reps 5 --warmup 2"
  COPY="--device cuda"
  GOODPUT_SIZES=""; TTFT_SIZES=""
fi
{ date -u; nvidia-smi; nvidia-smi topo -m; $PY -c "import torch; print(torch.__version__, torch.cuda.device_count())"
  echo "PARTS=$PARTS DEVICE=$DEVICE BUDGET=$BUDGET"; } > "$W/machine.txt" 2>&1

want tests && PDCLUSTER_TEST_MODEL_DIR="$MODELS/tiny-llama" run_part gpu_tests ${TEST_S:-200} \
  $PY -c "$TERM_AS_INTERRUPT; import pytest; sys.exit(pytest.main(sys.argv[1:]))" \
  -v -p no:cacheprovider tests/test_gpu_kv_transfer.py
want tests && tail -8 "$W/gpu_tests.log"
if want copy && [ -f benchmarks/page_copy_bench.py ]; then
  run_part page_copy 70 $PY benchmarks/page_copy_bench.py $COPY --json "$W/page_copy.json"
  tail -4 "$W/page_copy.log"
fi
if want bw && [ -z "${SKIP_BW:-}" ]; then
  run_part kv_transfer_bw 80 $PY benchmarks/kv_transfer_bw.py $BW --json "$W/kv_transfer_bw.json"
  grep '^{"backend' "$W/kv_transfer_bw.log" | head -40
fi
# study PART LIMIT ARGS...: kv_gpu_study.py into W/PART/, stopping new clusters 50 s before its limit
study() {
  local part=$1 cap=$2; shift 2
  local lim=$(( $(left) - 20 )); [ "$cap" -lt "$lim" ] && lim=$cap
  run_part "$part" "$cap" $PY benchmarks/kv_gpu_study.py --device "$DEVICE" --model-dir "$STUDY_MODEL" \
    --out "$W/$part" --parts "$part" --deadline-s $(( lim - 50 )) "$@" ${STUDY_ARGS:-}
  grep -E "^(ttft|rate|cluster up|.* failed)" "$W/$part.log" | tail -40
  [ -f "$W/$part/kv_gpu_study.json" ] && cp "$W/$part/kv_gpu_study.json" "$W/kv_gpu_$part.json"
}
# ttft leaves goodput what it needs when both run in one call (3 layouts x ~70 s on the GPU)
want goodput && TTFT_CAP=$(( $(left) - ${GOODPUT_S:-230} )) || TTFT_CAP=100000
want ttft && study ttft $TTFT_CAP --backends "$BACKENDS" --ttft-prompt-lens "$LENS" --ttft-requests 3 $TTFT_SIZES
want goodput && study goodput 100000 --rates "$RATES" --seconds-per-rate "$SPR" --ttft-requests 3 $GOODPUT_SIZES
[ -f "$W/goodput/slo_attainment.png" ] && cp "$W/goodput/slo_attainment.png" "$W/"

find "$W"/tmp-* -maxdepth 1 -name 'pdcluster-*' -print0 2>/dev/null \
  | tar -czf "$W/logs.tar.gz" --null -T - "$W"/*.log 2>/dev/null
for f in machine.txt parts.txt gpu_tests.log page_copy.json kv_transfer_bw.json kv_gpu_ttft.json \
         kv_gpu_goodput.json slo_attainment.png logs.tar.gz; do [ -f "$W/$f" ] && cp "$W/$f" "$OUT/"; done
echo "done in $(( $(date +%s) - T0 )) s; OUT: $(ls "$OUT" | tr '\n' ' ')"
