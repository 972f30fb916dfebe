"""Constitutional AI (Bai et al., 2022): critique -> revision SFT data and AI preference labels.

- `fastalign cai revise`: each prompt gets an initial response that the model then critiques and
  revises against sampled principles for K rounds; writes SFT rows and full traces
  (`fastalign.cai.revise`).
- `fastalign cai label`: a feedback model answers a multiple-choice question per response pair and
  principle; the normalised answer-token probabilities, averaged over both A/B orders, become a
  soft preference row that `fastalign rm` / `fastalign dpo` read as is (`fastalign.cai.label`).

Modules are imported directly (`from fastalign.cai.revise import ...`); this package imports
nothing, so `import fastalign.cai` loads neither torch nor transformers.
"""
