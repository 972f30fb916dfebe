"""TRL's `DPOTrainer` with its loss swapped for fastalign's fused one.

    .venv/bin/python examples/trl_dpo_trainer.py --steps 3

TRL still does the data work (prompt/completion tokenization, EOS, truncation, the [chosen;
rejected] collator with its `completion_mask`), the reference model and the training loop; the
subclass only replaces `compute_loss`: hidden states + `lm_head.weight` into
`FusedLinearPreferenceLoss`, instead of TRL's log-probs from full logits.
"""

from __future__ import annotations

import copy
import math
import sys
import tempfile

import torch
from common import base_parser, log_step, read_pairs, resolve
from transformers import AutoModelForCausalLM, AutoTokenizer

from fastalign.losses.fused_linear import FusedLinearPreferenceLoss

try:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer
except ImportError as e:  # trl is an optional (dev) dependency
    sys.exit(f"this example needs trl (and datasets): pip install trl  [{e}]")


class FusedLossDPOTrainer(DPOTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Mirror the DPOConfig so the swap changes the implementation, not the objective.
        self.fused_loss = FusedLinearPreferenceLoss("dpo", beta=self.args.beta, loss_type="sigmoid")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # TRL's collator: rows = [chosen; rejected], completion_mask marks the scored tokens.
        # Labels are the next tokens, -100 outside the completion (prompt, padding).
        ids, attn = inputs["input_ids"], inputs["attention_mask"]
        labels = ids.masked_fill(inputs["completion_mask"] == 0, -100)[:, 1:]
        body = self.accelerator.unwrap_model(model)
        hidden = body.model(input_ids=ids, attention_mask=attn).last_hidden_state[:, :-1]
        if "ref_chosen_logps" in inputs:  # precompute_ref_log_probs=True
            ref = {
                "ref_chosen_logps": inputs["ref_chosen_logps"],
                "ref_rejected_logps": inputs["ref_rejected_logps"],
            }
        else:
            with torch.no_grad():
                ref_hidden = self.ref_model.model(input_ids=ids, attention_mask=attn).last_hidden_state[
                    :, :-1
                ]
            ref = {"ref_hidden": ref_hidden, "ref_weight": self.ref_model.lm_head.weight}
        loss, m = self.fused_loss(hidden, body.lm_head.weight, labels, **ref)
        if model.training:
            log_step(self.state.global_step + 1, loss, m)
        return (loss, m) if return_outputs else loss


def main() -> None:
    ap = base_parser(__doc__, steps=3, pairs=8, pairs_help="pairs in the dataset")
    args = ap.parse_args()

    model_dir = resolve(args.model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    # Passed explicitly: TRL would otherwise reload the reference from the model's path.
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    dataset = Dataset.from_list(read_pairs(resolve(args.data), args.pairs))

    with tempfile.TemporaryDirectory() as out:
        config = DPOConfig(
            output_dir=out,
            max_steps=args.steps,
            per_device_train_batch_size=2,
            learning_rate=5e-4,
            beta=0.1,
            max_length=256,  # tokens of prompt + completion per row (long pandalm prompts)
            report_to=[],
            use_cpu=True,
            save_strategy="no",
            logging_strategy="no",
            disable_tqdm=True,
            seed=0,
        )
        trainer = FusedLossDPOTrainer(
            model=model, ref_model=ref, args=config, train_dataset=dataset, processing_class=tokenizer
        )
        result = trainer.train()
    assert math.isfinite(result.training_loss), f"non-finite training loss {result.training_loss}"
    print(f"done: {result.global_step} steps, mean loss {result.training_loss:.4f}")


if __name__ == "__main__":
    main()
