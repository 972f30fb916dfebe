"""Shared by the example scripts: paths, reading preference pairs, and building the stacked batch
that `FusedLinearPreferenceLoss` expects (B chosen rows, then B rejected rows, labels shifted).

Kept deliberately plain (lists of ints, one pad call) so each example script shows only the part
that differs: how the fused loss plugs into that training loop.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = "assets/models/stories260k"
DEFAULT_DATA = "assets/data/preferences/pandalm_testset_v1.jsonl"
IGNORE = -100


def resolve(path: str) -> Path:
    """Relative paths are relative to the repo root (not the cwd), so the scripts run from anywhere."""
    p = Path(path)
    return p if p.is_absolute() else (REPO_ROOT / p).resolve()


def read_pairs(path: Path, n: int) -> list[dict]:
    """The first `n` {prompt, chosen, rejected} records of a JSONL file."""
    pairs = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                pairs.append({k: rec[k] for k in ("prompt", "chosen", "rejected")})
            if len(pairs) == n:
                break
    if not pairs:
        raise SystemExit(f"no preference pairs in {path}")
    return pairs


def encode(tokenizer, prompt: str, completion: str, max_prompt: int, max_completion: int):
    """Token ids and per-token labels for prompt + completion.

    Prompt and completion are tokenized separately so the boundary is exact (tokenizing the
    concatenation can merge tokens across it). Long prompts keep their *end* (the part nearest
    the answer); the completion gets an EOS so the model learns where to stop. Prompt positions
    get label -100: DPO scores only the completion.
    """
    p = tokenizer(prompt, add_special_tokens=True).input_ids  # BOS + prompt
    p = p[:1] + p[1:][-(max_prompt - 1) :]
    c = tokenizer(completion, add_special_tokens=False).input_ids[: max_completion - 1]
    c = [*c, tokenizer.eos_token_id]
    return p + c, [IGNORE] * len(p) + c


def collate(tokenizer_out: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad rows to one length: input_ids, attention_mask and *unshifted* labels (T each).

    Padding gets label -100 and attention 0; right padding keeps the causal prefix of every real
    token unchanged, so padded and unpadded log-probs agree.
    """
    t = max(len(ids) for ids, _ in tokenizer_out)
    input_ids = torch.full((len(tokenizer_out), t), pad_id, dtype=torch.long)
    labels = torch.full((len(tokenizer_out), t), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(tokenizer_out), t), dtype=torch.long)
    for i, (ids, lab) in enumerate(tokenizer_out):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        attention_mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def preference_batch(tokenizer, pairs, pad_id, max_prompt=64, max_completion=64):
    """2B rows: all chosen completions first, then all rejected ones (pair b = rows b, B + b)."""
    rows = [encode(tokenizer, p["prompt"], p["chosen"], max_prompt, max_completion) for p in pairs]
    rows += [encode(tokenizer, p["prompt"], p["rejected"], max_prompt, max_completion) for p in pairs]
    return collate(rows, pad_id)


def hidden_and_labels(model, batch):
    """Last hidden states of the transformer body, aligned with next-token labels.

    Position t predicts token t+1, so drop the last hidden state and the first label: the fused
    loss then multiplies hidden (2B, T-1, H) by lm_head.weight tile by tile, never materialising
    the (2B, T-1, V) logits.
    """
    out = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return out.last_hidden_state[:, :-1], batch["labels"][:, 1:]


def base_parser(doc: str | None, steps: int, pairs: int, pairs_help: str) -> argparse.ArgumentParser:
    """The options every example shares: --model-dir, --data, --steps, --pairs."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default=DEFAULT_MODEL, help="HF model folder (relative: to repo root)")
    ap.add_argument("--data", default=DEFAULT_DATA, help="JSONL of {prompt, chosen, rejected}")
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--pairs", type=int, default=pairs, help=pairs_help)
    return ap


def log_step(step: int, loss: torch.Tensor, metrics: dict, suffix: str = "") -> None:
    """One line per step; tests/test_examples.py reads the `loss` field."""
    print(
        f"step {step} loss {loss.item():.4f} reward_acc {metrics['accuracy'].item():.2f} "
        f"margin {metrics['margin'].item():+.4f}{suffix}",
        flush=True,
    )
