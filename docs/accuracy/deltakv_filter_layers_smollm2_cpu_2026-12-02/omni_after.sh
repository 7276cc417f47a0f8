#!/usr/bin/env bash
while kill -0 18919 2>/dev/null; do sleep 5; done
cd /work/wt/Q
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
rm -rf /work/acc_q/omnikv_f4 /work/acc_q/omnikv_f4.log
echo "omnikv_f4 start $(date -u +%H:%M) $(git rev-parse --short HEAD)" >> /work/acc_q/run.out
s=$SECONDS
timeout 1740 nice /work/wt/venv-Q/bin/python -m sparse_hf.cli eval --model demo --device cpu --tasks niah_single,niah_multikey,text_recall --lengths 2048 --depths 0.1,0.5,0.9 --num-samples 10 --corpus-file $HOME/.cache/sparse_hf/data/austen/heldout.jsonl --budgets 0.25 --no-progress --output-dir /work/acc_q/omnikv_f4 --methods omnikv --cache-config '{"full_attn_layers": [0, 3, 15, 21]}' > /work/acc_q/omnikv_f4.log 2>&1
echo "omnikv_f4 rc=$? $((SECONDS-s)) s $(date -u +%H:%M)" >> /work/acc_q/run.out
