#!/usr/bin/env bash
# CPU lane of issue 14's grid at 2048 tokens (one core, nice 19), session 2026-12-02 evening.
cd /work/main
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
G="--model demo --device cpu --dtype float32 --tasks niah_single,niah_multikey,text_recall --lengths 2048 --depths 0.1,0.5,0.9 --num-samples 10 --corpus-file $HOME/.cache/sparse_hf/data/austen/heldout.jsonl --engine --no-progress"
date -u
nice -n 19 python -m sparse_hf.cli eval $G --methods pyramidkv,knorm --budgets 0.25,0.1 --cache-config '{"selection_scope": "layer"}' --output-dir /tmp/acc_cpu/scope_layer > /tmp/acc_cpu/scope_layer.log 2>&1
echo "scope_layer rc=$?"; date -u
nice -n 19 python -m sparse_hf.cli eval $G --methods omnikv --budgets 0.25,0.1 --output-dir /tmp/acc_cpu/omnikv > /tmp/acc_cpu/omnikv.log 2>&1
echo "omnikv rc=$?"; date -u
