"""Recipes (SFT, reward model, DPO family, KTO) over one shared training loop.

`loop.run(train_cfg, task)` owns steps, gradient accumulation, schedule, clipping, mixed precision,
evaluation, logging, checkpoints and exact resume; each recipe module (`sft`, `rm`, `dpo`, `kto`)
only builds a `Task`: the model to train, the data, the collator and its batch → loss step.
Modules are imported on use so `import fastalign.trainers` stays light.
"""
