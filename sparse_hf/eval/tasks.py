"""Task names, their validation, and building the samples of one grid cell.

Task names: the needle tasks (``niah_single``, ``niah_multikey``, ``niah_multivalue``), the RULER-style tasks
(``ruler_vt``, ``ruler_cwe``, ``ruler_fwe``, ``ruler_multihop``), ``text_recall`` (recall from a local real text,
:mod:`sparse_hf.eval.text_recall`) and ``longbench:<task>`` for the English LongBench tasks (``longbench:all``
expands to all of them).
"""

from __future__ import annotations

from .longbench import LONGBENCH_TASKS, make_longbench_samples
from .needle import NEEDLE_TASKS, make_needle_sample
from .ruler import RULER_TASKS, make_ruler_sample
from .text_recall import TEXT_TASKS, load_paragraphs, make_text_recall_sample

SYNTHETIC_TASKS = NEEDLE_TASKS + RULER_TASKS       # generated from a seed alone
LOCAL_TASKS = SYNTHETIC_TASKS + TEXT_TASKS          # plus the tasks over a local text file


def is_needle(task: str) -> bool:
    """Needle tasks have a depth axis; the others do not."""
    return task in NEEDLE_TASKS


def parse_tasks(spec) -> list[str]:
    """Validate ``"niah_single,longbench:hotpotqa"`` (or a list of names); unknown names raise ``ValueError``."""
    names = [t.strip() for t in spec.split(",")] if isinstance(spec, str) else [str(t).strip() for t in spec]
    names = [t for t in names if t]
    if not names:
        raise ValueError("no task given; expected e.g. 'niah_single,ruler_vt,longbench:hotpotqa'")
    out: list[str] = []
    for name in names:
        if name == "longbench:all":
            out += [f"longbench:{t}" for t in LONGBENCH_TASKS]
        elif name in LOCAL_TASKS or (name.startswith("longbench:") and name[10:] in LONGBENCH_TASKS):
            out.append(name)
        else:
            raise ValueError(
                f"unknown task {name!r}; valid tasks: {', '.join(LOCAL_TASKS)}, longbench:all, "
                + ", ".join(f"longbench:{t}" for t in LONGBENCH_TASKS))
    return list(dict.fromkeys(out))


def build_samples(task: str, tokenizer, length: int, num_samples: int, seed: int, depth: float | None = None,
                  longbench_dir=None, longbench_rows: list[dict] | None = None,
                  allow_download: bool = True, corpus_file=None, paragraphs: list[str] | None = None) -> list[dict]:
    """The ``num_samples`` samples of ``task`` at ``length`` tokens (and ``depth``, for needle tasks).

    Synthetic samples depend only on ``(seed, task, length, index)`` (plus the depth's placement), so a
    rerun with the same arguments rebuilds exactly the same prompts. ``text_recall`` reads ``corpus_file`` (or
    takes its ``paragraphs``, already loaded).
    """
    if task in NEEDLE_TASKS:
        if depth is None:
            raise ValueError(f"{task} needs a depth in [0, 1]")
        return [make_needle_sample(task, tokenizer, length, depth, i, seed) for i in range(num_samples)]
    if task in RULER_TASKS:
        return [make_ruler_sample(task, tokenizer, length, i, seed) for i in range(num_samples)]
    if task in TEXT_TASKS:
        paragraphs = paragraphs if paragraphs is not None else load_paragraphs(corpus_file)
        return [make_text_recall_sample(tokenizer, length, i, seed, paragraphs) for i in range(num_samples)]
    if task.startswith("longbench:"):
        return make_longbench_samples(task[10:], tokenizer, length, num_samples, seed, longbench_dir,
                                      allow_download, rows=longbench_rows)
    raise ValueError(f"unknown task {task!r}")
