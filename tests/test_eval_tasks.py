"""Synthetic and LongBench eval tasks: determinism, answers in the context, token lengths, LongBench loading."""

import json
import re
from collections import Counter

import pytest

from sparse_hf.eval.haystack import count_tokens
from sparse_hf.eval.longbench import DATA_URL, PROMPTS, load_longbench, make_longbench_samples, truncate_middle
from sparse_hf.eval.needle import NEEDLE_TASKS
from sparse_hf.eval.ruler import RULER_TASKS
from sparse_hf.eval.tasks import SYNTHETIC_TASKS, build_samples, parse_tasks
from sparse_hf.eval.toy import build_toy_tokenizer

REQUIRED = {"id", "task", "context_length", "depth", "prompt", "answers", "metric"}


@pytest.fixture(scope="module")
def tok():
    return build_toy_tokenizer()


def one(task, tok, length=512, seed=0, depth=0.5, index=0):
    samples = build_samples(task, tok, length, index + 1, seed, depth=depth)
    return samples[index]


@pytest.mark.parametrize("task", SYNTHETIC_TASKS)
def test_same_seed_same_sample_other_seed_differs(task, tok):
    a, b, c = one(task, tok, seed=1), one(task, tok, seed=1), one(task, tok, seed=2)
    assert a == b
    assert a["prompt"] != c["prompt"] and a["answers"] != c["answers"]
    assert REQUIRED <= set(a) and a["task"] == task and a["context_length"] == 512
    # samples of one cell differ from each other
    s0, s1 = build_samples(task, tok, 512, 2, 1, depth=0.5)
    assert s0["prompt"] != s1["prompt"] and s0["id"] != s1["id"]


@pytest.mark.parametrize("task", SYNTHETIC_TASKS)
@pytest.mark.parametrize("length", [512, 2048])
def test_length_close_to_target_in_tokens(task, length, tok):
    s = one(task, tok, length=length)
    measured = count_tokens(tok, s["prompt"] + s["answer_prefix"])
    assert measured == s["num_tokens"]
    assert length - 40 <= measured <= length


@pytest.mark.parametrize("task", SYNTHETIC_TASKS)
def test_answers_present_in_context(task, tok):
    s = one(task, tok, length=1024)
    for answer in s["answers"]:
        assert answer in s["prompt"]


def test_needle_variants(tok):
    single = one("niah_single", tok)
    assert len(single["answers"]) == 1 and single["prompt"].count("special magic numbers for") == 1
    multikey = one("niah_multikey", tok)
    assert len(multikey["answers"]) == 1
    assert len(re.findall(r"magic numbers for \S+ is: \d{7}", multikey["prompt"])) == 4  # 1 + 3 distractors
    multivalue = one("niah_multivalue", tok)
    assert len(multivalue["answers"]) == 4 and len(set(multivalue["answers"])) == 4
    key = re.search(r"magic numbers for (\S+) mentioned", multivalue["prompt"]).group(1)
    for value in multivalue["answers"]:
        assert f"for {key} is: {value}." in multivalue["prompt"]


def test_needle_depth_moves_the_needle_through_one_haystack(tok):
    positions = {}
    for depth in (0.0, 0.5, 1.0):
        s = one("niah_single", tok, length=1024, depth=depth)
        context = s["prompt"].split("\n\n")[1]
        positions[depth] = context.index(s["answers"][0]) / len(context)
        assert s["depth"] == depth and f"-d{depth:g}-" in s["id"]
    assert positions[0.0] < 0.1 and 0.35 < positions[0.5] < 0.65 and positions[1.0] > 0.9
    strip = lambda s: re.sub(r"One of the special magic numbers[^.]*\.", "", s["prompt"]).split()  # noqa: E731
    assert strip(one("niah_single", tok, depth=0.0)) == strip(one("niah_single", tok, depth=1.0))


def test_ruler_word_tasks_answers_are_the_most_frequent(tok):
    cwe = one("ruler_cwe", tok, length=2048)
    counts = Counter(re.findall(r"\d+\. (\w+)", cwe["prompt"]))
    top = {w for w, _ in counts.most_common(10)}
    assert top == set(cwe["answers"]) and len(cwe["answers"]) == 10
    assert min(counts[w] for w in cwe["answers"]) > max(c for w, c in counts.items() if w not in top)
    fwe = one("ruler_fwe", tok, length=2048)
    counts = Counter(fwe["prompt"].split("\n\n")[1].split())
    ranked = counts.most_common(4)
    assert {w for w, _ in ranked[:3]} == set(fwe["answers"]) and ranked[2][1] > ranked[3][1]


def test_ruler_chain_tasks(tok):
    vt = one("ruler_vt", tok, length=1024)
    value = re.search(r"assigned the value (\d+) in", vt["prompt"]).group(1)
    assert f"VAR {vt['answers'][0]} = {value}." in vt["prompt"]
    for a, b in zip(vt["answers"], vt["answers"][1:]):
        assert f"VAR {b} = VAR {a}." in vt["prompt"]
    mh = one("ruler_multihop", tok, length=1024)
    key = re.search(r"Start at the key (\S+) and", mh["prompt"]).group(1)
    for _ in range(5):  # follow the chain
        nxt = re.search(rf"The key {re.escape(key)} leads to the (key|number) (\S+?)\.", mh["prompt"])
        if nxt.group(1) == "number":
            assert [nxt.group(2)] == mh["answers"]
            break
        key = nxt.group(2)
    else:
        pytest.fail("chain did not end at a number")


def test_too_small_length_raises(tok):
    with pytest.raises(ValueError, match="too small"):
        one("ruler_vt", tok, length=50)


def test_parse_tasks():
    assert parse_tasks("niah_single, ruler_vt,longbench:hotpotqa") == ["niah_single", "ruler_vt", "longbench:hotpotqa"]
    assert len(parse_tasks("longbench:all")) == len(PROMPTS) >= 16
    for bad in ("niah_foo", "longbench:nope", "", "longbench"):
        with pytest.raises(ValueError):
            parse_tasks(bad)
    assert set(NEEDLE_TASKS) | set(RULER_TASKS) == set(SYNTHETIC_TASKS)


# ---------------------------------------------------------------------------------------------- LongBench
def write_rows(folder, task, rows):
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{task}.jsonl", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def lb_row(i, task, context, answers, all_classes=None):
    return {"input": f"question {i}?", "context": context, "answers": answers, "length": len(context.split()),
            "all_classes": all_classes, "dataset": task, "language": "en", "_id": f"id{i}"}


def test_longbench_local_files_prompt_and_truncation(tmp_path, tok):
    long_context = " ".join(["apple"] * 50 + ["river"] * 2000 + ["tiger"] * 50)
    write_rows(tmp_path, "hotpotqa", [lb_row(i, "hotpotqa", long_context, ["Paris"]) for i in range(4)])
    samples = make_longbench_samples("hotpotqa", tok, 512, 2, seed=0, data_dir=tmp_path, allow_download=False)
    assert len(samples) == 2 and samples == make_longbench_samples("hotpotqa", tok, 512, 2, 0, tmp_path, False)
    s = samples[0]
    assert s["task"] == "longbench:hotpotqa" and s["metric"] == "qa_f1" and s["max_new_tokens"] == 32
    assert s["chat_template"] and s["answers"] == ["Paris"] and s["context_length"] == 512
    assert s["prompt"].startswith("Answer the question based on the given passages.")
    assert s["prompt"].rstrip().endswith("Answer:") and "tiger" in s["prompt"] and "apple" in s["prompt"]
    assert s["num_tokens"] <= 512 - 32 + 2


def test_longbench_no_template_tasks_and_metrics(tmp_path, tok):
    write_rows(tmp_path / "data", "trec", [lb_row(0, "trec", "What is x?\nType: Food", ["Food"], ["Food", "Date"])])
    s = make_longbench_samples("trec", tok, 512, None, 0, tmp_path, allow_download=False)[0]
    assert not s["chat_template"] and s["first_line_only"] and s["metric"] == "classification"
    assert s["all_classes"] == ["Food", "Date"] and s["prompt"].endswith("question 0?")


def test_longbench_missing_files_error(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_longbench("qasper", tmp_path, allow_download=False)
    assert "--longbench-dir" in str(err.value) and DATA_URL in str(err.value) and "qasper.jsonl" in str(err.value)
    with pytest.raises(ValueError, match="unknown LongBench task"):
        load_longbench("nope", tmp_path, allow_download=False)


def test_truncate_middle_keeps_head_and_tail(tok):
    text = " ".join(["apple"] * 10 + ["river"] * 500 + ["tiger"] * 10)
    assert truncate_middle(tok, "short text", 100) == "short text"
    cut = truncate_middle(tok, text, 64)
    assert cut.startswith("apple") and cut.rstrip().endswith("tiger") and count_tokens(tok, cut) <= 66
