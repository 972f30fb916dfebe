"""Prompt files for the online recipes (PPO, GRPO, online DPO): rows → token-id prompts.

    prompts, report = load_prompts("prompts.jsonl", tokenizer, max_prompt_length=256)
    prompts[0] == {"index": 0, "prompt_ids": [...], "prompt_text": "...", "columns": {...}}

Sources are those of `fastalign.data.sources` (JSONL/NDJSON/JSON/CSV, each also .gz/.bz2/.xz/.zst,
parquet and save_to_disk folders through `datasets`, hub names; CSV columns stay strings). Each
row needs a `prompt` (after the `columns` mapping canonical name -> source column, e.g.
{"prompt": "question"}):

- a string. With `chat_template=True` and a tokenizer that has a chat template, it becomes one user
  turn rendered with the template and its generation prompt (what a chat model expects); otherwise
  (no template, or `chat_template=False`) the text is tokenised as is, with the tokenizer's special
  tokens (BOS). Why default to the template: a chat model sampled on a bare string answers out of
  role, and a base model (no template) is unaffected.
- a list of {"role", "content"} messages: always rendered with the chat template + generation
  prompt (a tokenizer without one is an error: there is no other faithful rendering).

`prompt_text` is what reward models and reward functions see as the prompt: the string itself, or
for a message list the content of its last user turn (reward models apply their own template).
Every other column of the row is kept in `columns` (passed to reward functions as keyword lists,
e.g. an `answer` column for `exact_match`).

Truncation: a prompt over `max_prompt_length` tokens keeps its LAST tokens (the part the response
continues). Bad rows (unreadable line, not an object, no prompt, empty prompt, wrong type) are
skipped with counted reasons and `file:line` in the report (`strict=True`: the first one raises
ValueError), as `fastalign.data.loader` does for training data.
"""

from __future__ import annotations

import os
from collections import Counter

from fastalign.data.loader import DataReport
from fastalign.data.sources import RowError, iter_rows


def _check_columns(columns: dict[str, str] | None) -> dict[str, str]:
    if not columns:
        return {}
    if not isinstance(columns, dict) or set(columns) - {"prompt"}:
        raise ValueError(
            f"data.columns: prompt files map only 'prompt' to a source column, got {columns!r} "
            "(other columns are passed to reward functions under their own names)"
        )
    if not isinstance(columns["prompt"], str) or not columns["prompt"]:
        raise ValueError(f"data.columns.prompt must be a column name, got {columns['prompt']!r}")
    return dict(columns)


def _is_messages(x) -> bool:
    return isinstance(x, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in x)


class PromptEncoder:
    """One row's prompt → (token ids, prompt text, truncated?)."""

    def __init__(self, tokenizer, max_prompt_length: int, chat_template: bool = True) -> None:
        if not isinstance(max_prompt_length, int) or max_prompt_length < 1:
            raise ValueError(f"max_prompt_length must be an int >= 1, got {max_prompt_length!r}")
        self.tok, self.max_len = tokenizer, max_prompt_length
        self.has_template = bool(getattr(tokenizer, "chat_template", None))
        self.template_strings = chat_template and self.has_template

    def __call__(self, prompt) -> tuple[list[int], str, bool]:
        if isinstance(prompt, str):
            if not prompt.strip():
                raise RowError("empty_field", "prompt is empty")
            text = prompt
            if self.template_strings:
                ids = self._render([{"role": "user", "content": prompt}])
            else:
                ids = list(self.tok(prompt).input_ids)
        elif _is_messages(prompt):
            if not prompt:
                raise RowError("empty_field", "prompt message list is empty")
            if not self.has_template:
                raise ValueError(
                    "prompt rows with chat messages need a tokenizer with a chat template; this tokenizer "
                    "has none: set model.chat_template (e.g. model.chat_template=chatml, or a .jinja "
                    "file) or use plain-text prompts"
                )
            users = [m["content"] for m in prompt if m.get("role") == "user"]
            text = str(users[-1] if users else prompt[-1]["content"])
            ids = self._render(prompt)
        else:
            raise RowError(
                "bad_type",
                "prompt must be a string or a list of {role, content} messages, "
                f"got {type(prompt).__name__}",
            )
        truncated = len(ids) > self.max_len
        return (ids[-self.max_len :] if truncated else ids), text, truncated

    def _render(self, messages: list[dict]) -> list[int]:
        text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        bos = getattr(self.tok, "bos_token", None)
        special = not (isinstance(bos, str) and bos and text.startswith(bos))  # templates that write BOS
        return list(self.tok(text, add_special_tokens=special).input_ids)


def load_prompts(
    source: str | os.PathLike,
    tokenizer,
    *,
    max_prompt_length: int = 256,
    columns: dict[str, str] | None = None,
    chat_template: bool = True,
    strict: bool = False,
    max_rows: int | None = None,
    split: str = "train",
) -> tuple[list[dict], DataReport]:
    """(examples, report): examples {index, prompt_ids, prompt_text, columns}; see the module doc.

    Raises FileNotFoundError for a missing source, ValueError for a bad `columns` mapping, a chat
    row without a chat template, a bad row under `strict`, or when no row is usable."""
    columns = _check_columns(columns)
    encode = PromptEncoder(tokenizer, max_prompt_length, chat_template)
    report = DataReport(source=str(source), kind="prompt", format="prompt")
    out: list[dict] = []
    key = columns.get("prompt", "prompt")
    for where, raw, error in iter_rows(source, split=split, max_rows=max_rows):
        report.rows_read += 1
        try:
            if error is not None:
                raise error
            if key not in raw:
                raise RowError(
                    "missing_field",
                    f"no {key!r} column (keys: {', '.join(sorted(map(str, raw)))}; map another with "
                    "data.columns.prompt=NAME)",
                )
            ids, text, truncated = encode(raw[key])
        except RowError as e:
            report._skip(where, e, strict)
            continue
        extra = {k: v for k, v in raw.items() if k != key}
        out.append({"index": len(out), "prompt_ids": ids, "prompt_text": text, "columns": extra})
        report.truncated += int(truncated)
    report.kept = len(out)
    report.skipped = dict(Counter(report.skipped).most_common())
    if not out:
        raise ValueError(f"no usable prompts: {report.summary()}")
    return out, report


def column_lists(rows: list[dict]) -> dict[str, list]:
    """The extra columns of `rows` as {name: [value per row]} (None where a row lacks one), the
    keyword lists reward functions receive."""
    names = sorted({k for r in rows for k in r["columns"]})
    return {k: [r["columns"].get(k) for r in rows] for k in names}
