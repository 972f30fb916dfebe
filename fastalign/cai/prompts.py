"""Prompt builders: the conversations that ask for a response, a critique, a revision and a
multiple-choice preference, rendered with the model's chat template.

A model without a chat template (a base LM such as stories260k) gets the plain transcript the
paper used, "\\n\\nHuman: ...\\n\\nAssistant: ...", ending in "\\n\\nAssistant:" so the model
speaks next; "\\n\\nHuman:" is then a stop string (the model would otherwise write the human's
next turn) and is cut from the reply.

Each critique / revision round starts a fresh conversation from the prompt and the current
response (the paper's setup), so context length does not grow with K. Few-shot examples are
earlier, complete exchanges of the same shape put in front of it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

import torch

from fastalign.cai.constitution import Principle
from fastalign.data.sources import iter_rows
from fastalign.models import load_causal_lm, load_tokenizer
from fastalign.rollout.generate import generate

HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
ANSWER_PREFIX = "The answer is: ("
FEEDBACK_INTRO = "Consider the following conversation between a human and an assistant:"


@dataclass(frozen=True)
class FewShot:
    """A worked example: prompt, a flawed response, its critique and the revision."""

    prompt: str
    response: str
    critique: str
    revision: str
    critique_request: str | None = None  # None: the current round's principle's request
    revision_request: str | None = None


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def stop_strings(tokenizer) -> list[str]:
    """Stops the plain transcript needs (none with a chat template: its EOS ends the turn)."""
    return [] if has_chat_template(tokenizer) else [HUMAN]


def clean_reply(text: str, stops: list[str]) -> str:
    """The reply without a trailing stop string (generate keeps it) and outer whitespace."""
    for s in stops:
        cut = text.find(s)
        if cut >= 0:
            text = text[:cut]
    return text.strip()


def render(tokenizer, messages: list[dict], assistant_prefix: str = "") -> str:
    """Text after which the model writes the assistant's next turn (starting with the prefix)."""
    if has_chat_template(tokenizer):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text + assistant_prefix
    return transcript(messages, assistant_prefix)


def transcript(messages: list[dict], assistant_prefix: str = "") -> str:
    """The plain "\n\nHuman: ...\n\nAssistant:" rendering (models without a chat template)."""
    parts = [f"{HUMAN if m['role'] == 'user' else ASSISTANT} {m['content']}" for m in messages]
    return "".join(parts) + ASSISTANT + (f" {assistant_prefix}" if assistant_prefix else "")


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of a rendered prompt: special tokens (BOS) unless the template wrote BOS already."""
    bos = getattr(tokenizer, "bos_token", None)
    special = not (isinstance(bos, str) and bos and text.startswith(bos))
    return list(tokenizer(text, add_special_tokens=special).input_ids)


def _turns(prompt: str, response: str) -> list[dict]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def _shots(few_shot: list[FewShot], principle: Principle | None, upto: str) -> list[dict]:
    """Messages of the few-shot examples, each complete up to stage `upto`."""
    out: list[dict] = []
    for s in few_shot:
        if upto == "initial" or principle is None:
            out += _turns(s.prompt, s.revision)
            continue
        out += _turns(s.prompt, s.response)
        out += _turns(s.critique_request or principle.critique, s.critique)
        if upto == "revision":
            out += _turns(s.revision_request or principle.revision, s.revision)
    return out


def initial_messages(prompt: str, few_shot: list[FewShot] = ()) -> list[dict]:
    return [*_shots(list(few_shot), None, "initial"), {"role": "user", "content": prompt}]


def critique_messages(prompt: str, response: str, p: Principle, few_shot: list[FewShot] = ()) -> list[dict]:
    return [
        *_shots(list(few_shot), p, "critique"),
        *_turns(prompt, response),
        {"role": "user", "content": p.critique},
    ]


def revision_messages(
    prompt: str, response: str, critique: str, p: Principle, few_shot: list[FewShot] = ()
) -> list[dict]:
    return [
        *_shots(list(few_shot), p, "revision"),
        *_turns(prompt, response),
        *_turns(p.critique, critique),
        {"role": "user", "content": p.revision},
    ]


def feedback_messages(prompt: str, first: str, second: str, question: str) -> list[dict]:
    """The paper's multiple-choice question; the assistant turn then starts with ANSWER_PREFIX."""
    text = (
        f"{FEEDBACK_INTRO}\n\nHuman: {prompt}\n\n{question}\n"
        f"Options:\n(A) {first.strip()}\n(B) {second.strip()}"
    )
    return [{"role": "user", "content": text}]


def load_prompts(source: str, max_prompts: int | None = None) -> list[str]:
    """The "prompt" strings of a data file (JSONL/JSON/parquet/csv), in order; a bad row is a
    ValueError naming file and line (prompts are inputs: a silently skipped one is a lost row)."""

    prompts = []
    for where, row, error in iter_rows(source, max_rows=max_prompts):
        if error is not None:
            raise ValueError(f"{where}: {error}")
        value = row.get("prompt")
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{where}: expected a non-empty 'prompt' string, got {value!r:.60}")
        prompts.append(value.strip())
    if not prompts:
        raise ValueError(f'{source}: no prompts (expected rows like {{"prompt": "..."}})')
    return prompts


def load_few_shot(source: str | None) -> list[FewShot]:
    """Few-shot examples: rows {prompt, response, critique, revision[, critique_request,
    revision_request]} of non-empty strings; an error names file, line and field."""
    if not source:
        return []

    keys = ("prompt", "response", "critique", "revision")
    optional = ("critique_request", "revision_request")
    out = []
    for where, row, error in iter_rows(source):
        if error is not None:
            raise ValueError(f"{where}: {error}")
        unknown = sorted(set(row) - set(keys) - set(optional))
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {unknown}; expected {', '.join(keys + optional)}")
        for k in keys + optional:
            if (k in keys or k in row) and (not isinstance(row.get(k), str) or not row[k].strip()):
                raise ValueError(f"{where}: field {k!r} must be a non-empty string, got {row.get(k)!r:.60}")
        out.append(FewShot(**{k: row[k].strip() for k in keys + optional if k in row}))
    return out


# ---------------------------------------------------------------------------------------------
# seeds, keys and sampling shared by revise and label
# ---------------------------------------------------------------------------------------------
def mix_seed(*parts: int) -> int:
    """A stable 31-bit seed from integers (Python's hash() is salted per process)."""

    digest = hashlib.sha256(",".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def prompt_key(index: int, text: str) -> str:
    """A prompt's identity in a run: its index plus a hash of its text (an edited input file is
    caught instead of resuming with rows of the old prompt)."""

    return f"{index}:{hashlib.sha256(text.encode('utf-8')).hexdigest()[:16]}"


def raw_prompt(prompt: str) -> str:
    """The human's words of a one-turn plain transcript ("\\n\\nHuman: x\\n\\nAssistant:" -> x)."""
    s, h, a = prompt.strip(), HUMAN.strip(), ASSISTANT.strip()
    if s.startswith(h) and s.endswith(a) and s.count(h) == 1 and s.count(a) == 1:
        return s[len(h) : -len(a)].strip()
    return prompt


def load_lm(model_cfg, device: str):
    """(model, tokenizer) of a ModelConfig on `device` ("auto": CUDA when there is one), eval mode."""

    dev = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else "cpu" if device == "auto" else device
    )
    tok = load_tokenizer(
        model_cfg.tokenizer or model_cfg.path,
        gguf_file=None if model_cfg.tokenizer else model_cfg.gguf_file,
        trust_remote_code=model_cfg.trust_remote_code,
        chat_template=getattr(model_cfg, "chat_template", None),
    )
    model = load_causal_lm(
        model_cfg.path,
        gguf_file=model_cfg.gguf_file,
        dtype=model_cfg.dtype,
        attn_implementation=model_cfg.attn_implementation,
        device=dev,
        trust_remote_code=model_cfg.trust_remote_code,
    )
    return model.eval(), tok


def fit_context(ids: list[int], model, reserve: int) -> tuple[list[int], bool]:
    """Keep the last tokens so that prompt + `reserve` new tokens fit the model's positions
    (the end of a conversation is what the next turn depends on); (ids, was it cut)."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit is None or len(ids) <= limit - reserve:
        return ids, False
    return ids[-(limit - reserve) :], True


def sample_replies(
    model, tokenizer, conversations: list[list[dict]], gen, seed: int
) -> tuple[list[str], list[bool]]:
    """One sampled assistant reply per conversation, in one seeded generate() call over the batch;
    returns (cleaned texts, per conversation: was its context cut to fit)."""

    stops = stop_strings(tokenizer)
    gen = replace(gen, stop=[*gen.stop, *stops], batch_size=max(1, len(conversations)))
    ids, cut = [], []
    for msgs in conversations:
        row, was_cut = fit_context(encode(tokenizer, render(tokenizer, msgs)), model, gen.max_new_tokens)
        ids.append(row)
        cut.append(was_cut)
    out = generate(model, tokenizer, ids, gen, seed=seed)
    return [clean_reply(t, list(gen.stop)) for t in out.texts], cut
