"""Rollout experience for the online recipes (PPO, GRPO, online DPO).

Each step of an online recipe samples responses from the current policy, scores them, and turns
them into training experience. The pieces live in their own modules, imported directly (this
package imports nothing, so `import fastalign.rollout` loads neither torch nor transformers):

- `fastalign.rollout.generate`: `generate(model, tokenizer, prompts, gen_config)` → `Generations`
  (response ids cut at EOS / stop strings, finished flags, texts, sampling log-probs), for plain,
  peft and DeepSpeed (ZeRO 0–3) models; under ZeRO-3 it gathers the parameters once per call or
  generates on the sharded model with all ranks stepping together (`GenerationConfig.zero_mode`).
- rewards, KL control and experience assembly are added beside it by their own modules.
"""
