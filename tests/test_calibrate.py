"""``sparse-hf calibrate`` on a tiny saved model: the per-layer top-k agreement against a naive computation from
eager attention probabilities, the exact choice against brute force, the written file as a cache_config for the
HF path, the CLI and the engine, and one-line errors before any model loads."""

import itertools
import json

import pytest
import torch

import sparse_hf  # noqa: F401
from helpers import saved_tiny_llama
from sparse_hf.calibrate import calibrate, choice_value, choose_filter_layers
from sparse_hf.cli import main, parse_json_object

LAYERS, WINDOW = 5, 6


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return saved_tiny_llama(tmp_path_factory.mktemp("tiny"), LAYERS)


def naive_agreement(model, prompts, k_of):
    """Eager attention probabilities; per layer and window query: max over heads, top-k as Python sets."""
    model.set_attn_implementation("eager")
    try:
        sets = []                                                     # [prompt][layer][query] -> set
        for ids in prompts:
            with torch.no_grad():
                att = model(input_ids=ids, output_attentions=True).attentions   # [1, H, L, L] per layer
            L = ids.shape[1]
            context, k = L - WINDOW, k_of(L - WINDOW)
            per_layer = []
            for a in att:
                queries = []
                for w in range(WINDOW):
                    row = [max(float(a[0, h, context + w, j]) for h in range(a.shape[1])) for j in range(context)]
                    ranked = sorted(range(context), key=lambda j: (-row[j], j))
                    queries.append(set(ranked[:k]))
                per_layer.append(queries)
            sets.append((per_layer, k))
    finally:
        model.set_attn_implementation("sdpa")
    out = [[0.0] * LAYERS for _ in range(LAYERS)]
    n = 0
    for per_layer, k in sets:
        for w in range(WINDOW):
            n += 1
            for i in range(LAYERS):
                for j in range(LAYERS):
                    out[i][j] += len(per_layer[i][w] & per_layer[j][w]) / k
    return [[v / n for v in row] for row in out]


@pytest.mark.parametrize("top", [7, 0.2])
def test_agreement_matches_naive_eager_computation(saved, top):
    _, model = saved
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 500, (1, n), generator=g) for n in (60, 45)]
    result = calibrate(model, prompts, num_top_tokens=top, window=WINDOW, num_filter_layers=2)
    expected = naive_agreement(model, prompts, lambda c: top if isinstance(top, int) else int(top * c))
    got = torch.tensor(result["agreement"], dtype=torch.float64)
    assert torch.allclose(got, torch.tensor(expected, dtype=torch.float64), atol=1e-9)
    assert torch.allclose(got.diagonal(), torch.ones(LAYERS, dtype=torch.float64))
    assert result["full_attn_layers"][0] == 0 and len(result["full_attn_layers"]) == 2
    assert [r["next"] for r in result["per_layer"][:-1]] == pytest.approx([expected[i][i + 1] for i in range(LAYERS - 1)])


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_choice_is_the_best_by_brute_force(n):
    g = torch.Generator().manual_seed(n)
    A = torch.rand(7, 7, generator=g, dtype=torch.float64)
    chosen = choose_filter_layers(A, n)
    assert chosen[0] == 0 and len(chosen) == n == len(set(chosen))
    best = max(choice_value(A, {0, *rest}) for rest in itertools.combinations(range(1, 7), n - 1))
    assert abs(choice_value(A, set(chosen)) - best) < 1e-12


@pytest.mark.parametrize("n,include", [(3, (1,)), (4, (1, 2, 3)), (4, (5,)), (3, (0, 6)), (2, (2,))])
def test_pinned_layers_choice_is_the_best_by_brute_force(n, include):
    """``include`` pins filter layers (DeltaKV keeps its first layers full); the rest is still the best choice."""
    g = torch.Generator().manual_seed(10 + n)
    A = torch.rand(7, 7, generator=g, dtype=torch.float64)
    chosen = choose_filter_layers(A, n, include)
    pinned = {0, *include}
    assert pinned <= set(chosen) and len(chosen) == n == len(set(chosen)) and chosen == sorted(chosen)
    free = [layer for layer in range(1, 7) if layer not in pinned]
    best = max(choice_value(A, pinned | set(rest)) for rest in itertools.combinations(free, n - len(pinned)))
    assert abs(choice_value(A, set(chosen)) - best) < 1e-12
    unpinned = choose_filter_layers(A, n)
    assert choice_value(A, set(unpinned)) >= choice_value(A, set(chosen)) - 1e-12   # pinning never helps the value


def test_pinned_layers_bad_input():
    A = torch.rand(5, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="more than num_filter_layers"):
        choose_filter_layers(A, 2, (1, 2))
    with pytest.raises(ValueError, match="has 5 layers"):
        choose_filter_layers(A, 3, (7,))


def test_cli_writes_a_cache_config_every_entry_point_loads(saved, tmp_path, capsys):
    path, model = saved
    out = tmp_path / "calib.json"
    rc = main(["calibrate", "--model", str(path), "--output", str(out), "--num-prompts", "1", "--length", "300",
               "--window", "8", "--num-filter-layers", "2", "--tasks", "niah_multikey"])
    captured = capsys.readouterr()
    printed = captured.out
    assert rc == 0, captured.err
    assert "mean agreement with the following layers" in printed and len(printed.splitlines()) >= LAYERS + 3
    knobs = json.loads(out.read_text())
    assert set(knobs) == {"full_attn_layers"} and knobs["full_attn_layers"][0] == 0
    details = json.loads((tmp_path / "calib.agreement.json").read_text())
    assert len(details["agreement"]) == LAYERS and details["full_attn_layers"] == knobs["full_attn_layers"]
    assert parse_json_object(f"@{out}") == knobs                     # --cache-config @calib.json
    ids = torch.randint(3, 500, (1, 40), generator=torch.Generator().manual_seed(3))
    cfg = dict(knobs, num_top_tokens=8, num_recent_tokens=4, num_sink_tokens=2)
    from engine_helpers import assert_greedy_equal, engine_tokens, hf_greedy_with_logits
    from sparse_hf.engine import LLM

    llm = LLM(model, num_kv_slots=256, max_model_len=128, sparse_method="omnikv", **cfg)
    got = engine_tokens(llm, [ids[0].tolist()], 4)[0]
    assert_greedy_equal(got, *hf_greedy_with_logits(model, ids[0].tolist(), 4, cache_implementation="omnikv",
                                                    cache_config=cfg))


@pytest.mark.parametrize("args,message", [
    (["--model", "./no/such/model"], "no such model folder"),
    (["--num-top-tokens", "1.5"], "fraction must lie in"),
    (["--output", "/no/such/dir/c.json"], "does not exist"),
    (["--num-filter-layers", "5"], "the model has 5 layers"),
    (["--window", "300", "--length", "256"], "smaller than --length"),
    (["--prompts-file", "/no/such.jsonl"], "no such file"),
    (["--tasks", "nope"], "unknown task"),
    (["--include-layers", "1,x"], "expected layer numbers"),
    (["--include-layers", "9"], "out of range"),
    (["--include-layers", "1,2,3", "--num-filter-layers", "3"], "more than --num-filter-layers"),
    (["--pin-sensitive", "2"], "needs --deltakv-path"),
    (["--deltakv-path", "./no/such/compressor"], "no such compressor folder"),
    (["--deltakv-path", "demo", "--pin-sensitive", "0"], "--pin-sensitive"),
    (["--save-compressor", "out"], "--save-compressor needs --deltakv-path"),
    (["--append-answers", "--prompts-file", "PROMPTS"], "--append-answers needs synthetic prompts"),
    (["--deltakv-path", "demo", "--save-compressor", "/no/such/dir/out"], "does not exist"),
    (["--deltakv-path", "demo", "--save-compressor", "NONEMPTY"], "not an empty folder"),
])
def test_bad_arguments_are_one_line_errors(saved, tmp_path, capsys, monkeypatch, args, message):
    path, _ = saved
    import sparse_hf.models

    monkeypatch.setattr(sparse_hf.models, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    (tmp_path / "p.txt").write_text("some text")
    args = [{"NONEMPTY": str(tmp_path / "full"), "PROMPTS": str(tmp_path / "p.txt")}.get(a, a) for a in args]
    full = ["calibrate", "--model", str(path), "--output", str(tmp_path / "c.json")] + args
    try:
        rc = main(full)
    except SystemExit as exc:
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_cli_include_layers_pins_them(saved, tmp_path, capsys):
    path, _ = saved
    out = tmp_path / "calib.json"
    rc = main(["calibrate", "--model", str(path), "--output", str(out), "--num-prompts", "1", "--length", "300",
               "--window", "8", "--num-filter-layers", "3", "--include-layers", "1,2", "--tasks", "niah_multikey"])
    assert rc == 0, capsys.readouterr().err
    assert json.loads(out.read_text())["full_attn_layers"] == [0, 1, 2]
    rc = main(["calibrate", "--model", str(path), "--output", str(out), "--num-prompts", "1", "--length", "300",
               "--window", "8", "--num-filter-layers", "3", "--include-layers", "3", "--tasks", "niah_multikey"])
    layers = json.loads(out.read_text())["full_attn_layers"]
    assert rc == 0 and len(layers) == 3 and {0, 3} <= set(layers)


def test_append_answers_puts_each_answer_in_the_scoring_window(saved):
    """``--append-answers``: each synthetic prompt is the sample's prompt followed by its reference answer's tokens,
    so the last ``--window`` queries (which score the tokens) include the answer's own decode steps."""
    import argparse

    from sparse_hf.calibrate import build_prompts
    from sparse_hf.eval.runner import encode_sample
    from sparse_hf.eval.tasks import build_samples
    from transformers import AutoTokenizer

    path, _ = saved
    tok = AutoTokenizer.from_pretrained(path)
    args = argparse.Namespace(prompts_file=None, tasks=["niah_single", "niah_multikey"], num_prompts=2, length=300,
                              seed=3, append_answers=True)
    got = build_prompts(args, tok)
    plain = build_prompts(argparse.Namespace(**dict(vars(args), append_answers=False)), tok)
    samples = [s for t in args.tasks for s in build_samples(t, tok, 300, 2, 3, 0.5, allow_download=False)]
    assert len(got) == len(plain) == len(samples) == 4
    for ids, base, sample in zip(got, plain, samples):
        answer = tok(" " + ", ".join(sample["answers"]), add_special_tokens=False)["input_ids"]
        assert torch.equal(base, encode_sample(tok, sample, use_chat_template=False))
        assert ids[0].tolist() == base[0].tolist() + answer and len(answer) > 0
