#!/usr/bin/env bash
# Issue 12/14: DeltaKV (and OmniKV) with 4 and 3 calibrated filter layers, on the prompts of
# docs/accuracy/smollm2_cpu_b025_2026-12-02 (SmolLM2 demo, 2K, budget 0.25, three tasks, 70 prompts).
cd /work/wt/Q
PY=/work/wt/venv-Q/bin/python
O=/work/acc_q
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
G="--model demo --device cpu --tasks niah_single,niah_multikey,text_recall --lengths 2048 --depths 0.1,0.5,0.9 --num-samples 10 --corpus-file $HOME/.cache/sparse_hf/data/austen/heldout.jsonl --budgets 0.25 --no-progress"
cal() { local n=$1; local s=$SECONDS; echo "calibrate $n start $(date -u +%H:%M) $(git rev-parse --short HEAD)"; nice $PY -m sparse_hf.cli calibrate --model demo --num-filter-layers $n --seed 7 --device cpu --output $O/q$n.json > $O/calibrate_q$n.log 2>&1; echo "calibrate $n rc=$? $((SECONDS-s)) s $(date -u +%H:%M): $(cat $O/q$n.json)"; }
cfg() { $PY -c "import json,sys; d=json.load(open('$O/q$1.json')); d.update(json.loads(sys.argv[1])); print(json.dumps(d))" "$2"; }
ev() { local name=$1; shift; local s=$SECONDS; echo "$name start $(date -u +%H:%M) $(git rev-parse --short HEAD)"; nice $PY -m sparse_hf.cli eval $G --output-dir $O/$name "$@" >> $O/$name.log 2>&1; echo "$name rc=$? $((SECONDS-s)) s $(date -u +%H:%M)"; }
date -u
cal 4
cal 3
ev deltakv_f4 --methods deltakv --cache-config "$(cfg 4 '{"deltakv_path": "demo"}')"
ev deltakv_f3 --methods deltakv --cache-config "$(cfg 3 '{"deltakv_path": "demo"}')"
ev omnikv_f4 --methods omnikv --cache-config "$(cfg 4 '{}')"
date -u
