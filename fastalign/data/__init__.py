"""Preference / KTO / SFT data for the trainers: sources, format detection, tokenisation, collators.

    examples, report = load_examples("preference", "pairs.jsonl", tokenizer, max_length=512)
    batch = PreferenceCollator(pad_token_id, packing=True)(examples[:8])

Examples are plain dicts of python int lists, each with "index" (its position in `examples`):
- preference: prompt_ids, chosen_ids, rejected_ids[, margin (float)]
- kto: prompt_ids, completion_ids, label (bool)
- sft: input_ids, labels (-100 on prompt tokens)
Responses end with the tokenizer's EOS. Format detection rules: fastalign.data.formats; truncation
and chat templates: fastalign.data.tokenize; sources: fastalign.data.sources (file readers:
fastalign.data.readers, compressed files: fastalign.data.compression); collators and packing
helpers: fastalign.data.collate. Importing this package loads neither torch nor datasets.
"""

from fastalign.data.collate import (
    KTOCollator,
    PreferenceCollator,
    SFTCollator,
    block_causal_mask,
    unpack_rows,
)
from fastalign.data.errors import DataWarning, FormatUndetectedError
from fastalign.data.loader import DataReport, load_examples

__all__ = [
    "DataReport",
    "DataWarning",
    "FormatUndetectedError",
    "KTOCollator",
    "PreferenceCollator",
    "SFTCollator",
    "block_causal_mask",
    "load_examples",
    "unpack_rows",
]
