#!/usr/bin/env bash
# Run R0 against the shipped demo compressor and the balanced PCA-only init (../pca_balance_2026-12-03/), same prompts.
# Machine: 2-core CPU, torch 2.13, transformers 5.24. Date: 2026-12-03 (UTC).
# R0 = /tmp/r0_demo_kv (trained on the H200: --pca_balance kv init, 650 steps, otherwise the shipped demo recipe);
# sha256 of its model.safetensors f738981350ded835aa4fc6651085ebb9b8a8d31fa84314d7b38b1bb9b2c38c71.
# Run from /work/main.
set -eu
D=docs/deltakv/r0_2026-12-03
# 1. the compressor's config and card (21:56 UTC)
cp /tmp/r0_demo_kv/config.json $D/r0_config.json
cp /tmp/r0_demo_kv/README.md $D/r0_card.md
# 2. answer NLL, 14 prompts at 2K (21:56:45-22:05:42 UTC, 537 s)
OMP_NUM_THREADS=2 python3 benchmarks/deltakv_answer_nll.py --tasks niah_single,niah_multikey,text_recall --length 2048 \
  --depths 0.1,0.5,0.9 --num-samples 2 --corpus-file ~/.cache/sparse_hf/data/austen/heldout.jsonl \
  --config 'r0_all=deltakv@0.25:{"num_top_tokens": 1.0, "deltakv_path": "/tmp/r0_demo_kv"}' \
  --config 'r0_025=deltakv@0.25:{"deltakv_path": "/tmp/r0_demo_kv"}' \
  --json $D/answer_nll_r0.json > $D/answer_nll_r0.log 2>&1
# 3. greedy needles at 4K, CPU engine, 60 prompts, 0.25, filter layers [0,1,2,3,8,17,22] (22:05:53-22:37:27 UTC, 1894 s; engine 1882.6 s)
OMP_NUM_THREADS=2 python3 -m sparse_hf.cli eval --model demo --device cpu --dtype float32 --tasks niah_single,niah_multikey \
  --lengths 4096 --depths 0.1,0.5,0.9 --num-samples 10 --engine --methods deltakv --budgets 0.25 \
  --cache-config '{"deltakv_path": "/tmp/r0_demo_kv", "full_attn_layers": [0, 1, 2, 3, 8, 17, 22]}' \
  --output-dir /tmp/r0needle/out --no-progress > $D/needles_4k_r0.log 2>&1
cp /tmp/r0needle/out/predictions.jsonl $D/needles_4k_r0.jsonl
# 4. the tables (22:38 UTC)
python3 $D/table.py $D > $D/table.md
