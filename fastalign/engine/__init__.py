"""DeepSpeed engine layer: ZeRO 0–3 trainable and frozen models, the fused lm_head under ZeRO-3,
consolidated export. CPU (gloo, `DS_ACCELERATOR=cpu`) and CUDA (nccl).

- `build_ds_config(user_json, stage=..., batch_size=..., ...)`: a DeepSpeed config dict with every
  "auto" filled from the recipe; a user value contradicting the recipe is a ValueError.
- `init_distributed()`, `rank()`, `world_size()`, `is_main_process()`, `barrier()`.
- `zero_init(stage, ds)`: build models sharded (ZeRO-3) — no rank ever holds a full copy.
- `build_trainable(model, ds, optimizer, lr_scheduler)`, `build_frozen(model, ds)`: engines.
- `hidden_states(engine, input_ids, ...)`: (B, T, H) last hidden states through the engine's root
  forward (lm_head skipped), so ZeRO-3's per-step bookkeeping runs as in a normal forward.
- `fused_head_params(model)`: the full lm_head (weight, bias) for the fused losses; under ZeRO-3
  gathered for the forward and re-gathered in the backward, gradient reduce-scattered.
- `consolidated_state_dict(engine)`, `export_hf(engine, tokenizer, out_dir, dtype)`.
- `model_state_bytes(n_params, stage=, world=, ...)`, `check_fits(...)`, `param_counts(config)`,
  `preflight(cfg, ds, world)`: per-rank model-state memory, checked before loading (memory.py).
- `fastalign.engine.launch.main(argv)`: `fastalign launch` (hostfile / node checks, then deepspeed).

Names are imported on first use (PEP 562): `import fastalign.engine` loads neither torch nor
deepspeed.
"""

from __future__ import annotations

from fastalign.lazy import lazy_exports

_EXPORTS = {
    "build_ds_config": "ds_config",
    "frozen_ds_config": "ds_config",
    "ds_builds_optimizer": "ds_config",
    "init_distributed": "dist",
    "is_main_process": "dist",
    "world_size": "dist",
    "rank": "dist",
    "barrier": "dist",
    "zero_init": "engine",
    "build_trainable": "engine",
    "build_frozen": "engine",
    "hidden_states": "engine",
    "zero_stage": "engine",
    "fused_head_params": "gather",
    "gathered_params": "gather",
    "consolidated_state_dict": "export",
    "export_hf": "export",
    "model_state_bytes": "memory",
    "check_fits": "memory",
    "param_counts": "memory",
    "param_counts_from_path": "memory",
    "preflight": "memory",
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
