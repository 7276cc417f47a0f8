#!/usr/bin/env bash
# omnikv with filter layers [0,1,2,3,8,17,22] (17 for 16) at 4K on the CPU engine, niah_single + niah_multikey (lead, 2026-12-03)
cd /tmp/L17
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
G="--model demo --device cpu --dtype float32 --tasks niah_single,niah_multikey --lengths 4096 --depths 0.1,0.5,0.9 --num-samples 10 --engine --no-progress"
for b in 0.1 0.25; do
date -u
nice -n 10 python3 -m sparse_hf.cli eval $G --methods omnikv --budgets $b --cache-config '{"full_attn_layers": [0, 1, 2, 3, 8, 17, 22]}' --output-dir /tmp/L17/omnikv_l17_4k_$b > /tmp/L17/omnikv_l17_4k_$b.log 2>&1
echo "omnikv_l17_4k_$b rc=$?"; date -u
done
