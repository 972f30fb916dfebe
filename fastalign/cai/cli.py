"""Driver of `fastalign cai revise|label`: config, resumable outputs, batches, progress.

Run folder (`output_dir`):
- `trace.jsonl`: one line per finished prompt, appended with flush + fsync. It is the source of
  truth: on restart a torn last line (a kill mid-write) is cut off, its prompts count as done
  (keyed by index + text hash), and only the others are run.
- `sft.jsonl` (revise) / `pairs.jsonl` (label): the training rows, appended per prompt right
  after its trace line and rebuilt from the traces (atomically) on restart, so a kill between the
  two writes loses nothing.
- `cai_config.yaml` + `cai_inputs.json` (sha256 of the prompt / response / few-shot /
  constitution files): a restart with a different config or changed inputs is an error naming
  what changed, unless `resume=false` (which deletes the run's earlier outputs and starts over).

Batches are fixed slices of the prompt list (prompt i in batch i // generation.batch_size); a
batch with any unfinished prompt runs whole (same batch mates, same seeds: same tokens) and only
its unfinished prompts are written, so resumed output equals an uninterrupted run's.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import sys
import time
from pathlib import Path

import yaml

from fastalign.cai.config import CAI_RECIPES, RESUME_FREE_KEYS
from fastalign.cai.constitution import load_constitution
from fastalign.config import config_to_dict, load_config
from fastalign.files import describe_missing

TRACE, CONFIG, INPUTS = "trace.jsonl", "cai_config.yaml", "cai_inputs.json"


def _sha256(path: str) -> str:
    if not Path(path).is_file():
        raise FileNotFoundError(f"input file not found: {describe_missing(path)}")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _identity(cfg) -> dict:

    return {k: v for k, v in config_to_dict(cfg).items() if k not in RESUME_FREE_KEYS}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_traces(path: Path) -> list[dict]:
    """The complete trace lines of `path`. A torn last line (no newline, or garbled: a kill
    mid-write) is cut off the file; a garbled line before the end is an error."""
    if not path.exists():
        return []
    data = path.read_bytes()
    traces, pos = [], 0
    for n, raw in enumerate(data.splitlines(keepends=True), start=1):
        last = pos + len(raw) == len(data)
        try:
            record = json.loads(raw) if raw.strip() else None
        except json.JSONDecodeError as e:
            if not last:
                raise ValueError(
                    f"{path}:{n}: corrupt trace line ({e.msg}); fix it, or resume=false"
                ) from None
            record = None
        if last and not raw.endswith(b"\n"):
            break  # torn: the prompt is run again
        if record is not None:
            traces.append(record)
        pos += len(raw)
    if pos < len(data):
        with open(path, "rb+") as f:
            f.truncate(pos)
            f.flush()
            os.fsync(f.fileno())
    return traces


def open_run(out: Path, cfg, inputs: list[str], output: str) -> list[dict]:
    """Check a resumed run against the saved config and inputs (or clear it), save both, and
    return the finished traces."""
    hashes = {p: _sha256(p) for p in inputs}
    names = (TRACE, output, CONFIG, INPUTS)
    if not cfg.resume:
        for name in names:
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    traces = read_traces(out / TRACE)
    if traces and (out / CONFIG).exists():  # a run that wrote nothing yet may change freely
        saved = _flat(yaml.safe_load((out / CONFIG).read_text(encoding="utf-8")) or {})
        now = _flat(_identity(cfg))
        diff = [
            f"{k}: {saved.get(k)!r} -> {now.get(k)!r}"
            for k in sorted(set(saved) | set(now))
            if saved.get(k) != now.get(k)
        ]
        if diff:
            raise ValueError(
                f"{out} holds a run with another config ({'; '.join(diff)}); use another output_dir, or "
                "resume=false to delete its rows and start over"
            )
        old = json.loads((out / INPUTS).read_text(encoding="utf-8")) if (out / INPUTS).exists() else {}
        changed = [p for p in sorted(set(old) | set(hashes)) if old.get(p) != hashes.get(p)]
        if changed:
            raise ValueError(
                f"{out}: input file(s) changed since this run started: {', '.join(changed)}; use another "
                "output_dir, or resume=false to delete its rows and start over"
            )

    _atomic_write(out / CONFIG, yaml.safe_dump(_identity(cfg), sort_keys=False))
    _atomic_write(out / INPUTS, json.dumps(hashes, indent=1))
    return traces


def _jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


class _Appender:
    """Appends JSON lines with flush + fsync per call (a kill loses at most the line being written)."""

    def __init__(self, path: Path):
        self.f = open(path, "a", encoding="utf-8")

    def write(self, records: list[dict]) -> None:
        if not records:
            return
        self.f.write(_jsonl(records))
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self) -> None:
        self.f.close()


def _progress(cfg, total: int, done: int, desc: str):
    if not (cfg.progress and sys.stderr.isatty()) and os.environ.get("FASTALIGN_PROGRESS") != "1":
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, desc=desc, unit="prompt", dynamic_ncols=True)


def execute(step: str, cfg) -> dict:
    """Run `step` ("revise" | "label") for a loaded config; returns a summary dict."""

    job = importlib.import_module(f"fastalign.cai.{step}")
    out = Path(cfg.output_dir)
    items = job.load_items(cfg)
    load_constitution(cfg.constitution)  # bad inputs fail here, before any model is loaded
    traces = open_run(out, cfg, job.input_files(cfg), job.OUTPUT)
    keys = {it.key for it in items}
    stale = [t["key"] for t in traces if t.get("key") not in keys]
    if stale:
        raise ValueError(
            f"{out / TRACE}: rows for prompts not in the input ({stale[:3]}); resume=false to start over"
        )
    done = {t["key"] for t in traces}
    bs = cfg.generation.batch_size
    batches = [items[i : i + bs] for i in range(0, len(items), bs)]
    todo = [b for b, batch in enumerate(batches) if any(it.key not in done for it in batch)]
    summary = {
        "prompts": len(items),
        "resumed": len(done),
        "written": 0,
        "seconds": 0.0,
        "output_dir": str(out),
    }
    data_path = out / job.OUTPUT  # rebuilt from the traces: a kill between the two appends loses nothing
    _atomic_write(data_path, "".join(_jsonl(job.rows(t)) for t in traces))
    if not todo:
        return summary
    t0 = time.perf_counter()
    run_batch = job.make_runner(cfg)
    trace_out, data_out = _Appender(out / TRACE), _Appender(data_path)
    bar = _progress(cfg, len(items), len(done), f"cai {step}")
    try:
        for b in todo:
            for t in run_batch(b, batches[b]):
                if t["key"] in done:
                    continue
                trace_out.write([t])
                data_out.write(job.rows(t))
                done.add(t["key"])
                summary["written"] += 1
                if bar is not None:
                    bar.update(1)
                if cfg.stop_after is not None and summary["written"] >= cfg.stop_after:
                    return summary
    finally:
        trace_out.close()
        data_out.close()
        if bar is not None:
            bar.close()
        summary["seconds"] = time.perf_counter() - t0
    return summary


def run(step: str, config: str | None, overrides: list[str], print_only: bool = False) -> dict | None:
    """`fastalign cai <step> --config X [key=value ...] [--print-config]`."""

    if step not in CAI_RECIPES:
        raise ValueError(f"cai step must be one of {', '.join(CAI_RECIPES)}, got {step!r}")
    cfg = load_config(CAI_RECIPES[step], config, list(overrides))
    if print_only:
        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        return None
    s = execute(step, cfg)
    out = Path(s["output_dir"])
    output = importlib.import_module(f"fastalign.cai.{step}").OUTPUT
    print(
        f"[cai {step}] {s['written']} prompts written in {s['seconds']:.1f} s ({s['resumed']} done before, "
        f"{s['prompts']} in all); rows: {out / output}; traces: {out / TRACE}"
    )
    return s
