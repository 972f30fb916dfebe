"""fastalign: fast, memory-frugal preference alignment.

Kept import-light on purpose: `import fastalign` loads no torch, Triton or C++ extension.
Import what you need: `from fastalign.ops import token_logprobs, linear_logprobs`.
"""

__version__ = "0.1.0"
