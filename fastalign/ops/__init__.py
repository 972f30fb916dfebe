"""Public fused ops with autograd and backend dispatch (triton | cpp | torch).

- `token_logprobs(logits, labels)`: per-token log-probs (and entropy) from logits, one online
  log-sum-exp pass per row, never a full log_softmax tensor.
- `linear_logprobs(hidden, weight, labels)`: the same from hidden states and the lm_head weight,
  never holding the (N, V) logits.
- `gae(rewards, values, mask)`: generalised advantage estimates and returns on right-padded
  (B, T) batches (no autograd: targets).
"""

from fastalign.ops.gae import gae, gae_reference
from fastalign.ops.linear_logprobs import LinearLogprobs, linear_logprobs, linear_logprobs_reference
from fastalign.ops.token_logprobs import TokenLogprobs, token_logprobs, token_logprobs_reference

__all__ = [
    "LinearLogprobs",
    "TokenLogprobs",
    "gae",
    "gae_reference",
    "linear_logprobs",
    "linear_logprobs_reference",
    "token_logprobs",
    "token_logprobs_reference",
]
