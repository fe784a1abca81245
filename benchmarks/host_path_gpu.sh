#!/bin/bash
# The host-path GPU run (benchmarks/host_path_gpu.py) on one GPU, deps from .whl/, under 9 minutes.
#   bash benchmarks/host_path_gpu.sh TOKENIZER_JSON OUT [BUDGET_S]
# TOKENIZER_JSON: the default model's tokenizer, written on a CPU machine (the device has no GGUF):
#   python benchmarks/host_path_gpu.py --write-tokenizer .carry-hostpath/tokenizer.json
# Wheels in .whl/ (the project's deps the device lacks) go to a private target dir on PYTHONPATH, so
# the system Python is left as it is. Knobs: PRESETS, STREAMS, MAX_TOKENS, BATCHES, DEVICE, DTYPE, PY,
# PARTS (engine,cluster), CLUSTER_TREE (serve the cluster from another checkout: the 'before' of a pair),
# CLIENT_PROCS (the streaming client's processes; default 1), API_SERVERS ([router] api_servers; default the
# config's: 4 on 16 cores), MAX_PREFILL_TOKENS ([scheduler] key; default the config's).
# CPU rehearsal (tiny sizes, ~3 min on a 2-core VM), from the repo root:
#   PY=/work/main/.venv/bin/python DEVICE=cpu DTYPE=float32 PRESETS=tiny-llama STREAMS=8 MAX_TOKENS=16 \
#     BATCHES=1,8 bash benchmarks/host_path_gpu.sh /tmp/tok.json /tmp/hostpath 400
set -u
TOK=$(cd "$(dirname "$1")" && pwd)/$(basename "$1"); OUT=$(mkdir -p "$2" && cd "$2" && pwd); BUDGET=${3:-530}
PY=${PY:-python3}
W=$(mktemp -d /tmp/hostpath-XXXXXX)
if [ -d .whl ] && [ -z "${NO_WHEELS:-}" ]; then
  $PY -m pip install --quiet --no-deps --no-index --target "$W/deps" .whl/*.whl > "$W/pip.log" 2>&1 \
    || tail -5 "$W/pip.log"
  export PYTHONPATH="$W/deps:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
{ date -u; nvidia-smi 2>/dev/null | head -15; $PY -c "import torch; print('torch', torch.__version__)"
  $PY -c "import zmq, msgpack, tokenizers, fastapi, uvicorn, httpx, jinja2; print('deps ok')"; } > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt" | tail -3
timeout -s TERM -k 20 "$BUDGET" $PY benchmarks/host_path_gpu.py --tokenizer-json "$TOK" --out "$W/run" \
  --presets "${PRESETS:-llama-3.2-1b,llama-3.1-8b}" --streams "${STREAMS:-256}" --max-tokens "${MAX_TOKENS:-256}" \
  --batches "${BATCHES:-1,64,256}" --device "${DEVICE:-cuda:0}" --dtype "${DTYPE:-bfloat16}" \
  --parts "${PARTS:-engine,cluster}" ${CLUSTER_TREE:+--cluster-tree "$CLUSTER_TREE"} \
  --client-procs "${CLIENT_PROCS:-1}" --api-servers "${API_SERVERS:--1}" --max-prefill-tokens "${MAX_PREFILL_TOKENS:-0}" 2>&1 | tee "$W/run.log" | tail -40
echo "rc=${PIPESTATUS[0]}" >> "$OUT/machine.txt"
cp "$W"/run/host_path_gpu.json "$W"/run/host_path_gpu.md "$OUT/" 2>/dev/null
tar -czf "$OUT/logs.tar.gz" -C "$W" run.log $(cd "$W" && ls -d run/*/logs 2>/dev/null) 2>/dev/null
echo "OUT: $(ls "$OUT" | tr '\n' ' ')"
