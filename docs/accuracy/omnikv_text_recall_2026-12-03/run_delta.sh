#!/usr/bin/env bash
# deltakv (demo compressor) with the calibrated filter layers at 0.25, then the default layers' missing 2K text cell
# (helper A, 2026-12-03, 2-core CPU, one thread, nice 10)
cd /tmp
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
G="--model demo --device cpu --dtype float32 --lengths 2048 --depths 0.1,0.5,0.9 --num-samples 10 --corpus-file $HOME/.cache/sparse_hf/data/austen/heldout.jsonl --engine --no-progress"
date -u
nice -n 10 /work/wt/venv-A/bin/python -m sparse_hf.cli eval $G --tasks text_recall --methods deltakv --budgets 0.25 --cache-config '{"deltakv_path": "demo"}' --output-dir /tmp/A/eng/deltakv_text > /tmp/A/eng/deltakv_text.log 2>&1
echo "deltakv_text rc=$?"; date -u
nice -n 10 /work/wt/venv-A/bin/python -m sparse_hf.cli eval $G --tasks text_recall,niah_single,niah_multikey --methods deltakv --budgets 0.25 --cache-config '{"deltakv_path": "demo", "full_attn_layers": [0, 3, 14, 17, 21, 27, 28]}' --output-dir /tmp/A/eng/deltakv_calib > /tmp/A/eng/deltakv_calib.log 2>&1
echo "deltakv_calib rc=$?"; date -u
