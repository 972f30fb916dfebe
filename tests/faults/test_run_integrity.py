"""Run integrity under a hostile or careless user (issue 14): a resumed, cached or concurrent run
never silently trains on something else, divergence is caught at the step and never saved.

Every case runs the real CLI on stories260k for a few steps; runs are shared between asserts
(module-scoped fixtures) to keep the wall time small.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from repo_assets import OASST, STORIES
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[2]
BASE = [
    f"model.path={STORIES}", "model.dtype=float32", "data.max_rows=24", "data.max_length=64",
    "data.max_prompt_length=32", "train.batch_size=4", "train.lr=1e-3", "train.warmup_steps=0",
    "train.schedule=cosine", "train.tensorboard=false", "train.export=false", "train.threads=2",
]  # fmt: skip


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "error")
    monkeypatch.setenv("FASTALIGN_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.delenv("FASTALIGN_DEBUG", raising=False)


def cli(*args: str) -> tuple[int, str]:
    """`fastalign <args>` in this process: (exit code, stderr)."""
    import contextlib
    import io

    from fastalign.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, err.getvalue()


def dpo(out: Path, *extra: str) -> tuple[int, str]:
    return cli("dpo", *BASE, f"data.train={OASST}", f"train.output_dir={out}", *extra)


def metrics(out: Path) -> dict[int, dict]:
    from fastalign.trainers.metrics import read_metrics

    return {r["step"]: r for r in read_metrics(out) if r["split"] == "train"}


# ---------------------------------------------------------------------------------------------
# 1. fingerprint: resume refuses changed settings, weights or data, unless accepted
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A 2-step DPO run with a checkpoint per step, on a private copy of model and data."""
    root = tmp_path_factory.mktemp("fingerprint")
    model, data = root / "model", root / "pairs.jsonl"
    shutil.copytree(STORIES, model)
    data.write_text("".join(OASST.read_text().splitlines(keepends=True)[:24]))
    out = root / "run"
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("FASTALIGN_CACHE", str(root / "cache"))
    args = [*BASE, f"model.path={model}", f"data.train={data}", f"train.output_dir={out}",
            "train.max_steps=2", "train.save_every=1"]  # fmt: skip
    code, err = cli("dpo", *args)
    mp.undo()
    assert code == 0, err
    return {"root": root, "model": model, "data": data, "out": out, "args": args}


def _copy_run(base: dict, name: str) -> Path:
    dst = base["root"] / name
    shutil.copytree(base["out"], dst)
    (dst / ".lock").unlink(missing_ok=True)
    return dst


def _resume(base: dict, out: Path, *extra: str) -> tuple[int, str]:
    args = [a for a in base["args"] if not a.startswith(("train.output_dir=", "train.max_steps="))]
    return cli("dpo", *args, f"train.output_dir={out}", *extra)


@pytest.mark.parametrize(
    "change, listed",
    [
        (["train.lr=5e-3"], "train.lr: 0.001 -> 0.005"),
        (["dpo.beta=0.5"], "dpo.beta: 0.1 -> 0.5"),
        (["data.max_length=48"], "data.max_length: 64 -> 48"),
    ],
)
def test_a_changed_setting_is_refused_naming_it(base_run, change, listed):
    out = _copy_run(base_run, f"refuse-{change[0].split('=')[0]}")
    config_before = (out / "config.yaml").read_bytes()
    code, err = _resume(base_run, out, "train.max_steps=4", *change)
    assert code == 2
    assert listed in err and "train.resume=never" in err and "train.accept_changes=[" in err, err
    assert (out / "config.yaml").read_bytes() == config_before  # never rewritten on a refusal
    assert sorted(metrics(out)) == [1, 2]


def test_changed_data_or_model_content_is_refused(base_run):
    out = _copy_run(base_run, "refuse-content")
    data2 = base_run["root"] / "pairs_edited.jsonl"
    shutil.copy(base_run["data"], data2)
    rows = base_run["data"].read_text().splitlines()
    base_run["data"].write_text("\n".join([rows[1], rows[0], *rows[2:]]) + "\n")  # same name, new content
    try:
        code, err = _resume(base_run, out, "train.max_steps=4")
        assert code == 2 and "data.train (content): changed" in err, err
    finally:
        shutil.copy(data2, base_run["data"])
    weights = base_run["model"] / "model.safetensors"
    saved = weights.read_bytes()
    t = load_file(weights)
    t[next(iter(t))] *= 1.01  # the model folder retrained in place
    save_file(t, weights, metadata={"format": "pt"})
    try:
        code, err = _resume(base_run, out, "train.max_steps=4")
        assert code == 2 and "model.path (content): changed" in err, err
    finally:
        weights.write_bytes(saved)


def test_an_accepted_change_applies_and_is_recorded(base_run):
    out = _copy_run(base_run, "accept")
    config_before = (out / "config.yaml").read_bytes()
    code, err = _resume(
        base_run, out, "train.max_steps=4", "train.lr=5e-3", "train.accept_changes=[train.lr]"
    )
    assert code == 0, err
    history = [json.loads(x) for x in (out / "config_history.jsonl").read_text().splitlines()]
    assert history[-1]["step"] == 3 and history[-1]["changes"]["train.lr"] == [0.001, 0.005]
    assert (out / "config.yaml").read_bytes() == config_before  # the original stays; changes appended
    m = metrics(out)
    # step 3 of a 4-step cosine at the NEW peak lr (the old run's scheduler state is rebased)
    expected = 5e-3 * 0.5 * (1 + math.cos(math.pi * 2 / 4))
    assert m[3]["lr"] == pytest.approx(expected, rel=1e-6)


def test_max_steps_below_the_checkpoint_is_refused(base_run):
    out = _copy_run(base_run, "lower")
    code, err = _resume(base_run, out, "train.max_steps=1")
    assert code == 2 and "below the step of the checkpoint" in err and "step 2" in err, err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000001", "step-00000002"]


def test_extending_max_steps_recomputes_the_schedule(base_run):
    out = _copy_run(base_run, "extend")
    old = metrics(out)
    code, err = _resume(base_run, out, "train.max_steps=4")
    assert code == 0, err
    assert "the lr schedule is recomputed for 4 steps" in err
    m = metrics(out)
    assert sorted(m) == [1, 2, 3, 4] and m[1]["loss"] == old[1]["loss"]
    assert (
        m[3]["lr"] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 2 / 4)), rel=1e-6) and m[3]["lr"] > 0
    )
    history = [json.loads(x) for x in (out / "config_history.jsonl").read_text().splitlines()]
    assert history[-1]["changes"]["train.max_steps"] == [2, 4]


# ---------------------------------------------------------------------------------------------
# reference log-prob cache: keyed on the weights' content, not the path
# ---------------------------------------------------------------------------------------------
def test_reference_cache_follows_retrained_weights(tmp_path):
    sft_out, dpo_out = tmp_path / "sft", tmp_path / "dpo"
    sft = [*BASE, f"data.train={OASST}", "data.format=sft", "data.columns.completion=chosen",
           f"train.output_dir={sft_out}", "train.export=true", "train.resume=never"]  # fmt: skip
    run_dpo = ["dpo.precompute_ref_logps=true", f"model.path={sft_out / 'final'}", "train.max_steps=1",
               "train.resume=never"]  # fmt: skip
    assert cli("sft", *sft, "train.max_steps=2")[0] == 0
    assert dpo(dpo_out, *run_dpo)[0] == 0
    assert metrics(dpo_out)[1]["rewards/chosen"] == 0.0
    assert cli("sft", *sft, "train.max_steps=4", "train.lr=3e-3")[0] == 0  # retrained in place
    code, err = dpo(dpo_out, *run_dpo)
    assert code == 0 and "recomputing" in err, err
    m = metrics(dpo_out)[1]
    assert m["rewards/chosen"] == 0.0 and m["rewards/rejected"] == 0.0  # the new weights are the reference


# ---------------------------------------------------------------------------------------------
# 2. divergence is caught at the step and never saved
# ---------------------------------------------------------------------------------------------
def _all_weights(out: Path) -> list[torch.Tensor]:
    ts = []
    for f in out.rglob("*.safetensors"):
        if f.name != "ref_logps.safetensors":
            ts += list(load_file(f).values())
    return ts


def test_an_exploding_lr_stops_at_the_step_and_saves_nothing(tmp_path):
    out = tmp_path / "boom"
    code, err = dpo(out, "train.lr=1e12", "train.max_steps=3", "train.save_every=1", "train.export=true")
    assert code == 2
    assert "diverged at step 1" in err and "parameter norm jumped" in err, err
    assert "no checkpoint was written" in err
    assert not (out / "final").exists() and not list(out.glob("checkpoints/step-*"))
    # the same folder with a sane lr trains from scratch and finishes
    code, err = dpo(out, "train.max_steps=2", "train.save_every=1")
    assert code == 0, err


def test_divergence_after_good_steps_names_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "late"
    assert dpo(out, "train.max_steps=2", "train.save_every=1", "train.schedule=constant")[0] == 0
    code, err = dpo(out, "train.max_steps=4", "train.save_every=1", "train.schedule=constant",
                    "train.lr=1e12", "train.accept_changes=[train.lr]", "train.export=true")  # fmt: skip
    assert code == 2 and "diverged at step 3" in err, err
    assert "checkpoints/step-00000002" in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000001", "step-00000002"]
    for t in _all_weights(out):
        assert torch.isfinite(t).all() and t.abs().max() < 1e3
    assert not (out / "final").exists()
    # resuming from the last good checkpoint with a sane lr
    code, err = dpo(out, "train.max_steps=4", "train.save_every=1", "train.schedule=constant")
    assert code == 0 and "resumed from" in err and "step-00000002" in err, err


# ---------------------------------------------------------------------------------------------
# 3. one run per folder
# ---------------------------------------------------------------------------------------------
def test_a_second_run_is_refused_and_a_killed_holder_leaves_no_lock(tmp_path):
    out = tmp_path / "busy"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1"}
    fastalign = Path(sys.executable).with_name("fastalign")
    holder = subprocess.Popen(
        [str(fastalign), "dpo", *BASE, f"data.train={OASST}", f"train.output_dir={out}",
         "train.max_steps=100000"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.time() + 120
        while not ((out / ".lock").is_file() and (out / ".lock").read_text()):
            assert holder.poll() is None and time.time() < deadline, "the first run never took the lock"
            time.sleep(0.2)
        code, err = dpo(out, "train.max_steps=1")
        assert code == 2 and f"pid {holder.pid} on host" in err and "in use by another run" in err, err
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    code, err = dpo(out, "train.max_steps=1", "train.resume=never")
    assert code == 0, err


# ---------------------------------------------------------------------------------------------
# 5. data and config edges, end to end
# ---------------------------------------------------------------------------------------------
def test_compressed_data_with_a_bom_and_a_bad_first_line_trains(tmp_path):
    import gzip

    rows = OASST.read_text().splitlines()[:12]
    data = tmp_path / "pairs.jsonl.gz"
    with gzip.open(data, "wt", encoding="utf-8") as f:
        f.write("\ufeff{not json\n" + "\n".join(rows) + "\n")
    code, err = dpo(tmp_path / "run", f"data.train={data}", "train.max_steps=1")
    assert code == 0, err
    assert "kept 12" in err and "pairs.jsonl.gz:1" in err, err


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.device=tpu", "train.device: expected 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got 'tpu'"),
        ("train.batch_size=0", "train.batch_size: must be >= 1"),
    ],
)
def test_bad_config_values_fail_before_loading(tmp_path, override, expected):
    code, err = dpo(tmp_path / "run", override)
    assert code == 2 and expected in err and "Traceback" not in err, err


def test_config_warnings_and_an_oversized_batch_are_reported(tmp_path):
    with pytest.warns(UserWarning, match=r"warmup_steps=3 >= train.max_steps=2"):
        code, err = dpo(tmp_path / "w", "train.warmup_steps=3", "train.max_steps=2", "data.max_rows=6",
                        "train.batch_size=8")  # fmt: skip
    assert code == 0 and "more than the" in err and "training rows" in err, err


def _broken_model(tmp_path: Path, how: str) -> Path:
    m = tmp_path / how
    shutil.copytree(STORIES, m)
    w = m / "model.safetensors"
    if how == "no_weights":
        w.unlink()
    elif how == "truncated":
        w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    elif how == "random_bytes":
        w.write_bytes(os.urandom(4096))
    elif how == "bad_config":
        (m / "config.json").write_text('{"model_type": "llama",,}')
    return m


@pytest.mark.parametrize(
    "how, expected",
    [
        ("no_weights", "no model weights (*.safetensors)"),
        ("truncated", "model.safetensors: truncated"),
        ("random_bytes", "model.safetensors: not a safetensors file"),
        ("bad_config", "config.json: not valid JSON (line 1, column 24"),
    ],
)
def test_a_broken_model_folder_is_one_line_naming_the_file(tmp_path, how, expected):
    code, err = dpo(tmp_path / "run", f"model.path={_broken_model(tmp_path, how)}", "train.max_steps=1")
    assert code == 2 and expected in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 8, err


def test_a_full_disk_names_the_file_and_keeps_the_earlier_checkpoint(tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(small)]).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        out = small / "run"
        code, err = dpo(out, "train.max_steps=3", "train.save_every=1", "train.keep_last=3")
        assert code == 2, err
        assert "no space left on device while writing" in err and "is intact" in err, err
        good = sorted(p.name for p in (out / "checkpoints").iterdir())
        assert good and all(p.startswith("step-") and not p.endswith(".tmp") for p in good), good
        state = json.loads((out / "checkpoints" / good[-1] / "trainer_state.json").read_text())
        assert state["step"] == int(good[-1][5:])
    finally:
        subprocess.run(["umount", str(small)])


# ---------------------------------------------------------------------------------------------
# 4. launch input cannot inject commands (the full matrix is tests/engine/test_hostfile.py)
# ---------------------------------------------------------------------------------------------
def test_a_hostfile_host_that_is_an_ssh_option_runs_nothing(tmp_path):
    pwned = tmp_path / "PWNED"
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(f"-oProxyCommand=touch${{IFS}}{pwned} slots=1\nnode2 slots=1\n")
    code, err = cli("launch", "--hostfile", str(hostfile), "--num_nodes", "2", "--", "sft")
    assert code == 2 and f"{hostfile}:1" in err and "starts with '-'" in err, err
    assert not pwned.exists()
