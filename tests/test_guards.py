"""Never learn from garbage: bad batches raise before anything changes; bad steps are undone."""
import copy

import pytest
import torch

import tta
from tta.engine import check_labels
from tta.models import load_classifier
from tta.objectives.update import GuardedStep


def _snapshot(method):
    return copy.deepcopy(method.model.state_dict()), copy.deepcopy(method.optimizer.state_dict())


def _assert_unchanged(method, snapshot):
    model_state, opt_state = snapshot
    for k, v in model_state.items():
        torch.testing.assert_close(method.model.state_dict()[k], v, rtol=0, atol=0)
    now = method.optimizer.state_dict()["state"]
    for key, state in opt_state["state"].items():
        for name, value in state.items():
            torch.testing.assert_close(now[key][name], value, rtol=0, atol=0)


@pytest.fixture
def tent():
    method = tta.methods.build("tent", load_classifier("digits_cnn"), lr=1e-1)
    method(torch.rand(8, 3, 32, 32))  # one real step so the optimizer has momentum
    return method


@pytest.mark.parametrize("bad,match", [
    (torch.full((4, 3, 32, 32), float("nan")), "NaN or Inf"),
    (torch.rand(4, 3, 32, 32).index_fill_(0, torch.tensor([2]), float("inf")), "NaN or Inf"),
    (torch.rand(4, 1, 32, 32), "expected 3 channels"),
    (torch.rand(0, 3, 32, 32), "empty batch"),
    (torch.rand(3, 32, 32), r"shape \(N, C, H, W\)"),
    ((torch.rand(4, 3, 32, 32) * 255).to(torch.uint8), "float images"),
])
def test_bad_batches_raise_and_leave_weights_and_optimizer_untouched(tent, bad, match):
    snapshot = _snapshot(tent)
    with pytest.raises(ValueError, match=match):
        tent(bad)
    _assert_unchanged(tent, snapshot)


def test_nonfinite_batch_in_skip_mode_predicts_but_does_not_update(tent):
    tent.nonfinite = "skip"
    snapshot = _snapshot(tent)
    x = torch.rand(4, 3, 32, 32)
    x[1] = float("nan")
    tent(x)
    _assert_unchanged(tent, snapshot)
    counters = tent.stats()["counters"]
    assert counters["skipped_nonfinite"] == 1 and counters["steps"] == 1


def test_labels_out_of_range_are_a_clear_error():
    with pytest.raises(ValueError, match="labels out of range"):
        check_labels(torch.tensor([0, 3, 10]), 10)
    with pytest.raises(ValueError, match="labels out of range"):
        check_labels(torch.tensor([-1, 3]), 10)
    check_labels(torch.tensor([-1, 3]), 10, open_set=True)


@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    lambda ps: torch.optim.Adam(ps, lr=0.01),
    lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.01),
])
def test_guarded_step_equals_plain_steps_and_skipping_equals_not_stepping(make):
    """Primed optimizer state + device-side undo reproduces a plain loop that skips steps on the host."""
    torch.manual_seed(0)
    w_plain = torch.randn(5, requires_grad=True)
    w_ours = w_plain.detach().clone().requires_grad_(True)
    plain, ours = make([w_plain]), make([w_ours])
    guard = GuardedStep(ours)
    targets = [torch.randn(5) for _ in range(5)]
    keep = [True, False, True, True, False]
    for target, ok in zip(targets, keep):
        if ok:
            ((w_plain - target) ** 2).sum().backward()
            plain.step()
        plain.zero_grad()
        guard(((w_ours - target) ** 2).sum(), torch.tensor(ok))
    torch.testing.assert_close(w_ours, w_plain, rtol=1e-6, atol=1e-7)


def test_guarded_step_undoes_a_nan_loss():
    w = torch.ones(3, requires_grad=True)
    opt = torch.optim.SGD([w], lr=0.1, momentum=0.9)
    guard = GuardedStep(opt)
    kept = guard((w * float("nan")).sum(), torch.tensor(True))
    assert not kept
    torch.testing.assert_close(w.detach(), torch.ones(3))
    assert torch.equal(opt.state[w]["momentum_buffer"], torch.zeros(3))


def test_batch_size_one_with_batchnorm_warns_once_and_still_runs():
    method = tta.methods.build("tent", load_classifier("digits_cnn"), batch_size=1)
    assert method.lr == 2.5e-4 / 64 * 1 * 2  # the ResNet rule below batch 32; Tent has no bs=1 doubling
    with pytest.warns(UserWarning, match="degenerate"):
        logits = method(torch.rand(1, 3, 32, 32))
    assert logits.shape == (1, 10) and torch.isfinite(logits).all()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        method(torch.rand(1, 3, 32, 32))  # warned once per method, not per batch
    assert method.stats()["counters"]["steps"] == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_nonfinite_found_flags_nan_and_inf_and_leaves_values_unchanged(dtype):
    """The guard's gradient check (one multi-tensor kernel): 1 for a NaN or an infinity anywhere,
    0 for finite tensors (also huge ones), and the tensors keep their exact values (the kernel
    multiplies by exactly 1)."""
    from tta.objectives.update import nonfinite_found

    tensors = [torch.randn(7, dtype=dtype), torch.randn(3, 4, dtype=dtype)[:, ::2], torch.randn((), dtype=dtype)]
    tensors[2].fill_(torch.finfo(dtype).max)
    before = [t.clone() for t in tensors]
    assert nonfinite_found(tensors).tolist() == [0.0]
    assert all(torch.equal(a, b) for a, b in zip(before, tensors))
    for bad in (float("nan"), float("inf"), float("-inf")):
        spoiled = [t.clone() for t in tensors]
        spoiled[1][2, 1] = bad
        assert nonfinite_found(spoiled).tolist() == [1.0], bad
