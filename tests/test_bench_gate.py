"""The benchmark regression gate (benchmarks/gate.py): per-CPU baselines, the cross-CPU rule for
a CPU without one, memory gated everywhere, and a 2x slowdown failing it."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import gate  # noqa: E402  (benchmarks/ is not a package)

COLUMNS = ("op", "backend", "mode", "shape", "dtype", "metric", "value", "device", "commit")
CASE = ("token_logprobs", "cpp", "fwd", "N=1024 V=32768", "fp32")
LIN = ("linear_logprobs", "cpp", "fwd+bwd", "N=512 H=576 V=32768", "fp32")
AMD, INTEL, OTHER = "AMD EPYC", "Intel(R) Xeon(R) Processor", "Some Other CPU @ 3.1GHz"


def write(path: Path, device: str, figures: dict, errors: dict | None = None) -> Path:
    """figures {(case..., metric): value}; eager rows are added so the CSV looks like a real run."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        w.writerow(("machine", "-", "-", "-", "-", "loadavg_1min_max", "1.0", device, "abc1234"))
        for (*case, metric), value in figures.items():
            w.writerow((*case, metric, f"{value:.6g}", device, "abc1234"))
            eager = (case[0], "eager", *case[2:])
            w.writerow((*eager, "peak_mem_mb", "200", device, "abc1234"))
        for case, msg in (errors or {}).items():
            w.writerow((*case, "error", msg, device, "abc1234"))
    return path


def figures(speedup: float, lin_speedup: float = 1.0, mem: float = 100.0, ratio: float = 0.6) -> dict:
    return {
        (*CASE, "speedup_vs_eager"): speedup,
        (*CASE, "peak_mem_mb"): 0.0,
        (*LIN, "speedup_vs_eager"): lin_speedup,
        (*LIN, "peak_mem_mb"): mem,
        (*LIN, "mem_ratio_vs_eager"): ratio,
    }


@pytest.fixture
def baselines(tmp_path: Path) -> Path:
    root = tmp_path / "baselines"
    write(root / gate.cpu_slug(AMD) / "ops_quick.csv", AMD, figures(12.5, 1.00, 115.0))
    write(root / gate.cpu_slug(INTEL) / "ops_quick.csv", INTEL, figures(7.9, 1.04, 126.0))
    return root


def run_gate(baselines: Path, current: Path, *extra: str) -> int:
    return gate.main(["--baseline", str(baselines), "--current", str(current), *extra])


def test_cpu_slug():
    assert gate.cpu_slug("Intel(R) Xeon(R) Platinum 8480+ @ 2.00GHz") == "intel-xeon-platinum-8480"
    assert gate.cpu_slug("AMD EPYC") == "amd-epyc"
    assert gate.cpu_slug("Intel(R) Xeon(R) Processor") == "intel-xeon-processor"
    assert gate.cpu_slug("???") == "unknown-cpu"


def test_own_cpu_baseline_is_used(baselines, tmp_path, capsys):
    # The Intel figure (7.9) is far below AMD's 12.5 * 0.7 = 8.75 (the failure that blocked CI):
    # with per-CPU baselines it is compared with Intel's own 7.9.
    cur = write(tmp_path / "cur.csv", INTEL, figures(7.5, 1.0, 126.0))
    assert run_gate(baselines, cur) == 0
    out = capsys.readouterr().out
    assert "has its own baseline" in out and "intel-xeon-processor/ops_quick.csv" in out
    assert "amd-epyc" not in out


@pytest.mark.parametrize("device", [AMD, INTEL])
def test_two_fold_slowdown_fails_on_a_cpu_with_a_baseline(baselines, tmp_path, device, capsys):
    base = gate.load(baselines / gate.cpu_slug(device) / "ops_quick.csv").figures
    slow = {k: (v / 2 if k[5] == "speedup_vs_eager" else v) for k, v in base.items() if k[1] != "eager"}
    assert run_gate(baselines, write(tmp_path / "cur.csv", device, slow)) == 1
    out = capsys.readouterr().out
    assert out.count("FAIL") >= 3  # both speed-ups and the summary line
    # ... and the same figures without the slowdown pass.
    same = {k: v for k, v in base.items() if k[1] != "eager"}
    assert run_gate(baselines, write(tmp_path / "cur2.csv", device, same)) == 0


def test_speedup_bound_is_30_percent_on_own_cpu(baselines, tmp_path):
    assert run_gate(baselines, write(tmp_path / "a.csv", AMD, figures(12.5 * 0.71, 1.0, 115.0))) == 0
    assert run_gate(baselines, write(tmp_path / "b.csv", AMD, figures(12.5 * 0.69, 1.0, 115.0))) == 1


def test_cpu_without_baseline_uses_cross_cpu_floor(baselines, tmp_path, capsys):
    # floor = min over CPUs * (1 - 0.5): token 7.9 * 0.5 = 3.95, linear 1.0 * 0.5 = 0.5.
    ok = write(tmp_path / "ok.csv", OTHER, figures(4.0, 0.51, 126.0))
    assert run_gate(baselines, ok) == 0
    out = capsys.readouterr().out
    assert "no baseline for this CPU" in out and "some-other-cpu" in out
    assert ">=3.950" in out  # the bound printed is the cross-CPU floor
    assert run_gate(baselines, write(tmp_path / "slow.csv", OTHER, figures(3.9, 0.51, 126.0))) == 1
    assert run_gate(baselines, write(tmp_path / "slow2.csv", OTHER, figures(4.0, 0.49, 126.0))) == 1
    # A 2x slowdown is caught there only for a CPU slower than every known one (documented).
    two_x = write(tmp_path / "2x.csv", OTHER, figures(7.8 / 2, 0.99 / 2, 126.0))
    assert run_gate(baselines, two_x) == 1


def test_memory_is_gated_on_every_cpu(baselines, tmp_path):
    # Own CPU: Intel's 126 MB * 1.1 + 8 = 146.6.
    assert run_gate(baselines, write(tmp_path / "a.csv", INTEL, figures(7.9, 1.04, 146.0))) == 0
    assert run_gate(baselines, write(tmp_path / "b.csv", INTEL, figures(7.9, 1.04, 147.0))) == 1
    # CPU without a baseline: the largest known (126 MB) with the same tolerance.
    assert run_gate(baselines, write(tmp_path / "c.csv", OTHER, figures(7.9, 1.04, 146.0))) == 0
    assert run_gate(baselines, write(tmp_path / "d.csv", OTHER, figures(7.9, 1.04, 147.0))) == 1
    # mem_ratio_vs_eager alone (peak_mem_mb is within its slack but the ratio is not).
    assert run_gate(baselines, write(tmp_path / "e.csv", INTEL, figures(7.9, 1.04, 126.0, 0.6799))) == 0
    assert run_gate(baselines, write(tmp_path / "f.csv", INTEL, figures(7.9, 1.04, 126.0, 0.6801))) == 1


def test_missing_figure_fails(baselines, tmp_path, capsys):
    figs = figures(7.9, 1.04, 126.0)
    del figs[(*LIN, "speedup_vs_eager")]
    cur = write(tmp_path / "cur.csv", INTEL, figs, errors={LIN: "cpp backend unavailable: no compiler"})
    assert run_gate(baselines, cur) == 1
    assert "missing: cpp backend unavailable" in capsys.readouterr().out


def test_explicit_baseline_file(baselines, tmp_path):
    amd = baselines / "amd-epyc" / "ops_quick.csv"
    # An explicit file applies the own-CPU rules whatever its device (the old behaviour).
    assert run_gate(amd, write(tmp_path / "cur.csv", INTEL, figures(7.9, 1.04, 115.0))) == 1
    assert run_gate(amd, write(tmp_path / "cur2.csv", INTEL, figures(9.0, 1.04, 115.0))) == 0


def test_suite_selects_the_file(baselines, tmp_path, capsys):
    cur = write(tmp_path / "cur.csv", INTEL, figures(7.9, 1.04, 126.0))
    assert run_gate(baselines, cur, "--suite", "losses_quick") == 1
    assert "no baselines" in capsys.readouterr().out


def test_bad_input_is_exit_2(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    assert gate.main(["--current", str(bad), "--baseline", str(bad)]) == 2
    assert gate.main(["--current", str(bad), "--metrics", "gflops"]) == 2


def test_repository_baselines_exist_for_both_suites():
    found_ops = gate.find_baselines(gate.DEFAULT_BASELINES, "ops_quick")
    found_losses = gate.find_baselines(gate.DEFAULT_BASELINES, "losses_quick")
    assert {"amd-epyc", "intel-xeon-processor"} <= set(found_ops)
    assert {"amd-epyc", "intel-xeon-processor"} <= set(found_losses)
    for path in (*found_ops.values(), *found_losses.values()):
        run = gate.load(path)
        assert len(run.devices) == 1 and gate.cpu_slug(run.device) == path.parent.name
        assert not run.errors, f"{path}: a baseline with failed cases leaves them ungated"


# --- benchmarks/benchlib.py: the machinery the scripts share -----------------------------------
import argparse  # noqa: E402
import textwrap  # noqa: E402

import benchlib  # noqa: E402


def test_csv_round_trip_through_the_gate_loader(tmp_path):
    results = [
        dict(
            op="o", backend="cpp", mode="fwd", shape="N=1", dtype="fp32", time_ms_median=2.0, peak_mem_mb=3.5
        ),
        dict(op="o", backend="torch", mode="fwd", shape="N=1", dtype="fp32", error="boom, with a comma"),
    ]
    path = tmp_path / "run.csv"
    benchlib.write_csv(
        path, results, [("machine", "-", "-", "-", "-", "loadavg_1min_max", 1.5)], "CPU X", "abc"
    )
    run = gate.load(path)
    assert run.figures[("o", "cpp", "fwd", "N=1", "fp32", "time_ms_median")] == 2.0
    assert run.errors == {("o", "torch", "fwd", "N=1", "fp32"): "boom, with a comma"}
    assert run.devices == {"CPU X"} and run.commits == {"abc"}


def test_case_process_returns_what_a_dying_child_printed(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import json, sys, time
            payload = json.loads(sys.argv[2])
            print({benchlib.RESULT_TAG!r} + json.dumps({{"n": payload["n"]}}), flush=True)
            if payload["how"] == "exit":
                print("bad things", file=sys.stderr)
                sys.exit(3)
            time.sleep(30)
            """
        )
    )
    printed, stderr, how = benchlib.run_case_process(script, {"n": 7, "how": "exit"}, 60, 1)
    assert printed == [{"n": 7}] and how == "exit status 3" and "bad things" in stderr
    printed, _, how = benchlib.run_case_process(script, {"n": 8, "how": "hang"}, 2, 1)
    assert printed == [{"n": 8}] and how == "timeout after 2 s"
    err = benchlib.died({"op": "x"}, "a\nb\nlast line", how)
    assert err["op"] == "x" and "timeout after 2 s" in err["error"] and "last line" in err["error"]


def test_write_baseline_keeps_the_selected_rows_and_checks_arguments(tmp_path, capsys):
    out = write(tmp_path / "run.csv", INTEL, figures(7.9, 1.0, 120.0))
    args = argparse.Namespace(write_baseline=str(tmp_path / "b" / "x.csv"), gate=None, inject_slowdown=1)
    keep = lambda row: row[1] != "eager"
    assert benchlib.baseline_and_gate(args, out, INTEL, "ops_quick", 0, keep_row=keep) == 0
    rows = (tmp_path / "b" / "x.csv").read_text().splitlines()
    assert rows[0].startswith("op,backend") and rows[1:] and not any(",eager," in r for r in rows)
    bad = argparse.Namespace(write_baseline="", inject_slowdown=2)
    assert "would record the slowdown" in benchlib.check_baseline_args(bad)
    assert "integer >= 1" in benchlib.check_baseline_args(
        argparse.Namespace(write_baseline=None, inject_slowdown=0)
    )
