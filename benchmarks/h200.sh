#!/usr/bin/env bash
# One GPU table on the lent H200 (../shared/gpu/README.md says what that machine has).
# Prepare here first: `make gpu-carry` (copies the tested vLLM 0.22 bundle, the trl /
# datasets wheels and the two demo files into the git-ignored .gpu-carry/), then run through
# the device tool with carry [".gpu-carry"]:
#   bash benchmarks/h200.sh masks|scoring|train|agreement [gpu_tables options]
# Everything lands in $OUT as it happens (the log, runs.jsonl with each finished run, then
# the table as Markdown and JSON), so a run cut short by the device's limit keeps what ran.
# TABLE_TIMEOUT (seconds, default 540) stops the table itself before that limit.
set -euo pipefail
table=${1:?usage: bash benchmarks/h200.sh masks|scoring|train|agreement [options]}
shift
carry=.gpu-carry
out=${OUT:-runs/gpu/out}
mkdir -p "$out" runs/gpu
started=$(date +%s)
if ! bash "$carry/vllm-0.22-bundle/install.sh" "$carry/vllm-0.22-bundle" > "$out/install.log" 2>&1 ||
   ! python3 -m pip install -q --no-index --no-deps --target /tmp/site "$carry"/whl/*.whl \
       >> "$out/install.log" 2>&1; then
    tail -n 20 "$out/install.log"
    exit 1
fi
export PYTHONPATH=/tmp/vsite:/tmp/site:$PWD VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
    KTO_SHARED_DATA=$PWD/$carry/data KTO_RUNS_LOG=$out/runs.jsonl
echo "installed in $(( $(date +%s) - started )) s; git $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
status=0
timeout "${TABLE_TIMEOUT:-540}" python3 benchmarks/gpu_tables.py "$table" \
    --out "runs/gpu/$table" "$@" > "$out/$table.log" 2>&1 || status=$?
tail -n 30 "$out/$table.log"
cp runs/gpu/"$table"/*.md runs/gpu/"$table"/*.json "$out"/ 2>/dev/null || true
find runs/gpu -name metrics.jsonl | tar czf "$out/$table-metrics.tgz" -T - 2>/dev/null || true
echo "$table: exit $status after $(( $(date +%s) - started )) s"
exit $status
