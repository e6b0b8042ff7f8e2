#!/usr/bin/env bash
# One GPU table on the lent H200 (../shared/gpu/README.md says what that machine has).
# Prepare here first: `make gpu-carry` (copies the tested vLLM 0.22 bundle and the trl /
# datasets wheels into the git-ignored .gpu-carry/), then run through the device tool with
# carry [".gpu-carry"]:   bash benchmarks/h200.sh scoring|train|agreement|masks [options]
# Results (tables as Markdown and JSON) and a tarball of the logs land in $OUT.
set -euo pipefail
table=${1:?usage: bash benchmarks/h200.sh scoring|train|agreement|masks [options]}
shift
carry=.gpu-carry
out=${OUT:-runs/gpu/out}
mkdir -p "$out" runs/gpu
started=$(date +%s)
bash "$carry/vllm-0.22-bundle/install.sh" "$carry/vllm-0.22-bundle" > runs/gpu/install.log 2>&1
python3 -m pip install -q --no-index --no-deps --target /tmp/site "$carry"/whl/*.whl \
    >> runs/gpu/install.log 2>&1
export PYTHONPATH=/tmp/vsite:/tmp/site:$PWD VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
echo "installed in $(( $(date +%s) - started )) s; git $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
status=0
python3 benchmarks/gpu_tables.py "$table" --out "runs/gpu/$table" "$@" \
    > "runs/gpu/$table.log" 2>&1 || status=$?
tail -n 30 "runs/gpu/$table.log"
cp runs/gpu/"$table"/*.md runs/gpu/"$table"/*.json "$out"/ 2>/dev/null || true
tar czf "$out/$table-logs.tgz" runs/gpu/*.log $(find runs/gpu -name 'metrics.jsonl') 2>/dev/null || true
echo "$table: exit $status after $(( $(date +%s) - started )) s"
exit $status
