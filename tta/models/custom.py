"""Your own architecture: ``py:<module>:<factory>`` specs, and files holding a whole pickled module.

``model=py:<module>:<factory>`` imports ``<module>`` (a dotted module path, looked up in the current
working directory first, then in the installed packages, the way ``python -m`` finds modules),
calls ``<factory>()`` without arguments and uses the ``nn.Module`` it returns. The weights come
from ``model_weights=<state dict file>`` (``weights=`` in Python; read with ``weights_only=True``),
or are whatever the factory set. **Naming a module here runs its code**: that is your explicit
opt-in to run it, exactly as ``python -m <module>`` would; nothing else in this package imports
code named on the command line.

Recipe (a model class of your own, on the command line)::

    # mynet.py, in the folder you run from
    import torch.nn as nn

    class MyNet(nn.Module):
        ...

    def build():
        return MyNet(num_classes=10)

    # weights saved with torch.save(model.state_dict(), "mynet.pt")
    python -m tta.run model=py:mynet:build model_weights=mynet.pt normalization=[[0.5],[0.5]] data=...

The normalisation is part of the model: state it (``normalization=``), or the ImageNet statistics
are assumed with a warning and the run record says ``normalization_source: guessed``. The head is
resized (randomly initialised, with a warning) when it has another number of classes than the data.

A spec that is a path to an existing file (``model=net.pt``) must hold a whole pickled module, and
loading it unpickles arbitrary objects, which runs code from the file. That needs an explicit
opt-in: ``allow_pickle=True`` (``model_allow_pickle=true``). Without it the file is refused with a
message that says how to load a state dict instead (``py:`` + ``model_weights=``, or an
architecture spec + ``model_weights=``). A file holding a state dict is refused with the same advice.
"""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

from torch import nn

from .checkpoints import load_checkpoint
from .classifier import Classifier, module_built
from .specs import FILE, MODEL_SPECS, Built, SpecRequest

_STATE_DICT_ADVICE = ("load it as a state dict instead: model=py:<module>:<factory> (your architecture) or an "
                      "architecture spec (timm:<name>, torchvision:<name>, ...) together with model_weights=<file> "
                      "(Python: load_classifier(spec, weights=<file>))")


def import_factory(target: str) -> tuple[object, str]:
    """``"pkg.mod:make"`` -> (the callable ``make`` of ``pkg.mod``, its qualified name). The module is
    looked up in the current working directory first, then on ``sys.path``."""
    module_name, sep, attr = target.rpartition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"py:{target}: expected py:<module>:<factory>, e.g. py:mynet:build (mynet.py in the "
                         f"working directory, build() returns the nn.Module)")
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name is not None and module_name.startswith(err.name):
            raise ValueError(f"py:{target}: no module {module_name!r} in the working directory ({cwd}) or the "
                             f"installed packages") from err
        raise
    finally:
        if added:
            sys.path.remove(cwd)
    factory = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise ValueError(f"py:{target}: module {module_name!r} ({getattr(module, '__file__', '?')}) has no "
                             f"attribute {attr!r}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise ValueError(f"py:{target}: {attr!r} is not callable")
    return factory, f"{module_name}:{attr}"


@MODEL_SPECS.register("py:", help="py:<module>:<factory>  your own architecture: <factory>() returns the nn.Module "
                                  "(module from the working directory or installed packages); weights from "
                                  "model_weights=<state dict file>")
def python_spec(rest: str, request: SpecRequest) -> Built:
    """The module returned by the named factory (see the module docstring)."""
    factory, name = import_factory(rest)
    net = factory()
    if isinstance(net, Classifier):  # a factory that already wraps its model: keep its normalisation
        built = Built(net.net, net.info, fixed_input_size=net.fixed_input_size)
        built.info.spec, built.info.source = f"py:{name}", "python"
        return built
    if not isinstance(net, nn.Module):
        raise TypeError(f"py:{name} returned a {type(net).__name__}, not an nn.Module")
    return module_built(net, f"py:{name}", "python", "from the factory")


@MODEL_SPECS.register(FILE, help="<file.pt>  a whole pickled module (needs model_allow_pickle=true: unpickling runs "
                                 "code from the file)")
def pickled_module_spec(rest: str, request: SpecRequest) -> Built:
    """A file holding a whole pickled ``nn.Module`` (only with ``request.allow_pickle``)."""
    path = Path(rest)
    if path.suffix == ".safetensors":
        raise ValueError(f"{path} holds a state dict (safetensors), not a model: {_STATE_DICT_ADVICE}")
    if not request.allow_pickle:
        obj = _safe_peek(path)
        if isinstance(obj, dict):
            raise ValueError(f"{path} holds a state dict, not a model: {_STATE_DICT_ADVICE}")
        raise ValueError(f"{path} holds a pickled object; loading it runs code from the file, so it needs an explicit "
                         f"opt-in: model_allow_pickle=true (Python: allow_pickle=True) if you trust the file. Or "
                         f"{_STATE_DICT_ADVICE}")
    obj = load_checkpoint(path, allow_pickle=True, what="model file")
    if not isinstance(obj, nn.Module):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a model: {_STATE_DICT_ADVICE}")
    return module_built(obj, str(path), "file", str(path))


def _safe_peek(path: Path) -> object | None:
    """What ``torch.load(weights_only=True)`` makes of the file (``None`` when it refuses)."""
    from .checkpoints import PickleRequired

    try:
        return load_checkpoint(path, allow_pickle=False, what="model file")
    except PickleRequired:
        return None


__all__ = ["import_factory", "pickled_module_spec", "python_spec"]
