"""Prepare an offline English prose corpus for DeltaKV compressor training and evaluation.

Source: Jane Austen's six novels, as shipped by the Debian package ``r-cran-janeaustenr`` (1.0.0-1 on Debian 12;
the novels are Project Gutenberg texts, public domain). Install it with::

    apt-get install -y --no-install-recommends r-cran-janeaustenr     # pulls r-base-core, ~45 MB installed

The script asks ``Rscript`` to dump each novel's lines, splits the novels into chapters (one document per chapter),
rejoins each paragraph's wrapped lines, and writes::

    DATA_DIR/train.jsonl     chapters of the five training novels      {"text", "book", "chapter"}
    DATA_DIR/heldout.jsonl   chapters of the held-out novel (Persuasion by default)
    DATA_DIR/manifest.json   package, version, split, counts and sha256 of both files

The held-out split is a whole novel the compressor never sees, so evaluation text is different documents, not
just different blocks. The output is deterministic (same package version -> same bytes -> same sha256).

Usage::

    python examples/prepare_corpus.py --data-dir ~/.cache/sparse_hf/data/austen
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import tempfile

PACKAGE = "r-cran-janeaustenr"
R_PACKAGE = "janeaustenr"
#: R object name -> title, in publication order.
BOOKS = {
    "sensesensibility": "Sense & Sensibility",
    "prideprejudice": "Pride & Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}
CHAPTER = re.compile(r"^\s*chapter\s+([0-9]+|[ivxlc]+)\.?\s*$", re.IGNORECASE)
VOLUME = re.compile(r"^\s*volume\s+([0-9]+|[ivxlc]+)\.?\s*$", re.IGNORECASE)


def debian_version(package: str) -> str | None:
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True,
                             check=True)
        return out.stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def dump_novels(workdir: str) -> dict[str, list[str]]:
    """Each novel's lines, through Rscript (the package stores them as R character vectors)."""
    script = (f"suppressMessages(library({R_PACKAGE}));"
              "args <- commandArgs(trailingOnly=TRUE); out <- args[1];"
              "for (b in args[-1]) writeLines(get(b), file.path(out, paste0(b, '.txt')), useBytes=TRUE)")
    try:
        subprocess.run(["Rscript", "-e", script, workdir, *BOOKS], check=True, capture_output=True, text=True)
    except FileNotFoundError as err:
        raise SystemExit(f"Rscript not found: install the corpus with `apt-get install -y --no-install-recommends "
                         f"{PACKAGE}`") from err
    except subprocess.CalledProcessError as err:
        raise SystemExit(f"Rscript failed ({err.stderr.strip()[-300:]}); is {PACKAGE} installed?") from err
    novels = {}
    for name in BOOKS:
        with open(os.path.join(workdir, name + ".txt"), encoding="utf-8", errors="replace") as f:
            novels[name] = f.read().splitlines()
    return novels


def paragraphs(lines: list[str]) -> str:
    """Rejoin hard-wrapped lines: blank lines separate paragraphs, which come out separated by one blank line."""
    paras, current = [], []
    for line in lines:
        if line.strip():
            current.append(line.strip())
        elif current:
            paras.append(" ".join(current))
            current = []
    if current:
        paras.append(" ".join(current))
    return "\n\n".join(re.sub(r"\s{2,}", " ", p) for p in paras)


def chapters(lines: list[str]) -> list[tuple[int, str]]:
    """``[(chapter number in the book, text)]``; front matter and volume headings are dropped."""
    out, current, number = [], None, 0
    for line in lines:
        if CHAPTER.match(line):
            if current is not None:
                out.append((number, paragraphs(current)))
            number += 1
            current = []
        elif VOLUME.match(line):
            continue
        elif current is not None:
            current.append(line)
    if current is not None:
        out.append((number, paragraphs(current)))
    return [(n, text) for n, text in out if text.strip()]


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=os.path.expanduser("~/.cache/sparse_hf/data/austen"))
    parser.add_argument("--heldout", default="persuasion", choices=sorted(BOOKS),
                        help="the novel kept out of training (evaluation documents)")
    args = parser.parse_args(argv)

    os.makedirs(args.data_dir, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        novels = dump_novels(tmp)
    counts: dict[str, dict] = {"train": {}, "heldout": {}}
    paths = {split: os.path.join(args.data_dir, f"{split}.jsonl") for split in counts}
    files = {split: open(path, "w", encoding="utf-8") for split, path in paths.items()}
    try:
        for name, title in BOOKS.items():
            split = "heldout" if name == args.heldout else "train"
            docs = chapters(novels[name])
            for number, text in docs:
                files[split].write(json.dumps({"text": text, "book": title, "chapter": number},
                                              ensure_ascii=False) + "\n")
            counts[split][title] = {"chapters": len(docs), "words": sum(len(t.split()) for _, t in docs),
                                    "chars": sum(len(t) for _, t in docs)}
    finally:
        for f in files.values():
            f.close()

    manifest = {
        "source": f"Debian package {PACKAGE} {debian_version(PACKAGE) or '(version unknown)'} "
                  "(Jane Austen's novels, Project Gutenberg texts, public domain)",
        "documents": "one per chapter, wrapped lines rejoined into paragraphs",
        "heldout": BOOKS[args.heldout],
        "splits": {split: {"file": os.path.basename(paths[split]), "sha256": sha256(paths[split]),
                           "books": counts[split],
                           "chapters": sum(c["chapters"] for c in counts[split].values()),
                           "words": sum(c["words"] for c in counts[split].values())} for split in counts},
    }
    with open(os.path.join(args.data_dir, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
    for split, info in manifest["splits"].items():
        print(f"{split}: {info['chapters']} chapters, {info['words']:,} words -> {paths[split]}")
    print(f"source: {manifest['source']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
