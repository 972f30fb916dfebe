"""Row formats: detection and normalisation to canonical records.

The `columns` mapping (canonical name -> source column) is applied first; the canonical names are
TRL's: prompt, chosen, rejected (preference), prompt, completion, label (KTO), text / messages /
prompt, completion (SFT), plus the optional "margin" (a number) and "p_chosen" (a soft label in
[0, 1]) for preference rows.

Detection (`fmt="auto"`) looks at the keys (and value types) of each row; the file's format is the one
most of its first 32 fitting rows have (`fastalign.data.loader`). A row that fits another format is
skipped as `format_mismatch`, one that fits none as `missing_field`. Per row:

- kind "preference": `chosen` and `rejected` present.
  * no `prompt`: "chat" if chosen is a list of messages, else "hh" (hh-rlhf transcripts);
  * with `prompt`: "chat" if any of prompt / chosen / rejected is a list, else "preference".
- kind "kto": `prompt`, `completion` and `label` present: "chat" if prompt or completion is a list,
  else "kto".
- kind "sft": `messages` (or ShareGPT's `conversations`) -> "chat"; `text` -> "sft"; `prompt` +
  `completion` (or a preference pair's `chosen`, which is then the completion learnt) -> "chat" if
  either is a list, else "sft".

Formats, per row:
 (a) preference: prompt / chosen / rejected strings.
 (b) hh: chosen / rejected are whole "\\n\\nHuman: ... \\n\\nAssistant: ..." transcripts; the prompt is
     their common prefix up to and including the last "\\n\\nAssistant:" in it, the responses the rest.
 (c) chat: lists of {"role", "content"} messages (ShareGPT's {"from", "value"} turns are read as
     such: human -> user, gpt -> assistant). Preference: prompt (a list, or a string = one user
     turn) with chosen / rejected assistant-message lists, or no prompt and chosen / rejected whole
     conversations whose common leading turns are the prompt. KTO: prompt + completion lists. SFT:
     `messages` whose last turn is the assistant reply that is learnt (earlier turns are the prompt).
 (d) kto: prompt, completion strings and label (bool, or the ints 0 / 1).
 (e) sft: prompt / completion strings, or `text` (every token is learnt).

Records out: {"prompt", "chosen", "rejected"[, "margin", "p_chosen"]}, {"prompt", "completion", "label"},
{"prompt", "completion"} or {"text"}, plus "chat": bool (prompt and responses are message lists).
A bad row raises RowError(reason, detail). Empty (or whitespace-only) text is `empty_field` for
prompts, SFT completions and `text`; an empty preference or KTO response is kept as a legitimate
"said nothing" reply (just the EOS token; real preference sets contain such pairs), and an empty
message list is always `empty_field`.

CSV rows (`TextRow`) hold only strings: `label` is read from "true" / "false" / "1" / "0" (any case),
`margin` and `p_chosen` from decimal text, and an empty margin / p_chosen cell means "not given".
"""

from __future__ import annotations

import math

from fastalign.data.errors import RowError
from fastalign.data.readers import TextRow

KINDS = ("preference", "kto", "sft")
FORMATS = {"preference": ("preference", "hh", "chat"), "kto": ("kto", "chat"), "sft": ("sft", "chat")}
CANONICAL = ("prompt", "chosen", "rejected", "completion", "label", "messages", "text", "margin", "p_chosen")
HH_ASSISTANT = "\n\nAssistant:"
_TEXT_LABELS = {"true": True, "1": True, "false": False, "0": False}  # how CSV writers spell bools


def check_columns(columns: dict[str, str] | None) -> dict[str, str]:
    if columns is None:
        return {}
    if not isinstance(columns, dict):
        raise ValueError(
            f"columns must be a dict canonical_name -> source column, got {type(columns).__name__}"
        )
    for key, value in columns.items():
        if key not in CANONICAL:
            raise ValueError(
                f"columns: unknown canonical name {key!r}; expected one of {', '.join(CANONICAL)}"
            )
        if not isinstance(value, str):
            raise ValueError(f"columns[{key!r}] must be a source column name (str), got {value!r}")
    return dict(columns)


def rename(row: dict, columns: dict[str, str]) -> dict:
    """Apply the canonical -> source mapping; a mapped column missing from the row is `missing_field`."""
    if not columns:
        return row
    out = type(row)((k, v) for k, v in row.items() if k not in columns)  # a TextRow stays one
    for canonical, source in columns.items():
        if source not in row:
            raise RowError("missing_field", f"mapped column {source!r} (for {canonical!r}) is absent")
        out[canonical] = row[source]
    return out


def detect(kind: str, row: dict) -> str | None:
    """The format of `row` for `kind`, or None when it fits none."""
    keys = set(row)
    if kind == "preference":
        if not {"chosen", "rejected"} <= keys:
            return None
        if "prompt" not in keys:
            return "chat" if isinstance(row["chosen"], list) else "hh"
        return (
            "chat"
            if any(isinstance(row[k], list) for k in ("prompt", "chosen", "rejected"))
            else "preference"
        )
    if kind == "kto":
        if not {"prompt", "completion", "label"} <= keys:
            return None
        return "chat" if any(isinstance(row[k], list) for k in ("prompt", "completion")) else "kto"
    if "messages" in keys or "conversations" in keys:  # conversations: ShareGPT's name
        return "chat"
    if "text" in keys:
        return "sft"
    for response in ("completion", "chosen"):  # a preference pair's chosen side is an SFT target
        if {"prompt", response} <= keys:
            return "chat" if any(isinstance(row[k], list) for k in ("prompt", response)) else "sft"
    return None


def expected_keys(kind: str) -> str:
    return {
        "preference": "prompt/chosen/rejected, or chosen/rejected transcripts or message lists",
        "kto": "prompt/completion/label",
        "sft": "text, messages, prompt/completion, or prompt/chosen (a pair's chosen side)",
    }[kind]


def _field(row: dict, name: str):
    if name not in row:
        raise RowError(
            "missing_field", f"no {name!r} field (has {', '.join(sorted(map(str, row))) or 'none'})"
        )
    return row[name]


def _string(row: dict, name: str, *, allow_empty: bool = False) -> str:
    value = _field(row, name)
    if not isinstance(value, str):
        hint = ""
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            hint = f" {value!r:.40} (the source stores this column as numbers; store it as text)"
        raise RowError("wrong_type", f"{name!r} must be a string, got {type(value).__name__}{hint}")
    if not allow_empty and not value.strip():
        raise RowError("empty_field", f"{name!r} is empty")
    return value


# ShareGPT turns ({"from": "human", "value": ...}) read as {role, content}; other names kept as roles
SHAREGPT_ROLES = {
    "human": "user",
    "gpt": "assistant",
    "user": "user",
    "assistant": "assistant",
    "system": "system",
}


def _messages(value, name: str, *, allow_string_as_user: bool = False) -> list[dict]:
    if allow_string_as_user and isinstance(value, str):
        if not value.strip():
            raise RowError("empty_field", f"{name!r} is empty")
        return [{"role": "user", "content": value}]
    if not isinstance(value, list):
        raise RowError(
            "wrong_type", f"{name!r} must be a list of {{role, content}} messages, got {type(value).__name__}"
        )
    if not value:
        raise RowError("empty_field", f"{name!r} is an empty message list")
    out = []
    for i, m in enumerate(value):
        if isinstance(m, dict) and "role" not in m and isinstance(m.get("from"), str):
            m = {"role": SHAREGPT_ROLES.get(m["from"], m["from"]), "content": m.get("value")}
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            raise RowError(
                "bad_messages", f"{name}[{i}] must be a {{'role': str, 'content': str}} object, got {m!r:.80}"
            )
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _margin(row: dict, rec: dict) -> dict:
    margin = _number(row, "margin")
    if margin is not None:
        rec["margin"] = margin
    p = _number(row, "p_chosen")  # a soft label (fastalign cai label): P(chosen is preferred)
    if p is not None:
        if not 0.0 <= p <= 1.0:
            raise RowError("wrong_type", f"'p_chosen' must be a number in [0, 1], got {p!r:.40}")
        rec["p_chosen"] = p
    return rec


def _number(row: dict, name: str) -> float | None:
    """The optional finite number `row[name]` (parsed when the row is CSV text), or None if absent."""
    if name not in row:
        return None
    value = row[name]
    if isinstance(row, TextRow) and isinstance(value, str):
        if not value.strip():
            return None
        try:
            value = float(value)
        except ValueError:
            raise RowError("wrong_type", f"{name!r} must be a number, got {value!r:.40}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RowError("wrong_type", f"{name!r} must be a finite number, got {value!r:.40}")
    return float(value)


def _same(a, b) -> bool:
    if isinstance(a, str):
        return a.strip() == b.strip()
    return [(m["role"], m["content"].strip()) for m in a] == [(m["role"], m["content"].strip()) for m in b]


def _label(row: dict) -> bool:
    value = _field(row, "label")
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(row, TextRow) and isinstance(value, str) and value.strip().lower() in _TEXT_LABELS:
        return _TEXT_LABELS[value.strip().lower()]
    raise RowError("bad_label", f"'label' must be a bool (or 0 / 1), got {value!r:.40}")


def normalize(kind: str, fmt: str, row: dict) -> dict:
    """Canonical record for one renamed row of format `fmt`."""
    if kind == "preference":
        return _margin(row, _preference(fmt, row))
    if kind == "kto":
        label = _label(row)
        if fmt == "chat":
            prompt = _messages(_field(row, "prompt"), "prompt", allow_string_as_user=True)
            completion = _messages(_field(row, "completion"), "completion")
            return {"prompt": prompt, "completion": completion, "label": label, "chat": True}
        completion = _string(row, "completion", allow_empty=True)
        return {"prompt": _string(row, "prompt"), "completion": completion, "label": label, "chat": False}
    return _sft(fmt, row)


def _preference(fmt: str, row: dict) -> dict:
    if fmt == "preference":
        prompt = _string(row, "prompt")
        chosen, rejected = (
            _string(row, "chosen", allow_empty=True),
            _string(row, "rejected", allow_empty=True),
        )
    elif fmt == "hh":
        chosen, rejected = _string(row, "chosen"), _string(row, "rejected")  # whole transcripts
        if _same(chosen, rejected):
            raise RowError("identical_pair", "chosen and rejected transcripts are the same")
        common = _common_prefix_len(chosen, rejected)
        cut = chosen[:common].rfind(HH_ASSISTANT)
        if cut < 0:
            raise RowError(
                "no_common_prompt", 'chosen and rejected share no prefix ending in "\\n\\nAssistant:"'
            )
        cut += len(HH_ASSISTANT)
        prompt, chosen, rejected = chosen[:cut], chosen[cut:], rejected[cut:]
    else:  # chat
        chosen = _messages(_field(row, "chosen"), "chosen")
        rejected = _messages(_field(row, "rejected"), "rejected")
        if "prompt" in row:
            prompt = _messages(row["prompt"], "prompt", allow_string_as_user=True)
            k = len(prompt)
            if _turns_equal(chosen[:k], prompt) and _turns_equal(rejected[:k], prompt):
                # UltraFeedback-style rows repeat the prompt as the first turns of both sides
                chosen, rejected = chosen[k:], rejected[k:]
                for name, turns in (("chosen", chosen), ("rejected", rejected)):
                    if not turns:
                        raise RowError("empty_field", f"{name!r} has no turns after the prompt")
        else:
            if _same(chosen, rejected):
                raise RowError("identical_pair", "chosen and rejected conversations are the same")
            n = 0
            while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
                n += 1
            if n == 0:
                raise RowError("no_common_prompt", "chosen and rejected share no leading turns")
            prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
            for name, turns in (("chosen", chosen), ("rejected", rejected)):
                if not turns:
                    raise RowError("empty_field", f"{name!r} has no turns after the common prompt")
    if _same(chosen, rejected):
        raise RowError("identical_pair", "chosen and rejected are the same after stripping whitespace")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "chat": fmt == "chat"}


def _turns_equal(a: list[dict], b: list[dict]) -> bool:
    def key(m: dict) -> tuple[str, str]:
        return str(m.get("role")), str(m.get("content", "")).strip()

    return len(a) == len(b) and all(key(x) == key(y) for x, y in zip(a, b, strict=True))


def _sft(fmt: str, row: dict) -> dict:
    if fmt == "chat":
        if "messages" in row or "conversations" in row:
            key = "messages" if "messages" in row else "conversations"
            messages = _messages(row[key], key)
            if messages[-1]["role"] != "assistant":
                raise RowError(
                    "bad_messages",
                    f"{key!r} must end with an assistant turn, ends with {messages[-1]['role']!r}",
                )
            if len(messages) < 2:
                raise RowError("bad_messages", f"{key!r} has no turn before the assistant reply")
            return {"prompt": messages[:-1], "completion": messages[-1:], "chat": True}
        prompt = _messages(_field(row, "prompt"), "prompt", allow_string_as_user=True)
        name = _sft_response(row)
        return {"prompt": prompt, "completion": _messages(_field(row, name), name), "chat": True}
    if "text" in row:
        return {"text": _string(row, "text"), "chat": False}
    return {"prompt": _string(row, "prompt"), "completion": _string(row, _sft_response(row)), "chat": False}


def _sft_response(row: dict) -> str:
    """`completion`, else the `chosen` response of a preference pair (SFT on the preferred side)."""
    return "completion" if "completion" in row or "chosen" not in row else "chosen"


def _common_prefix_len(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
