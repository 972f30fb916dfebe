"""DPO in a plain PyTorch loop with fastalign's fused loss (no logits tensor is ever built).

    .venv/bin/python examples/plain_loop_dpo.py --steps 5

Loads the tiny Llama `stories260k`, freezes a deep copy as the DPO reference, and trains on a few
real preference pairs. The point: the model body gives hidden states, and
`FusedLinearPreferenceLoss` takes them plus `lm_head.weight` — the (2B, T, V) logits, the largest
activation of DPO at real vocabulary sizes, never exist.
"""

from __future__ import annotations

import copy
import math
import time

import torch
from common import base_parser, hidden_and_labels, log_step, preference_batch, read_pairs, resolve
from transformers import AutoModelForCausalLM, AutoTokenizer

from fastalign.losses.fused_linear import FusedLinearPreferenceLoss


def main() -> None:
    ap = base_parser(__doc__, steps=5, pairs=4, pairs_help="preference pairs per batch")
    ap.add_argument("--lr", type=float, default=1e-3)
    args = ap.parse_args()
    torch.manual_seed(0)

    model_dir = resolve(args.model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    # The reference is the starting policy, frozen: a deep copy taken before any update.
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    model.train()

    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    pairs = read_pairs(resolve(args.data), args.pairs)
    batch = preference_batch(tokenizer, pairs, pad_id)

    loss_fn = FusedLinearPreferenceLoss("dpo", beta=0.1)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)

    # The reference never changes, and neither does this batch: its hidden states are computed
    # once. (With fresh batches each step, run this inside the loop, still under no_grad.)
    with torch.no_grad():
        ref_hidden, _ = hidden_and_labels(ref, batch)

    for step in range(1, args.steps + 1):
        t0 = time.perf_counter()
        hidden, labels = hidden_and_labels(model, batch)
        # lm_head.weight is passed, not owned by the loss: with tied embeddings (as here) the
        # gradient reaches the embedding matrix through the same tensor.
        loss, m = loss_fn(
            hidden, model.lm_head.weight, labels, ref_hidden=ref_hidden, ref_weight=ref.lm_head.weight
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        assert math.isfinite(loss.item()), f"non-finite loss at step {step}: {loss.item()}"
        log_step(step, loss, m, f" ({time.perf_counter() - t0:.2f}s)")


if __name__ == "__main__":
    main()
