"""The recipe registry: command name -> config class, build function and driver.

The CLI (`fastalign <name>`), `fastalign launch` and tests run a recipe through `run_recipe`; there
is no discovery by module name. Offline recipes build a `Task` for the gradient-step driver
(`trainers/loop.py`); online recipes build a `RolloutAlgo` for the rollout driver
(`trainers/rollout_loop.py`). Both drivers run on the same `RunSession`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastalign.config import RECIPES as CONFIGS
from fastalign.trainers import dpo, grpo, kto, loop, online_dpo, ppo, rm, rollout_loop, sft
from fastalign.trainers.session import RunResult, RunSession


@dataclass(frozen=True)
class Recipe:
    name: str
    config: type
    build: Callable[[Any], Any]  # cfg -> Task | RolloutAlgo
    driver: Callable[[Any, Any, RunSession], RunResult]  # (cfg, built, session) -> result

    @property
    def help(self) -> str:
        return self.config.help

    def run(self, cfg) -> RunResult:
        """Open the run (lock, resume check: before any model is loaded), build, train."""
        session = RunSession(cfg, self.name).open()
        try:
            built = self.build(cfg)
        except BaseException:
            session.close()
            raise
        session.name = built.name
        return self.driver(cfg, built, session)


REGISTRY: dict[str, Recipe] = {
    name: Recipe(name, CONFIGS[name], build, driver)
    for name, build, driver in (
        ("sft", sft.build, loop.run),
        ("rm", rm.build, loop.run),
        ("dpo", dpo.build, loop.run),
        ("kto", kto.build, loop.run),
        ("ppo", ppo.build, rollout_loop.run),
        ("grpo", grpo.build, rollout_loop.run),
        ("online-dpo", online_dpo.build, rollout_loop.run),
    )
}
assert set(REGISTRY) == set(CONFIGS), "every config recipe needs a registry entry"
