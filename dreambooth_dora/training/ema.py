"""An exponential moving average of the adapter parameters (`--use_ema`).

After optimiser step k (k = 1, 2, ...): `ema = d_k * ema + (1 - d_k) * param`, in fp32, with
`d_k = min(ema_decay, k / (9 + k))`: diffusers' `EMAModel` schedule, which lets the average follow
the first steps instead of staying near the initial weights (a DreamBooth run is short). The saved
adapter and the validation images use the averaged weights; checkpoints keep the raw ones and the
average (through accelerate's `register_for_checkpointing`), so a resumed run equals an
uninterrupted one.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


class AdapterEMA:
    def __init__(self, params: list[torch.nn.Parameter], decay: float):
        self.params, self.decay, self.steps = list(params), float(decay), 0
        self.shadow = [p.detach().float().clone() for p in self.params]

    def current_decay(self) -> float:
        return min(self.decay, self.steps / (9 + self.steps))

    @torch.no_grad()
    def update(self) -> None:
        self.steps += 1
        d = self.current_decay()
        for s, p in zip(self.shadow, self.params):
            s.mul_(d).add_(p.detach().float(), alpha=1 - d)

    @contextmanager
    def applied(self):
        """The averaged weights in the model for the block; the raw ones back afterwards."""
        raw = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, s in zip(self.params, self.shadow):
                p.copy_(s.to(p.dtype))  # an in-place copy: DoRA's cached norms see the change
        try:
            yield
        finally:
            with torch.no_grad():
                for p, r in zip(self.params, raw):
                    p.copy_(r)

    def state_dict(self) -> dict:
        return {"steps": self.steps, "shadow": [s.clone() for s in self.shadow]}

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state["steps"])
        for s, saved in zip(self.shadow, state["shadow"]):
            s.copy_(saved)
