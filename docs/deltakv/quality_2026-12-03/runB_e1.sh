#!/usr/bin/env bash
cd /tmp
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
P=/work/wt/venv-B/bin/python
O=/work/wt/B/docs/deltakv/quality_2026-12-03
G="--model demo --device cpu --dtype float32 --tasks niah_single,niah_multikey,text_recall --lengths 2048 --depths 0.1,0.5,0.9 --corpus-file $HOME/.cache/sparse_hf/data/austen/heldout.jsonl --engine --no-progress"
date -u
nice -n 10 $P -m sparse_hf.cli eval $G --num-samples ${NS:-3} --methods deltakv --budgets 0.25 --cache-config '{"deltakv_path": "demo", "num_top_tokens": 1.0}' --output-dir $O/deltakv_all_rebuilt > $O/deltakv_all_rebuilt.log 2>&1
echo "rc=$?"; date -u
