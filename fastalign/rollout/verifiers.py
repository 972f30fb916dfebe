"""Ready-made verifiable rewards, usable as `reward.function` (e.g.
"fastalign.rollout.verifiers:contains_word" with `reward.function_kwargs: {word: dog}`).

Contract of every reward function: `fn(prompts, completions, **kwargs) -> list[float]` of length N.
Fixed settings come from `reward.function_kwargs`; extra prompt-file columns arrive as list kwargs
(one value per completion, e.g. `answer`); unused kwargs are ignored (`**_`).
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections.abc import Sequence


def _check_lengths(name: str, prompts: Sequence, completions: Sequence, **columns: Sequence) -> None:
    n = len(completions)
    if len(prompts) != n:
        raise ValueError(f"{name}: {len(prompts)} prompts but {n} completions")
    for key, col in columns.items():
        if len(col) != n:
            raise ValueError(
                f"{name}: column {key!r} has {len(col)} values, expected {n} (one per completion)"
            )


def contains_word(
    prompts: Sequence[str], completions: Sequence[str], *, word: str, case_sensitive: bool = False, **_
) -> list[float]:
    """1.0 when `word` occurs as a whole word (not inside another word), else 0.0."""
    _check_lengths("contains_word", prompts, completions)
    if not isinstance(word, str) or not word.strip():
        raise ValueError(f"contains_word: word must be a non-empty string, got {word!r}")
    pattern = re.compile(rf"(?<!\w){re.escape(word.strip())}(?!\w)", 0 if case_sensitive else re.IGNORECASE)
    return [1.0 if pattern.search(c) else 0.0 for c in completions]


def ends_within(prompts: Sequence[str], completions: Sequence[str], *, max_words: int, **_) -> list[float]:
    """1.0 when the completion has at most `max_words` whitespace-separated words (rewarding brevity
    only pays once the policy also learns to stop: pair it with `missing_eos_penalty`)."""
    _check_lengths("ends_within", prompts, completions)
    if not isinstance(max_words, int) or isinstance(max_words, bool) or max_words < 0:
        raise ValueError(f"ends_within: max_words must be an int >= 0, got {max_words!r}")
    return [1.0 if len(c.split()) <= max_words else 0.0 for c in completions]


_EDGE = string.punctuation + "“”‘’«»"


def normalize_answer(text: str) -> str:
    """NFKC, case-folded, whitespace collapsed, punctuation and quotes stripped from both ends."""
    text = " ".join(unicodedata.normalize("NFKC", str(text)).casefold().split())
    return text.strip(_EDGE + " ")


def exact_match(
    prompts: Sequence[str], completions: Sequence[str], *, answer: Sequence[str], **_
) -> list[float]:
    """1.0 when the normalised completion equals the normalised `answer` (a prompt-file column)."""
    _check_lengths("exact_match", prompts, completions, answer=answer)
    return [
        1.0 if normalize_answer(c) == normalize_answer(a) else 0.0
        for c, a in zip(completions, answer, strict=True)
    ]
