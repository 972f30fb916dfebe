"""DPO with `transformers.Trainer`: override `compute_loss` to use fastalign's fused loss.

    .venv/bin/python examples/hf_trainer_dpo.py --steps 3

The Trainer keeps doing what it is good at (optimizer, scheduler, grad accumulation, devices);
only the loss changes: the model body's last hidden state plus `lm_head.weight` go straight into
`FusedLinearPreferenceLoss`, so no (2B, T, V) logits tensor is built. The reference model is run
once, up front, under no_grad; its per-pair log-probs travel in the batch like any other column.
"""

from __future__ import annotations

import copy
import math
import tempfile

import torch
from common import (
    base_parser,
    collate,
    encode,
    hidden_and_labels,
    log_step,
    read_pairs,
    resolve,
)
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

from fastalign.losses.fused_linear import FusedLinearPreferenceLoss
from fastalign.losses.preference import sequence_logps
from fastalign.ops import linear_logprobs


class PairDataset(torch.utils.data.Dataset):
    """One item = one preference pair, already tokenized (+ reference log-probs once computed)."""

    def __init__(self, tokenizer, pairs, max_prompt=64, max_completion=64):
        self.items = [
            {
                "chosen": encode(tokenizer, p["prompt"], p["chosen"], max_prompt, max_completion),
                "rejected": encode(tokenizer, p["prompt"], p["rejected"], max_prompt, max_completion),
            }
            for p in pairs
        ]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


class PairCollator:
    """B pairs -> 2B rows (chosen first, then rejected) + the pairs' reference log-probs, if any."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items):
        batch = collate([it["chosen"] for it in items] + [it["rejected"] for it in items], self.pad_id)
        if "ref_chosen_logps" in items[0]:
            batch["ref_chosen_logps"] = torch.stack([it["ref_chosen_logps"] for it in items])
            batch["ref_rejected_logps"] = torch.stack([it["ref_rejected_logps"] for it in items])
        return batch


@torch.no_grad()
def add_reference_logps(ref, dataset, collator):
    """Summed completion log-probs of the frozen reference, once per pair (DPO's ref term).

    Same fused op and the same summing rule as the loss (average_log_prob=False for DPO), so the
    policy and reference terms are computed identically and cancel exactly at step 0.
    """
    for item in dataset.items:
        batch = collator([item])
        hidden, labels = hidden_and_labels(ref, batch)
        tok = linear_logprobs(hidden, ref.lm_head.weight, labels)
        seq = sequence_logps(tok, labels != -100)
        item["ref_chosen_logps"], item["ref_rejected_logps"] = seq[0], seq[1]


class FusedDPOTrainer(Trainer):
    def __init__(self, *args, loss_fn: FusedLinearPreferenceLoss, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_fn = loss_fn

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        hidden, labels = hidden_and_labels(model, inputs)
        loss, m = self.loss_fn(
            hidden,
            model.lm_head.weight,
            labels,
            ref_chosen_logps=inputs["ref_chosen_logps"],
            ref_rejected_logps=inputs["ref_rejected_logps"],
        )
        if model.training:
            log_step(self.state.global_step + 1, loss, m)
        return (loss, m) if return_outputs else loss


def main() -> None:
    ap = base_parser(__doc__, steps=3, pairs=8, pairs_help="pairs in the dataset")
    ap.add_argument("--batch-pairs", type=int, default=2, help="pairs per step")
    args = ap.parse_args()

    model_dir = resolve(args.model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    ref = copy.deepcopy(model).eval().requires_grad_(False)

    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    dataset = PairDataset(tokenizer, read_pairs(resolve(args.data), args.pairs))
    collator = PairCollator(pad_id)
    add_reference_logps(ref, dataset, collator)
    del ref  # the reference is no longer needed: its log-probs are in the dataset

    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(
            output_dir=out,
            max_steps=args.steps,
            per_device_train_batch_size=args.batch_pairs,
            learning_rate=5e-4,
            remove_unused_columns=False,  # keep ref_*_logps / labels: compute_loss reads them
            report_to=[],
            use_cpu=True,
            save_strategy="no",
            logging_strategy="no",
            seed=0,
            disable_tqdm=True,
        )
        trainer = FusedDPOTrainer(
            model=model,
            args=targs,
            train_dataset=dataset,
            data_collator=collator,
            loss_fn=FusedLinearPreferenceLoss("dpo", beta=0.1),
        )
        result = trainer.train()
    assert math.isfinite(result.training_loss), f"non-finite training loss {result.training_loss}"
    print(f"done: {result.global_step} steps, mean loss {result.training_loss:.4f}")


if __name__ == "__main__":
    main()
