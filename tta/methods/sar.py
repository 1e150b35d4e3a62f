"""SAR: sharpness-aware and reliable entropy minimisation (Niu et al., ICLR 2023).

Paper: "Towards Stable Test-Time Adaptation in Dynamic Wild World", https://arxiv.org/abs/2302.12400.
Official code: https://github.com/mr-eggplant/SAR (``sar.py``, ``sam.py``, ``main.py``); docs/methods/sar.md.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from ..objectives import shannon_entropy, weighted_mean
from ..objectives.sam import SAMPerturbation
from ..objectives.update import select_
from ..policies import EntropyMargin, Policy
from .batch import BatchMethod
from .registry import register


@register("sar")
class SAR(BatchMethod):
    """SAR (Niu et al., ICLR 2023; mr-eggplant/SAR ``forward_and_adapt_sar``).

    Per batch:

    1. forward ``z = f(x; theta)``; ``S1 = {H < e_margin * ln C}`` (strict; 0.4 ln C), intersected
       with any extra policy; ``L1 = mean_S1 H``; backward;
    2. SAM ascent (``rho`` 0.05, non-adaptive): ``e = rho g / (||g|| + 1e-12)``, global norm;
       ``theta <- theta + e``;
    3. second forward on the **full batch** at ``theta + e`` (so BatchNorm sees every sample, as
       SAR's code; DeYO's copy forwards ``x[S1]`` only); ``S2 = S1 and {H' < e_margin * ln C}``;
       ``L2 = mean_S2 H'`` (extra policies' weights, if any, apply to both losses);
    4. EMA of ``L2`` (0.9) when ``S2`` is non-empty and ``L2`` finite;
    5. backward ``L2``, restore ``theta``, SGD step (momentum 0.9) with the gradient at ``theta + e``;
    6. recovery: if ``ema < reset_constant`` (0.2, hard-coded in SAR's code) reset the model and the
       optimizer, on the device (an exact select of the initial state, no host sync);
    7. return the first forward's logits.

    Defaults and decisions (all as the official code unless an option is set):

    * parameters: preset ``sar`` (norm affine without ``layer4``, ``blocks.9-11``, final ``norm``);
      lr by SAR's rule (2.5e-4 ResNet bs >= 32, 1e-3 ViT at bs 64), doubled at bs 1
      (``double_lr_at_bs1``, SAR commit a266f7d).
    * empty ``S1``/``S2``: the official second SGD step still runs with a zero gradient, so the
      momentum keeps moving the weights; kept (``step_on_empty=True``, counted in
      ``empty_selection_steps``). ``step_on_empty=False`` skips the update when ``S2`` is empty; with
      it, an empty ``S1`` known on the host (``skip_empty``, :class:`~tta.methods.batch.BatchMethod`)
      also skips the ascent, the second forward and both backwards, with the same result.
    * after a recovery the official code keeps the EMA value (``SAR.forward`` assigns the returned
      ``ema`` after ``reset()`` cleared it), so the model keeps being reset until the EMA climbs
      back above 0.2; kept (docs/methods/sar.md, step 7: the code keeps it).
      ``clear_ema_on_recovery=True`` clears it.
    * a recovery restores the weights but **not** the SGD momentum: SAR's ``reset()`` loads the
      state dict of its SAM wrapper, which does not hold the base SGD's momentum buffers (checked
      with a wrapper built the same way on torch 2.14); kept. ``reset_momentum_on_recovery=True``
      also zeroes the momentum (a fresh optimizer). ``reset()`` (a new domain) clears the EMA, as SAR's
      ``main.py`` builds a fresh model per corruption.
    * ``recovery=False`` turns model recovery off.
    * selection diagnostics (run.json ``selection``): ``S2`` is the stage ``entropy_margin_sam``, after
      ``entropy_margin`` (``S1``); correctness is judged on the first forward's prediction (the one reported).
    * the EMA is a float32 device buffer (the official one is a Python float, i.e. float64): the
      values agree to ~1e-7 relative, which only matters for an EMA within that of 0.2.
    * ``episodic=True`` calls :meth:`reset` before each batch, which also clears the SGD momentum
      (the official ``SAR.reset()`` keeps it, as for recoveries); SAR's experiments never use it.
    """

    paper = "Niu et al., ICLR 2023 (mr-eggplant/SAR)"
    #: its own step (not the family's default): no sample memory to train from (tta.methods.memory_step)
    provides = frozenset({"source", "model"})
    default_params = "sar"
    double_lr_at_bs1 = True

    def __init__(self, model, *, e_margin: float = 0.4, rho: float = 0.05, adaptive: bool = False,
                 reset_constant: float = 0.2, ema_momentum: float = 0.9, recovery: bool = True,
                 step_on_empty: bool = True, clear_ema_on_recovery: bool = False,
                 reset_momentum_on_recovery: bool = False, **kwargs: Any):
        super().__init__(model, **kwargs)
        self.e_margin, self.rho, self.adaptive = float(e_margin), float(rho), bool(adaptive)
        self.reset_constant, self.ema_momentum, self.recovery = float(reset_constant), float(ema_momentum), bool(recovery)
        self.step_on_empty, self.clear_ema_on_recovery = bool(step_on_empty), bool(clear_ema_on_recovery)
        self.reset_momentum_on_recovery = bool(reset_momentum_on_recovery)
        params = self.adapted_parameters()
        self.sam = SAMPerturbation(params, rho=self.rho, adaptive=self.adaptive)
        for i, p in enumerate(params):
            self.register_buffer(f"initial_{i}", p.detach().clone(), persistent=False)
        self.register_buffer("ema", torch.zeros(()))
        self.register_buffer("ema_exists", torch.zeros((), dtype=torch.bool))
        for name in ("recoveries", "empty_selection_steps", "second_kept"):
            self.counters.add(name, 0)

    def default_policies(self) -> list[Policy]:
        return [EntropyMargin(fraction=self.e_margin)]

    @property
    def requires_nonempty(self) -> bool:  # type: ignore[override]
        return not self.step_on_empty

    def margin(self) -> float:
        return self.e_margin * math.log(self.num_classes)

    def reset_state(self) -> None:
        self.ema.zero_()
        self.ema_exists.fill_(False)

    def adapt(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.run_model(x)
        ctx = self.context(x, logits)
        weights = self.select(ctx)
        if self.requires_nonempty and self.empty_selection(weights):  # S1 empty, so S2 too: no update
            self.last_selection["entropy_margin_sam"] = torch.zeros_like(weights, dtype=torch.bool)
            self.counters.add("forwards", 2)
            self.skip_step(weights, backwards=2)
            if self.recovery:
                self._recover(self.ema_exists & (self.ema < self.reset_constant))
            return logits.detach()
        if self._host_guard and self.step_on_empty and self._zero_gradient_step(logits, weights):
            return logits.detach()
        loss = weighted_mean(ctx.entropy, weights)
        self._observe_loss(loss)  # the first (unperturbed) loss, for an attached monitor
        ok_first = loss.detach().isfinite()
        loss.backward()
        self.sam.ascend(ok_first, host=self._host_guard)

        entropy2 = shannon_entropy(self.run_model(x))  # full batch at theta + e
        keep2 = (weights > 0) & (entropy2.detach() < self.margin())
        self.last_selection["entropy_margin_sam"] = keep2  # S2: what the update learns from (diagnostics)
        weights2 = torch.where(keep2, weights, torch.zeros_like(weights))
        loss2 = weighted_mean(entropy2, weights2)
        kept2 = keep2.sum()
        with torch.no_grad():
            value = weighted_mean(entropy2.detach().float(), keep2.float())  # SAR's loss_second: mean_S2 H'
            valid = (kept2 > 0) & value.isfinite()
            moved = torch.where(self.ema_exists, self.ema_momentum * self.ema + (1 - self.ema_momentum) * value, value)
            self.ema.copy_(torch.where(valid, moved, self.ema))
            self.ema_exists.copy_(self.ema_exists | valid)
        ok = loss2.detach().isfinite()
        loss2.backward()
        self.sam.restore()
        nonempty = kept2 > 0
        ok = self.update(None, ok & nonempty if self.requires_nonempty else ok, host=self._host_guard)
        self.counters.add("forwards", 2)
        self.counters.add("second_kept", kept2 * ok)
        self.record_step(ok, (weights > 0).sum(), nonempty=nonempty, require_nonempty=self.requires_nonempty, backwards=2)
        if self.recovery:
            self._recover(self.ema_exists & (self.ema < self.reset_constant))
        return logits.detach()

    def _zero_gradient_step(self, logits: torch.Tensor, weights: torch.Tensor) -> bool:
        """The official step on an empty ``S1``, without the work that cannot change it.

        With ``S1`` empty and finite logits, both backwards give exactly zero gradients, so the
        ascent moves nothing, the second forward repeats the first, ``S2`` is empty and the EMA
        stays; what remains is the SGD step on a zero gradient (the momentum moves the weights).
        Where reads are free (the CPU, ``skip_empty`` not ``"never"``) the size and the finiteness
        are read on the host and only that step is taken, with zero gradients on the parameters the
        loss reaches (all of them, checked once on the autograd graph; otherwise the full step
        runs). Returns whether it did; weights, optimizer state and counters are those of the full step."""
        if int((weights > 0).sum()) or not bool(logits.detach().isfinite().all()) \
                or not self._reaches_every_parameter(logits):
            return False
        self.last_selection["entropy_margin_sam"] = torch.zeros_like(weights, dtype=torch.bool)
        for p in self.adapted_parameters():
            p.grad = torch.zeros_like(p)
        self.update(None, True, host=True)
        self.counters.add("forwards", 2)
        self._record_step_on_host(self.update.stepped, 0, False, False, 2)
        if self.recovery:
            self._recover(self.ema_exists & (self.ema < self.reset_constant))
        return True

    def _reaches_every_parameter(self, logits: torch.Tensor) -> bool:
        """Whether a loss on ``logits`` reaches every adapted parameter (walked once on the autograd graph)."""
        reached = self.__dict__.get("_reaches_all")
        if reached is None:
            leaves, seen, stack = set(), set(), [logits.grad_fn]
            while stack:
                fn = stack.pop()
                if fn is None or fn in seen:
                    continue
                seen.add(fn)
                variable = getattr(fn, "variable", None)
                if variable is not None:
                    leaves.add(id(variable))
                stack.extend(f for f, _ in fn.next_functions)
            reached = self.__dict__["_reaches_all"] = all(id(p) in leaves for p in self.adapted_parameters())
        return reached

    @torch.no_grad()
    def _recover(self, flag: torch.Tensor) -> None:
        """Reset model and optimizer where ``flag`` (a device bool), without a host sync; where reads
        are free (the CPU, :meth:`plan_skip`) the flag is read and nothing runs while it is false."""
        if self._host_guard and not bool(flag):
            self.counters.add("recoveries", 0)
            return
        params = self.adapted_parameters()
        select_(params, [self._buffers[f"initial_{i}"] for i in range(len(params))], flag)
        state = ([v for p in params for v in self.optimizer.state[p].values() if torch.is_tensor(v)]
                 if self.reset_momentum_on_recovery else [])
        if state:  # fresh optimizer state = zeros (GuardedStep primes it that way)
            by_device: dict[torch.device, list[torch.Tensor]] = {}
            for t in state:
                by_device.setdefault(t.device, []).append(t)
            for device, tensors in by_device.items():
                keep = (~flag).to(device=device, dtype=tensors[0].dtype)
                torch._foreach_mul_(tensors, keep)
        if self.clear_ema_on_recovery:
            self.ema_exists.copy_(self.ema_exists & ~flag)
        self.counters.add("recoveries", flag)

    def hparams(self) -> dict[str, Any]:
        return {**super().hparams(), "e_margin": self.e_margin, "e_margin_nats": self.margin(), "rho": self.rho,
                "adaptive": self.adaptive, "reset_constant": self.reset_constant, "ema_momentum": self.ema_momentum,
                "recovery": self.recovery, "step_on_empty": self.step_on_empty,
                "clear_ema_on_recovery": self.clear_ema_on_recovery,
                "reset_momentum_on_recovery": self.reset_momentum_on_recovery}
