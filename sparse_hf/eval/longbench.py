"""LongBench (v1, English tasks) with the official prompts, generation lengths, truncation and metrics.

Data comes from ``datasets.load_dataset("THUDM/LongBench", task, split="test")`` when the Hub is reachable,
or from a local directory of the official ``<task>.jsonl`` files (the ``data.zip`` of the dataset repository;
fields ``input, context, answers, length, all_classes, dataset, _id``). As in LongBench's ``pred.py``, a prompt
longer than the budget keeps the head and tail halves of its tokens (here the budget is the grid length minus
the task's generation length), and the few-shot / code tasks are sent without a chat template.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

PROMPTS = {
    "narrativeqa": "You are given a story, which can be either a novel or a movie script, and a question. Answer the question as concisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nStory: {context}\n\nNow, answer the question based on the story as concisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",  # noqa: E501
    "qasper": "You are given a scientific article and a question. Answer the question as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.\n\nArticle: {context}\n\n Answer the question based on the above article as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",  # noqa: E501
    "multifieldqa_en": "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based on the above text, only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",  # noqa: E501
    "hotpotqa": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",  # noqa: E501
    "gov_report": "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n{context}\n\nNow, write a one-page summary of the report.\n\nSummary:",  # noqa: E501
    "qmsum": "You are given a meeting transcript and a query containing a question or instruction. Answer the query in one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting transcript in one or more sentences.\n\nQuery: {input}\nAnswer:",  # noqa: E501
    "multi_news": "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\nNow, write a one-page summary of all the news.\n\nSummary:",  # noqa: E501
    "trec": "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n{input}",
    "triviaqa": "Answer the question based on the given passage. Only give me the answer and do not output any other words. The following are some examples.\n\n{context}\n\n{input}",  # noqa: E501
    "samsum": "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n{input}",
    "passage_count": "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully read these paragraphs and determine how many unique paragraphs there are after removing duplicates. In other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the final count of unique paragraphs after removing duplicates. The output format should only contain the number, such as 1, 2, 3, and so on.\n\nThe final answer is: ",  # noqa: E501
    "passage_retrieval_en": "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the number of the paragraph that the abstract is from. The answer format must be like \"Paragraph 1\", \"Paragraph 2\", etc.\n\nThe answer is: ",  # noqa: E501
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
    "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
}
PROMPTS["2wikimqa"] = PROMPTS["musique"] = PROMPTS["hotpotqa"]

MAX_NEW_TOKENS = {
    "narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "hotpotqa": 32, "2wikimqa": 32, "musique": 32,
    "gov_report": 512, "qmsum": 512, "multi_news": 512, "trec": 64, "triviaqa": 32, "samsum": 128,
    "passage_count": 32, "passage_retrieval_en": 32, "lcc": 64, "repobench-p": 64,
}

METRICS = {
    "narrativeqa": "qa_f1", "qasper": "qa_f1", "multifieldqa_en": "qa_f1", "hotpotqa": "qa_f1",
    "2wikimqa": "qa_f1", "musique": "qa_f1", "triviaqa": "qa_f1",
    "gov_report": "rouge_l", "qmsum": "rouge_l", "multi_news": "rouge_l", "samsum": "rouge_l",
    "trec": "classification", "passage_count": "count", "passage_retrieval_en": "retrieval",
    "lcc": "code_sim", "repobench-p": "code_sim",
}

#: Tasks LongBench sends without a chat template (few-shot and code completion; lsht is a Chinese task).
NO_CHAT_TEMPLATE = frozenset({"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"})
#: Tasks whose prediction is cut to its first line before scoring, as in LongBench's ``eval.py``.
FIRST_LINE_ONLY = frozenset({"trec", "triviaqa", "samsum", "lsht"})
LONGBENCH_TASKS = tuple(PROMPTS)

DATA_URL = "https://huggingface.co/datasets/THUDM/LongBench/resolve/main/data.zip"


def load_longbench(task: str, data_dir: str | os.PathLike | None = None, allow_download: bool = True) -> list[dict]:
    """Rows of LongBench ``task``: from ``data_dir/<task>.jsonl`` if given and present, else from the Hub."""
    if task not in PROMPTS:
        raise ValueError(f"unknown LongBench task {task!r}; expected one of {', '.join(LONGBENCH_TASKS)}")
    if data_dir is not None:
        for path in (Path(data_dir) / f"{task}.jsonl", Path(data_dir) / "data" / f"{task}.jsonl"):
            if path.is_file():
                with open(path, encoding="utf-8") as f:
                    return [json.loads(line) for line in f if line.strip()]
    error: Exception | None = None
    if allow_download:
        try:
            import datasets

            return [dict(row) for row in datasets.load_dataset("THUDM/LongBench", task, split="test")]
        except Exception as exc:  # no network, no script support, ... -> explain how to get the files
            error = exc
    where = f"no file {task}.jsonl under {data_dir}" if data_dir is not None else "no --longbench-dir given"
    reason = f"the Hub download failed ({type(error).__name__}: {error})" if error else "downloading is disabled"
    raise FileNotFoundError(
        f"LongBench task {task!r}: {where} and {reason}. Download {DATA_URL}, unzip it and pass the folder "
        f"holding {task}.jsonl as --longbench-dir (Python: longbench_dir=...).")


def truncate_middle(tokenizer, prompt: str, max_tokens: int) -> str:
    """Keep the first and last ``max_tokens // 2`` tokens of ``prompt`` when it is longer than ``max_tokens``."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_tokens:
        return prompt
    half = max_tokens // 2
    return (tokenizer.decode(ids[:half], skip_special_tokens=True)
            + tokenizer.decode(ids[len(ids) - half:], skip_special_tokens=True))


def make_longbench_samples(task: str, tokenizer, context_length: int, num_samples: int | None, seed: int,
                           data_dir=None, allow_download: bool = True, rows: list[dict] | None = None) -> list[dict]:
    """Samples of LongBench ``task`` truncated to ``context_length - max_new_tokens`` prompt tokens.

    ``num_samples`` rows are drawn without replacement with ``random.Random(seed)`` (kept in dataset order);
    ``None`` takes them all. ``rows`` skips loading (used by the runner to load a task once for all lengths).
    """
    import random

    rows = load_longbench(task, data_dir, allow_download) if rows is None else rows
    max_new = MAX_NEW_TOKENS[task]
    budget = context_length - max_new
    if budget < 16:
        raise ValueError(f"longbench:{task}: context length {context_length} leaves no room for the prompt "
                         f"after {max_new} generated tokens")
    picked = range(len(rows))
    if num_samples is not None and num_samples < len(rows):
        picked = sorted(random.Random(f"{seed}:longbench:{task}").sample(range(len(rows)), num_samples))
    samples = []
    for i in picked:
        row = rows[i]
        prompt = truncate_middle(tokenizer, PROMPTS[task].format(context=row["context"], input=row["input"]),
                                 budget)
        samples.append({
            "id": f"longbench:{task}-L{context_length}-{row.get('_id', i)}",
            "task": f"longbench:{task}",
            "context_length": context_length,
            "depth": None,
            "prompt": prompt,
            "answer_prefix": "",
            "answers": list(row["answers"]),
            "all_classes": row.get("all_classes"),
            "metric": METRICS[task],
            "max_new_tokens": max_new,
            "chat_template": task not in NO_CHAT_TEMPLATE,
            "first_line_only": task in FIRST_LINE_ONLY,
            "num_tokens": len(tokenizer(prompt, add_special_tokens=False)["input_ids"]),
        })
    return samples
