"""Training: one run session (`session.py`: folder lock, resume + fingerprint check, metrics,
progress, checkpoints, export) under two thin drivers — `loop.run(cfg, task)` (gradient steps:
SFT, RM, DPO family, KTO) and `rollout_loop.run(cfg, algo)` (rollout iterations: PPO, GRPO,
online DPO). Each recipe module only builds: `build(cfg) -> Task | RolloutAlgo`; the registry that
maps command names to them is `fastalign.recipes`. Modules are imported on use so `import
fastalign.trainers` stays light.
"""
