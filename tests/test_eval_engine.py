"""``run_eval(engine=True)`` (``sparse-hf eval --engine``) gives the HF-backed eval's predictions and budget-use
fields, record for record: on a tiny random Llama with the toy tokenizer for every method the engine runs (with an
EOS that fires mid-answer, so the stop rule is exercised), and on the real demo model (SmolLM2-135M, chat template,
its own EOS) when it is installed."""

import json
import re

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import sparse_hf  # noqa: F401  (registers the HF-path caches)
from sparse_hf.deltakv import DeltaKVCompressor
from sparse_hf.eval import run_eval
from sparse_hf.eval.engine_runner import knob_groups
from sparse_hf.eval.runner import budget_to_cache_config, encode_sample
from sparse_hf.eval.tasks import build_samples
from sparse_hf.eval.toy import build_toy_tokenizer

GRID = dict(tasks="niah_single", lengths=[256, 384], depths=[0.5], num_samples=2, seed=0, max_new_tokens=6,
            progress=False)
COMPARED = ("prediction", "score", "prompt_tokens", "budget_tokens", "kept_tokens", "full_layer_share",
            "context_tokens")


@pytest.fixture(scope="module")
def tok():
    return build_toy_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    """6 layers, so omnikv's default filter layers (0, 1, 2, 3) leave two sparse layers. Its EOS is the third
    token that full greedy decoding gives the first prompt, so generations stop before ``max_new_tokens``."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=len(tok), max_position_embeddings=2048)
    model = LlamaForCausalLM(config).eval()
    sample = build_samples("niah_single", tok, 256, 1, 0, 0.5)[0]
    ids = encode_sample(tok, sample)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    model.generation_config.eos_token_id = int(out[0, -1])
    return model


def read(path):
    return {(r["method"], r["budget"], r["task"], r["length"], r["depth"], r["id"]): r
            for r in map(json.loads, path.read_text().splitlines())}


def both(model, tok, tmp_path, **kwargs):
    """The predictions of the HF-backed and the engine-backed eval of the same grid."""
    run_eval(model, tok, output_dir=tmp_path / "hf", **kwargs)
    summary = run_eval(model, tok, output_dir=tmp_path / "engine", engine=True, **kwargs)
    assert summary["config"]["engine"] is True
    return read(tmp_path / "hf" / "predictions.jsonl"), read(tmp_path / "engine" / "predictions.jsonl")


def assert_same_records(hf, eng):
    assert hf.keys() == eng.keys() and hf
    for key, ref in hf.items():
        got = eng[key]
        assert got["engine"] is True
        assert {k: got[k] for k in COMPARED} == {k: ref[k] for k in COMPARED}, key
        if got["method"] != "deltakv":            # the engine does not report deltakv's picks
            assert got["read_tokens"] == ref["read_tokens"], key


def test_engine_eval_equals_hf_eval_for_every_engine_method(model, tok, tmp_path):
    methods = "full,streamingllm,snapkv,pyramidkv,knorm,h2o,omnikv"
    hf, eng = both(model, tok, tmp_path / "a", methods=methods, budgets=[0.1, 0.25], **GRID)
    assert_same_records(hf, eng)
    assert {r["method"] for r in eng.values()} == set(methods.split(","))
    stopped = [r for r in hf.values() if len(tok(r["prediction"], add_special_tokens=False)["input_ids"]) < 6]
    assert stopped, "the EOS never fired: the stop rule was not compared"
    sparse = [r for r in eng.values() if r["method"] in ("snapkv", "h2o")]
    assert all(r["kept_tokens"] < r["prompt_tokens"] for r in sparse), "budget too loose to test anything"
    assert all(r["read_tokens"] < r["context_tokens"] for r in eng.values() if r["method"] == "omnikv")
    full = {(k[2:]): r["prediction"] for k, r in hf.items() if k[0] == "full"}
    assert any(full[k[2:]] != r["prediction"] for k, r in hf.items() if k[0] != "full"), \
        "no method changed a prediction: the comparison would prove nothing"


def test_engine_eval_deltakv_with_a_compressor(model, tok, tmp_path):
    torch.manual_seed(0)
    comp = DeltaKVCompressor.for_model(model.config, kv_compressed_size=16)
    hf, eng = both(model, tok, tmp_path, methods="deltakv", budgets=[0.25],
                   cache_config={"compressor": comp, "num_sink_tokens": 2}, **GRID)
    assert_same_records(hf, eng)
    assert all(r["read_tokens"] < r["context_tokens"] for r in hf.values()), "deltakv read everything"


def test_knob_groups_give_each_prompt_its_own_budget():
    lengths = [2040, 2047, 2049, 2100, 2040]
    groups = knob_groups("snapkv", 0.1, lengths, None, budget_to_cache_config)
    assert knob_groups("snapkv", 0.1, lengths, None, budget_to_cache_config, max_size=2) == [
        (groups[0][0], [1, 2]), (groups[0][0], [0, 4]), (groups[1][0], [3])]     # longest first
    for knobs, indices in groups:
        for i in indices:
            assert knobs == budget_to_cache_config("snapkv", 0.1, lengths[i])
    assert sorted(i for _, idx in groups for i in idx) == list(range(len(lengths)))
    assert [idx for _, idx in groups] == [[0, 1, 2, 4], [3]]     # budgets of 204 tokens and of 210
    assert knob_groups("full", 1.0, lengths, None, budget_to_cache_config) == [(None, [0, 1, 2, 3, 4])]


def test_engine_rejects_methods_it_does_not_run(model, tok, tmp_path, monkeypatch):
    import sparse_hf.engine.config as engine_config

    monkeypatch.setattr(engine_config, "ENGINE_METHODS", ("snapkv",))
    with pytest.raises(ValueError, match="engine does not run h2o"):
        run_eval(model, tok, methods="snapkv,h2o", budgets=[0.25], output_dir=tmp_path, engine=True, **GRID)


def test_demo_model_engine_eval_equals_hf_eval(tmp_path):
    """The real model, its chat template and its own EOS: the same answers from both back-ends."""
    from sparse_hf.models import cache_dir, load_model

    if not (cache_dir() / "smollm2-135m-instruct" / "model.safetensors").exists():
        pytest.skip("the demo model is not converted in the sparse_hf cache (sparse-hf eval --model demo does it)")
    demo, demo_tok = load_model("demo", torch.float32, "cpu")
    grid = dict(GRID, lengths=[256, 384], num_samples=1, max_new_tokens=16)
    hf, eng = both(demo, demo_tok, tmp_path, methods="full,snapkv,streamingllm,h2o", budgets=[0.25], **grid)
    assert_same_records(hf, eng)
    assert any(r["score"] == 1.0 for r in hf.values()), "the model found no needle: a weak comparison"


def test_cli_engine_flag(model, tok, tmp_path, monkeypatch, capsys):
    import sys
    import types

    import sparse_hf.engine.config as engine_config
    from sparse_hf.eval.cli import main

    loaded = []
    fake = types.ModuleType("sparse_hf.models")
    fake.load_model = lambda name, dtype, device: loaded.append(name) or (model, tok)
    monkeypatch.setitem(sys.modules, "sparse_hf.models", fake)
    base = ["eval", "--model", "demo", "--tasks", "niah_single", "--lengths", "256", "--depths", "0.5",
            "--num-samples", "1", "--max-new-tokens", "2", "--no-progress", "--device", "cpu", "--engine",
            "--budgets", "0.25", "--output-dir", str(tmp_path)]
    assert main(base + ["--methods", "full,snapkv"]) == 0
    records = list(read(tmp_path / "predictions.jsonl").values())
    assert len(records) == 2 and all(r["engine"] for r in records)
    err = capsys.readouterr().err
    assert "engine: snapkv @ 0.25: 1 prompts in" in err
    # one timestamped progress line per finished batch: its size, where its time went, prompts done of the total
    assert re.search(r"\d\d:\d\d:\d\d engine: snapkv @ 0\.25: batch of 1 \(\d+-\d+ tokens\) in [\d.]+ s \(build "
                     r"[\d.]+, generate [\d.]+ \[.*prefill 1.*\], close [\d.]+\), .* \| 2/2 prompts", err)
    assert re.search(r"engine: full: batch of 1 .* \| 1/2 prompts", err)
    monkeypatch.setattr(engine_config, "ENGINE_METHODS", ("snapkv",))
    assert main(base + ["--methods", "h2o"]) == 2 and loaded == ["demo"]      # refused before loading the model
    assert "--engine: the engine does not run h2o" in capsys.readouterr().err
