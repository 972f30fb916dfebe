"""`fastalign launch [launcher args] -- COMMAND ARGS...`: check a multi-node setup, then run
`deepspeed ... --module fastalign.cli COMMAND ARGS` and return its exit code.

Why a wrapper: the plain `deepspeed` launcher (0.19.8, `deepspeed/launcher/runner.py`) treats a
missing hostfile as "no hostfile" — it logs a warning ("Unable to find hostfile, will proceed with
training with local resources only") and trains on this node alone; with `--num_nodes 2` it then
fails with a traceback ("Num nodes is >1 but no extra nodes available via hostfile"). A bad
hostfile line is a traceback too, and `--num_nodes` larger than the hostfile silently uses fewer
nodes. Here each of those is one line naming the problem (exit code 2 through the CLI), before
any process starts.

Two ways to start N nodes:
- from one node over ssh (pdsh): `fastalign launch --hostfile hostfile --num_nodes 2 -- dpo ...`;
- one invocation per node, no ssh (SLURM, containers): `--node_rank R --master_addr A
  --num_nodes N --num_gpus G`; fastalign passes `--no_ssh` and, without a hostfile, writes a
  temporary one of N identical nodes (`node-i slots=G`), since the deepspeed launcher needs one
  to know the world size.

Pure Python: no torch import (the CLI imports this at `fastalign launch`).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

DLTS_HOSTFILE = "/job/hostfile"  # the deepspeed launcher's default hostfile
_HOST_LINE = re.compile(r"^(\S+)\s+slots=(\d+)\s*$")


def parse_hostfile(path: str | os.PathLike) -> dict[str, int]:
    """{host: slots} of an MPI-style hostfile (`host slots=N` lines, `#` comments, blank lines);
    a missing / unreadable file or a bad line is an error naming file:line."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(
            f"hostfile {p} does not exist (the deepspeed launcher would only warn and silently train on "
            "this node alone); give an existing file of 'HOST slots=N' lines"
        )
    try:
        lines = p.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"hostfile {p}: cannot be read ({type(e).__name__}: {e})") from None
    hosts: dict[str, int] = {}
    for i, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _HOST_LINE.match(line)
        if m is None:
            raise ValueError(f"hostfile {p}:{i}: expected 'HOST slots=N' got {line!r}")
        host, slots = m.group(1), int(m.group(2))
        if slots < 1:
            raise ValueError(f"hostfile {p}:{i}: slots must be >= 1, got {slots}")
        if host in hosts:
            raise ValueError(f"hostfile {p}:{i}: host {host!r} is listed twice")
        hosts[host] = slots
    if not hosts:
        raise ValueError(f"hostfile {p}: no 'HOST slots=N' line in it")
    return hosts


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastalign launch", add_help=False)
    p.add_argument("-H", "--hostfile")
    p.add_argument("--num_nodes", type=int, default=-1)
    p.add_argument("--num_gpus", "--num_accelerators", type=int, default=-1)
    p.add_argument("--node_rank", type=int, default=-1)
    p.add_argument("--master_addr", default="")
    p.add_argument("--master_port", type=int)
    p.add_argument("--no_ssh", action="store_true")
    p.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true")
    return p


def _recipes() -> tuple[str, ...]:
    from fastalign.cli import RECIPE_COMMANDS  # the CLI owns the command names

    return RECIPE_COMMANDS


def _split(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" not in argv:
        raise ValueError(
            "expected 'fastalign launch [launcher args] -- COMMAND ARGS', e.g. "
            "'fastalign launch --hostfile hostfile --num_nodes 2 -- dpo --config configs/dpo.yaml'"
        )
    cut = argv.index("--")
    command = argv[cut + 1 :]
    if not command:
        raise ValueError(f"no COMMAND after '--' (one of {', '.join(_recipes())})")
    if command[0] not in _recipes():
        names = ", ".join(_recipes())
        raise ValueError(f"{command[0]!r} after '--' is not a fastalign recipe (one of {names})")
    return argv[:cut], command


def _check_nodes(a: argparse.Namespace, hosts: dict[str, int] | None) -> None:
    if a.num_nodes == 0 or a.num_nodes < -1:
        raise ValueError(f"--num_nodes: expected a positive number of nodes, got {a.num_nodes}")
    if a.num_gpus == 0 or a.num_gpus < -1:
        raise ValueError(f"--num_gpus: expected a positive number of ranks per node, got {a.num_gpus}")
    if hosts is not None and a.num_nodes > len(hosts):
        raise ValueError(
            f"--num_nodes {a.num_nodes} but hostfile {a.hostfile} lists {len(hosts)} host"
            f"{'s' if len(hosts) != 1 else ''} ({', '.join(hosts)})"
        )
    per_node = a.no_ssh or a.node_rank >= 0
    if a.num_nodes > 1 and hosts is None and not per_node:
        raise ValueError(
            f"--num_nodes {a.num_nodes} without a hostfile: the deepspeed launcher only knows this node "
            "(it falls back to local resources); give --hostfile, or start one launch per node with "
            "--node_rank R --master_addr ADDR"
        )
    if per_node:
        nodes = a.num_nodes if a.num_nodes > 0 else (len(hosts) if hosts else 1)
        if not 0 <= a.node_rank < nodes:
            raise ValueError(f"--node_rank: expected 0 <= node_rank < {nodes} nodes, got {a.node_rank}")
        if nodes > 1 and not a.master_addr:
            raise ValueError("--node_rank without --master_addr: every node needs the address of node 0")
        if hosts is None and a.num_gpus < 1:
            raise ValueError("--node_rank without a hostfile needs --num_gpus (ranks on each node)")


def build_command(argv: list[str], workdir: str | os.PathLike) -> tuple[list[str], bool]:
    """(deepspeed command, dry_run) after every check; ValueError / FileNotFoundError naming the
    problem otherwise. A generated hostfile (per-node launch without one) goes in `workdir`."""
    launcher_argv, command = _split(list(argv))
    a, passthrough = _parser().parse_known_args(launcher_argv)
    if a.hostfile is None and Path(DLTS_HOSTFILE).is_file():
        a.hostfile = DLTS_HOSTFILE  # what the deepspeed launcher would pick up itself
    hosts = parse_hostfile(a.hostfile) if a.hostfile is not None else None
    _check_nodes(a, hosts)
    per_node = a.no_ssh or a.node_rank >= 0
    hostfile = a.hostfile
    if per_node and hosts is None:  # the launcher needs a hostfile to know the world size
        text = "".join(f"node-{i} slots={a.num_gpus}\n" for i in range(max(a.num_nodes, 1)))
        hostfile = Path(workdir) / "hostfile"
        hostfile.write_text(text)
        hosts_text = "; ".join(text.splitlines())
        print(f"fastalign launch: hostfile {hostfile} (removed at exit): {hosts_text}", file=sys.stderr)
    exe = Path(sys.executable).with_name("deepspeed")
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "deepspeed.launcher.runner"]
    if hostfile is not None:
        cmd += ["--hostfile", str(hostfile)]
    for flag, value, unset in (
        ("--num_nodes", a.num_nodes, -1),
        ("--num_gpus", a.num_gpus, -1),
        ("--node_rank", a.node_rank, -1),
        ("--master_addr", a.master_addr, ""),
        ("--master_port", a.master_port, None),
    ):
        if value != unset:
            cmd += [flag, str(value)]
    if per_node:
        cmd.append("--no_ssh")
    cmd += [*passthrough, "--module", "fastalign.cli", *command]
    return cmd, a.dry_run


def main(argv: list[str]) -> int:
    """Check, then run the deepspeed launcher and return its exit code; `--dry-run` prints the
    command instead. Bad input raises ValueError / FileNotFoundError (the CLI: one line, exit 2)."""
    with tempfile.TemporaryDirectory(prefix="fastalign-launch-") as tmp:
        cmd, dry_run = build_command(argv, tmp)
        if dry_run:
            print(shlex.join(cmd))
            return 0
        return subprocess.run(cmd).returncode


if __name__ == "__main__":  # `python -m fastalign.engine.launch ARGS` = `fastalign launch ARGS`
    try:
        sys.exit(main(sys.argv[1:]))
    except (ValueError, FileNotFoundError) as e:
        print(f"fastalign launch: error: {e}", file=sys.stderr)
        sys.exit(2)
