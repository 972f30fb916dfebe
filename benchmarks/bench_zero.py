"""ZeRO-3 benchmark: per-rank memory of model states and time per step at 1 and 2 ranks (CPU, gloo).

A Llama of a few million parameters (transformers.LlamaConfig, fp32, built inside
`deepspeed.zero.Init` so no rank ever holds the whole model) is trained with DeepSpeed ZeRO
stage 3 and torch AdamW on random tokens. Each configuration is one `torchrun` launch of this
file (`--worker`); every rank writes a JSON, the parent prints a table and writes a CSV.

What is counted as "model states", per rank (DeepSpeed 0.19, `runtime/zero/stage3.py` and
`partition_parameters.py`; the optimizer is `engine.optimizer`, a `DeepSpeedZeroOptimizer_Stage3`):

- params: the rank's parameter partition, `sum(p.ds_tensor.numel() * itemsize)`. ZeRO-3 replaces
  every `p.data` by an empty tensor and keeps the rank's slice in `p.ds_tensor` (padded to
  `ceil(numel / world)`); the slices are views into one flat buffer, `optimizer.lp_param_buffer`.
- persistent: full copies that stay resident on every rank outside a forward. Parameters with
  fewer elements than `stage3_param_persistence_threshold` (DeepSpeed default 1e5: here the
  norms and the 256x256 attention projections) are never released after being gathered;
  measured as `p.data` of the parameters still gathered after the last step, when it is not
  the storage of `ds_tensor` itself (at 1 rank it is: nothing extra).
- master: the fp32 master partition, `optimizer.fp32_partitioned_groups_flat`, counted when its
  storage is not the lp buffer's. stage3.py `_create_fp32_partitions` means to reuse the lp
  buffer when its dtype and device already match, but it compares `tensor.device == self.device`
  with `self.device` a string ('cpu'), and `torch.device('cpu') == 'cpu'` is False in torch 2.13,
  so even an fp32 run gets a second fp32 copy of the partition: it is real memory and counts.
- grads: the rank's gradient partition, `optimizer.grad_partitions_flat_buffer` (a persistent
  flat buffer of `sum(p.partition_numel())` elements; each reduce-scatter writes the rank's
  slice there). The step's transient flattened copy (`_prepare_fp32_grad_for_sub_group`) and
  the reduce bucket (`reduce_bucket_size`) are working memory, not counted.
- optim: every tensor in the wrapped torch optimizer's `optimizer.optimizer.state`, which is
  keyed by the flat fp32 partitions: AdamW's `exp_avg` and `exp_avg_sq` (and its `step`).

The target (issue 5 section 4) is total(2 ranks) / total(1 rank) <= 0.6 per rank. VmHWM, the
process's peak RSS, is reported for reference: it also holds activations, the reduce bucket,
gathered parameters, libraries and the gloo/shm buffers, none of which ZeRO partitions; "RSS
base" is VmRSS after the imports and the process group, before the model is built.

Time per step is the median over `--steps` steps after `--warmup` (forward, backward, step) of
the slowest rank, at a fixed global batch (`--batch` sequences of `--seq` tokens, split over the
ranks, so both configurations do the same training step). With other jobs on the machine,
absolute times swing, so runs alternate 1, 2 / 2, 1 ranks (`--rounds`, 4) and the reported figure is
the median over rounds of the ratio t(2 ranks) / t(1 rank) measured in the same round.

    .venv/bin/python benchmarks/bench_zero.py --out benchmarks/results/zero-cpu-DATE.csv
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MB = 2**20
STATES = ("params", "persistent", "master", "grads", "optim")


def _proc_status_mb() -> dict[str, float]:
    """VmRSS and VmHWM (peak RSS) of this process, MiB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(rest.split()[0]) / 1024
    return out


def _nbytes(t) -> int:
    return t.numel() * t.element_size()


def model_state_bytes(engine) -> dict[str, int]:
    """Bytes of this rank's model states under ZeRO-3 (see the module docstring for what counts)."""
    import torch

    opt = engine.optimizer
    params = list(engine.module.parameters())

    def ptr(p) -> int:
        return p.ds_tensor.untyped_storage().data_ptr()

    lp_ptr = opt.lp_param_buffer.untyped_storage().data_ptr()
    master = sum(
        _nbytes(t) for t in opt.fp32_partitioned_groups_flat if t.untyped_storage().data_ptr() != lp_ptr
    )
    seen, optim = set(), 0
    for state in opt.optimizer.state.values():
        for v in state.values():
            if torch.is_tensor(v) and v.data_ptr() not in seen:
                seen.add(v.data_ptr())
                optim += _nbytes(v)
    return {
        "params": sum(_nbytes(p.ds_tensor) for p in params),
        # at 1 rank a persistent parameter's data *is* its ds_tensor: count only separate copies
        "persistent": sum(_nbytes(p.data) for p in params if p.data.untyped_storage().data_ptr() != ptr(p)),
        "master": master,
        "grads": _nbytes(opt.grad_partitions_flat_buffer),
        "optim": optim,
    }


def worker(args: argparse.Namespace) -> None:
    """One rank of a torchrun launch: build, train, measure, write `<json-dir>/rank<r>.json`."""
    import deepspeed
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    rss_base = _proc_status_mb()["VmRSS"]  # libraries + process group, before any model state
    if args.batch % world:
        raise ValueError(f"--batch {args.batch} is not divisible by the {world} ranks")
    micro = args.batch // world
    ds_config = {
        "train_batch_size": args.batch,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    cfg = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=args.seq,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)  # same initial weights on every rank and at every world size
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = LlamaForCausalLM(cfg)
    n_params = sum(p.ds_numel for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)

    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, args.vocab, (args.warmup + args.steps, args.batch, args.seq), generator=gen)
    times, losses = [], []
    for step in range(args.warmup + args.steps):
        ids = tokens[step, rank * micro : (rank + 1) * micro]  # (micro, T): this rank's rows
        t0 = time.perf_counter()
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())

    states = model_state_bytes(engine)
    persistent_params = sum(1 for p in model.parameters() if p.data.numel() > 0)
    out = {
        "rank": rank,
        "world": world,
        "n_params": n_params,
        "n_param_tensors": sum(1 for _ in model.parameters()),
        "persistent_param_tensors": persistent_params,
        "micro_batch": micro,
        "step_s": times[args.warmup :],
        "losses": losses,
        "states_mb": {k: v / MB for k, v in states.items()},
        "total_mb": sum(states.values()) / MB,
        "rss_base_mb": rss_base,
        **{f"{k}_mb": v for k, v in _proc_status_mb().items()},
    }
    Path(args.json_dir, f"rank{rank}.json").write_text(json.dumps(out))
    torch.distributed.barrier()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc: int, args: argparse.Namespace, json_dir: Path) -> list[dict]:
    """Run this file under torchrun with `nproc` ranks; return the ranks' JSONs (rank order)."""
    json_dir.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": str(args.threads),
        "HF_HUB_OFFLINE": "1",
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", args.extensions_dir),
    }
    keys = ("vocab", "hidden", "intermediate", "layers", "heads", "seq", "batch", "steps", "warmup")
    passthrough = [f"--{k}={getattr(args, k)}" for k in keys]
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
        "--master_addr=127.0.0.1", f"--master_port={_free_port()}", __file__,
        "--worker", f"--json-dir={json_dir}", *passthrough,
    ]  # fmt: skip
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    wall = time.perf_counter() - t
    if proc.returncode:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise RuntimeError(f"torchrun with {nproc} ranks exited with status {proc.returncode}")
    res = [json.loads((json_dir / f"rank{r}.json").read_text()) for r in range(nproc)]
    for r in res:
        r["wall_s"] = wall
    return res


def summarize(res: list[dict]) -> dict:
    """Step time of one run: per step the slowest rank, then the median over steps."""
    per_step = [max(r["step_s"][i] for r in res) for i in range(len(res[0]["step_s"]))]
    losses = [statistics.fmean(r["losses"][i] for r in res) for i in range(len(res[0]["losses"]))]
    return {"median_step_s": statistics.median(per_step), "losses": losses}


def print_memory(first: dict[int, list[dict]], args: argparse.Namespace) -> float:
    """Table of model states per rank; returns the worst 2-rank / 1-rank ratio of the totals."""
    ref = first[1][0]
    print(
        f"\nLlama {ref['n_params'] / 1e6:.2f}M params fp32 (V={args.vocab} H={args.hidden} L={args.layers}), "
        f"ZeRO-3 + torch AdamW, gloo, OMP_NUM_THREADS={args.threads}, global batch {args.batch}x{args.seq}"
    )
    print("model states per rank, MiB (params = ds_tensor partition; see the docstring):")
    head = f"{'ranks':>5} {'rank':>4} " + " ".join(f"{k:>10}" for k in STATES)
    print(head + f" {'total':>8} {'x 1-rank':>8} {'VmHWM':>8} {'RSS base':>8}")
    for n in (1, 2):
        for r in first[n]:
            cells = " ".join(f"{r['states_mb'][k]:10.2f}" for k in STATES)
            ratio = r["total_mb"] / ref["total_mb"]
            rss = f"{r['VmHWM_mb']:8.1f} {r['rss_base_mb']:8.1f}"
            print(f"{n:5d} {r['rank']:4d} {cells} {r['total_mb']:8.2f} {ratio:8.3f} {rss}")
    worst = max(r["total_mb"] for r in first[2]) / ref["total_mb"]
    verdict = "PASS" if worst <= 0.6 else "FAIL"
    print(f"target: total per rank at 2 ranks <= 0.6x 1 rank: {worst:.3f}x -> {verdict}")
    return worst


def csv_rows(runs: list[tuple[int, int, list[dict]]], ref_total: float) -> list[dict]:
    """Long-format rows (round, ranks, rank, metric, value), one per figure of every rank of every run."""
    rows = []
    for rnd, n, res in runs:
        med = summarize(res)["median_step_s"]
        for r in res:
            figs = {f"{k}_mb": v for k, v in r["states_mb"].items()}
            figs |= {"total_mb": r["total_mb"], "total_ratio_vs_1rank": r["total_mb"] / ref_total}
            figs |= {"vmhwm_mb": r["VmHWM_mb"], "vmrss_end_mb": r["VmRSS_mb"]}
            figs |= {"rss_base_mb": r["rss_base_mb"], "median_step_s": med}
            figs |= {"rank_median_step_s": statistics.median(r["step_s"]), "n_params": r["n_params"]}
            figs |= {"loadavg_1min": r["loadavg_1min"]}
            base = {"round": rnd, "ranks": n, "rank": r["rank"]}
            rows += [{**base, "metric": k, "value": round(v, 4)} for k, v in figs.items()]
    return rows


def print_times(runs: list[tuple[int, int, list[dict]]], rounds: int) -> list[dict]:
    """Paired step-time ratios t(2 ranks) / t(1 rank), one per round; returns their CSV rows."""
    print("\ntime per step (median over steps of the slowest rank, s), paired by round:")
    rows, ratios = [], []
    for rnd in range(rounds):
        t = {n: summarize(res)["median_step_s"] for rr, n, res in runs if rr == rnd}
        ratios.append(t[2] / t[1])
        print(f"  round {rnd}: 1 rank {t[1]:.3f}  2 ranks {t[2]:.3f}  ratio 2/1 {ratios[-1]:.3f}")
        rows.append({"round": rnd, "ranks": "2/1", "metric": "step_time_ratio", "value": ratios[-1]})
    med = statistics.median(ratios)
    rows.append({"round": "median", "ranks": "2/1", "metric": "step_time_ratio", "value": med})
    for r in rows:
        r["value"] = round(r["value"], 4)
    print(f"  median ratio t(2 ranks) / t(1 rank): {med:.3f} (speedup {1 / med:.2f}x)")
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--json-dir", help=argparse.SUPPRESS)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=688)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=4, help="global batch (sequences per step, split over ranks)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=4, help="rounds of (1 rank, 2 ranks), order alternating")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS per rank")
    p.add_argument("--timeout", type=float, default=300, help="seconds per torchrun launch")
    p.add_argument("--extensions-dir", default=str(Path(sys.prefix) / "torch_extensions_ds"))
    p.add_argument("--out", default="benchmarks/results/local/zero.csv", help="CSV to write")
    args = p.parse_args()
    if args.worker:
        worker(args)
        return 0

    tmp = Path(tempfile.mkdtemp(prefix="fastalign-bench-zero-"))
    runs: list[tuple[int, int, list[dict]]] = []  # (round, ranks, per-rank results)
    for rnd in range(args.rounds):
        for n in (1, 2) if rnd % 2 == 0 else (2, 1):
            load = os.getloadavg()[0]
            res = launch(n, args, tmp / f"r{rnd}-n{n}")
            for r in res:
                r["loadavg_1min"] = load
            runs.append((rnd, n, res))
            med = summarize(res)["median_step_s"]
            wall = res[0]["wall_s"]
            print(f"round {rnd}, {n} rank(s): median step {med:.3f} s, load {load:.2f}, launch {wall:.1f} s")

    first = {n: res for _, n, res in reversed(runs)}  # memory is deterministic: the first run's figures
    print_memory(first, args)
    rows = csv_rows(runs, first[1][0]["total_mb"])
    rows += print_times(runs, args.rounds)
    l1, l2 = summarize(first[1])["losses"], summarize(first[2])["losses"]
    dl = max(abs(a - b) for a, b in zip(l1, l2, strict=True))
    print(f"loss, 1 vs 2 ranks (mean over ranks), max |diff| over {len(l1)} steps: {dl:.2e}")
    rows.append({"round": "", "ranks": "2/1", "metric": "max_loss_diff", "value": dl})

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["round", "ranks", "rank", "metric", "value"], restval="")
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
