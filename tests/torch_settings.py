"""A pytest plugin: every test must leave torch's process-wide settings as it found them.

torch keeps settings in places a test can change for every later test of the session: the config
modules of the compiler (``torch._dynamo.config``, ``torch._inductor.config``,
``torch._functorch.config``), whose options are served through ``__getattr__`` and can be *deleted*
by a test runner's attribute patching (pytest 9.2's ``monkeypatch`` undo did exactly that to
``torch._dynamo.config.recompile_limit``), and global switches (default dtype, deterministic
algorithms, matmul precision, cuDNN flags, anomaly mode, grad mode).

After each test the settings are read again; any difference (a changed value, or an option that can
no longer be read) fails that test in its teardown, naming the settings, and the values found before
the test are put back so that one leak does not cascade into the rest of the suite. Patch torch
settings with torch's own API (``torch._dynamo.config.patch(...)`` as a context manager or decorator),
never with ``monkeypatch.setattr``.

The thread count is left out: ``conftest.py`` sets one intra-op thread per test and restores it.
"""
from __future__ import annotations

import importlib
import warnings
from typing import Any

import pytest
import torch

#: the compiler's config modules (imported here, so that their state is known before every test)
CONFIG_MODULES = ("torch._dynamo.config", "torch._inductor.config", "torch._functorch.config")

_MISSING = "<cannot be read>"


def _config_modules() -> dict[str, Any]:
    return {name: importlib.import_module(name) for name in CONFIG_MODULES}


def _switches() -> dict[str, Any]:
    return {
        "torch.get_default_dtype()": torch.get_default_dtype(),
        "torch.is_grad_enabled()": torch.is_grad_enabled(),
        "torch.is_inference_mode_enabled()": torch.is_inference_mode_enabled(),
        "torch.is_anomaly_enabled()": torch.is_anomaly_enabled(),
        "torch.are_deterministic_algorithms_enabled()": torch.are_deterministic_algorithms_enabled(),
        "torch.is_deterministic_algorithms_warn_only_enabled()": torch.is_deterministic_algorithms_warn_only_enabled(),
        "torch.get_float32_matmul_precision()": torch.get_float32_matmul_precision(),
        "torch.backends.cudnn.enabled": torch.backends.cudnn.enabled,
        "torch.backends.cudnn.benchmark": torch.backends.cudnn.benchmark,
        "torch.backends.cudnn.deterministic": torch.backends.cudnn.deterministic,
        "torch.backends.cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "torch.get_num_interop_threads()": torch.get_num_interop_threads(),
    }


def snapshot() -> dict[str, Any]:
    """Every watched setting: ``{name: value}``; a config option that cannot be read maps to
    ``"<cannot be read>"``."""
    values = _switches()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # reading a deprecated option warns
        for module_name, module in _config_modules().items():
            for option in module.get_config_copy():
                try:
                    values[f"{module_name}.{option}"] = getattr(module, option)
                except AttributeError:
                    values[f"{module_name}.{option}"] = _MISSING
    return values


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # values without a usable ==: compare their text
        return repr(a) == repr(b)


def changed(before: dict[str, Any], after: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{name: (before, after)}`` for every setting that differs."""
    return {name: (before.get(name, _MISSING), after.get(name, _MISSING))
            for name in sorted(set(before) | set(after))
            if not _same(before.get(name, _MISSING), after.get(name, _MISSING))}


def _set_deterministic(before: dict[str, Any]) -> None:
    torch.use_deterministic_algorithms(
        before["torch.are_deterministic_algorithms_enabled()"],
        warn_only=before["torch.is_deterministic_algorithms_warn_only_enabled()"])


#: how to put a switch back (inference mode is context state: not restorable from here)
_SWITCH_SETTERS = {
    "torch.is_grad_enabled()": lambda b: torch.set_grad_enabled(b["torch.is_grad_enabled()"]),
    "torch.get_default_dtype()": lambda b: torch.set_default_dtype(b["torch.get_default_dtype()"]),
    "torch.is_anomaly_enabled()": lambda b: torch.set_anomaly_enabled(b["torch.is_anomaly_enabled()"]),
    "torch.are_deterministic_algorithms_enabled()": _set_deterministic,
    "torch.is_deterministic_algorithms_warn_only_enabled()": _set_deterministic,
    "torch.get_float32_matmul_precision()":
        lambda b: torch.set_float32_matmul_precision(b["torch.get_float32_matmul_precision()"]),
    "torch.backends.cudnn.enabled": lambda b: setattr(torch.backends.cudnn, "enabled", b["torch.backends.cudnn.enabled"]),
    "torch.backends.cudnn.benchmark": lambda b: setattr(torch.backends.cudnn, "benchmark", b["torch.backends.cudnn.benchmark"]),
    "torch.backends.cudnn.deterministic":
        lambda b: setattr(torch.backends.cudnn, "deterministic", b["torch.backends.cudnn.deterministic"]),
    "torch.backends.cuda.matmul.allow_tf32":
        lambda b: setattr(torch.backends.cuda.matmul, "allow_tf32", b["torch.backends.cuda.matmul.allow_tf32"]),
}


def restore(before: dict[str, Any], names: list[str]) -> None:
    """Put the settings among ``names`` back to their values in ``before``, so that one leak fails one
    test and not every later one."""
    modules = _config_modules()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in names:
            if name in _SWITCH_SETTERS:
                _SWITCH_SETTERS[name](before)
                continue
            module_name, _, option = name.rpartition(".")
            value = before.get(name, _MISSING)
            if module_name in modules and value is not _MISSING:
                setattr(modules[module_name], option, value)


@pytest.fixture(autouse=True)
def _torch_settings_unchanged():
    before = snapshot()
    yield
    after = snapshot()
    diff = changed(before, after)
    if diff:
        restore(before, list(diff))
        lines = "\n".join(f"  {name}: {old!r} -> {new!r}" for name, (old, new) in diff.items())
        pytest.fail("the test left torch settings changed (patch them with torch's own API, e.g. "
                    f"torch._dynamo.config.patch(...)):\n{lines}", pytrace=False)
