"""SamplingParams validation, the batched Sampler against a naive per-row reference, and the OutputProcessor
(incremental detokenisation and stop rules) with a real byte-level BPE tokenizer."""

import pytest
import torch

from sparse_hf.engine.output import OutputProcessor
from sparse_hf.engine.sampler import Sampler
from sparse_hf.engine.sampling_params import SamplingParams
from tiny_tokenizer import tiny_tokenizer

V = 50


# ---------------------------------------------------------------- SamplingParams

@pytest.mark.parametrize("kwargs, field", [
    (dict(temperature=-0.1), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(temperature="1"), "temperature"), (dict(temperature=True), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_p=None), "top_p"),
    (dict(top_k=-2), "top_k"), (dict(top_k=2.0), "top_k"),
    (dict(max_tokens=0), "max_tokens"), (dict(max_tokens=1.5), "max_tokens"),
    (dict(min_tokens=-1), "min_tokens"), (dict(min_tokens=5, max_tokens=4), "min_tokens"),
    (dict(stop=""), "stop"), (dict(stop=["a", 3]), "stop"), (dict(stop=[""]), "stop"),
    (dict(stop_token_ids=[-1]), "stop_token_ids"), (dict(stop_token_ids=3), "stop_token_ids"),
    (dict(ignore_eos=1), "ignore_eos"),
    (dict(seed=1.0), "seed"), (dict(seed=2 ** 64), "seed"), (dict(seed=-(2 ** 63) - 1), "seed"),
])
def test_sampling_params_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_sampling_params_normalises_and_validates_replace():
    p = SamplingParams(temperature=0, stop="###", stop_token_ids=[7, 3], top_k=-1, max_tokens=None, seed=-5)
    assert p.greedy and p.stop == ("###",) and p.stop_token_ids == (7, 3)
    assert p.ending_token_ids([2, 7]) == (2, 7, 3)
    assert p.replace(ignore_eos=True).ending_token_ids([2]) == (7, 3)
    with pytest.raises(ValueError, match="top_p"):
        p.replace(top_p=2)


# ---------------------------------------------------------------- Sampler

def _logits(batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, V, generator=g) * 2


def _reference_support(row_logits, p: SamplingParams) -> set[int]:
    """The tokens a per-row naive implementation may draw: temperature, then top-k, then top-p."""
    x = row_logits / p.temperature
    order = torch.argsort(x, descending=True).tolist()
    if p.top_k > 0:
        order = order[:p.top_k]
    probs = torch.softmax(x[order].double(), dim=0).tolist()
    kept, mass = [], 0.0
    for token, prob in zip(order, probs):
        if p.top_p < 1 and mass >= p.top_p:
            break
        kept.append(token)
        mass += prob
    return set(kept)


def test_greedy_rows_are_exact_argmax_among_sampled_rows():
    logits = _logits(6)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0), SamplingParams(temperature=0),
              SamplingParams(temperature=0.7, top_k=3), SamplingParams(temperature=0, top_p=0.1),
              SamplingParams(temperature=2.0, seed=1)]
    out = Sampler()(logits, params, torch.zeros(6, dtype=torch.long), eos_token_ids=[])
    assert out.dtype == torch.long and out.shape == (6,)
    for row in (0, 2, 4):
        assert out[row].item() == logits[row].argmax().item()
    all_greedy = Sampler()(logits, [SamplingParams(temperature=0)] * 6, torch.zeros(6, dtype=torch.long), [])
    assert torch.equal(all_greedy, logits.argmax(-1))


@pytest.mark.parametrize("p", [
    SamplingParams(top_k=1), SamplingParams(top_k=5), SamplingParams(top_p=0.5), SamplingParams(top_p=0.9),
    SamplingParams(temperature=0.5, top_k=8, top_p=0.8), SamplingParams(temperature=3.0, top_k=4),
    SamplingParams(temperature=1.3),
])
def test_top_k_top_p_support_is_exact(p):
    torch.manual_seed(0)
    logits = _logits(3, seed=1)
    sampler = Sampler()
    draws = [set() for _ in range(3)]
    for _ in range(400):
        out = sampler(logits, [p] * 3, torch.zeros(3, dtype=torch.long), [])
        for row in range(3):
            draws[row].add(out[row].item())
    for row in range(3):
        expected = _reference_support(logits[row], p)
        assert draws[row] <= expected, (row, draws[row] - expected)
        if len(expected) <= 8:   # small supports are covered completely by 400 draws
            assert draws[row] == expected


def test_sampled_frequencies_follow_the_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    torch.manual_seed(0)
    counts = torch.zeros(4)
    sampler = Sampler()
    for _ in range(4000):
        counts[sampler(logits, [SamplingParams()], torch.zeros(1, dtype=torch.long), []).item()] += 1
    torch.testing.assert_close(counts / counts.sum(), torch.softmax(logits[0], 0), atol=0.03, rtol=0)


def test_seeded_row_same_alone_and_in_any_batch():
    logits = _logits(5, seed=3)
    seeded = SamplingParams(temperature=1.0, seed=1234)
    sampler = Sampler()
    for step in range(6):
        steps = torch.full((5,), step)
        alone = sampler(logits[2:3], [seeded], steps[:1], []).item()
        torch.manual_seed(step + 100)   # the default RNG state must not matter
        batch = sampler(logits, [SamplingParams(), SamplingParams(temperature=0), seeded, SamplingParams(seed=9),
                                 SamplingParams(top_p=0.3)], steps, [])
        assert batch[2].item() == alone
        shuffled = sampler(logits[[2, 0]], [seeded, SamplingParams()], steps[:2], [])
        assert shuffled[0].item() == alone


def test_seeded_sequence_varies_with_step_and_seed():
    logits = torch.zeros(1, V)   # uniform: the draw is the noise alone
    sampler = Sampler()
    seq = lambda seed: [sampler(logits, [SamplingParams(seed=seed)], torch.tensor([s]), []).item()
                        for s in range(12)]
    assert seq(7) == seq(7)
    assert len(set(seq(7))) > 3 and seq(7) != seq(8)


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    logits = torch.zeros(3, V)
    logits[:, 4] = 50.0    # EOS is by far the most likely
    logits[:, 9] = 40.0    # then a stop id
    eos = [4]
    sampler = Sampler()
    params = [SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[9]),
              SamplingParams(temperature=0, min_tokens=3, ignore_eos=True),
              SamplingParams(temperature=0)]
    early = sampler(logits, params, torch.tensor([2, 0, 0]), eos)
    assert early.tolist() == [_argmax_without(logits[0], [4, 9]), 4, 4]
    reached = sampler(logits, params, torch.tensor([3, 0, 5]), eos)
    assert reached.tolist() == [4, 4, 4]
    sampled = sampler(logits[:1], [SamplingParams(min_tokens=2, stop_token_ids=[9], top_k=2)], torch.tensor([1]), eos)
    assert sampled.item() not in (4, 9)


def _argmax_without(row, banned):
    row = row.clone()
    row[banned] = float("-inf")
    return row.argmax().item()


# ---------------------------------------------------------------- OutputProcessor

@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _run(proc, tok, text, params, prompt="Hello"):
    state = proc.new_state(tok(prompt)["input_ids"], params)
    deltas, result = [], (None, False, None)
    for token in tok(text)["input_ids"]:
        result = proc.update(state, token)
        deltas.append(result[0])
        if result[1]:
            break
    return state, deltas, result


@pytest.mark.parametrize("text", ["Caf\u00e9 cr\u00e8me \u4f60\u597d\uff0c\u4e16\u754c\u3002 \U0001F600\U0001F680 ok",
                                  " The sky is blue.\n    return a + b"])
def test_incremental_detokenisation_matches_full_decode(tok, text):
    proc = OutputProcessor(tok)
    state, deltas, (_, finished, _) = _run(proc, tok, text, SamplingParams(max_tokens=None))
    assert not finished
    assert "".join(deltas) == state.text == tok.decode(tok(text)["input_ids"]) == text
    assert all("\ufffd" not in d for d in deltas)


def test_stop_string_cuts_text_and_deltas_never_overshoot(tok):
    proc = OutputProcessor(tok)
    text = "The grass is green. The sky is blue. The sun is yellow."
    state, deltas, (_, finished, reason) = _run(proc, tok, text, SamplingParams(stop=["sky is", "zzz"]))
    assert finished and reason == "stop"
    assert state.text == "The grass is green. The "
    assert "".join(deltas) == state.text


def test_stop_string_ignored_before_min_tokens(tok):
    proc = OutputProcessor(tok)
    ids = tok("ab ab ab ab")["input_ids"]
    first_stop_len = len(tok("ab")["input_ids"])
    state, _, (_, finished, reason) = _run(proc, tok, "ab ab ab ab",
                                           SamplingParams(stop="ab", min_tokens=first_stop_len + 1, max_tokens=50))
    assert finished and reason == "stop" and len(state.token_ids) > first_stop_len
    assert len(state.token_ids) <= len(ids)


def test_eos_stop_ids_and_length(tok):
    eos = tok.eos_token_id
    hello = tok("Hello world")["input_ids"]
    proc = OutputProcessor(tok)

    state = proc.new_state([1, 2], SamplingParams())
    for t in hello:
        assert not proc.update(state, t)[1]
    delta, finished, reason = proc.update(state, eos)
    assert finished and reason == "stop" and state.text == "Hello world" and state.token_ids[-1] == eos

    state = proc.new_state([1, 2], SamplingParams(ignore_eos=True, max_tokens=len(hello) + 2))
    for t in hello + [eos]:
        assert not proc.update(state, t)[1]
    assert proc.update(state, hello[0]) == (state.text[-len(tok.decode(hello[:1])):], True, "length")

    state = proc.new_state([1], SamplingParams(stop_token_ids=[hello[1]]))
    proc.update(state, hello[0])
    assert proc.update(state, hello[1])[1:] == (True, "stop") and state.text == tok.decode(hello[:1])

    state = proc.new_state([1, 2, 3], SamplingParams(max_tokens=None), max_total_len=5)
    assert not proc.update(state, hello[0])[1]
    assert proc.update(state, hello[1])[1:] == (True, "length")
    with pytest.raises(RuntimeError):
        proc.update(state, hello[0])


def test_incomplete_character_held_back_then_flushed_at_the_end(tok):
    proc = OutputProcessor(tok)
    ids = tok("ok \U0001F600")["input_ids"]
    emoji_ids = len(ids) - len(tok("ok ")["input_ids"])
    assert emoji_ids >= 2, "the emoji must span several byte-level tokens for this test"
    cut = ids[:-1]                                   # the emoji's last byte never comes
    state = proc.new_state([1], SamplingParams(max_tokens=len(cut)))
    deltas = [proc.update(state, t) for t in cut]
    assert all("\ufffd" not in d for d, _, _ in deltas[:-1]) and deltas[-1][1:] == (True, "length")
    assert "".join(d for d, _, _ in deltas) == state.text == tok.decode(cut)
    assert state.text.endswith("\ufffd")
    state = proc.new_state([1], SamplingParams(max_tokens=None))
    for t in cut:
        proc.update(state, t)
    assert proc.finish(state, "abort") == "\ufffd" and state.text == tok.decode(cut)
