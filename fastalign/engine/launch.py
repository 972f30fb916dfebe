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

Untrusted text never reaches a shell or an option parser as code. Host names (hostfile, `--master_addr`,
`--include` / `--exclude`) must be RFC 1123 host names or IPv4/IPv6 addresses: a hostfile line
`-oProxyCommand=touch${IFS}/tmp/x slots=1` would otherwise reach `ssh` (deepspeed's reachability
check, then pdsh) as an option and run the command. Over pdsh every rank's command is one string
that the remote shell parses (deepspeed joins it unquoted: `export K=V; cd DIR; python ... ARGS`), so
there the recipe's arguments are shell-quoted and everything else that lands in that string
(working directory, forwarded environment, `.deepspeed_env`, path-valued launcher flags) must be
plain characters, or the launch is refused naming the offending value.

Pure Python: no torch import (the CLI imports this at `fastalign launch`).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from fastalign.config import RECIPES

DLTS_HOSTFILE = "/job/hostfile"  # the deepspeed launcher's default hostfile
_HOST_LINE = re.compile(r"^(\S+)\s+slots=(\S*)$")
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")  # RFC 1123 §2.1
_HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-:")
# Characters a POSIX shell takes literally outside quotes (shlex.quote's safe set) minus '%',
# which pdsh substitutes in the remote command (deepspeed relies on its `%n`).
_SHELL_PLAIN = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_@+=:,./-")
# Inside the double quotes deepspeed puts around an argument with a space, these still expand.
_DOUBLE_QUOTE_ACTIVE = frozenset("$`\\%")
# deepspeed/launcher/runner.py EXPORT_ENVS + the CUDA accelerator's export_envs(): variables
# whose values pdsh mode writes unquoted into the remote command as `export K=V;`.
_FORWARDED_ENV_PREFIXES = ("MLFLOW", "PYTHON", "MV2", "UCX", "NCCL")


def host_problem(host: str) -> str | None:
    """Why `host` is not a plain host name (RFC 1123) or IPv4 / IPv6 address; None when it is one.

    Everything else is refused rather than escaped: a host is handed to ssh, pdsh and mpirun as
    an argument, and a leading '-' makes it an option there (`-oProxyCommand=...` runs a command)."""
    if not host:
        return "is empty"
    if host.startswith("-"):
        return "starts with '-' (ssh and pdsh would read it as an option)"
    bad = sorted(set(host) - _HOST_CHARS)
    if bad:
        shown = ", ".join(repr(c) for c in bad)
        return f"contains {shown}: a host must be a host name (letters, digits, '-', '.') or an IP address"
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return "is not a valid IPv6 address"
        return None
    name = host[:-1] if host.endswith(".") else host  # a fully qualified name may end in '.'
    labels = name.split(".")
    if labels[-1].isdigit():  # dotted digits are an IPv4 address or nothing (RFC 1123 §2.1)
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return (
                "is neither a valid IPv4 address nor a host name (a host name's last label is not all digits)"
            )
        return None
    if len(name) > 253:
        return f"is {len(name)} characters long (a host name has at most 253)"
    for label in labels:
        if not _LABEL.fullmatch(label):
            why = (
                "empty"
                if not label
                else "longer than 63 characters"
                if len(label) > 63
                else "starting or ending with '-'"
            )
            return f"has a label {label!r} ({why}); RFC 1123 labels are 1-63 letters, digits and inner '-'"
    return None


def check_host(host: str, where: str) -> str:
    """`host` when `host_problem` finds nothing, else ValueError '<where>: host '<host>' <problem>'."""
    problem = host_problem(host)
    if problem is not None:
        raise ValueError(f"{where}: host {host!r} {problem}")
    return host


def parse_hostfile(path: str | os.PathLike) -> dict[str, int]:
    """{host: slots} of an MPI-style hostfile (`host slots=N` lines, `#` comments, blank lines);
    a missing / unreadable file, a bad line, a host that is not a host name or IP address (see
    `host_problem`) or slots that are not a positive whole number is an error naming file:line."""
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
    seen: dict[str, str] = {}  # lower-cased -> as written: host names are case-insensitive
    for i, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _HOST_LINE.match(line)
        if m is None:
            raise ValueError(f"hostfile {p}:{i}: expected 'HOST slots=N' got {line!r}")
        host, slots_text = m.group(1), m.group(2)
        check_host(host, f"hostfile {p}:{i}")
        # ASCII digits only: str.isdigit / int() also take '³' or Arabic-Indic digits
        if not re.fullmatch(r"[0-9]+", slots_text) or int(slots_text) < 1:
            raise ValueError(f"hostfile {p}:{i}: slots must be a whole number >= 1, got {slots_text!r}")
        if host.lower() in seen:
            twice = f"{host!r}" if seen[host.lower()] == host else f"{host!r} (as {seen[host.lower()]!r})"
            raise ValueError(f"hostfile {p}:{i}: host {twice} is listed twice")
        seen[host.lower()] = host
        hosts[host] = int(slots_text)
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
    # parsed here (not passed through blindly) because they decide which hosts run and whether
    # the ranks are started through a remote shell; all are handed on to deepspeed unchanged
    p.add_argument("-i", "--include", default="")
    p.add_argument("-e", "--exclude", default="")
    p.add_argument("--launcher", default="pdsh")
    p.add_argument("--launcher_args", default="")
    p.add_argument("--force_multi", action="store_true")
    p.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true")
    return p


def _recipes() -> tuple[str, ...]:
    return tuple(RECIPES)  # the recipe command names (fastalign.config.RECIPES, torch-free)


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


def _resource_filter(a: argparse.Namespace, hosts: dict[str, int] | None) -> dict[str, list[int]]:
    """{host: slots} of `--include` / `--exclude` (deepspeed's `NAME[:SLOT[,SLOT...]][@...]`), every
    host checked against the hostfile (or `localhost` without one) and every slot against its
    count; {} when neither is given. deepspeed checks the same, but with a traceback."""
    flag, spec = ("--include", a.include) if a.include else ("--exclude", a.exclude)
    if not spec:
        return {}
    if a.include and a.exclude:
        raise ValueError("--include and --exclude: give one of them, not both")
    if a.num_nodes != -1 or a.num_gpus != -1:
        raise ValueError(
            f"{flag} with --num_nodes / --num_gpus: the deepspeed launcher takes one or the other"
        )
    pool = hosts if hosts is not None else {"localhost": -1}  # local slot count: known to deepspeed only
    chosen: dict[str, list[int]] = {}
    for node in spec.split("@"):
        if node.count(":") > 1:
            raise ValueError(
                f"{flag} {spec!r}: {node!r} has several ':' (an IPv6 address cannot be named here, since "
                "':' separates the slots; list the host by name in the hostfile)"
            )
        host, _, slots_text = node.partition(":")
        check_host(host, f"{flag} {spec!r}")
        if host not in pool:
            where = f"hostfile {a.hostfile}" if hosts is not None else "this node (no hostfile)"
            raise ValueError(f"{flag} {spec!r}: host {host!r} is not in {where} ({', '.join(pool)})")
        slots = chosen.setdefault(host, [])
        for slot in slots_text.split(",") if slots_text else []:
            if not re.fullmatch(r"[0-9]+", slot) or (pool[host] > 0 and int(slot) >= pool[host]):
                have = f" (slots 0..{pool[host] - 1})" if pool[host] > 0 else ""
                raise ValueError(f"{flag} {spec!r}: {slot!r} is not a slot of host {host!r}{have}")
            slots.append(int(slot))
    return chosen


def _over_pdsh(
    a: argparse.Namespace, hosts: dict[str, int] | None, per_node: bool, chosen: dict[str, list[int]]
) -> bool:
    """Whether the deepspeed launcher will start the ranks with pdsh, i.e. through a remote shell
    (runner.py: `multi_node_exec = (force_multi or len(active_resources) > 1) and not no_ssh`
    with the pdsh launcher). The MPI and SLURM launchers pass arguments as argv."""
    if per_node or a.launcher.lower() != "pdsh":
        return False
    pool = hosts if hosts is not None else {"localhost": 1}
    if a.include:
        used = len(chosen)
    elif a.exclude:  # a host drops out when all of its slots are excluded
        used = sum(1 for h, n in pool.items() if h not in chosen or (chosen[h] and len(set(chosen[h])) < n))
    else:
        used = len(pool)
    if a.num_nodes > 0:
        used = min(used, a.num_nodes)
    return a.force_multi or used > 1


def _plain_for_shell(value: str, what: str, why: str) -> None:
    bad = sorted(set(value) - _SHELL_PLAIN)
    if bad:
        raise ValueError(
            f"{what} {value!r} contains {', '.join(repr(c) for c in bad)}, which the remote shell would "
            f"interpret: {why}; only letters, digits and _@+=:,./- are accepted there"
        )


def _remote_arg(arg: str) -> str:
    """`arg` as it must be handed to deepspeed so the remote shell of a pdsh launch sees it verbatim.
    deepspeed (PDSHRunner.parse_user_args) leaves an argument without a space as it is and wraps
    one with a space in double quotes (escaping only '"'); pdsh replaces '%' sequences."""
    if "%" in arg:
        raise ValueError(
            f"recipe argument {arg!r}: pdsh replaces '%' sequences in the command it runs on each node; "
            "put this value in the YAML config instead"
        )
    if " " not in arg:
        return shlex.quote(arg)  # unchanged when it is plain; else single-quoted, i.e. literal
    active = sorted(set(arg) & _DOUBLE_QUOTE_ACTIVE)
    if active:
        raise ValueError(
            f"recipe argument {arg!r}: over pdsh deepspeed passes an argument with a space inside double "
            f"quotes, where {', '.join(repr(c) for c in active)} still expand on the remote shell; "
            "put this value in the YAML config instead"
        )
    return arg  # deepspeed's double quotes keep it one word, and nothing in it expands


def _check_pdsh_command(passthrough: list[str]) -> None:
    """Refuse what deepspeed would write unquoted into the remote shell command of a pdsh launch:
    `export K=V; ... cd CWD; python -u -m deepspeed.launcher.launch ... --flag=VALUE ...`."""
    why = "over pdsh the deepspeed launcher runs `cd DIR` unquoted on every node"
    _plain_for_shell(os.path.abspath("."), "working directory", why + "; start from a plainer path")
    for key, value in sorted(os.environ.items()):
        if key.startswith(_FORWARDED_ENV_PREFIXES):
            why = f"over pdsh the deepspeed launcher forwards it unquoted as `export {key}=...` to every node"
            _plain_for_shell(value, f"environment variable {key}", why + "; unset or change it")
    env_name = os.getenv("DS_ENV_FILE", ".deepspeed_env")
    for folder in (os.path.expanduser("~"), "."):
        env_file = Path(folder) / env_name
        if not env_file.is_file():
            continue
        for i, line in enumerate(env_file.read_text().splitlines(), 1):
            key, sep, value = line.partition("=")
            where = f"{env_file}:{i}"
            if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
                raise ValueError(f"{where}: expected 'NAME=value' got {line!r}")
            why = f"deepspeed forwards it unquoted as `export {key}=...` to every node"
            _plain_for_shell(value, f"{where}: value of {key}", why)
    for token in passthrough:  # e.g. --venv_script PATH, --enable_each_rank_log DIR
        why = "deepspeed copies launcher flag values unquoted into the command run on every node"
        _plain_for_shell(token, "launcher argument", why)


def build_command(argv: list[str], workdir: str | os.PathLike) -> tuple[list[str], bool]:
    """(deepspeed command, dry_run) after every check; ValueError / FileNotFoundError naming the
    problem otherwise. A generated hostfile (per-node launch without one) goes in `workdir`."""
    launcher_argv, command = _split(list(argv))
    a, passthrough = _parser().parse_known_args(launcher_argv)
    if a.hostfile is None and Path(DLTS_HOSTFILE).is_file():
        a.hostfile = DLTS_HOSTFILE  # what the deepspeed launcher would pick up itself
    hosts = parse_hostfile(a.hostfile) if a.hostfile is not None else None
    if a.master_addr:
        check_host(a.master_addr, "--master_addr")
    _check_nodes(a, hosts)
    chosen = _resource_filter(a, hosts)
    per_node = a.no_ssh or a.node_rank >= 0
    if _over_pdsh(a, hosts, per_node, chosen):
        _check_pdsh_command(passthrough)
        command = [command[0], *map(_remote_arg, command[1:])]
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
        # './-x', not '-x': deepspeed's argparse would take a path starting with '-' for an option
        cmd += ["--hostfile", os.path.join(".", hostfile) if str(hostfile).startswith("-") else str(hostfile)]
    for flag, value, unset in (
        ("--num_nodes", a.num_nodes, -1),
        ("--num_gpus", a.num_gpus, -1),
        ("--node_rank", a.node_rank, -1),
        ("--master_addr", a.master_addr, ""),
        ("--master_port", a.master_port, None),
        ("--include", a.include, ""),
        ("--exclude", a.exclude, ""),
        ("--launcher", a.launcher, "pdsh"),
    ):
        if value != unset:
            cmd += [flag, str(value)]
    if a.launcher_args:  # '=': its value usually starts with '-'
        cmd.append(f"--launcher_args={a.launcher_args}")
    if a.force_multi:
        cmd.append("--force_multi")
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
