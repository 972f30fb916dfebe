"""Tokenise canonical records into examples (python lists of ints) and truncate them.

Tokens:
- text prompts: `tokenizer(prompt)` with special tokens (BOS if the tokenizer adds one); responses are
  tokenised separately with `add_special_tokens=False`, so the prompt / response boundary is exact.
- chat rows: the prompt is `apply_chat_template(prompt, add_generation_prompt=True)` rendered as text,
  the response is the rendering of prompt + response messages minus the prompt rendering (a template
  whose full rendering does not start with the prompt rendering is an error). Whitespace the template
  puts after a closing EOS (e.g. "</s>\\n") is dropped. The prompt text gets the tokenizer's special
  tokens unless it already starts with the BOS text (templates that write BOS themselves).
- every response (chosen / rejected / completion, SFT completion and `text`) ends with
  `tokenizer.eos_token_id`, appended unless it is already the last token.

Truncation: with `max_prompt_length`, a longer prompt keeps its LAST `max_prompt_length` tokens (the
part next to the response). A prompt still `>= max_length` tokens is skipped as `prompt_too_long`.
Responses are then cut to `max_length - len(prompt)` tokens, keeping their start (the EOS may be
cut). `text` rows are cut to `max_length`. A row counts once as truncated, whichever part was cut.
A preference pair whose chosen and rejected tokens are then equal is skipped: `identical_after_truncation`
when the cut made them so, `identical_pair` when they tokenise alike uncut.
"""

from __future__ import annotations

from fastalign.constants import IGNORE_INDEX
from fastalign.data.errors import RowError


def _identical(cut: bool, room: int, max_length: int) -> RowError:
    """Equal chosen and rejected tokens give the pair no training signal: skip it, saying why."""
    if cut:
        return RowError(
            "identical_after_truncation",
            f"chosen and rejected are the same in their first {room} tokens, all that fit "
            f"max_length {max_length} after the {max_length - room}-token prompt",
        )
    return RowError("identical_pair", "chosen and rejected tokenise to the same ids")


class Encoder:
    """Turns records of one kind into examples; holds the tokenizer and length limits."""

    def __init__(self, kind: str, tokenizer, max_length: int, max_prompt_length: int | None):
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is None:
            raise ValueError("tokenizer has no eos_token_id; set tokenizer.eos_token before loading data")
        if not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
        if max_prompt_length is not None and (
            not isinstance(max_prompt_length, int) or max_prompt_length < 1
        ):
            raise ValueError(f"max_prompt_length must be None or an int >= 1, got {max_prompt_length!r}")
        self.kind, self.tok, self.eos = kind, tokenizer, int(eos)
        self.max_length, self.max_prompt_length = max_length, max_prompt_length

    def __call__(self, rec: dict) -> tuple[dict, bool]:
        """(example without "index", truncated?) for one record; RowError("prompt_too_long") to skip."""
        if "text" in rec:
            ids = self._response(self.tok(rec["text"]).input_ids)
            return {"input_ids": ids[: self.max_length], "labels": list(ids[: self.max_length])}, len(
                ids
            ) > self.max_length
        names = {"preference": ("chosen", "rejected"), "kto": ("completion",), "sft": ("completion",)}[
            self.kind
        ]
        if rec["chat"]:
            prompt_text = self._render(rec["prompt"], generation_prompt=True)
            prompt = self._encode_prompt(prompt_text)
            responses = [self._encode_chat_response(prompt_text, rec["prompt"], rec[n]) for n in names]
        else:
            prompt = self._encode_prompt(rec["prompt"])
            responses = [self._response(self.tok(rec[n], add_special_tokens=False).input_ids) for n in names]
        truncated = False
        if self.max_prompt_length is not None and len(prompt) > self.max_prompt_length:
            prompt, truncated = prompt[-self.max_prompt_length :], True
        if len(prompt) >= self.max_length:
            raise RowError(
                "prompt_too_long", f"prompt has {len(prompt)} tokens, max_length is {self.max_length}"
            )
        room = self.max_length - len(prompt)
        cut = any(len(r) > room for r in responses)
        responses = [r[:room] for r in responses]
        if self.kind == "preference" and responses[0] == responses[1]:
            raise _identical(cut, room, self.max_length)
        truncated = truncated or cut
        if self.kind == "preference":
            ex = {"prompt_ids": prompt, "chosen_ids": responses[0], "rejected_ids": responses[1]}
            for key in ("margin", "p_chosen"):
                if key in rec:
                    ex[key] = rec[key]
        elif self.kind == "kto":
            ex = {"prompt_ids": prompt, "completion_ids": responses[0], "label": rec["label"]}
        else:
            ex = {"input_ids": prompt + responses[0], "labels": [IGNORE_INDEX] * len(prompt) + responses[0]}
        return ex, truncated

    def _response(self, ids: list[int]) -> list[int]:
        ids = list(ids)
        return ids if ids and ids[-1] == self.eos else [*ids, self.eos]

    def _encode_prompt(self, text: str) -> list[int]:
        bos = getattr(self.tok, "bos_token", None)
        special = not (isinstance(bos, str) and bos and text.startswith(bos))
        return list(self.tok(text, add_special_tokens=special).input_ids)

    def _render(self, messages: list[dict], *, generation_prompt: bool) -> str:
        if not getattr(self.tok, "chat_template", None):
            raise ValueError(
                "chat rows (lists of {role, content} messages) need a tokenizer with a chat template; "
                "this tokenizer has none: set model.chat_template (e.g. model.chat_template=chatml, or a "
                ".jinja file) or use plain-text columns"
            )
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def _encode_chat_response(self, prompt_text: str, prompt: list[dict], response: list[dict]) -> list[int]:
        full = self._render(prompt + response, generation_prompt=False)
        if not full.startswith(prompt_text):
            raise ValueError(
                "the chat template's rendering of prompt + response does not start with its rendering of the "
                "prompt with add_generation_prompt=True, so the response tokens cannot be separated; "
                f"prompt renders as ...{prompt_text[-60:]!r}, "
                f"full as ...{full[max(0, len(prompt_text) - 60) :][:80]!r}"
            )
        text = full[len(prompt_text) :]
        eos_text = getattr(self.tok, "eos_token", None)
        if isinstance(eos_text, str) and eos_text and text.rstrip().endswith(eos_text):
            text = text.rstrip()
        return self._response(self.tok(text, add_special_tokens=False).input_ids)
