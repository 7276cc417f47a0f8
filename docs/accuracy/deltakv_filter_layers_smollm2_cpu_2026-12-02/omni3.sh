#!/usr/bin/env bash
cd /work/wt/Q
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
echo "omnikv_f3 (niah_single only) start $(date -u +%H:%M:%S) $(git rev-parse --short HEAD)" >> /work/acc_q/run.out
s=$SECONDS
timeout 660 nice /work/wt/venv-Q/bin/python -m sparse_hf.cli eval --model demo --device cpu --tasks niah_single --lengths 2048 --depths 0.1,0.5,0.9 --num-samples 10 --corpus-file $HOME/.cache/sparse_hf/data/austen/heldout.jsonl --budgets 0.25 --no-progress --output-dir /work/acc_q/omnikv_f3 --methods omnikv --cache-config '{"full_attn_layers": [0, 3, 21]}' > /work/acc_q/omnikv_f3.log 2>&1
echo "omnikv_f3 rc=$? $((SECONDS-s)) s $(date -u +%H:%M:%S)" >> /work/acc_q/run.out
