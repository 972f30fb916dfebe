"""Divergence is caught at the step, and never saved.

Per optimizer step the guard checks, in one host sync, that the step's loss and gradient norm
are finite and that the weights it produced are finite and did not jump (parameter norm more than
JUMP times the previous step's: lr 1e12 gives 1e14 after one step, ordinary training changes the
norm by well under 1 % per step). The weights of step k are checked together with step k+1's loss
and gradient norm, and before every checkpoint and export, so nothing non-finite or exploded is
ever written. A failure raises DivergenceError naming the step, the first bad quantity and the
last checkpoint, which holds good weights by construction.

Under ZeRO every rank contributes its shard of the norms and its loss flag to one all-reduce, so
all ranks stop at the same step instead of waiting for a collective timeout.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist

from fastalign.errors import DivergenceError
from fastalign.trainers.runtime import Runtime, Trainable

JUMP = 10.0


def _shard(p: torch.Tensor) -> torch.Tensor:
    return p.ds_tensor if hasattr(p, "ds_tensor") else p  # ZeRO-3: this rank's partition


class DivergenceGuard:
    def __init__(self, name: str, rt: Runtime, trainables: Sequence[Trainable], last_good) -> None:
        """`last_good()`: the newest checkpoint folder, or None (for the message)."""
        self.name, self.rt, self.last_good = name, rt, last_good
        self.params = [_shard(p) for t in trainables for p in t.model.parameters() if p.requires_grad]
        self._pending: torch.Tensor | None = None  # sum of squares of the weights after the last step
        self._norm: float | None = None  # parameter norm after the last checked step
        self._pending_step = 0

    @torch.no_grad()
    def _sumsq(self) -> torch.Tensor:
        ps = [p for p in self.params if p.numel()]
        if not ps:
            return torch.zeros((), dtype=torch.float64)
        return torch.stack([n.double() for n in torch._foreach_norm(ps)]).square().sum().cpu()

    def weights_updated(self, step: int) -> None:
        """After an optimizer step: the weights' norm, checked at the next check (no sync here)."""
        self._pending, self._pending_step = self._sumsq(), step

    def check(
        self, step: int, loss: torch.Tensor | float | None = None, grad_norm: float | None = None
    ) -> None:
        """One sync: the loss and gradient norm of `step` and the weights of the last update."""
        vals = torch.tensor(
            [
                float("nan") if loss is None else 0.0,
                0.0 if grad_norm is None else float(grad_norm),
                -1.0,
            ],
            dtype=torch.float64,
        )
        if loss is not None:
            vals[0] = torch.as_tensor(loss, dtype=torch.float64).detach().cpu()
        if self._pending is not None:
            vals[2] = self._pending
        if self.rt.distributed:
            flags = torch.stack([vals[0].isfinite().double(), vals[1].isfinite().double()])
            summed = torch.cat([flags, vals[2:].clamp(min=0)])
            dist.all_reduce(summed)
            world = float(self.rt.world)
            loss_ok, grad_ok = bool(summed[0] == world), bool(summed[1] == world)
            sumsq = float(summed[2]) if self._pending is not None else None
        else:
            loss_ok, grad_ok = bool(torch.isfinite(vals[0])), bool(torch.isfinite(vals[1]))
            sumsq = float(vals[2]) if self._pending is not None else None
        if loss is None:
            loss_ok = True
        if sumsq is not None:
            norm = math.sqrt(sumsq) if math.isfinite(sumsq) else float("inf")
            if not math.isfinite(norm):
                self._fail(self._pending_step, "the weights are not finite after the optimizer step")
            if self._norm is not None and self._norm > 0 and norm > JUMP * self._norm:
                self._fail(
                    self._pending_step,
                    f"the parameter norm jumped from {self._norm:.4g} to {norm:.4g} in one optimizer step "
                    f"(more than {JUMP:g}x: the update exploded)",
                )
            self._norm, self._pending = norm, None
        if not loss_ok:
            self._fail(step, f"the loss is {float(vals[0])}")
        if not grad_ok:
            self._fail(step, f"the gradient norm is {float(vals[1])}")

    def start(self) -> None:
        """The norm of the starting weights (loaded or resumed): the reference for the first jump."""
        self.weights_updated(0)
        self.check(0)

    def _fail(self, step: int, what: str) -> None:
        good = self.last_good()
        where = (
            f"the last good checkpoint is {good} (run the same command again to resume from it, after "
            "fixing the cause, e.g. a lower train.lr; the resumed run replays the same batches)"
            if good is not None
            else "no checkpoint was written (set train.save_every to keep good ones)"
        )
        raise DivergenceError(
            f"[{self.name}] training diverged at step {step}: {what}. Nothing from this step was saved; "
            f"{where}."
        )
