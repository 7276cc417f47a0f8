#!/usr/bin/env bash
while kill -0 8235 2>/dev/null; do sleep 10; done
cd /work/wt/Q
echo "bytes start $(date -u +%H:%M) $(git rev-parse --short HEAD)"
s=$SECONDS
OMP_NUM_THREADS=1 nice /work/wt/venv-Q/bin/python benchmarks/deltakv_bytes_by_filter_layers.py --lengths 2560,3072 --filter-layers 7,4,3 --output /work/acc_q/bytes.json > /work/acc_q/bytes.log 2>&1
echo "bytes rc=$? $((SECONDS-s)) s $(date -u +%H:%M)"
