"""`fastalign launch` input cannot inject commands (issue 14 §4): hostfile hosts and slots,
--master_addr, --include / --exclude, and over pdsh everything that lands in the remote shell.

The threat, reproduced with deepspeed 0.19.8 alone: a hostfile line
`-oProxyCommand=touch${IFS}/tmp/PWNED slots=1` (plus a second host) makes the launcher's ssh
reachability check run `ssh -o PasswordAuthentication=no -oProxyCommand=touch${IFS}/tmp/PWNED
hostname`, and ssh runs the proxy command through /bin/sh."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from launching import ROOT, run_launch

from fastalign.engine import launch
from fastalign.engine.launch import build_command, check_host, host_problem, main, parse_hostfile

HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None


def _injection_hostfile(folder: Path) -> tuple[Path, Path]:
    """A hostfile whose first host is an ssh option that creates `folder/PWNED`, and that file."""
    pwned = folder / "PWNED"
    hostfile = folder / "hostfile"
    hostfile.write_text(f"-oProxyCommand=touch${{IFS}}{pwned} slots=1\nworker-1 slots=1\n")
    return hostfile, pwned


def test_the_injection_hostfile_is_refused_in_process_and_nothing_is_started(tmp_path, monkeypatch):
    hostfile, pwned = _injection_hostfile(tmp_path)
    started = []
    monkeypatch.setattr(launch.subprocess, "run", lambda *a, **k: started.append(a))
    with pytest.raises(ValueError, match=rf"hostfile {hostfile}:1: host '-oProxyCommand=.*' starts with '-'"):
        main(["--hostfile", str(hostfile), "--num_nodes", "2", "--", "sft"])
    assert started == [] and not pwned.exists()


def test_the_injection_hostfile_creates_no_file_through_the_real_launch_path(tmp_path):
    """`python -m fastalign.engine.launch` as a user runs it, with `ssh` and `pdsh` on PATH
    replaced by recorders: before the fix the deepspeed launcher called ssh with the host as an
    option (and with the real ssh, PWNED appeared); now nothing is started at all."""
    hostfile, pwned = _injection_hostfile(tmp_path)
    fake_bin, calls = tmp_path / "bin", tmp_path / "calls.log"
    fake_bin.mkdir()
    for tool in ("ssh", "pdsh"):
        script = fake_bin / tool
        # a recorder that also does what matters about the real ssh: runs a -oProxyCommand=CMD
        script.write_text(
            "#!/bin/sh\n"
            f'echo "{tool} $*" >> {calls}\n'
            'for a in "$@"; do case "$a" in -oProxyCommand=*) sh -c "${a#-oProxyCommand=}";; esac; done\n'
            "exit 255\n"
        )
        script.chmod(0o755)
    env = dict(os.environ, PATH=f"{fake_bin}{os.pathsep}{os.environ['PATH']}", DS_ACCELERATOR="cpu")
    env["PYTHONPATH"] = str(ROOT)
    cmd = [sys.executable, "-m", "fastalign.engine.launch", "--hostfile", str(hostfile), "--", "sft"]
    result = run_launch(cmd, env=env, timeout=120, cwd=tmp_path)
    log = result.stdout + result.stderr
    assert result.returncode == 2, log
    assert f"fastalign launch: error: hostfile {hostfile}:1: host '-oProxyCommand=" in log
    assert not calls.exists(), calls.read_text()
    assert not pwned.exists()
    assert "cmd =" not in log and "Traceback" not in log  # the deepspeed launcher never ran


@pytest.mark.parametrize(
    "host",
    [
        "worker-0",
        "node7.cluster.example.org",
        "node7.cluster.example.org.",  # fully qualified, trailing dot
        "localhost",
        "a",
        "3com",  # RFC 1123 allows a leading digit
        "x" * 63 + ".example",
        "10.0.0.1",
        "192.168.255.254",
        "::1",
        "fe80::1ff:fe23:4567:890a",
        "2001:db8::8a2e:370:7334",
        "::ffff:10.0.0.1",
    ],
)
def test_host_names_and_ip_addresses_pass(host, tmp_path):
    assert host_problem(host) is None
    hf = tmp_path / "hostfile"
    hf.write_text(f"{host} slots=2\n")
    assert parse_hostfile(hf) == {host: 2}


@pytest.mark.parametrize(
    ("host", "why"),
    [
        ("-oProxyCommand=touch${IFS}/tmp/PWNED", "starts with '-'"),
        ("-p2222", "starts with '-'"),
        ("host;touch", r"contains ';'"),
        ("$(touch)", r"contains '\$', '\(', '\)'"),
        ("`id`", "contains '`'"),
        ("a|b", r"contains '\|'"),
        ("a&b", "contains '&'"),
        ("a>b", "contains '>'"),
        ("user@host", "contains '@'"),  # ssh would log in as 'user': not a host name
        ("a,b", "contains ','"),  # pdsh's -w takes a comma list: one entry would become two
        ("a*", r"contains '\*'"),
        ("wörker", "contains 'ö'"),
        ("under_score", "contains '_'"),
        ("-worker", "starts with '-'"),
        ("worker-", "starting or ending with '-'"),
        ("a..b", "label '' .*empty"),
        ("x" * 64, "longer than 63"),
        (".".join(["x" * 60] * 5), "at most 253"),
        ("10.0.0.256", "neither a valid IPv4"),
        ("1234", "neither a valid IPv4"),
        ("1:2:3", "not a valid IPv6"),
        ("[::1]", r"contains '\[', '\]'"),
        ("fe80::1%eth0", "contains '%'"),
    ],
)
def test_anything_else_is_refused_with_the_reason(host, why):
    problem = host_problem(host)
    assert problem is not None
    assert re.search(why, problem), problem
    with pytest.raises(ValueError, match=rf"^--master_addr: host .*{why}"):
        check_host(host, "--master_addr")


@pytest.mark.parametrize("slots", ["0", "-1", "1.5", "two", "", "٣", "1e3", "0x10"])
def test_slots_must_be_positive_whole_numbers_and_the_line_is_named(slots, tmp_path):
    hf = tmp_path / "hosts.txt"
    hf.write_text(f"# cluster\nworker-0 slots=4\n\nworker-1 slots={slots}\n")
    with pytest.raises(
        ValueError, match=rf"hostfile {hf}:4: slots must be a whole number >= 1, got '{slots}'"
    ):
        parse_hostfile(hf)


def test_a_bad_host_names_the_file_and_line(tmp_path):
    hf = tmp_path / "hosts.txt"
    hf.write_text("worker-0 slots=4\n# a comment\nworker;reboot slots=4\n")
    with pytest.raises(ValueError, match=rf"^hostfile {hf}:3: host 'worker;reboot' contains ';'"):
        parse_hostfile(hf)
    hf.write_text("worker-0 slots=4\nWORKER-0 slots=2\n")  # one machine to ssh, two entries
    with pytest.raises(ValueError, match=rf"{hf}:2: host 'WORKER-0' \(as 'worker-0'\) is listed twice"):
        parse_hostfile(hf)


def test_master_addr_include_and_exclude_are_checked(tmp_path):
    hf = tmp_path / "hostfile"
    hf.write_text("worker-0 slots=2\nworker-1 slots=2\n")
    base = ["--hostfile", str(hf)]
    with pytest.raises(ValueError, match="--master_addr: host '-oProxyCommand=x' starts with '-'"):
        build_command([*base, "--master_addr=-oProxyCommand=x", "--", "sft"], tmp_path)
    with pytest.raises(ValueError, match=r"--master_addr: host 'a;b' contains ';'"):
        build_command(["--num_nodes", "2", "--node_rank", "0", "--master_addr", "a;b", "--num_gpus", "1",
                       "--", "sft"], tmp_path)  # fmt: skip
    with pytest.raises(ValueError, match=r"--include 'worker-0@-oX': host '-oX' starts with '-'"):
        build_command([*base, "--include", "worker-0@-oX", "--", "sft"], tmp_path)
    with pytest.raises(ValueError, match=r"host 'worker-9' is not in hostfile .* \(worker-0, worker-1\)"):
        build_command([*base, "--exclude", "worker-9", "--", "sft"], tmp_path)
    with pytest.raises(ValueError, match=r"'2' is not a slot of host 'worker-1' \(slots 0\.\.1\)"):
        build_command([*base, "-i", "worker-1:0,2", "--", "sft"], tmp_path)
    with pytest.raises(ValueError, match=r"'x' is not a slot of host 'worker-1'"):
        build_command([*base, "-i", "worker-1:x", "--", "sft"], tmp_path)
    with pytest.raises(ValueError, match="one of them, not both"):
        build_command([*base, "-i", "worker-0", "-e", "worker-1", "--", "sft"], tmp_path)
    with pytest.raises(ValueError, match="--include with --num_nodes"):
        build_command([*base, "-i", "worker-0", "--num_nodes", "1", "--", "sft"], tmp_path)
    cmd, _ = build_command([*base, "--include", "worker-1:1", "--", "sft"], tmp_path)
    assert cmd[cmd.index("--include") + 1] == "worker-1:1"  # a good filter reaches deepspeed


HOSTILE_ARGS = [
    "train.output_dir=runs/x;touch${{IFS}}{pwned}",
    "data.train=$(touch${{IFS}}{pwned})",
    "model.path=`touch${{IFS}}{pwned}`",
    "train.output_dir=it's",
    "lists=[q_proj,v_proj]",
    "glob=*",
    "",
    'say=a "quoted" phrase with spaces',
    "tab=a\tb",
]


def _pdsh_command(cmd: list[str]) -> tuple[object, list[str]]:
    """deepspeed's own PDSHRunner applied to our command: (its args, the words of the remote
    command after the user script), exactly as pdsh hands them to each node's shell."""
    from deepspeed.launcher.multinode_runner import PDSHRunner
    from deepspeed.launcher.runner import parse_args

    args = parse_args(cmd[1:] if Path(cmd[0]).name == "deepspeed" else cmd[3:])
    runner = PDSHRunner(args, "e30=")
    remote, _kill, _env = runner.get_cmd({}, {"worker-0": [0], "worker-1": [0]})
    return args, remote[remote.index(args.user_script) :]


@pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed")
def test_over_pdsh_the_recipe_arguments_reach_the_remote_shell_verbatim(tmp_path, monkeypatch):
    """The remote command is one string that each node's shell parses (pdsh joins the words
    with spaces; ssh passes the string to `$SHELL -c`). Run that parse with /bin/sh here: every
    argument arrives as typed, and none of the hostile ones runs anything."""
    hf = tmp_path / "hostfile"
    hf.write_text("worker-0 slots=1\nworker-1 slots=1\n")
    pwned = tmp_path / "PWNED"
    args = [a.format(pwned=pwned) for a in HOSTILE_ARGS]
    monkeypatch.chdir(tmp_path)
    cmd, _ = build_command(["--hostfile", str(hf), "--", "dpo", *args], tmp_path)
    _, words = _pdsh_command(cmd)
    show = [sys.executable, "-c", "import json, sys; print(json.dumps(sys.argv[1:]))"]
    line = " ".join([*map(shlex.quote, show), *words])
    out = subprocess.run(["sh", "-c", line], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == ["fastalign.cli", "dpo", *args]
    assert not pwned.exists()
    # on one node (no shell in between) the same arguments go to deepspeed untouched
    cmd, _ = build_command(["--num_gpus", "2", "--", "dpo", *args], tmp_path)
    assert cmd[-len(args) :] == args


@pytest.mark.parametrize(
    ("arg", "why"),
    [
        ("data.system_prompt=say $HOME please", r"double quotes, where '\$' still expand"),
        ("x=a `b` c", "double quotes, where '`' still expand"),
        ("x=50%n", "pdsh replaces '%' sequences"),
    ],
)
def test_over_pdsh_arguments_the_remote_shell_would_expand_are_refused(arg, why, tmp_path, monkeypatch):
    hf = tmp_path / "hostfile"
    hf.write_text("worker-0 slots=1\nworker-1 slots=1\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=rf"recipe argument .*{why}"):
        build_command(["--hostfile", str(hf), "--", "dpo", arg], tmp_path)
    # one node, or one launch per node (--no_ssh): no remote shell, the argument is fine
    build_command(["--num_gpus", "2", "--", "dpo", arg], tmp_path)
    build_command(["--hostfile", str(hf), "--node_rank", "0", "--master_addr", "worker-0", "--", "dpo", arg],
                  tmp_path)  # fmt: skip


def test_over_pdsh_the_environment_cwd_and_flag_values_must_be_plain(tmp_path, monkeypatch):
    hf = tmp_path / "hostfile"
    hf.write_text("worker-0 slots=1\nworker-1 slots=1\n")
    argv = ["--hostfile", str(hf), "--", "sft"]
    plain = tmp_path / "plain"
    plain.mkdir()
    monkeypatch.chdir(plain)
    monkeypatch.setenv("HOME", str(plain))  # no ~/.deepspeed_env of the machine running the tests
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    build_command(argv, tmp_path)  # all plain: accepted

    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "eth0;touch x")
    with pytest.raises(
        ValueError, match=r"environment variable NCCL_SOCKET_IFNAME 'eth0;touch x' contains ' ', ';'"
    ):
        build_command(argv, tmp_path)
    build_command(["--num_gpus", "1", "--", "sft"], tmp_path)  # one node: nothing is forwarded
    monkeypatch.delenv("NCCL_SOCKET_IFNAME")

    (plain / ".deepspeed_env").write_text("OMP_NUM_THREADS=4\nHF_HOME=$(reboot)\n")
    with pytest.raises(ValueError, match=r"\.deepspeed_env:2: value of HF_HOME '\$\(reboot\)' contains"):
        build_command(argv, tmp_path)
    (plain / ".deepspeed_env").write_text("OMP_NUM_THREADS=4\n")
    build_command(argv, tmp_path)

    with pytest.raises(ValueError, match=r"launcher argument 'v;touch x' contains ' ', ';'"):
        build_command(["--venv_script", "v;touch x", *argv], tmp_path)

    odd = tmp_path / "my runs"
    odd.mkdir()
    monkeypatch.chdir(odd)
    monkeypatch.setenv("HOME", str(odd))
    with pytest.raises(ValueError, match=r"working directory '.*my runs' contains ' '"):
        build_command(argv, tmp_path)
    # the MPI launchers take argv (no remote shell string), and --include of one host is one node
    build_command(["--launcher", "openmpi", *argv], tmp_path)
    build_command(["--include", "worker-1", *argv[:2], "--", "sft"], tmp_path)
