"""Triton kernels and their launchers, installed as `fastalign.kernels` (one op per module).

- `token_logprobs`: per-token log-probs / entropy from (N, V) logits, one online log-sum-exp
  pass per row.
- `linear_logprobs`: the same from hidden states and the lm_head weight; logits tiles live only
  in registers / shared memory.

Written for Hopper (H100 / H200): bf16 / fp16 inputs with fp32 accumulation, autotuned tiles.
Under `TRITON_INTERPRET=1` each kernel uses one small fixed config so CPU tests stay fast. The
modules import triton, so nothing is imported here: `fastalign.ops` loads them on first use.
"""
