"""Fuzzing ``method(x)`` over every registered batch method: whatever the batch, the call either
raises a ``ValueError`` that says what is wrong, leaving the whole state bitwise unchanged, or
returns a valid prediction; the weights stay finite either way.

Cases (seeded, ~30 per method, on the tiny digits CNN): shapes (empty and single-image batches,
wrong ranks and channel counts), dtypes (half, bfloat16, double, integers, bool), value ranges
(0..1, inside the 1e-3 tolerance, 0..255, -5..5, constants), NaN/Inf patterns, memory layouts
(non-contiguous, channels_last) and inputs that require grad. Image sizes are those the network
itself accepts (8 to 64 pixels): a size a network cannot take at all is the network's own error.
Whether a case is valid is decided here, independently of the code under test, and the outcome
must match it.
"""
import copy
import math
import random
import warnings

import pytest
import torch

import tta
from tta.models import load_classifier

VIEW_METHODS = {"tpt", "difftpt", "adte", "zero", "tda", "ctpt"}
BATCH_METHODS = sorted(set(tta.methods.available()) - VIEW_METHODS)
CASES = 30
CLEAR = ("expected", "empty batch", "NaN or Inf", "images must be in", "differs from the model's", "at least 1x1",
         "is on")


MUTATIONS = ("empty", "channels", "rank", "range", "nonfinite", "dtype")


def make_case(rng: random.Random):
    """One batch and whether a method must accept it: about half are valid batches in their many
    forms, the others carry one or two defects."""
    defects = set(rng.sample(MUTATIONS, rng.choice([1, 1, 2]))) if rng.random() < 0.5 else set()
    n = 0 if "empty" in defects else rng.choice([1, 1, 2, 3, 5])
    c = rng.choice([1, 4, 2]) if "channels" in defects else 3
    h, w = rng.choice([(32, 32), (32, 32), (28, 40), (8, 8), (64, 48)])
    shape = [n, c, h, w]
    if "rank" in defects:
        shape = rng.choice([shape[1:], [1] + shape, shape[:2]])
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    x = torch.rand(*shape, generator=g)
    form = rng.choice(["unit", "unit", "unit", "tolerance", "zeros", "ones"])
    if form == "tolerance":
        x = x * (1 + 1.6e-3) - 8e-4  # within 1e-3 of [0, 1]
    elif form == "zeros":
        x = torch.zeros_like(x)
    elif form == "ones":
        x = torch.ones_like(x)
    if "range" in defects and x.numel():
        scale, offset, outside = rng.choice([(255, 0, 200.0), (10, -5, -4.0), (1, 0, 1.002), (1, 0, -0.002)])
        x = x * scale + offset
        x.reshape(-1)[rng.randrange(x.numel())] = outside  # at least one value out of range, whatever the form
    if "nonfinite" in defects and x.numel():
        which = rng.choice(["one_nan", "all_nan", "pos_inf", "neg_inf"])
        if which == "all_nan":
            x = torch.full_like(x, float("nan"))
        else:
            x.reshape(-1)[rng.randrange(x.numel())] = {"one_nan": float("nan"), "pos_inf": float("inf"),
                                                       "neg_inf": float("-inf")}[which]
    if "dtype" in defects:
        dtype = rng.choice([torch.float16, torch.bfloat16, torch.float64, torch.uint8, torch.int64, torch.bool])
        x = x.to(dtype) if dtype.is_floating_point else x.nan_to_num(0.0).clamp(-1e6, 1e6).to(dtype)
    layout = rng.random()
    if x.ndim == 4 and layout < 0.15:
        x = x.contiguous(memory_format=torch.channels_last)
    elif x.ndim == 4 and layout < 0.3 and h == w:
        x = x.transpose(2, 3)  # non-contiguous
    if x.is_floating_point() and rng.random() < 0.1:
        x = x.requires_grad_()
    valid = not defects
    return x, valid


def build(name):
    kw = {"fisher_data": torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))} \
        if name in ("eata", "eata_c") else {}
    return tta.methods.build(name, load_classifier("digits_cnn"), **kw)


def weights_finite(method):
    tensors = list(method.state_dict().values())
    return all(torch.isfinite(t).all() for t in tensors if torch.is_tensor(t) and t.is_floating_point()) and all(
        torch.isfinite(v).all() for s in (method.optimizer.state.values() if method.optimizer else [])
        for v in s.values() if torch.is_tensor(v) and v.is_floating_point())


def bitwise_equal(a, b):
    if torch.is_tensor(a):
        bits = lambda t: t.reshape(-1).view(torch.uint8) if t.is_floating_point() else t  # noqa: E731 (NaN == NaN)
        return torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(bitwise_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(bitwise_equal(x, y) for x, y in zip(a, b))
    return a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b))


@pytest.mark.parametrize("name", BATCH_METHODS)
def test_fuzz_method_call(name):
    rng = random.Random(f"fuzz-{name}")
    method = build(name)
    method(torch.rand(8, 3, 32, 32))  # a real step first: momentum and running estimates exist
    outcomes = {"predicted": 0, "refused": 0}
    for case in range(CASES):
        x, valid = make_case(rng)
        before = copy.deepcopy(method.state_dict())
        describe = f"case {case}: shape {tuple(x.shape)}, dtype {x.dtype}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # batch size 1 with BatchNorm warns (once)
            try:
                logits = method(x)
            except ValueError as error:
                message = str(error)
                assert not valid, f"{describe}: a valid batch was refused: {message}"
                assert any(k in message for k in CLEAR), f"{describe}: unclear message {message!r}"
                assert bitwise_equal(method.state_dict(), before), f"{describe}: the state changed on an error"
                outcomes["refused"] += 1
                continue
        assert valid, f"{describe}: an invalid batch was accepted"
        assert torch.is_tensor(logits) and logits.shape == (x.shape[0], 10), describe
        assert torch.isfinite(logits).all(), describe
        assert weights_finite(method), describe
        outcomes["predicted"] += 1
    assert weights_finite(method)
    assert outcomes["predicted"] >= 5 and outcomes["refused"] >= 5, outcomes  # both sides were exercised
    assert method.stats()["counters"]["batches"] == 1 + outcomes["predicted"]  # refused calls are not counted
