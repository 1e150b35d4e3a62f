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


def test_batch_size_one_without_batchnorm_does_not_warn():
    """A GroupNorm model normalises each image on its own: batch size 1 is fine there."""
    import warnings

    method = tta.methods.build("tent", load_classifier("digits_gn"), batch_size=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            method(torch.rand(1, 3, 32, 32))
    assert method.stats()["counters"]["batches"] == 2


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


@pytest.mark.parametrize("options", [
    dict(momentum=0.9, foreach=True),
    dict(momentum=0.9),  # foreach left to torch (per-tensor on the CPU)
    dict(momentum=0.0),
    dict(momentum=0.9, weight_decay=1e-2, nesterov=True, foreach=True),
    dict(momentum=0.5, dampening=0.3, maximize=True),
])
def test_optimizer_step_is_bitwise_sgd_step(options):
    """The guarded update's SGD step (torch's functional SGD, without ``SGD.step``'s wrappers) gives
    bit for bit the parameters and momentum buffers of ``SGD.step()``, a parameter without a
    gradient untouched, and the buffers created lazily as SGD creates them."""
    from tta.objectives.update import optimizer_step

    torch.manual_seed(0)
    ours_w = [torch.randn(5, requires_grad=True), torch.randn(2, 3, requires_grad=True), torch.randn(4, requires_grad=True)]
    plain_w = [w.detach().clone().requires_grad_(True) for w in ours_w]
    ours, plain = (torch.optim.SGD(ws, lr=0.05, **options) for ws in (ours_w, plain_w))
    for k in range(6):
        grads = [torch.randn_like(w) for w in ours_w]
        for ws in (ours_w, plain_w):
            for i, (w, g) in enumerate(zip(ws, grads)):
                w.grad = None if (i == 2 and k % 2) else g.clone()
        optimizer_step(ours)
        plain.step()
        assert all(torch.equal(a, b) for a, b in zip(ours_w, plain_w)), k
    for a, b in zip(ours_w, plain_w):
        assert ours.state[a].keys() == plain.state[b].keys()
        if "momentum_buffer" in plain.state[b]:
            assert torch.equal(ours.state[a]["momentum_buffer"], plain.state[b]["momentum_buffer"])


def test_optimizer_step_with_a_sparse_gradient_in_a_later_group_steps_each_group_once():
    """A sparse gradient anywhere sends the whole step to ``SGD.step()``, decided before any group
    moved (a dense group updated first and again by ``SGD.step()`` would be stepped twice)."""
    from tta.objectives.update import optimizer_step

    ours = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(4))]
    plain = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(4))]
    for ws in (ours, plain):
        ws[0].grad = torch.ones(3)
        ws[1].grad = torch.sparse_coo_tensor([[1]], [2.0], (4,))
    ours_opt = torch.optim.SGD([{"params": [ours[0]]}, {"params": [ours[1]]}], lr=0.1)
    plain_opt = torch.optim.SGD([{"params": [plain[0]]}, {"params": [plain[1]]}], lr=0.1)
    optimizer_step(ours_opt)
    plain_opt.step()
    assert all(torch.equal(a, b) for a, b in zip(ours, plain))


def test_optimizer_step_keeps_hooks_and_schedulers():
    """Anything that observes ``SGD.step`` (a step hook, a global hook, an LR scheduler's call
    count) still sees it: those optimizers take ``optimizer.step()`` itself."""
    import warnings

    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from tta.objectives.update import optimizer_step

    w = torch.ones(3, requires_grad=True)
    opt = torch.optim.SGD([w], lr=0.1, momentum=0.9)
    calls = []
    handle = opt.register_step_post_hook(lambda *a: calls.append("own"))
    w.grad = torch.ones(3)
    optimizer_step(opt)
    handle.remove()
    handle = register_optimizer_step_pre_hook(lambda *a: calls.append("global"))
    try:
        optimizer_step(opt)
    finally:
        handle.remove()
    assert calls == ["own", "global"]
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "lr_scheduler.step() before optimizer.step()" if the call went unseen
        optimizer_step(opt)
        scheduler.step()
