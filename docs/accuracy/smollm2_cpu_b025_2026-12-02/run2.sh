#!/usr/bin/env bash
cd /work/main
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
G="--model demo --device cpu --tasks niah_single,niah_multikey,text_recall --lengths 2048 --depths 0.1,0.5,0.9 --num-samples 10 --corpus-file .acc2/heldout.jsonl --budgets 0.25 --no-progress"
ev() { local name=$1; shift; local s=$SECONDS; echo "$name start $(date -u +%H:%M) $(git rev-parse --short HEAD)"; python -m sparse_hf.cli eval $G --output-dir /work/acc_cpu/$name "$@" >> /work/acc_cpu/$name.log 2>&1; echo "$name rc=$? $((SECONDS-s)) s $(date -u +%H:%M)"; }
ev streamingllm --methods streamingllm
ev snapkv_kvhead --methods snapkv --cache-config '{"selection_scope": "kv_head"}'
ev h2o --methods h2o
