"""Speed options of a method: bf16 autocast, channels_last, and ``torch.compile`` of the step.

Defaults are fp32 eager, as the papers ran. ``fast`` turns on all three (channels_last only for
CNNs, where it helps the convolutions; a ViT's tensors stay as they are).

How a batch method's step is compiled (:meth:`tta.methods.batch.BatchMethod.compile_step`):

* **the networks** (the adapted model, and the frozen source copy when a policy needs one) are
  compiled on their own, each behind a ``torch.compiler.disable`` boundary, so their graphs are
  the same for every method with the same parameter preset and the compile caches share them
  (compiling Tent then EATA on ResNet-50 compiles the network once). Forward and backward are
  compiled (AOTAutograd);
* **the rest of the step** -- selection policies, loss, the guarded update (gradient check,
  snapshot, optimizer step, undo), the counters -- is the method's ``adapt`` compiled as one
  function. ``Tensor.backward()`` and the network boundaries split it into a fixed handful of
  graphs, the same every batch;
* what cannot be traced stays eager behind a boundary: DeYO's PLPD re-forward of the samples still
  alive (its size is read on the host, and its permutations come from the CPU RNG as in the
  official code) and EATA-C's stochastic sub-network forward (forward hooks, eager RNG). They are
  marked with :func:`tta.compiling.eager_boundary`, which defers ``torch.compiler.disable`` (and so
  the import of ``torch._dynamo``) until something is compiled.

Shapes are static (``dynamic=False``): a new batch size (the smaller last batch of a domain)
compiles once more, after which every batch of either size reuses its graphs. Dynamic shapes
would avoid that one recompile but compile slower and give slower kernels.

Compile mode of the networks: ``compile_mode=None`` is Inductor's default (no autotuning, no CUDA
graphs), chosen because it compiles in tens of seconds where ``"max-autotune-no-cudagraphs"``
takes minutes per network, which a stream of a few thousand batches rarely pays back. CUDA graphs
(``"reduce-overhead"``/``"max-autotune"``) are not the default: the step mutates the adapted
parameters, the optimizer state and device counters between graphs, and DeYO's step reads a size
on the host, which a captured graph cannot do; pass ``compile_mode`` to try them. The glue graphs
always use the default mode (they are small elementwise graphs).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from torch import nn

from ..compiling import arm, eager_boundary
from .lr_rule import model_family

#: ``torch.compile`` modes accepted for the networks (``None``: Inductor's default)
COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
#: the ``torch.compile`` backend (tests set ``"aot_eager"``: the same tracing, graph breaks and
#: recompilations, without Inductor's code generation, which takes minutes on a small CPU)
BACKEND = "inductor"


def compile_fn(fn: Callable[..., Any], mode: str | None = None) -> Callable[..., Any]:
    """``torch.compile(fn)`` with static shapes, this module's backend and ``mode`` (Inductor only).
    Arms the eager boundaries first (:mod:`tta.compiling`)."""
    arm()
    if BACKEND != "inductor" or mode == "default":
        mode = None
    return torch.compile(fn, dynamic=False, backend=BACKEND, mode=mode)


@dataclass(frozen=True)
class SpeedOptions:
    """The speed options a method runs with (recorded in the run results)."""

    amp: bool = False
    channels_last: bool = False
    compile: bool = False
    compile_mode: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def is_cnn(net: nn.Module) -> bool:
    """A convolutional network (no self-attention blocks): channels_last helps it."""
    return model_family(net) == "cnn"


def resolve(net: nn.Module, *, fast: bool = False, amp: bool = False, channels_last: bool = False,
            compile: bool = False, compile_mode: str | None = None) -> SpeedOptions:
    """The options ``fast`` stands for (bf16 autocast, channels_last for CNNs, compile), or'ed with
    the ones given one by one."""
    if compile_mode not in COMPILE_MODES:
        raise ValueError(f"compile_mode must be one of {COMPILE_MODES}, not {compile_mode!r}")
    if fast:
        amp, compile = True, True
        channels_last = channels_last or is_cnn(net)
    return SpeedOptions(bool(amp), bool(channels_last), bool(compile), compile_mode if compile else None)


def compile_network(module: nn.Module, mode: str | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """``module`` compiled on its own (static shapes), callable from inside another compiled function
    without being inlined into it: the boundary keeps the network's graphs shared between methods.
    The module itself is left as it was (its state dict, and eager calls elsewhere, unchanged)."""
    compiled = compile_fn(module, mode)

    @torch.compiler.disable
    def call(x: torch.Tensor) -> torch.Tensor:
        return compiled(x)

    return call


def compiled_graphs() -> int:
    """Graphs ``torch.compile`` has compiled in this process so far (a new batch shape, a guard
    failure or a new function each add some): a steady state adds none."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


__all__ = ["BACKEND", "COMPILE_MODES", "SpeedOptions", "compile_fn", "compile_network", "compiled_graphs", "eager_boundary", "is_cnn",
           "resolve"]
