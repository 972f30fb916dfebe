"""Memory preflight: the per-rank accounting against what benchmarks/bench_zero.py measured, the
ZeRO stages / precision / offload rules, the parameter count from a config, and the error text."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest
from repo_assets import ASSETS

from fastalign.engine.memory import GiB, check_fits, model_state_bytes, param_counts, param_counts_from_path

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks" / "results" / "zero-cpu-2026-11-30.csv"
MiB = 2**20


def _bench_config():
    """The Llama of bench_zero.py's defaults (V=8192 H=256 L=4, intermediate 688, untied)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=8192, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=128, tie_word_embeddings=False,
    )  # fmt: skip


def _measured() -> dict[tuple[int, str], float]:
    """(ranks, metric) -> value of rank 0 in round 0 of the stored bench_zero run."""
    out = {}
    with BENCH.open() as f:
        for row in csv.DictReader(f):
            if row["round"] == "0" and row["rank"] == "0":
                out[(int(row["ranks"]), row["metric"])] = float(row["value"])
    return out


def test_param_counts_from_the_config_on_the_meta_device():
    counts = param_counts(_bench_config())
    measured = _measured()
    assert counts["n_params"] == measured[(1, "n_params")] == 7358720
    # persistent at the default threshold 1e5: the 256x256 attention projections and the norms
    assert counts["n_persistent"] == 4 * 4 * 256 * 256 + (2 * 4 + 1) * 256


@pytest.mark.parametrize("ranks", [1, 2])
def test_estimate_matches_bench_zero_measured_model_states(ranks):
    measured, counts = _measured(), param_counts(_bench_config())
    est = model_state_bytes(counts["n_params"], stage=3, world=ranks, n_persistent=counts["n_persistent"])
    dev = est["device"]
    for state in ("params", "persistent", "master", "grads", "optim"):
        assert abs(dev[state] / MiB - measured[(ranks, f"{state}_mb")]) <= 0.01, state
    assert abs(dev["total"] / MiB / measured[(ranks, "total_mb")] - 1) <= 0.001
    # without the persistent parameters (what a user can compute by hand) still within 15 %
    plain = model_state_bytes(counts["n_params"], stage=3, world=ranks)["device"]["total"] / MiB
    assert abs(plain / measured[(ranks, "total_mb")] - 1) <= 0.15
    assert est["cpu"]["total"] == 0


def test_stages_precision_and_offload_follow_the_zero_paper():
    n, w = 1_000_000, 4
    per = lambda **kw: {k: v / n for k, v in model_state_bytes(n, world=w, **kw)["device"].items()}
    # bf16 mixed: 2 + 2 + 12 bytes per parameter; stage k shards what ZeRO-k shards
    assert per(stage=1, bf16=True)["total"] == pytest.approx(2 + 2 + 12 / w)
    assert per(stage=2, bf16=True)["total"] == pytest.approx(2 + (2 + 12) / w)
    assert per(stage=3, bf16=True)["total"] == pytest.approx((2 + 2 + 12) / w)
    # fp32: 4 + 4 + 8 plus DeepSpeed's extra fp32 partition (4) from stage 1 on; none at stage 0
    assert per(stage=0)["total"] == pytest.approx(16)
    assert per(stage=3)["total"] == pytest.approx(20 / w)
    # offload: optimizer states and gradient partition to CPU, then the parameters too
    off = model_state_bytes(n, stage=3, world=w, bf16=True, offload_optimizer="cpu")
    assert off["device"]["total"] / n == pytest.approx(2 / w)
    assert off["cpu"]["total"] / n == pytest.approx(14 / w)
    both = model_state_bytes(n, stage=3, world=w, bf16=True, offload_optimizer="cpu", offload_param="cpu")
    assert both["device"]["total"] == 0 and both["cpu"]["total"] / n == pytest.approx(16 / w)
    # LoRA-like: only the trainable part has gradients and optimizer states
    lora = model_state_bytes(n, stage=3, world=1, bf16=True, n_trainable=0)["device"]
    assert lora["total"] == 2 * n
    with pytest.raises(ValueError, match="offload_param: expected 'none' or 'cpu'"):
        model_state_bytes(n, stage=3, world=1, offload_param="nvme")


def test_too_large_names_the_figures_and_what_would_fit():
    n = 120_000_000
    kw = dict(stage=3, world=2, limit_bytes_device=GiB, limit_bytes_cpu=64 * GiB)
    with pytest.raises(ValueError) as e:
        check_fits(n, what="the model m", **kw)
    msg = str(e.value)
    assert msg.startswith(
        "ZeRO stage 3 on 2 ranks needs 1.12 GiB per rank on the device for the model states"
    )
    assert "(120M parameters, fp32, offload_optimizer=none, offload_param=none)" in msg
    assert "engine.memory_limit_gb is 1;" in msg
    assert "set engine.offload_optimizer=cpu (needs 0.224 GiB per rank on the device)" in msg
    assert "use 4 ranks or more (0.559 GiB per rank)" in msg
    # the suggestion really fits
    fits = check_fits(n, offload_optimizer="cpu", **kw)
    assert fits["device"]["total"] <= GiB
    # a CPU run: device and offload are the same RAM, so only more ranks help
    with pytest.raises(ValueError) as e:
        check_fits(n, same_memory=True, limit_name="available RAM", **kw)
    assert "offload" not in str(e.value).split(";")[1] and "use 4 ranks or more" in str(e.value)
    # the CPU side too small with optimizer offload
    with pytest.raises(ValueError, match=r"needs 0.894 GiB of CPU memory per rank .* available: 0.5 GiB"):
        check_fits(
            n, stage=3, world=2, offload_optimizer="cpu", limit_bytes_device=GiB, limit_bytes_cpu=GiB // 2
        )
    unchecked = check_fits(n, stage=3, world=2, limit_bytes_device=None, limit_bytes_cpu=None)
    assert unchecked["device"]["total"] == round(20 * n / 2)


def test_counts_a_real_model_folder_without_loading_it():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    counts = param_counts_from_path(str(ASSETS / "models" / "stories260k"), threshold=0)
    assert counts == {"n_params": 260032, "n_persistent": 0}
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        param_counts_from_path(str(ASSETS / "data"))


def test_preflight_reads_the_recipe_and_the_deepspeed_config(monkeypatch):
    from fastalign.config import SFTRecipe, load_config
    from fastalign.engine import build_ds_config, preflight

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = ASSETS / "models" / "stories260k"

    def run(*overrides: str, persistence: int = 0):
        cfg = load_config(SFTRecipe, None, [f"model.path={model}", "train.device=cpu", *overrides])
        user = {"zero_optimization": {"stage3_param_persistence_threshold": persistence}}
        ds = build_ds_config(user, stage=cfg.engine.zero_stage, batch_size=2, grad_accum=1, max_grad_norm=1.0,
                             bf16=False, lr=1e-3, weight_decay=0.0, world=2)  # fmt: skip
        return preflight(cfg, ds, 2)

    states = run()  # fits: 260032 fp32 parameters on 2 ranks, 20 bytes each / 2
    assert states["device"]["total"] == round(260032 * 20 / 2)
    # DeepSpeed's default threshold keeps every one of stories260k's small tensors whole on each rank
    assert run(persistence=100_000)["device"]["persistent"] == 4 * 260032
    with pytest.raises(ValueError) as e:
        run("engine.memory_limit_gb=0.0001")
    msg = str(e.value)
    assert f"the model {model} (0.26M parameters, fp32, offload_optimizer=none, offload_param=none)" in msg
    assert "engine.memory_limit_gb is 0.0001" in msg and "use 64 ranks or more" in msg
