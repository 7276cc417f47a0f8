#!/usr/bin/env bash
# omnikv with the calibrated filter layers, engine, 2K, the grid's prompts (helper A, 2026-12-03)
cd /tmp
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
G="--model demo --device cpu --dtype float32 --tasks text_recall,niah_single,niah_multikey --lengths 2048 --depths 0.1,0.5,0.9 --num-samples 10 --corpus-file $HOME/.cache/sparse_hf/data/austen/heldout.jsonl --engine --no-progress"
date -u
nice -n 10 /work/wt/venv-A/bin/python -m sparse_hf.cli eval $G --methods omnikv --budgets 0.25,0.1 --cache-config '{"full_attn_layers": [0, 3, 14, 17, 21, 27, 28]}' --output-dir /tmp/A/eng/omnikv_calib > /tmp/A/eng/omnikv_calib.log 2>&1
echo "omnikv_calib rc=$?"; date -u
