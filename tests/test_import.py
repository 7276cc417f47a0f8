"""``import sparse_hf`` makes the method names valid for ``generate`` at once, in a fresh interpreter, whichever of
sparse_hf and transformers is imported first (the package registers lazily: a bug here hides behind test order)."""

import subprocess
import sys

import pytest

FIRST_GENERATE = """
import torch
{imports}
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM
GenerationConfig(cache_implementation="snapkv")           # validates at once
torch.manual_seed(0)
config = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                     intermediate_size=64, vocab_size=64, max_position_embeddings=128)
model = LlamaForCausalLM(config).eval()
ids = torch.randint(1, 64, (1, 40))
plain = model.generate(ids, max_new_tokens=4, do_sample=False)
sparse = model.generate(ids, max_new_tokens=4, do_sample=False, cache_implementation="snapkv",
                        cache_config={{"num_top_tokens": 1.0, "num_recent_tokens": 32, "window_size": 8}},
                        return_dict_in_generate=True)
assert torch.equal(plain, sparse.sequences), (plain, sparse.sequences)
import sparse_hf
cache = sparse.past_key_values
assert isinstance(cache, sparse_hf.SparseCache), type(cache)
print("ok")
"""


@pytest.mark.parametrize("imports", ["import sparse_hf\nimport transformers", "import transformers\nimport sparse_hf",
                                     "import sparse_hf"])
def test_first_generate_after_import_uses_the_sparse_cache(imports):
    code = FIRST_GENERATE.format(imports=imports)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]
