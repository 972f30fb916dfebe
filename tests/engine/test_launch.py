"""`fastalign launch`: hostfile / node checks, the command it runs, a two-node run on one machine
(two per-node launches, no ssh), and bad setups that must fail fast instead of hanging: a missing
hostfile, a contradicting batch size, a model over the memory limit, a node that dies mid-run."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from launching import dist_env, free_port
from repo_assets import ASSETS

from fastalign.engine.launch import build_command, main, parse_hostfile

ROOT = Path(__file__).resolve().parents[2]
MODEL = ASSETS / "models" / "stories260k"
OASST = ASSETS / "data" / "preferences" / "oasst_en_100_tree_pairs.jsonl"
DOCS = ROOT / "docs" / "distributed.md"
RUN_TIMEOUT_S = 420
DIST_TIMEOUT_S = 30

NEEDS_DIST = [
    pytest.mark.distributed,
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed"),
]


# ---- checks and the command (in process, no launch) ---------------------------------------------


def _cmd(argv: list[str], tmp_path: Path) -> list[str]:
    cmd, dry = build_command(argv, tmp_path)
    assert dry == ("--dry-run" in argv)
    return cmd


def test_hostfile_lines_are_checked_with_file_and_line(tmp_path):
    good = tmp_path / "hostfile"
    good.write_text("# two nodes\nworker-0 slots=4\n\nworker-1   slots=2\n")
    assert parse_hostfile(good) == {"worker-0": 4, "worker-1": 2}
    bad = tmp_path / "bad"
    bad.write_text("worker-0 slots=4\nworker-1 gpus=2\n")
    with pytest.raises(ValueError, match=r"bad:2: expected 'HOST slots=N'.*'worker-1 gpus=2'"):
        parse_hostfile(bad)
    bad.write_text("worker-0 slots=4\nworker-0 slots=4\n")
    with pytest.raises(ValueError, match=r"bad:2: host 'worker-0' is listed twice"):
        parse_hostfile(bad)
    bad.write_text("# nothing\n")
    with pytest.raises(ValueError, match="no 'HOST slots=N' line"):
        parse_hostfile(bad)
    with pytest.raises(
        FileNotFoundError, match=r"hostfile /nope does not exist.*silently train on this node"
    ):
        parse_hostfile("/nope")


def test_node_counts_and_the_recipe_are_checked(tmp_path):
    hf = tmp_path / "hostfile"
    hf.write_text("a slots=1\nb slots=1\n")
    with pytest.raises(ValueError, match=r"--num_nodes 3 but hostfile .* lists 2 hosts \(a, b\)"):
        _cmd(["--hostfile", str(hf), "--num_nodes", "3", "--", "sft"], tmp_path)
    with pytest.raises(ValueError, match=r"without a hostfile.*falls back to local resources"):
        _cmd(["--num_nodes", "2", "--", "sft"], tmp_path)
    with pytest.raises(ValueError, match="'train' after '--' is not a fastalign recipe"):
        _cmd(["--num_gpus", "2", "--", "train", "--config", "x.yaml"], tmp_path)
    with pytest.raises(ValueError, match="expected 'fastalign launch"):
        _cmd(["--num_gpus", "2", "sft"], tmp_path)
    with pytest.raises(ValueError, match="without --master_addr"):
        _cmd(["--num_nodes", "2", "--node_rank", "1", "--num_gpus", "1", "--", "sft"], tmp_path)
    with pytest.raises(ValueError, match=r"0 <= node_rank < 2"):
        _cmd(
            ["--num_nodes", "2", "--node_rank", "2", "--master_addr", "h", "--num_gpus", "1", "--", "dpo"],
            tmp_path,
        )


def test_the_command_is_deepspeed_module_fastalign_cli(tmp_path):
    hf = tmp_path / "hostfile"
    hf.write_text("a slots=8\nb slots=8\n")
    cmd = _cmd(
        ["--hostfile", str(hf), "--num_nodes", "2", "--dry-run", "--", "dpo", "-c", "d.yaml", "x=1"], tmp_path
    )
    assert Path(cmd[0]).name == "deepspeed" or cmd[1:3] == ["-m", "deepspeed.launcher.runner"]
    assert cmd[-6:] == ["--module", "fastalign.cli", "dpo", "-c", "d.yaml", "x=1"]
    assert cmd[cmd.index("--hostfile") + 1] == str(hf) and "--no_ssh" not in cmd
    # per node without a hostfile: a generated one of N identical nodes, and no ssh
    cmd = _cmd(["--num_nodes", "2", "--node_rank", "1", "--master_addr", "10.0.0.1", "--num_gpus", "4",
                "--bind_cores_to_rank", "--", "sft"], tmp_path)  # fmt: skip
    gen = Path(cmd[cmd.index("--hostfile") + 1])
    assert gen.parent == tmp_path and gen.read_text() == "node-0 slots=4\nnode-1 slots=4\n"
    assert "--no_ssh" in cmd and "--bind_cores_to_rank" in cmd  # other launcher flags pass through
    assert cmd[cmd.index("--node_rank") + 1] == "1" and cmd[cmd.index("--master_addr") + 1] == "10.0.0.1"


def test_the_docs_launch_example_parses(tmp_path, monkeypatch, capsys):
    text = DOCS.read_text().replace("\\\n", " ")  # continuation lines: one command
    examples = re.findall(r"^fastalign launch (.+?)$", text, flags=re.M)
    assert examples, "docs/distributed.md has no `fastalign launch` example"
    monkeypatch.chdir(tmp_path)
    Path("hostfile").write_text("node-0 slots=1\nnode-1 slots=1\n")
    for line in examples:
        argv = shlex.split(line.replace("\\", ""))
        assert main(["--dry-run", *argv]) == 0, line
        printed = shlex.split(capsys.readouterr().out.strip().splitlines()[-1])
        assert printed[printed.index("--module") + 1] == "fastalign.cli", printed


def test_the_cli_passes_launcher_flags_through(capsys):
    """`fastalign launch --flags -- ...` reaches launch.main with the flags (CLI parsing)."""
    from fastalign.cli import main as cli_main

    assert cli_main(["launch", "--dry-run", "--num_gpus", "2", "--", "sft", "--config", "c.yaml"]) == 0
    assert "--num_gpus 2 --module fastalign.cli sft --config c.yaml" in capsys.readouterr().out


# ---- launches (gloo on CPU) ---------------------------------------------------------------------


def _env() -> dict[str, str]:
    return dist_env(timeout_s=DIST_TIMEOUT_S, debug=False)


def _sft(out: Path, steps: int, *extra: str) -> list[str]:
    return [
        "sft", "--config", "configs/sft.yaml", f"model.path={MODEL}", f"data.train={OASST}",
        "data.max_length=64", "data.max_prompt_length=32", "data.eval_fraction=0", f"train.output_dir={out}",
        f"train.max_steps={steps}", "train.batch_size=2", "train.eval_every=0", "train.save_every=0",
        "train.tensorboard=false", "train.progress=false", "train.resume=never", "train.export=false",
        "engine.backend=deepspeed", *extra,
    ]  # fmt: skip


def _launch(args: list[str], env: dict[str, str] | None = None, **kw) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "fastalign.engine.launch", *args]
    env = {**_env(), **(env or {})}
    pipe = subprocess.PIPE
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=pipe, stderr=pipe, text=True, **kw)


def _finish(proc: subprocess.Popen, timeout: float = RUN_TIMEOUT_S) -> tuple[int, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL) if _own_group(proc) else proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"launch did not finish in {timeout} s:\n{err[-4000:]}")
    return proc.returncode, out + err


def _own_group(proc: subprocess.Popen) -> bool:
    try:
        return os.getpgid(proc.pid) == proc.pid
    except ProcessLookupError:
        return False


def _node(rank: int, port: int, out: Path, steps: int, *extra: str) -> subprocess.Popen:
    """One node of a two-node job on this machine: its own launcher, one rank, no ssh."""
    args = ["--num_nodes", "2", "--node_rank", str(rank), "--master_addr", "127.0.0.1",
            "--master_port", str(port), "--num_gpus", "1", "--", *_sft(out, steps, *extra)]  # fmt: skip
    tmp = {"TMPDIR": str(out.parent)}  # a killed launcher leaves its generated hostfile there
    return _launch(args, tmp, start_new_session=True)  # own process group: the test can kill the node


def _train_losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["split"] == "train"]


def distributed(fn):
    for mark in reversed(NEEDS_DIST):
        fn = mark(fn)
    return fn


@distributed
def test_two_launchers_on_one_machine_train_together(tmp_path):
    port = free_port()
    nodes = [_node(r, port, tmp_path / "two_nodes", 3) for r in (0, 1)]
    results = [_finish(p) for p in nodes]
    for r, (code, log) in enumerate(results):
        assert code == 0, f"node {r} exited {code}:\n{log[-6000:]}"
    assert "nnodes=2, num_local_procs=1, node_rank=1" in results[1][1]
    code, log = _finish(_launch(["--num_gpus", "2", "--master_port", str(free_port()), "--",
                                 *_sft(tmp_path / "one_launcher", 3)]))  # fmt: skip
    assert code == 0, log[-6000:]
    two, one = _train_losses(tmp_path / "two_nodes"), _train_losses(tmp_path / "one_launcher")
    assert len(two) == len(one) == 3 and all(math.isfinite(x) for x in two)
    for a, b in zip(two, one, strict=True):
        assert abs(a - b) <= 1e-6 * abs(b), (two, one)
    assert (tmp_path / "two_nodes" / "config.yaml").is_file()


def test_a_missing_hostfile_exits_2_before_starting_anything(tmp_path):
    t0 = time.monotonic()
    code, log = _finish(_launch(["--hostfile", "/nope", "--num_nodes", "2", "--", *_sft(tmp_path, 3)]), 120)
    assert code == 2, log
    assert "fastalign launch: error: hostfile /nope does not exist" in log
    assert "nnodes=" not in log and "WORLD INFO" not in log  # no launcher was started
    assert time.monotonic() - t0 < 60


def _single_node_failure(tmp_path, *extra: str) -> tuple[int, str, float]:
    t0 = time.monotonic()
    proc = _launch(
        ["--num_gpus", "2", "--master_port", str(free_port()), "--", *_sft(tmp_path / "run", 3, *extra)]
    )
    code, log = _finish(proc, 240)
    return code, log, time.monotonic() - t0


@distributed
def test_a_contradicting_batch_size_fails_on_every_rank_not_hangs(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_batch_size": 7, "zero_optimization": {"stage": "auto"}}))
    code, log, took = _single_node_failure(tmp_path, f"engine.ds_config={ds}")
    assert code != 0, log[-4000:]
    msg = "'train_batch_size' is 7 but the recipe's batch_size × grad_accum × world size gives 4"
    assert msg in log, log[-4000:]
    assert took < 240


@distributed
def test_a_model_over_the_memory_limit_fails_before_loading(tmp_path):
    code, log, took = _single_node_failure(tmp_path, "engine.zero_stage=3", "engine.memory_limit_gb=0.0001")
    assert code != 0, log[-4000:]
    pattern = r"ZeRO stage 3 on 2 ranks needs .* GiB per rank .*offload_optimizer=none, offload_param=none\)"
    assert re.search(pattern + r", engine\.memory_limit_gb is 0\.0001", log), log[-4000:]
    assert "ZeRO-3 policy: this rank holds" not in log  # the error came before the model was built
    assert took < 240


@distributed
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "hung"])
def test_a_dead_or_hung_node_makes_the_other_exit_within_the_timeout(tmp_path, sig):
    """SIGKILL: gloo sees the closed connection at the next collective (seconds). SIGSTOP (a hung
    node): the collective times out after FASTALIGN_DIST_TIMEOUT (gloo: "Timed out waiting")."""
    port, out = free_port(), tmp_path / "dead"
    nodes = [_node(r, port, out, 500) for r in (0, 1)]
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not ((out / "metrics.jsonl").is_file() and _train_losses(out)):
            assert time.monotonic() < deadline, "no training step was logged"
            assert all(p.poll() is None for p in nodes), "a node exited before the first step"
            time.sleep(0.5)
        os.killpg(nodes[1].pid, sig)  # node 1: its launcher and its rank
        stopped = time.monotonic()
        code, log = _finish(nodes[0], DIST_TIMEOUT_S + 90)
        took = time.monotonic() - stopped
    finally:
        for p in nodes:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)  # also ends a stopped process
            p.communicate()
    assert code != 0, log[-4000:]
    assert took <= DIST_TIMEOUT_S + 60, (took, log[-4000:])
    if sig == signal.SIGSTOP:
        assert took >= DIST_TIMEOUT_S - 1, (took, log[-4000:])
        # gloo words its timeout two ways, depending on where the collective was waiting
        timeouts = (f"Timed out waiting {DIST_TIMEOUT_S * 1000}ms", "Application timeout caused pair closure")
        assert any(t in log for t in timeouts), log[-4000:]
    assert len(_train_losses(out)) < 500
