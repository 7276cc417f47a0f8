#!/usr/bin/env bash
# The commands behind docs/deltakv_quality.md "A K/V-balanced PCA init" (2-core CPU, torch 2.13, transformers 5.24,
# 2026-12-03 13:00-13:21 UTC). Two PCA-only compressors (learning rate 0: the one training step leaves the PCA
# weights), then the answer NLL on 14 prompts at 2K and the rebuild error on 3 prompts at 512 tokens.
set -eu
for b in none kv; do
  OMP_NUM_THREADS=2 python3 -m sparse_hf.cli train-compressor --model demo --dataset ~/.cache/sparse_hf/data/austen/train.jsonl \
    --output_dir /tmp/bal/pca_$b --kv_compressed_size 96 --down_type linear --up_type linear --block_size 2048 \
    --cluster_ratio 0.1 --neighbor_count 4 --num_sink 16 --init pca --init_blocks 8 --pca_balance $b \
    --learning_rate 0 --max_steps 1 --per_device_train_batch_size 1 --save_strategy no --report_to none --seed 42 \
    --eval_blocks 2 --disable_tqdm true > train_$b.log 2>&1
done
OMP_NUM_THREADS=2 python3 benchmarks/deltakv_answer_nll.py --tasks niah_single,niah_multikey,text_recall --length 2048 \
  --depths 0.1,0.5,0.9 --num-samples 2 --corpus-file ~/.cache/sparse_hf/data/austen/heldout.jsonl \
  --config 'pca_all=deltakv@0.25:{"num_top_tokens": 1.0, "deltakv_path": "/tmp/bal/pca_none"}' \
  --config 'balanced_all=deltakv@0.25:{"num_top_tokens": 1.0, "deltakv_path": "/tmp/bal/pca_kv"}' \
  --config 'pca_025=deltakv@0.25:{"deltakv_path": "/tmp/bal/pca_none"}' \
  --config 'balanced_025=deltakv@0.25:{"deltakv_path": "/tmp/bal/pca_kv"}' \
  --json answer_nll.json > answer_nll.log 2>&1
for b in none kv; do
  OMP_NUM_THREADS=2 python3 benchmarks/deltakv_rebuild_error.py --length 512 --tasks niah_single,niah_multikey,text_recall \
    --depths 0.5 --corpus-file ~/.cache/sparse_hf/data/austen/heldout.jsonl --deltakv-path /tmp/bal/pca_$b \
    --oracle-ranks 96 --json rebuild_error_$b.json > rebuild_error_$b.log 2>&1
done
python3 docs/deltakv/pca_balance_2026-12-03/table.py docs/deltakv/pca_balance_2026-12-03 > table.md
# Added 15:27-15:40 UTC: the shipped demo compressor (plain init, 650 steps on the H200) on the same 14 prompts
OMP_NUM_THREADS=1 python3 benchmarks/deltakv_answer_nll.py --tasks niah_single,niah_multikey,text_recall --length 2048 \
  --depths 0.1,0.5,0.9 --num-samples 2 --corpus-file ~/.cache/sparse_hf/data/austen/heldout.jsonl \
  --config 'shipped_all=deltakv@0.25:{"num_top_tokens": 1.0, "deltakv_path": "demo"}' \
  --config 'shipped_025=deltakv@0.25:{"deltakv_path": "demo"}' \
  --json answer_nll_shipped.json > answer_nll_shipped.log 2>&1
python3 docs/deltakv/pca_balance_2026-12-03/table.py docs/deltakv/pca_balance_2026-12-03 > table.md
