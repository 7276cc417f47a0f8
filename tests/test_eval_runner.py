"""End-to-end eval on a tiny random Llama: outputs, resumability, sparse-method plumbing, CLI and bad input."""

import json
import sys
import types

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sparse_hf.eval import budget_to_cache_config, run_eval
from sparse_hf.eval.cli import add_eval_parser, main
from sparse_hf.eval.runner import encode_sample
from sparse_hf.eval.toy import build_toy_tokenizer

GRID = dict(tasks="niah_single,ruler_vt", lengths=[384], depths=[0, 1], num_samples=1, seed=0,
            max_new_tokens=3, progress=False)



@pytest.fixture(scope="module")
def tok():
    return build_toy_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=len(tok))
    return LlamaForCausalLM(config).eval()


def count_generate(monkeypatch, model, calls, strip_cache_kwargs=False):
    """Wrap ``model.generate`` to record calls (and drop sparse kwargs until the caches are registered)."""
    original = model.generate

    def wrapped(**kwargs):
        calls.append({k: kwargs.get(k) for k in ("cache_implementation", "cache_config")}
                     | {"prompt_len": kwargs["input_ids"].shape[1]})
        if strip_cache_kwargs:
            kwargs.pop("cache_implementation", None)
            kwargs.pop("cache_config", None)
        return original(**kwargs)

    monkeypatch.setattr(model, "generate", wrapped)


def read_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_full_eval_writes_outputs_and_resumes(tmp_path, model, tok, monkeypatch):
    calls = []
    count_generate(monkeypatch, model, calls)
    summary = run_eval(model, tok, methods="full", output_dir=tmp_path, **GRID)
    preds = read_lines(tmp_path / "predictions.jsonl")
    assert len(preds) == len(calls) == 3 == summary["num_generated"]  # 2 needle depths + 1 ruler_vt
    for rec in preds:
        assert {"method", "budget", "task", "length", "depth", "id", "prediction", "answers", "score"} <= set(rec)
        assert rec["method"] == "full" and rec["budget"] == 1.0 and 0.0 <= rec["score"] <= 1.0
        assert rec["cache_config"] is None
    assert all(c["cache_implementation"] is None for c in calls)
    assert sorted(r["depth"] for r in preds if r["task"] == "niah_single") == [0.0, 1.0]
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert {(r["task"], r["length"]) for r in saved["results"]} == {("niah_single", 384), ("ruler_vt", 384)}
    assert len(saved["by_depth"]) == 2 and saved["overall"][0]["method"] == "full"
    assert "| full | - | niah_single | 384 |" in (tmp_path / "summary.md").read_text()
    for png in ("accuracy_vs_budget.png", "needle_heatmap_full.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"

    again = run_eval(model, tok, methods="full", output_dir=tmp_path, **GRID)  # nothing new to generate
    assert again["num_generated"] == 0 and again["num_skipped"] == 3 and len(calls) == 3
    assert len(read_lines(tmp_path / "predictions.jsonl")) == 3
    assert again["results"] == summary["results"]

    lines = (tmp_path / "predictions.jsonl").read_text().splitlines()  # crash mid-write: last line cut
    (tmp_path / "predictions.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][:20])
    with pytest.warns(UserWarning, match="unreadable line"):
        resumed = run_eval(model, tok, methods="full", output_dir=tmp_path, **GRID)
    assert resumed["num_generated"] == 1 and len(calls) == 4


def test_sparse_methods_get_budgeted_cache_configs(tmp_path, model, tok, monkeypatch):
    calls = []
    count_generate(monkeypatch, model, calls, strip_cache_kwargs=True)
    summary = run_eval(model, tok, methods="full,streamingllm,snapkv", budgets="0.25,0.5", output_dir=tmp_path,
                       **{**GRID, "tasks": "niah_single", "depths": [0.5]})
    assert summary["num_generated"] == 5  # full once + 2 methods x 2 budgets
    assert sum(c["cache_implementation"] is None for c in calls) == 1
    for method in ("streamingllm", "snapkv"):   # sinks + recent + top = the budget's tokens, for every method
        runs = [c for c in calls if c["cache_implementation"] == method]
        kept = [sum(c["cache_config"].get(k, 0) for k in ("num_sink_tokens", "num_recent_tokens", "num_top_tokens"))
                for c in runs]
        assert sorted(kept) == sorted(int(b * c["prompt_len"]) for b, c in zip((0.25, 0.5), runs))
    assert {(r["method"], r["budget"]) for r in summary["overall"]} == \
        {("full", 1.0), ("streamingllm", 0.25), ("streamingllm", 0.5), ("snapkv", 0.25), ("snapkv", 0.5)}
    for png in ("accuracy_vs_budget.png", "needle_heatmap_full.png", "needle_heatmap_snapkv_b0.25.png",
                "needle_heatmap_streamingllm_b0.5.png"):
        assert (tmp_path / png).is_file()


def test_budget_to_cache_config():
    assert budget_to_cache_config("full", 0.5, 1000) is None
    from sparse_hf.methods import get_method

    assert budget_to_cache_config("streamingllm", 0.25, 1000) == {"num_sink_tokens": 4, "num_recent_tokens": 246}
    assert budget_to_cache_config("streamingllm", 0.01, 100) == {"num_sink_tokens": 0, "num_recent_tokens": 1}
    assert budget_to_cache_config("snapkv", 0.1, 1000) == {"num_top_tokens": 71, "num_sink_tokens": 4,
                                                          "num_recent_tokens": 25, "window_size": 25}
    for method in ("pyramidkv", "omnikv", "knorm", "h2o"):   # the method's own rule, the one bench uses too
        assert budget_to_cache_config(method, 0.2, 1000) == get_method(method).knobs_for_budget(0.2, 1000)
    assert budget_to_cache_config("deltakv", 0.2, 10, {"deltakv_path": "c.pt"})["deltakv_path"] == "c.pt"
    for args in (("snapkv", 0.0, 10), ("snapkv", 1.5, 10), ("omnikv", 0.5, 10, {"bogus": 1}),
                 ("streamingllm", 0.5, 10, {"num_top_tokens": 3})):
        with pytest.raises(ValueError):
            budget_to_cache_config(*args)


def test_chat_template_rules(tok):
    sample = {"prompt": "Q?", "answer_prefix": " A:", "chat_template": True}
    with_template = tok.decode(encode_sample(tok, sample)[0])
    assert with_template.startswith("<|user|>") and with_template.endswith("<|assistant|>\nA:")
    assert tok.decode(encode_sample(tok, {**sample, "chat_template": False})[0]) == "Q? A:"  # LongBench few-shot
    assert tok.decode(encode_sample(tok, sample, use_chat_template=False)[0]) == "Q? A:"
    with pytest.raises(ValueError):
        encode_sample(tok, sample, use_chat_template="sometimes")


@pytest.mark.parametrize("bad", [dict(tasks="niah_nope"), dict(methods="full,h2o2"), dict(methods="snapkv", budgets="abc"),
                                 dict(methods="snapkv", budgets=[1.5]), dict(methods="snapkv", budgets="0"),
                                 dict(lengths="-5"), dict(lengths="1.5"), dict(depths="2"), dict(num_samples=0)])
def test_run_eval_rejects_bad_input(bad, tmp_path, model, tok):
    args = {**GRID, "methods": "full", "output_dir": tmp_path / "out", **bad}
    with pytest.raises(ValueError):
        run_eval(model, tok, **args)
    assert not (tmp_path / "out").exists()  # validation happens before anything is written


def parse(argv):
    import argparse

    parser = argparse.ArgumentParser(prog="sparse-hf")
    add_eval_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_cli_parses_grid():
    args = parse(["eval", "--model", "demo", "--tasks", "niah_single,longbench:trec", "--methods", "full,snapkv",
                  "--budgets", "0.5,0.1", "--lengths", "2048,1024", "--depths", "0,0.5,1", "--num-samples", "2",
                  "--cache-config", '{"pool_kernel_size": 5}', "--chat-template", "no"])
    assert args.tasks == ["niah_single", "longbench:trec"] and args.methods == ["full", "snapkv"]
    assert args.budgets == [0.1, 0.5] and args.lengths == [1024, 2048] and args.depths == [0.0, 0.5, 1.0]
    assert args.num_samples == 2 and args.cache_config == {"pool_kernel_size": 5} and args.chat_template is False


@pytest.mark.parametrize("flag,value,message", [("--tasks", "niah_nope", "unknown task"),
                                                ("--methods", "full,h2o2", "unknown method"),
                                                ("--budgets", "abc", "not a number"),
                                                ("--budgets", "1.5", "(0, 1]"),
                                                ("--depths", "0,2", "[0, 1]"),
                                                ("--lengths", "big", "not a number"),
                                                ("--num-samples", "0", ">= 1"),
                                                ("--cache-config", "{bad", "JSON")])
def test_cli_bad_input_exits_with_message(flag, value, message, capsys):
    argv = ["eval", "--model", "demo", "--tasks", "niah_single", flag, value]
    with pytest.raises(SystemExit) as exit_info:
        parse(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and message in err


def test_cli_runs_with_load_model(tmp_path, model, tok, monkeypatch, capsys):
    loaded = []
    fake = types.ModuleType("sparse_hf.models")
    fake.load_model = lambda name, dtype, device: loaded.append((name, dtype, device)) or (model, tok)
    monkeypatch.setitem(sys.modules, "sparse_hf.models", fake)
    lb = tmp_path / "lb"
    lb.mkdir()
    row = {"input": "Who?", "context": "Passage 1: Ada wrote it.", "answers": ["Ada"], "length": 5,
           "all_classes": None, "dataset": "hotpotqa", "language": "en", "_id": "x1"}
    (lb / "hotpotqa.jsonl").write_text(json.dumps(row) + "\n")
    out = tmp_path / "out"
    base = ["eval", "--model", "demo", "--lengths", "384", "--num-samples", "1", "--max-new-tokens", "2",
            "--output-dir", str(out), "--no-progress", "--device", "cpu"]
    assert main(base + ["--tasks", "niah_single,longbench:hotpotqa", "--depths", "0.5",
                        "--longbench-dir", str(lb)]) == 0
    assert loaded == [("demo", "auto", "cpu")]
    assert {r["task"] for r in read_lines(out / "predictions.jsonl")} == {"niah_single", "longbench:hotpotqa"}
    assert "2 new predictions" in capsys.readouterr().out
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)  # no Hub retries in the test
    assert main(base + ["--tasks", "longbench:qasper", "--longbench-dir", str(lb)]) == 2  # no qasper.jsonl
    err = capsys.readouterr().err
    assert "--longbench-dir" in err and "ConnectionError: offline" in err
