#!/usr/bin/env bash
cd /tmp
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
date -u
nice -n 10 /work/wt/venv-B/bin/python -m sparse_hf.cli eval --model demo --device cpu --dtype float32 --tasks niah_single --lengths 2048 --depths 0.1,0.5,0.9 --num-samples 10 --corpus-file $HOME/.cache/sparse_hf/data/austen/heldout.jsonl --engine --no-progress --methods deltakv --budgets 0.25 --cache-config '{"deltakv_path": "demo", "full_attn_layers": [0,1,2,3,8,16,22,23,24]}' --output-dir /work/wt/B/docs/deltakv/quality_2026-12-03/deltakv_L2324 > /work/wt/B/docs/deltakv/quality_2026-12-03/deltakv_L2324.log 2>&1
echo rc=$?; date -u
