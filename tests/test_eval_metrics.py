"""Eval metrics against hand-computed values."""

import pytest

from sparse_hf.eval.metrics import (METRIC_NAMES, classification_score, code_sim, count_score, edit_similarity,
                                    exact_match, first_code_line, lcs_length, normalize_answer, qa_f1,
                                    retrieval_score, rouge_l, score_sample, substring_match)


def test_normalize_answer():
    assert normalize_answer("The Cat, sat!  on A mat.") == "cat sat on mat"


def test_qa_f1():
    # prediction -> [cat, sat, on, mat], reference -> [cat, on, mat]: P = 3/4, R = 1, F1 = 6/7
    assert qa_f1("the cat sat on the mat", "a cat on a mat") == pytest.approx(6 / 7)
    assert qa_f1("Paris", "paris.") == 1.0
    assert qa_f1("London", "Paris") == 0.0
    # multiset overlap of [b, b, c] and [b, c, c] is {b, c}: P = R = 2/3
    assert qa_f1("b b c", "b c c") == pytest.approx(2 / 3)


def test_lcs_and_rouge_l():
    assert lcs_length(list("ABCBDAB"), list("BDCABA")) == 4
    assert lcs_length([], [1]) == 0
    # LCS = "the cat on the mat" (5): P = 5/6, R = 5/5, F = 10/11
    assert rouge_l("The cat sat on the mat.", "the cat on the mat") == pytest.approx(10 / 11)
    assert rouge_l("dog", "cat") == 0.0 and rouge_l("", "cat") == 0.0
    # "b a" vs "a b": LCS 1, P = R = 1/2
    assert rouge_l("b a", "a b") == pytest.approx(0.5)


def test_classification_score():
    classes = ["Food", "Date", "Animal"]
    assert classification_score("Food", "Food", all_classes=classes) == 1.0
    assert classification_score("Animal or Food", "Food", all_classes=classes) == 0.5
    assert classification_score("Date", "Food", all_classes=classes) == 0.0
    # "entity" is a strict substring of the right class, so it is not an extra match
    assert classification_score("Other entity", "Other entity", all_classes=["Other entity", "entity"]) == 1.0


def test_retrieval_and_count_scores():
    assert retrieval_score("Paragraph 3", "Paragraph 3") == 1.0
    assert retrieval_score("Paragraph 3 or Paragraph 5", "Paragraph 3") == 0.5
    assert retrieval_score("I do not know", "Paragraph 3") == 0.0
    assert count_score("There are 7 unique paragraphs: 7", 7) == 1.0
    assert count_score("5 or 7", "7") == 0.5
    assert count_score("none", 7) == 0.0


def test_code_sim():
    assert first_code_line("```python\n# a comment\nx = foo(1)\ny = 2") == "x = foo(1)"
    assert first_code_line("\n\nreturn a // b") == ""
    assert code_sim("```\nx = foo(1)\n", "x = foo(1)") == 1.0
    assert edit_similarity("abcd", "abce") == pytest.approx(0.75)  # 2 * 3 / 8
    assert edit_similarity("", "") == 1.0 and edit_similarity("abc", "") == 0.0


def test_substring_and_exact_match():
    assert substring_match("The numbers are 123 and 456.", ["123", "456", "789"]) == pytest.approx(2 / 3)
    assert substring_match("VAR abcde", ["ABCDE"]) == 1.0
    assert substring_match("anything", []) == 0.0
    assert substring_match("x 42 y", "42") == 1.0
    assert exact_match("The Answer.", "answer") == 1.0 and exact_match("answer 2", "answer") == 0.0


def test_score_sample_dispatch():
    qa = {"metric": "qa_f1", "answers": ["New York City", "Paris"]}
    assert score_sample("paris", qa) == 1.0  # best reference
    trec = {"metric": "classification", "answers": ["Food"], "all_classes": ["Food", "Date"],
            "first_line_only": True}
    assert score_sample("\nFood\nDate", trec) == 1.0  # second line ignored
    assert score_sample("x", {"metric": "substring_match", "answers": ["1", "x"]}) == 0.5
    with pytest.raises(ValueError, match="unknown metric"):
        score_sample("x", {"metric": "bleu", "answers": ["x"]})
    assert "rouge_l" in METRIC_NAMES and "code_sim" in METRIC_NAMES
