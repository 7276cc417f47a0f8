#!/usr/bin/env bash
# deltakv (the shipped trained compressor) with filter layers [0,1,2,3,8,17,22] at 4K, 0.25, CPU engine (lead, 2026-12-03)
cd /tmp/L17D
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
date -u
nice -n 10 python3 -m sparse_hf.cli eval --model demo --device cpu --dtype float32 --tasks niah_single,niah_multikey --lengths 4096 --depths 0.1,0.5,0.9 --num-samples 10 --engine --no-progress --methods deltakv --budgets 0.25 --cache-config '{"deltakv_path": "demo", "full_attn_layers": [0, 1, 2, 3, 8, 17, 22]}' --output-dir /tmp/L17D/deltakv_l17_4k_0.25 > /tmp/L17D/deltakv_l17_4k_0.25.log 2>&1
echo "deltakv_l17_4k_0.25 rc=$?"; date -u
