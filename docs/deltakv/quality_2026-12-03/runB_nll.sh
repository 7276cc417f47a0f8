#!/usr/bin/env bash
cd /tmp
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
date -u
nice -n 10 /work/wt/venv-B/bin/python /work/wt/B/benchmarks/deltakv_answer_nll.py --tasks niah_single,niah_multikey,text_recall --length 2048 --depths 0.1,0.5,0.9 --num-samples 1 --corpus-file $HOME/.cache/sparse_hf/data/austen/heldout.jsonl \
  --config full=full --config omnikv=omnikv@0.25 --config deltakv=deltakv@0.25 --config all_rebuilt='deltakv@0.25:{"num_top_tokens": 1.0}' \
  --config all_raw4to7='deltakv@0.25:{"num_top_tokens": 1.0, "full_attn_layers": [0,1,2,3,4,5,6,7,8,16,22]}' \
  --config all_raw23to29='deltakv@0.25:{"num_top_tokens": 1.0, "full_attn_layers": [0,1,2,3,8,16,22,23,24,25,26,27,28,29]}' \
  --json /work/wt/B/docs/deltakv/quality_2026-12-03/answer_nll.json > /work/wt/B/docs/deltakv/quality_2026-12-03/answer_nll.log 2>&1
echo rc=$?; date -u
