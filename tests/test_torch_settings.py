"""The suite's guard on torch's global settings (``tests/torch_settings.py``) catches a test that
leaves them changed, names the setting, and puts the value back so the leak stops there.

Each case runs a small pytest session inside this test (``pytester``) with the guard loaded, as
``conftest.py`` loads it for the whole suite.
"""
from __future__ import annotations

import torch
import torch._dynamo.config

import torch_settings

PLUGIN = 'pytest_plugins = ["torch_settings"]\n'


def run_inner(pytester, body: str):
    pytester.makeconftest(PLUGIN)
    pytester.makepyfile(test_inner="import torch\nimport torch._dynamo.config\n\n" + body)
    return pytester.runpytest_inprocess("-q", "-p", "no:cacheprovider")


def test_a_changed_compiler_option_fails_the_test_and_is_put_back(pytester):
    limit = torch._dynamo.config.recompile_limit
    result = run_inner(pytester, "def test_leaks():\n    torch._dynamo.config.recompile_limit = 3\n")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*the test left torch settings changed*",
                                 f"*torch._dynamo.config.recompile_limit: {limit} -> 3*"])
    assert torch._dynamo.config.recompile_limit == limit


def test_a_deleted_compiler_option_fails_the_test_and_is_put_back(pytester):
    """What pytest 9.2's ``monkeypatch`` undo did to an option torch serves through ``__getattr__``:
    deleted it, so that every later read raised ``AttributeError``."""
    limit = torch._dynamo.config.recompile_limit
    result = run_inner(pytester, "def test_deletes():\n    delattr(torch._dynamo.config, 'recompile_limit')\n")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*torch._dynamo.config.recompile_limit: * -> '<cannot be read>'*"])
    assert torch._dynamo.config.recompile_limit == limit


def test_a_changed_global_switch_fails_the_test(pytester):
    result = run_inner(pytester, "def test_dtype():\n    torch.set_default_dtype(torch.float64)\n\n"
                                 "def test_restores():\n    torch.set_default_dtype(torch.float32)\n")
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(["*torch.get_default_dtype(): torch.float32 -> torch.float64*"])
    assert torch.get_default_dtype() == torch.float32


def test_torchs_own_patch_api_passes(pytester):
    result = run_inner(pytester, "def test_patches():\n"
                                 "    with torch._dynamo.config.patch(recompile_limit=16):\n"
                                 "        assert torch._dynamo.config.recompile_limit == 16\n\n"
                                 "@torch._dynamo.config.patch(cache_size_limit=4)\n"
                                 "def test_decorated():\n"
                                 "    assert torch._dynamo.config.cache_size_limit == 4\n")
    result.assert_outcomes(passed=2)


def test_snapshot_sees_every_compiler_option():
    names = torch_settings.snapshot()
    assert "torch._dynamo.config.recompile_limit" in names
    assert any(name.startswith("torch._inductor.config.") for name in names)
    assert torch_settings.changed(names, torch_settings.snapshot()) == {}
