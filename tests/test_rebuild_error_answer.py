"""``benchmarks/deltakv_rebuild_error.py``'s ``answer_positions``: where a sample's answer stands in its prompt."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from deltakv_rebuild_error import answer_positions  # noqa: E402


class CharTokenizer:
    """One token per character (a space too), as a digit-splitting tokenizer treats a needle's number."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def test_answer_positions_against_a_plain_search():
    tok = CharTokenizer()
    prompt = "The magic number is 4134446. Remember it."
    ids = tok(prompt)["input_ids"]
    start = prompt.index("4134446")
    assert answer_positions(ids, tok, ["4134446"]) == set(range(start, start + 7))
    # the first answer found wins; every occurrence of it is marked; an absent answer marks nothing
    twice = tok("a 12 b 12")["input_ids"]
    assert answer_positions(twice, tok, ["99", "12"]) == {2, 3, 7, 8}
    assert answer_positions(ids, tok, ["777"]) == set() and answer_positions(ids, tok, []) == set()
