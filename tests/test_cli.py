"""The ``sparse-hf`` command line, run in subprocesses as a user runs it.

Every user error must be one line on stderr (``sparse-hf ...: error: ...``), exit status 2, no traceback, and be
found before any model loads. ``--help`` and the plain argument checks must not import torch (the cause of an 8 s
``--help``): those run in fresh interpreters, which report what they imported. Checks that need the method registry
import torch anyway, so most of them run in-process through ``main`` (a subprocess each would cost a torch import).
"""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

# Runs sparse_hf.cli.main(argv) and reports its status and which heavy modules it imported.
RUNNER = """
import json, os, sys
from sparse_hf.cli import main
try:
    rc = main(sys.argv[1:])
except SystemExit as exc:
    rc = exc.code
rc = 0 if rc is None else rc
with open(os.environ["CLI_TEST_REPORT"], "w") as f:
    json.dump({"rc": rc, "torch": "torch" in sys.modules, "transformers": "transformers" in sys.modules}, f)
sys.exit(rc)
"""


def run_cli(tmp_path, *argv, env=None):
    """``(report, stdout, stderr)`` of ``sparse-hf *argv`` in a fresh interpreter."""
    report = tmp_path / f"report-{len(list(tmp_path.glob('report-*')))}.json"
    full_env = dict(os.environ, CLI_TEST_REPORT=str(report), **(env or {}))
    proc = subprocess.run([sys.executable, "-c", RUNNER, *argv], capture_output=True, text=True, env=full_env,
                          timeout=600)
    data = json.loads(report.read_text())
    assert data["rc"] == proc.returncode
    return data, proc.stdout, proc.stderr


def run_in_process(capsys, *argv):
    """``(status, stderr)`` of ``main(argv)`` in this process (argparse errors exit through SystemExit)."""
    from sparse_hf.cli import main

    try:
        status = main(list(argv))
    except SystemExit as exc:
        status = exc.code
    return {"rc": status}, capsys.readouterr().err


def assert_one_line_error(report, stderr, *needles):
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert report["rc"] == 2, stderr
    assert "Traceback" not in stderr
    assert len(lines) == 1, stderr
    assert re.match(r"sparse-hf( [\w-]+)?: error: ", lines[0]), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture
def model_dir(tmp_path):
    """A model folder with a config.json (2 layers) and no weights: a check that waits for the model to load would
    fail with a load error instead of the expected message."""
    path = tmp_path / "tiny-model"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2}))
    return path


# ------------------------------------------------------------------------------------------------- help
def test_help_is_fast_and_imports_nothing_heavy(tmp_path):
    report, out, err = run_cli(tmp_path, "--help")
    assert report["rc"] == 0 and not report["torch"] and not report["transformers"], report
    for command in ("generate", "eval", "bench", "train-compressor"):
        assert command in out


def test_console_script_help(tmp_path):
    script = shutil.which("sparse-hf", path=os.path.dirname(sys.executable))
    if script is None:
        pytest.skip("the sparse-hf console script is not installed next to this interpreter")
    proc = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "generate" in proc.stdout


def test_generate_help_lists_every_registered_method(capsys):
    from sparse_hf.cli import main
    from sparse_hf.methods import METHODS

    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    text = " ".join(out.split())
    for name in METHODS:                      # knorm, and any method added later (e.g. h2o)
        assert name in text, name
    options = re.findall(r"^\s+(--[\w-]+)", out, re.M)
    assert len(options) >= 9
    for option in options:                    # every option has help text on its line or the next
        block = out.split(option, 1)[1].split("\n--", 1)[0]
        assert len(block.split()) > 2, option


@pytest.mark.parametrize("command", ["eval", "bench"])
def test_subcommand_help_has_help_for_every_option(capsys, command):
    from sparse_hf.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    parser_text = out.split("options:", 1)[1]
    entries = re.split(r"\n  (?=-)", parser_text)[1:]
    assert entries
    for entry in entries:
        flag = entry.split()[0]
        if flag in ("-h,", "-h"):
            continue
        assert len(entry.split()) > 2, f"{command} {flag} has no help"


# ------------------------------------------------------------------------------- errors without torch
@pytest.mark.parametrize("argv, needles", [
    (["generate", "--model", "/nonexistent/model-dir"], ["--model", "no such model folder"]),
    (["generate", "--model", "./relative-missing"], ["no such model folder"]),
    (["generate", "--prompt-file", "/nonexistent/prompt.txt"], ["--prompt-file", "no such file"]),
    (["generate", "--cache-config", "{bad"], ["--cache-config", "JSON"]),
    (["generate", "--cache-config", "[1, 2]"], ["JSON object"]),
    (["generate", "--max-new-tokens", "0"], ["--max-new-tokens", ">= 1"]),
    (["generate", "--max-new-tokens", "many"], ["not an integer"]),
    (["generate", "--dtype", "float8"], ["--dtype"]),
    (["generate", "--method", "full", "--cache-config", '{"num_top_tokens": 3}'], ["no effect"]),
    (["nonsense"], ["invalid choice"]),
    (["generate", "--no-such-flag"], ["unrecognized arguments"]),
])
def test_argument_errors_are_one_line_without_torch(tmp_path, argv, needles):
    report, _, err = run_cli(tmp_path, *argv)
    assert_one_line_error(report, err, *needles)
    assert not report["torch"] and not report["transformers"], report


# ---------------------------------------------------------------------- method and knob errors, no model
@pytest.mark.parametrize("extra, needles", [
    (["--method", "nope"], ["--method nope", "knorm", "full"]),
    (["--cache-config", '{"num_top_tokenz": 3}'], ["num_top_tokenz"]),
    (["--cache-config", '{"num_top_tokens": -1}'], ["num_top_tokens"]),
    (["--cache-config", '{"num_top_tokens": "lots"}'], ["num_top_tokens"]),
    (["--method", "omnikv", "--cache-config", '{"full_attn_layers": "0,5"}'], ["out of range", "2 layers"]),
    (["--method", "snapkv", "--cache-config", '{"window_size": 64, "num_recent_tokens": 8}'], ["window_size"]),
])
def test_knob_errors_are_found_before_the_model_loads(capsys, model_dir, extra, needles):
    """The folder has no weights: had the model been loaded first, the error would be a load error."""
    report, err = run_in_process(capsys, "generate", "--model", str(model_dir), *extra)
    assert_one_line_error(report, err, *needles)


def test_knob_error_in_a_fresh_process(tmp_path, model_dir):
    report, _, err = run_cli(tmp_path, "generate", "--model", str(model_dir), "--method", "knorm",
                             "--cache-config", '{"num_top_tokens": -1}')
    assert_one_line_error(report, err, "num_top_tokens")


def test_model_folder_without_config(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    report, _, err = run_cli(tmp_path, "generate", "--model", str(empty))
    assert_one_line_error(report, err, "config.json")
    assert not report["torch"]


def test_missing_weights_are_one_line(capsys, model_dir):
    """Past the checks, a model that cannot load is still one line, not a traceback."""
    report, err = run_in_process(capsys, "generate", "--model", str(model_dir), "--prompt", "hi")
    assert_one_line_error(report, err, "--model", "cannot load it")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_device_without_cuda(capsys, model_dir):
    report, err = run_in_process(capsys, "generate", "--model", str(model_dir), "--device", "cuda")
    assert_one_line_error(report, err, "CUDA is not available")


# --------------------------------------------------------------------------------------- eval and bench
def test_eval_errors_are_one_line(tmp_path, capsys):
    base = ["eval", "--tasks", "niah_single"]
    report, err = run_in_process(capsys, *base, "--model", "/nonexistent/model-dir")
    assert_one_line_error(report, err, "no such model folder")
    report, err = run_in_process(capsys, *base, "--model", "demo", "--methods", "snapkv",
                                 "--cache-config", '{"num_top_tokenz": 1}')
    assert_one_line_error(report, err, "num_top_tokenz")
    report, err = run_in_process(capsys, *base, "--model", "demo", "--budgets", "2")
    assert_one_line_error(report, err, "--budgets")
    pt = tmp_path / "c.pt"
    pt.write_bytes(b"not a compressor folder")
    report, err = run_in_process(capsys, *base, "--model", "demo", "--methods", "deltakv",
                                 "--cache-config", json.dumps({"deltakv_path": str(pt)}))
    assert_one_line_error(report, err, "is a file", "train-compressor")


def test_eval_help_examples_are_accepted():
    """The examples that ``eval --help`` gives for --cache-config pass the tool's own checks."""
    import argparse

    from sparse_hf.eval.cli import _check_compressor_path, add_eval_parser
    from sparse_hf.eval.runner import budget_to_cache_config

    parser = argparse.ArgumentParser()
    action = next(a for a in add_eval_parser(parser.add_subparsers())._actions if "--cache-config" in a.option_strings)
    examples = [json.loads(x) for x in re.findall(r"'(\{.*?\})'", action.help)]
    assert len(examples) == 2
    budget_to_cache_config("snapkv", 0.1, 1024, examples[0])
    budget_to_cache_config("deltakv", 0.1, 1024, examples[1])
    _check_compressor_path(examples[1])


def test_bench_errors_are_one_line(tmp_path, capsys):
    report, _, err = run_cli(tmp_path, "bench", "--cases", "4096")
    assert_one_line_error(report, err, "LENGTHxBATCH")
    assert not report["torch"]
    report, err = run_in_process(capsys, "bench", "--device", "cpu", "--methods", "vanilla,snapkv+graph")
    assert_one_line_error(report, err, "snapkv+graph", "needs CUDA")
    report, err = run_in_process(capsys, "bench", "--model", "/nonexistent/model-dir", "--device", "cpu")
    assert_one_line_error(report, err, "no such model folder")
    for spec, needle in (("omnikv:bogus=1", "has no knob 'bogus'"), ("nomethod:x=1", "unknown method"),
                         ("omnikv", "METHOD:KEY=VALUE")):
        report, err = run_in_process(capsys, "bench", "--device", "cpu", "--knob", spec)
        assert_one_line_error(report, err, needle)


def test_bench_knob_overrides_the_budget_rule(tmp_path):
    """``--knob omnikv:full_attn_layers=0,1`` reaches the cache; other methods keep their budget rule."""
    from sparse_hf.bench import run_bench

    out = run_bench("tiny", ["omnikv", "snapkv"], [0.5], [(64, 1)], steps=2, device="cpu", log=lambda _: None,
                    knob_overrides=[("omnikv", "full_attn_layers", "0,1")])
    by_method = {r["method"]: r["knobs"] for r in out}
    assert by_method["omnikv"]["full_attn_layers"] == "0,1"
    assert "full_attn_layers" not in by_method["snapkv"]


def test_bench_knob_values_that_are_numbers_become_numbers():
    # deltakv's kv_quant_bits checks for the int 4: "--knob deltakv:kv_quant_bits=4" failed as the string "4"
    from sparse_hf.bench_cli import parse_knob

    assert parse_knob("deltakv:kv_quant_bits=4") == ("deltakv", "kv_quant_bits", 4)
    assert parse_knob("snapkv:num_top_tokens=0.25") == ("snapkv", "num_top_tokens", 0.25)
    assert parse_knob("omnikv:full_attn_layers=0,1") == ("omnikv", "full_attn_layers", "0,1")
    assert parse_knob("deltakv:cluster_metric=cosine") == ("deltakv", "cluster_metric", "cosine")


def test_bench_defaults_fit_the_device():
    from sparse_hf.bench import SHAPES as BENCH_SHAPES
    from sparse_hf.bench_cli import CPU_DEFAULTS, GPU_DEFAULTS, SHAPES, parse_cases

    assert BENCH_SHAPES is SHAPES
    cpu_model, cpu_cases = CPU_DEFAULTS
    assert cpu_model == "tiny" and max(length for length, _ in parse_cases(cpu_cases)) <= 4096
    assert max(length for length, _ in parse_cases(GPU_DEFAULTS[1])) == 131072


def test_train_compressor_errors_are_one_line(tmp_path, capsys):
    data = tmp_path / "docs.txt"
    data.write_text("hello world\n")
    base = ["train-compressor", "--model", "demo", "--output_dir", str(tmp_path / "out")]
    for extra, needle in ((["--dataset", str(tmp_path / "missing.jsonl")], "no such file"),
                          (["--dataset", str(data), "--cluster_metric", "manhattan"], "--cluster_metric"),
                          (["--dataset", str(data), "--init", "zeros"], "--init")):
        report, err = run_in_process(capsys, *base, *extra)
        assert_one_line_error(report, err, needle)
    report, err = run_in_process(capsys, "train-compressor", "--model", "demo", "--dataset", str(data))
    assert_one_line_error(report, err, "--output_dir")


def test_knob_check_uses_the_registry_and_config():
    """The CLI's knob check accepts what the cache accepts (same registry, same config validation)."""
    from sparse_hf.cli import UsageError, check_method_and_knobs
    from sparse_hf.methods import METHODS

    for name in METHODS:
        if name != "deltakv":
            check_method_and_knobs(name, {}, 4)
    check_method_and_knobs("deltakv", {"deltakv_path": "org/compressor"}, 4)
    with pytest.raises(UsageError, match="deltakv needs a compressor"):
        check_method_and_knobs("deltakv", {}, 4)


# ------------------------------------------------------------------------------------- generate --engine
def test_generate_engine_equals_hf_path_and_reports_kept_kv(tmp_path, capsys):
    """``generate --engine`` runs the prompt through ``sparse_hf.LLM``: the same greedy text as the HF path at the
    same knobs, and a line with the KV slots the request held (fewer than a full cache's with snapkv)."""
    from sparse_hf.cli import main
    from tiny_tokenizer import save_tiny_chat_model

    path = save_tiny_chat_model(tmp_path / "chat-model")
    knobs = '{"num_top_tokens": 8, "num_sink_tokens": 2, "num_recent_tokens": 8, "window_size": 4}'
    args = ["generate", "--model", str(path), "--method", "snapkv", "--prompt", "The grass is green. " * 12,
            "--max-new-tokens", "6", "--cache-config", knobs]
    outputs = []
    for extra in ([], ["--engine"]):
        assert main(args + extra) == 0
        outputs.append(capsys.readouterr().out)
    hf, engine = (out.split("\n--- ")[0] for out in outputs)
    assert engine == hf, outputs
    kept_line = next(line for line in outputs[1].splitlines() if line.startswith("KV slots held"))
    kept, total = (int(x) for x in re.findall(r"(\d+) of (\d+)", kept_line)[0])
    assert 0 < kept < total, kept_line


# ------------------------------------------------------------------------------------- generate --method all
def test_demo_table_marks_answers_against_full_and_explains_expected_losses():
    from sparse_hf.generate_cli import demo_table

    table = demo_table([("full", "The pass key is 68231.", 1.0, 7.0), ("snapkv", "The pass key is 68231.", 0.28, 7.2),
                        ("h2o", "The pass key is 6.", 0.28, 10.8), ("streamingllm", "The pass key is The", 0.16, 10.5)])
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]] for line in table.splitlines()
            if line.startswith("| ") and not line.startswith("| method")}
    assert rows["full"][3] == "-" and rows["snapkv"][3] == "yes" and rows["h2o"][3] == "no"
    assert rows["streamingllm"][3] == "no" and rows["snapkv"][1] == "28.0%"
    notes = [line for line in table.splitlines() if line.startswith("- ")]
    assert [n.split(":")[0] for n in notes] == ["- h2o", "- streamingllm"]


def test_generate_all_methods_on_a_tiny_model(tmp_path, capsys):
    """``--method all`` on a real (tiny) model folder: every registered method but deltakv (no compressor for this
    model) runs, each under its own header, and the table has a row per method that ran."""
    from sparse_hf.cli import main
    from sparse_hf.generate_cli import method_names
    from tiny_tokenizer import save_tiny_chat_model

    path = save_tiny_chat_model(tmp_path / "chat-model")
    assert main(["generate", "--model", str(path), "--method", "all", "--prompt", "The grass is green. " * 30,
                 "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    ran = [m for m in method_names() if m != "deltakv"]
    for method in ["full", *ran]:
        assert f"\n=== {method} ===" in out and f"| {method} |" in out, method
    assert "--- deltakv: skipped" in out
