"""Ready-made verifiable rewards."""

from __future__ import annotations

import pytest

from fastalign.rollout.verifiers import contains_word, ends_within, exact_match, normalize_answer


def test_contains_word_whole_words_only():
    comps = ["The dog ran.", "hotdogs are food", "DOG!", "a dog-like cat", "dogma", "", "cat"]
    assert contains_word([""] * 7, comps, word="dog") == [1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    assert contains_word([""] * 7, comps, word="dog", case_sensitive=True) == [1, 0, 0, 1, 0, 0, 0]
    # regex characters in the word are literal; extra columns are ignored
    assert contains_word(["p", "p"], ["costs $5.00 now", "costs $5x00"], word="$5.00", answer=["a", "b"]) == [
        1.0,
        0.0,
    ]


def test_ends_within_counts_words():
    comps = ["one two three", "one  two\nthree four", "", "   "]
    assert ends_within(["p"] * 4, comps, max_words=3) == [1.0, 0.0, 1.0, 1.0]
    assert ends_within(["p"] * 4, comps, max_words=0) == [0.0, 0.0, 1.0, 1.0]


def test_exact_match_normalises():
    assert normalize_answer('  "Paris."  ') == "paris"
    assert normalize_answer("New   York\n") == "new york"
    comps = ["Paris.", " new york ", "42", "4 2", "Ｌｏｎｄｏｎ"]
    answers = ["paris", "New York", "42.", "42", "london"]
    assert exact_match(["q"] * 5, comps, answer=answers) == [1.0, 1.0, 1.0, 0.0, 1.0]


def test_errors_name_the_function():
    with pytest.raises(ValueError, match="exact_match: column 'answer' has 1 values, expected 2"):
        exact_match(["a", "b"], ["a", "b"], answer=["a"])
    with pytest.raises(ValueError, match="contains_word: 1 prompts but 2 completions"):
        contains_word(["a"], ["a", "b"], word="x")
    with pytest.raises(ValueError, match="contains_word: word must be a non-empty string"):
        contains_word(["a"], ["a"], word=" ")
    with pytest.raises(ValueError, match="ends_within: max_words must be an int >= 0"):
        ends_within(["a"], ["a"], max_words=-1)
