"""Which parameters adapt, and how normalisation layers behave while adapting.

Follows the original Tent recipe (Wang et al., ICLR 2021, ``configure_model`` / ``collect_params``):
the model goes to ``train()``, every parameter is frozen, then the affine parameters of the chosen
normalisation layers are re-enabled, and BatchNorm layers are switched to test-batch statistics by
dropping their running estimates (``track_running_stats=False``, running buffers set to ``None``),
exactly as the official code does.

Presets (``collect_params(model, preset)``):

* ``bn``   -- BatchNorm affine only: the official Tent and EATA repositories.
* ``norm`` -- BatchNorm, LayerNorm and GroupNorm affine: the SAR repository's Tent/EATA copies.
* ``sar``  -- ``norm`` minus the modules SAR and DeYO exclude: names containing ``layer4``,
  ``blocks.9``, ``blocks.10``, ``blocks.11`` or ``norm.``, and the final ViT ``norm``.
* ``all``  -- every parameter (full fine-tuning; not used by any paper default).
"""
from __future__ import annotations

from torch import nn

NORM_TYPES: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)
BN_TYPES: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._BatchNorm,)
PRESETS = ("bn", "norm", "sar", "all")
_SAR_EXCLUDED = ("layer4", "blocks.9", "blocks.10", "blocks.11")


def _sar_excludes(module_name: str) -> bool:
    return any(key in module_name for key in _SAR_EXCLUDED) or "norm." in module_name or module_name == "norm"


def _selected_modules(model: nn.Module, preset: str) -> list[tuple[str, nn.Module]]:
    if preset not in PRESETS:
        raise ValueError(f"unknown parameter preset {preset!r}; choose one of {PRESETS}")
    types = BN_TYPES if preset == "bn" else NORM_TYPES
    chosen = []
    for name, module in model.named_modules():
        if not isinstance(module, types):
            continue
        if preset == "sar" and _sar_excludes(name):
            continue
        chosen.append((name, module))
    return chosen


def use_batch_statistics(model: nn.Module) -> int:
    """Make every BatchNorm layer normalise with the statistics of the current batch.

    Same effect as the official code: running estimates are dropped, so train/eval mode no longer
    matters for these layers. Returns how many BatchNorm layers were switched.
    """
    count = 0
    for module in model.modules():
        if isinstance(module, BN_TYPES):
            module.track_running_stats = False
            module.running_mean = None
            module.running_var = None
            count += 1
    return count


def collect_params(model: nn.Module, preset: str = "norm") -> list[tuple[str, nn.Parameter]]:
    """The (qualified name, parameter) pairs a preset adapts, in module order.

    A model may define its own presets (e.g. CLIP's ``prompt``) with a method
    ``adaptable_params(preset) -> list[(name, param)] | None``; ``None`` falls back to the ones here.
    """
    custom = getattr(model, "adaptable_params", None)
    if callable(custom):
        chosen = custom(preset)
        if chosen is not None:
            return chosen
    if preset == "all":
        return [(n, p) for n, p in model.named_parameters()]
    params = []
    for module_name, module in _selected_modules(model, preset):
        for pname, param in module.named_parameters(recurse=False):
            if pname in ("weight", "bias"):
                params.append((f"{module_name}.{pname}" if module_name else pname, param))
    return params


def configure_model(model: nn.Module, preset: str = "norm", batch_stats: bool = True) -> list[tuple[str, nn.Parameter]]:
    """Prepare ``model`` for adaptation and return the parameters to give to the optimizer.

    ``train()`` mode, everything frozen except the preset's parameters, BatchNorm on batch statistics
    (``batch_stats=False`` keeps the running estimates, for methods that do not touch BN).
    """
    model.train()
    model.requires_grad_(False)
    if batch_stats:
        use_batch_statistics(model)
    params = collect_params(model, preset)
    for _, param in params:
        param.requires_grad_(True)
    return params


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, BN_TYPES) for m in model.modules())

