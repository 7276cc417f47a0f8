"""Training data for the DeltaKV compressor: documents -> ``bos + text + eos`` -> concatenated -> fixed-length blocks.

Mirrors the reference's ``naive_tokenize_and_pack`` (documents shuffled with seed 42, packed into 2048-token
blocks, labels = input_ids; document boundaries are not masked). Sources: a local ``.txt`` (one document per
line), ``.json``/``.jsonl``, ``.parquet`` or ``.csv`` file, a directory of such files, or a Hub dataset name
(``name``, ``name:config``) when the network allows.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

import torch

_BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def _local_files(path: str) -> tuple[str, list[str]]:
    """The ``datasets`` builder name and the data files of a local file or directory."""
    if os.path.isfile(path):
        files = [path]
    else:
        files = sorted(os.path.join(root, f) for root, _, names in os.walk(path) for f in names
                       if os.path.splitext(f)[1].lower() in _BUILDERS)
    kinds = Counter(_BUILDERS.get(os.path.splitext(f)[1].lower()) for f in files)
    if not files or None in kinds:
        raise ValueError(f"{path}: expected .txt, .json, .jsonl, .parquet or .csv data; found {files[:5] or 'none'}")
    if len(kinds) > 1:
        raise ValueError(f"{path}: mixes data formats {dict(kinds)}; keep one format per directory")
    return next(iter(kinds)), files


def load_documents(source: str, split: str = "train", text_field: str = "text") -> Any:
    """A ``datasets.Dataset`` of documents with a ``text_field`` column, from a local path or the Hub.

    ``split`` may slice (``"train[:20%]"``). A missing local path raises FileNotFoundError; a Hub name that
    cannot be fetched raises OSError saying to pass a local file instead.
    """
    path = os.path.expanduser(source)
    try:
        import datasets
    except ImportError:
        if not os.path.exists(path):
            raise
        return _local_documents(source, path, split, text_field)
    if os.path.exists(path):
        builder, files = _local_files(path)
        base_split = split.split("[", 1)
        try:
            ds = datasets.load_dataset(builder, data_files={"train": files}, split="train" + (
                "[" + base_split[1] if len(base_split) > 1 else ""))
        except Exception as err:   # e.g. DatasetGenerationError on a malformed JSON line: a clear one-line error
            cause = err.__cause__ or err
            raise ValueError(f"training data {source}: could not read it as {builder} data "
                             f"({type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''})") from err
    elif path.startswith(("/", ".", "~")) or path.count("/") > 1:
        raise FileNotFoundError(f"training data {source} does not exist (expected a file, a directory or a Hub name)")
    else:
        name, _, config = source.partition(":")
        try:
            ds = datasets.load_dataset(name, config or None, split=split)
        except Exception as err:
            raise OSError(f"could not load dataset {source!r} from the Hugging Face Hub ({type(err).__name__}: "
                          f"{err}); pass a local .txt/.jsonl/.parquet file or directory instead") from err
    if text_field not in ds.column_names:
        raise ValueError(f"{source}: no {text_field!r} column; columns are {ds.column_names} (set --text_field)")
    return ds


class DocumentList:
    """The few ``datasets.Dataset`` calls this module makes, over rows held in a list: used when ``datasets`` is
    not installed (the GPU image lacks it). Rows are dicts; ``shuffle`` draws the permutation ``datasets`` draws
    (``np.random.default_rng(seed).permutation(n)``), so both give the same packed blocks."""

    def __init__(self, rows: list[dict]):
        self.rows = rows
        self.column_names = list(rows[0]) if rows else []

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int | str) -> dict | list:
        """Row ``i``, or the column named ``i``."""
        return [row[i] for row in self.rows] if isinstance(i, str) else self.rows[i]

    def shuffle(self, seed: int) -> "DocumentList":
        import numpy as np

        return DocumentList([self.rows[i] for i in np.random.default_rng(seed).permutation(len(self.rows))])

    def select(self, indices) -> "DocumentList":
        return DocumentList([self.rows[i] for i in indices])

    def map(self, fn, batched: bool, batch_size: int, remove_columns=None, **_) -> "DocumentList":
        """``fn`` over batches of ``batch_size`` rows given as columns; returns the rows of its output columns."""
        assert batched, "DocumentList.map runs batched functions only"
        out = []
        for start in range(0, len(self.rows), batch_size):
            chunk = self.rows[start:start + batch_size]
            result = fn({name: [row.get(name) for row in chunk] for name in self.column_names})
            out.extend(dict(zip(result, values)) for values in zip(*result.values()))
        return DocumentList(out)


def _local_documents(source: str, path: str, split: str, text_field: str) -> DocumentList:
    """Local ``.txt`` (a document per line) or ``.json``/``.jsonl`` files without ``datasets``; other formats and
    split slices need it."""
    import json

    builder, files = _local_files(path)
    if builder not in ("text", "json") or "[" in split:
        raise ImportError(f"{source}: reading {builder} data (or slicing split={split!r}) needs the `datasets` "
                          "package: pip install datasets")
    rows: list[dict] = []
    for name in files:
        with open(name, encoding="utf-8") as f:
            text = f.read()
        if builder == "text":
            rows.extend({"text": line} for line in text.splitlines())
        elif text.lstrip().startswith("["):
            rows.extend(json.loads(text))
        else:
            for number, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        raise ValueError(f"training data {name}, line {number}: not JSON ({err.msg})") from None
    if rows and text_field not in rows[0]:
        raise ValueError(f"{source}: no {text_field!r} column; columns are {list(rows[0])} (set --text_field)")
    return DocumentList(rows)


def pack_documents(documents: Any, tokenizer: Any, block_size: int, text_field: str = "text",
                   shuffle_seed: int | None = 42, num_proc: int | None = None) -> Any:
    """Tokenize each document as ``bos + text + eos``, concatenate, and cut into ``block_size`` blocks.

    Returns a ``datasets.Dataset`` with one ``input_ids`` column of length-``block_size`` lists; the tail that
    does not fill a block (per map batch of 1000 documents) is dropped.
    """
    if block_size < 2:
        raise ValueError(f"block_size={block_size}: expected >= 2")
    if shuffle_seed is not None:
        documents = documents.shuffle(seed=shuffle_seed)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def tokenize_and_pack(batch: dict) -> dict:
        ids = tokenizer([t or "" for t in batch[text_field]], add_special_tokens=False)["input_ids"]
        stream = [tok for doc in ids for tok in bos + doc + eos]
        usable = len(stream) // block_size * block_size
        return {"input_ids": [stream[i:i + block_size] for i in range(0, usable, block_size)]}

    packed = documents.map(tokenize_and_pack, batched=True, batch_size=1000, num_proc=num_proc,
                           remove_columns=documents.column_names, desc="tokenize and pack")
    if len(packed) == 0:
        raise ValueError(f"the data holds fewer than block_size={block_size} tokens; use more text or a smaller block")
    return packed


def build_train_dataset(source: str, tokenizer: Any, block_size: int = 2048, split: str = "train",
                        text_field: str = "text", max_blocks: int | None = None, shuffle_seed: int | None = 42,
                        num_proc: int | None = None) -> Any:
    """:func:`load_documents` then :func:`pack_documents`, keeping at most ``max_blocks`` blocks."""
    packed = pack_documents(load_documents(source, split, text_field), tokenizer, block_size, text_field,
                            shuffle_seed, num_proc)
    if max_blocks is not None and len(packed) > max_blocks:
        packed = packed.select(range(max_blocks))
    return packed


class PackedCollator:
    """Stacks packed blocks: ``[{"input_ids": [L]}] -> {"input_ids": [B, L], "labels": [B, L]}`` (labels = inputs)."""

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        ids = torch.tensor([f["input_ids"] for f in features], dtype=torch.long)
        return {"input_ids": ids, "labels": ids.clone()}
