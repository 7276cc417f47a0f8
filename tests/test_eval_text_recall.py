"""``text_recall``: recall from a local real text. Samples are deterministic, fill the length, quote a phrase that
occurs once in the context and expect exactly the words after it; the metric scores a right and a wrong answer;
a missing corpus is a clear error (CLI: one line, before loading); run_eval runs it offline on a tiny model."""

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sparse_hf.eval import run_eval, score_sample
from sparse_hf.eval.cli import add_eval_parser  # noqa: F401  (the parser the CLI test goes through)
from sparse_hf.eval.haystack import count_tokens
from sparse_hf.eval.tasks import build_samples, parse_tasks
from sparse_hf.eval.text_recall import ANSWER_WORDS, CUE_WORDS
from sparse_hf.eval.toy import build_toy_tokenizer

# A few public-domain sentences (Jane Austen, Persuasion, chapter 1) made into paragraphs of a tiny corpus.
SENTENCES = [
    "Sir Walter Elliot, of Kellynch Hall, in Somersetshire, was a man who, for his own amusement, never took up any "
    "book but the Baronetage.",
    "There he found occupation for an idle hour, and consolation in a distressed one.",
    "There his faculties were roused into admiration and respect, by contemplating the limited remnant of the "
    "earliest patents.",
    "Vanity was the beginning and the end of Sir Walter Elliot's character; vanity of person and of situation.",
    "He had been remarkably handsome in his youth; and, at fifty-four, was still a very fine man.",
    "Few women could think more of their personal appearance than he did, nor could the valet of any new made lord "
    "be more delighted with the place he held in society.",
]


@pytest.fixture(scope="module")
def tok():
    return build_toy_tokenizer()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "book.jsonl"
    chapters = []
    for c in range(12):   # each chapter varies the sentences so that openings stay unique across the corpus
        paras = [f"In the year {1800 + 7 * c + i} it was said that " + s[0].lower() + s[1:]
                 for i, s in enumerate(SENTENCES)]
        chapters.append({"text": "\n\n".join(paras)})
    path.write_text("".join(json.dumps(ch) + "\n" for ch in chapters))
    return path


def samples(tok, corpus, length=400, n=3, seed=0):
    return build_samples("text_recall", tok, length, n, seed, corpus_file=corpus)


def test_deterministic_and_seed_dependent(tok, corpus):
    assert samples(tok, corpus) == samples(tok, corpus)
    assert [s["prompt"] for s in samples(tok, corpus, seed=1)] != [s["prompt"] for s in samples(tok, corpus)]


@pytest.mark.parametrize("length", [300, 600])
def test_fills_the_length_and_the_answer_follows_a_unique_cue(tok, corpus, length):
    for s in samples(tok, corpus, length):
        assert 0.8 * length <= s["num_tokens"] <= length + 10          # within a sentence of the length
        assert s["num_tokens"] == count_tokens(tok, s["prompt"] + s["answer_prefix"])
        context = s["prompt"].split("\n\n", 1)[1].rsplit("\n\nQuestion:", 1)[0]
        cue = s["answer_prefix"].split('"', 1)[1]
        (answer,) = s["answers"]
        assert len(cue.split()) == CUE_WORDS and len(answer.split()) == ANSWER_WORDS
        assert context.count(cue) == 1
        after = context[context.index(cue) + len(cue):].split()[:ANSWER_WORDS]
        assert " ".join(after) == answer
        assert score_sample(f' {answer} and more."', s) == 1.0
        assert score_sample(" something else entirely", s) == 0.0


def test_missing_corpus_is_a_clear_error(tok, tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="prepare_corpus.py"):
        build_samples("text_recall", tok, 300, 1, 0, corpus_file=tmp_path / "none.jsonl")
    from sparse_hf.cli import main

    rc = main(["eval", "--model", "demo", "--tasks", "text_recall", "--corpus-file", str(tmp_path / "none.jsonl")])
    err = capsys.readouterr().err
    assert rc == 2 and "prepare_corpus.py" in err and len(err.strip().splitlines()) == 1


def test_task_name_is_valid():
    assert parse_tasks("text_recall,niah_single") == ["text_recall", "niah_single"]


def test_run_eval_offline_on_a_tiny_model(tok, corpus, tmp_path):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=128, vocab_size=len(tok))).eval()
    summary = run_eval(model, tok, tasks="text_recall", methods="full,snapkv", budgets=[0.5], lengths=[300],
                       num_samples=2, output_dir=tmp_path, max_new_tokens=3, progress=False, corpus_file=corpus)
    cells = {(r["method"], r["task"]): r for r in summary["results"]}
    assert set(cells) == {("full", "text_recall"), ("snapkv", "text_recall")}
    assert all(r["num_samples"] == 2 for r in cells.values())
    assert summary["config"]["corpus_file"] == str(corpus)
