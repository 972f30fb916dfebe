"""`generate` under 2-rank ZeRO-3 (torchrun, gloo, CPU): "gather" and "synced" give the same tokens
as a single-process plain model, ranks with unequal prompt counts (3 / 1 / 0) do not hang, the
parameters are re-sharded afterwards and a trainable engine still trains."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from launching import dist_env, free_port

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed"),
]
LAUNCH_TIMEOUT_S = 420  # bounds everything, a hang included


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen_zero3")
    env = dist_env(debug=False, pythonpath=(HERE, REPO))
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    cmd += ["--master_port", str(free_port())]
    # own session: on a timeout (a hang is what this test guards against) the whole group goes,
    # the ranks included — killing torchrun alone would orphan them
    proc = subprocess.Popen(
        [*cmd, str(HERE / "generate_worker.py"), str(out)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun hung for {LAUNCH_TIMEOUT_S} s:\n{stdout[-2000:]}\n{stderr[-6000:]}")
    assert proc.returncode == 0, f"torchrun failed:\n{stdout[-4000:]}\n{stderr[-8000:]}"
    return {"ranks": [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)], "stderr": stderr}


@pytest.fixture(scope="module")
def reference():
    """Single process, plain model: each rank's prompts generated the same way."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    import generate_worker as GW

    from fastalign.models import load_causal_lm, load_tokenizer
    from fastalign.rollout.generate import generate

    tok = load_tokenizer(str(GW.MODEL))
    model = load_causal_lm(str(GW.MODEL), dtype="float32", attn_implementation="sdpa")
    ref = {}
    for sample in (False, True):
        for r in range(2):
            g = generate(
                model,
                tok,
                GW.rank_prompts(tok, r),
                GW.gen_config("auto", sample),
                seed=GW.SEED if sample else None,
                eos_token_ids=GW.eos_ids(tok),
            )
            ref[sample, r] = {"response_ids": g.response_ids, "finished": g.finished}
    return ref


def _case(runs, case: str, r: int) -> dict:
    return runs["ranks"][r][case]


@pytest.mark.parametrize("case", ["gather", "synced", "auto", "train_gather"])
def test_greedy_matches_single_process(runs, reference, case):
    for r in range(2):
        got = _case(runs, case, r)
        assert got["response_ids"] == reference[False, r]["response_ids"], (case, r)
        assert got["finished"] == reference[False, r]["finished"], (case, r)
        assert got["sharded_after"], f"{case}: rank {r} still holds full parameters after generate"


def test_rows_finish_at_different_steps(reference):
    """Guards the test itself: unequal lengths are what make "synced" need synced_gpus."""
    lengths = {len(x) for r in range(2) for x in reference[False, r]["response_ids"]}
    assert len(lengths) > 1 and any(f for r in range(2) for f in reference[False, r]["finished"])


def test_sampled_gather_and_synced_agree_with_single_process(runs, reference):
    for r in range(2):
        want = reference[True, r]["response_ids"]
        assert _case(runs, "sample_gather", r)["response_ids"] == want
        assert _case(runs, "sample_synced", r)["response_ids"] == want


def test_rank_without_prompts_does_not_hang(runs, reference):
    for case in ("gather_empty", "synced_empty"):
        assert _case(runs, case, 1)["response_ids"] == []
        assert _case(runs, case, 0)["response_ids"] == reference[False, 0]["response_ids"]


def test_auto_logs_its_choice_once_on_rank_zero(runs):
    lines = [x for x in runs["stderr"].splitlines() if "zero_mode auto -> gather" in x]
    assert len(lines) == 1, runs["stderr"][-3000:]


def test_trainable_engine_still_trains_after_generation(runs, reference):
    for r in range(2):
        res = runs["ranks"][r]
        assert res["train_mode_restored"] is True
        assert res["train_sharded_after_step"]
        assert res["train_loss"] > 0
        after = _case(runs, "train_synced_after_step", r)  # one AdamW step later: same shapes, still runs
        assert len(after["response_ids"]) == len(reference[False, r]["response_ids"])


def test_gather_on_a_module_inside_an_engine_is_refused(runs):
    for r in range(2):
        assert "pass the engine" in (runs["ranks"][r]["bare_module_error"] or "")
