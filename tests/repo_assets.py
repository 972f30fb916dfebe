"""The real model and data the tests use, shipped inside the repository (assets/README.md)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "assets"
STORIES = ASSETS / "models" / "stories260k"
PREFS = ASSETS / "data" / "preferences"
PANDALM = PREFS / "pandalm_testset_v1.jsonl"
OASST = PREFS / "oasst_en_100_tree_pairs.jsonl"
