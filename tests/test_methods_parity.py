"""Each method's step against a plain re-derivation from docs/methods/, written the way the official
code is written (index lists, ``.item()``, Python loops over parameters, ``torch.optim.SGD``).

Tiny timm models with random weights; the head is scaled up so that the entropy filters keep some
samples and drop others. Every comparison is made after one or two online steps: the kept set,
the returned (pre-update) logits, the counters, the updated parameters (SGD with momentum 0.9).
"""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tta.methods as methods
from tta.models import load_classifier

timm = pytest.importorskip("timm")

C = 10
BS = 16
LR = 0.05
NORM = (nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)


# ---------------------------------------------------------------- helpers written from docs/methods/
def tiny(arch: str = "test_resnet", seed: int = 0, head_scale: float | None = None):
    head_scale = head_scale or (6.0 if arch == "test_resnet" else 20.0)
    torch.manual_seed(seed)
    net = timm.create_model(arch, pretrained=False, num_classes=C)
    with torch.no_grad():
        net.get_classifier().weight.mul_(head_scale)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_classifier(net, pretrained=False, num_classes=C)


def batches(n: int = 3, seed: int = 1, size: int = 32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(BS, 3, size, size, generator=g) for _ in range(n)]


def ent(z: torch.Tensor) -> torch.Tensor:
    return -(z.softmax(1) * z.log_softmax(1)).sum(1)


def ref_configure(clf, preset: str) -> list[tuple[str, nn.Parameter]]:
    """Tent/SAR ``configure_model`` + ``collect_params``: train mode, BN on batch statistics."""
    net = clf.net
    net.train()
    net.requires_grad_(False)
    params = []
    for name, m in net.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            m.track_running_stats = False
            m.running_mean = None
            m.running_var = None
        if not isinstance(m, NORM):
            continue
        if preset == "sar" and (any(k in name for k in ("layer4", "blocks.9", "blocks.10", "blocks.11"))
                                or "norm." in name or name == "norm"):
            continue
        for pname in ("weight", "bias"):
            p = getattr(m, pname, None)
            if p is not None:
                p.requires_grad_(True)
                params.append((f"{name}.{pname}", p))
    return params


def pair(name: str, arch: str = "test_resnet", preset: str = "norm", **kwargs):
    clf = tiny(arch)
    ref = copy.deepcopy(clf)
    kwargs.setdefault("lr", LR)
    method = methods.build(name, clf, batch_size=BS, **kwargs)
    params = ref_configure(ref, preset)
    opt = torch.optim.SGD([p for _, p in params], lr=kwargs["lr"], momentum=0.9)
    return method, ref, params, opt


def assert_same_params(method, params, atol=1e-6):
    ours = dict(method.model.net.named_parameters())
    assert method.param_names == [n for n, _ in params]
    for name, p in params:
        torch.testing.assert_close(ours[name].detach(), p.detach(), atol=atol, rtol=1e-5, msg=name)


def changed(params, initial) -> bool:
    return any(not torch.equal(p.detach(), q) for (_, p), q in zip(params, initial))


def momentum_of(method) -> list[torch.Tensor]:
    return [method.optimizer.state[p]["momentum_buffer"].clone() for p in method.adapted_parameters()
            if "momentum_buffer" in method.optimizer.state[p]]


# ---------------------------------------------------------------- ETA / EATA
def eata_reference_step(ref, params, opt, x, m, e_margin, d_margin, fishers=None, alpha=2000.0):
    z = ref(x)
    e = ent(z)
    ids1 = torch.where(e < e_margin)[0]
    if m is not None:
        cos = F.cosine_similarity(m.unsqueeze(0), z[ids1].softmax(1), dim=1)
        ids2 = ids1[torch.where(torch.abs(cos) < d_margin)[0]]
    else:
        ids2 = ids1
    new = z[ids2].softmax(1).detach()
    if new.shape[0] > 0:
        m = new.mean(0) if m is None else 0.9 * m + (1 - 0.9) * new.mean(0)
    coeff = 1 / torch.exp(e[ids2].detach() - e_margin)
    loss = (e[ids2] * coeff).mean(0)
    if fishers is not None:
        for name, p in params:
            loss = loss + alpha * (fishers[name][0] * (p - fishers[name][1]) ** 2).sum()
    if len(ids2) > 0:
        loss.backward()
        opt.step()
    opt.zero_grad()
    return z.detach(), m, len(ids1), len(ids2)


@pytest.mark.parametrize("d_margin", [0.05, 0.6])
def test_eta_matches_reference_including_first_batch_without_m(d_margin):
    method, ref, params, opt = pair("eta", d_margin=d_margin)
    initial = [p.detach().clone() for _, p in params]
    e_margin = 0.4 * math.log(C)
    m, n1, n2, nonempty = None, 0, 0, 0
    for i, x in enumerate(batches()):
        out = method(x)
        z, m, k1, k2 = eata_reference_step(ref, params, opt, x, m, e_margin, d_margin)
        n1, n2, nonempty = n1 + k1, n2 + k2, nonempty + (k2 > 0)
        torch.testing.assert_close(out, z, atol=1e-5, rtol=1e-5)
        assert_same_params(method, params)
        red = method.policies[1]
        assert bool(red.m_exists) == (m is not None)
        if m is not None:
            torch.testing.assert_close(red.m, m, atol=1e-6, rtol=1e-5)
        if i == 0:
            assert k2 == k1 > 0  # first batch: no m yet, the redundancy test does not apply
    assert changed(params, initial)
    stats = method.stats()
    assert stats["policies"]["entropy_margin_kept"] == n1 and stats["policies"]["redundancy_kept"] == n2
    assert stats["counters"]["steps"] == nonempty and stats["counters"]["skipped_empty"] == 3 - nonempty
    assert stats["counters"]["kept"] == n2


def fisher_reference(ref, params, data, bs):
    fishers = {}
    chunks = list(data.split(bs))
    for it, xb in enumerate(chunks, start=1):
        z = ref(xb)
        loss = F.cross_entropy(z, z.max(1)[1])
        loss.backward()
        for name, p in params:
            fisher = p.grad.detach() ** 2 + (fishers[name][0] if it > 1 else 0)
            if it == len(chunks):
                fisher = fisher / it
            fishers[name] = [fisher, p.detach().clone()]
        for _, p in params:
            p.grad = None
    return fishers


def test_eata_fisher_and_steps_match_reference(tmp_path):
    data = torch.rand(40, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    method, ref, params, opt = pair("eata", fisher_data=data, d_margin=0.6, lr=0.01)
    fishers = fisher_reference(ref, params, data, BS)  # 40 images, batches of 16: 16 + 16 + 8
    e_margin = 0.4 * math.log(C)
    m = None
    for x in batches():
        out = method(x)
        z, m, _, _ = eata_reference_step(ref, params, opt, x, m, e_margin, 0.6, fishers, 2000.0)
        torch.testing.assert_close(out, z, atol=1e-5, rtol=1e-5)
        assert_same_params(method, params, atol=2e-6)
    for (name, _), f, a in zip(params, method.fisher.fisher(), method.fisher.anchors()):
        torch.testing.assert_close(f, fishers[name][0], atol=1e-7, rtol=1e-4)
        torch.testing.assert_close(a, fishers[name][1])
    assert method.hparams()["num_samples"] == 40 and method.hparams()["num_batches"] == 3
    assert method.hparams()["fisher_alpha"] == 2000.0

    # the Fisher file: the same steps from a fresh method; another model is a clear error
    path = tmp_path / "fisher.pt"
    method.save_fisher(path)
    again = methods.build("eata", tiny(), batch_size=BS, fisher_path=str(path), d_margin=0.6, lr=0.01)
    for f, g in zip(again.fisher.fisher(), method.fisher.fisher()):
        assert torch.equal(f, g)
    with pytest.raises(ValueError, match=r"blocks\.0\.norm1\.weight"):
        methods.build("eata", tiny("test_vit"), batch_size=BS, fisher_path=str(path))


def test_eata_state_dict_carries_the_fisher():
    first = methods.build("eata", tiny(), batch_size=BS, fisher_data=torch.rand(16, 3, 32, 32))
    first(batches(1)[0])
    second = methods.build("eata", tiny(), batch_size=BS, fisher_data=torch.rand(16, 3, 32, 32) * 0.5)
    second.load_state_dict(first.state_dict())
    second(batches(1)[0])  # the loaded Fisher wins over the pending data
    for f, g in zip(first.fisher.fisher(), second.fisher.fisher()):
        assert torch.equal(f, g)


def test_eata_fisher_size_cuts_the_last_batch():
    data = torch.rand(40, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    method, ref, params, _ = pair("eata", fisher_data=data, fisher_size=20)
    method.compute_fisher()
    fishers = fisher_reference(ref, params, data[:20], BS)
    for (name, _), f in zip(params, method.fisher.fisher()):
        torch.testing.assert_close(f, fishers[name][0], atol=1e-7, rtol=1e-4)
    assert method.hparams()["num_samples"] == 20 and method.hparams()["num_batches"] == 2


def test_eata_without_fisher_data_is_a_clear_error():
    with pytest.raises(ValueError, match="fisher_data"):
        methods.build("eata", tiny(), batch_size=BS)
    methods.build("eata", tiny(), batch_size=BS, fisher_alpha=0)  # ETA in disguise: allowed


def test_fisher_penalty_is_the_official_sum():
    data = torch.rand(32, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    method = methods.build("eata", tiny(), batch_size=BS, fisher_data=data)
    method.compute_fisher()
    with torch.no_grad():
        for p in method.adapted_parameters():
            p.add_(torch.randn_like(p) * 0.1)
    expected = sum(2000.0 * (f * (p - a) ** 2).sum() for f, p, a in
                   zip(method.fisher.fisher(), method.adapted_parameters(), method.fisher.anchors()))
    torch.testing.assert_close(method.fisher(), expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- empty selection and NaN
def test_empty_selection_leaves_weights_and_optimizer_untouched():
    method, _, params, _ = pair("eta")
    method(batches(1)[0])  # a real step first, so the optimizer has momentum
    before = [p.detach().clone() for p in method.adapted_parameters()]
    buffers = momentum_of(method)
    assert buffers and any(b.abs().sum() > 0 for b in buffers)
    method.policies[0].margin = -1.0  # nothing has negative entropy
    out = method(batches(1, seed=5)[0])
    assert torch.isfinite(out).all()
    for p, q in zip(method.adapted_parameters(), before):
        assert torch.equal(p.detach(), q)
    for b, c in zip(momentum_of(method), buffers):
        assert torch.equal(b, c)
    assert method.stats()["counters"]["skipped_empty"] >= 1


@pytest.mark.parametrize("name", ["eta", "eata", "sar", "deyo", "crowds", "eata_c"])
def test_nan_batch_with_skip_leaves_weights_untouched(name):
    kwargs = {"fisher_data": torch.rand(16, 3, 32, 32)} if name in ("eata", "eata_c") else {}
    method = methods.build(name, tiny(), batch_size=BS, lr=LR, nonfinite="skip", **kwargs)
    method(batches(1)[0])
    before = {k: v.clone() for k, v in method.model.state_dict().items()}
    x = batches(1, seed=3)[0]
    x[0, 0, 0, 0] = float("nan")
    method(x)
    for k, v in method.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(ValueError, match="NaN"):
        methods.build(name, tiny(), batch_size=BS, **kwargs)(x)


# ---------------------------------------------------------------- SAR
def sar_reference_step(ref, params, opt, x, margin, ema, rho=0.05, extra_margin=None, reset_to=None,
                       reset_constant=0.2):
    opt.zero_grad()
    z = ref(x)
    e = ent(z)
    keep = e < margin
    if extra_margin is not None:
        keep &= e < extra_margin
    ids1 = torch.where(keep)
    loss = e[ids1].mean(0)
    loss.backward()
    # SAM first step: e = rho * g / (||g|| + 1e-12), global norm
    ps = [p for _, p in params if p.grad is not None]
    grad_norm = torch.norm(torch.stack([p.grad.norm(p=2) for p in ps]), p=2)
    old = []
    with torch.no_grad():
        for p in ps:
            old.append(p.data.clone())
            p.add_(p.grad * (rho / (grad_norm + 1e-12)))
    opt.zero_grad()
    e2 = ent(ref(x))[ids1]
    ids2 = torch.where(e2 < margin)
    loss2 = e2[ids2].mean(0)
    if not math.isnan(loss2.item()):
        ema = loss2.item() if ema is None else 0.9 * ema + (1 - 0.9) * loss2.item()
    loss2.backward()
    for p, o in zip(ps, old):
        p.data = o
    opt.step()
    opt.zero_grad()
    if reset_to is not None and ema is not None and ema < reset_constant:
        with torch.no_grad():  # SAR's reset: weights back, the SGD momentum stays (see the SAR docstring)
            for (_, p), q in zip(params, reset_to):
                p.copy_(q)
    return z.detach(), ema, len(ids1[0]), len(ids2[0])


def test_sar_matches_reference():
    method, ref, params, opt = pair("sar", preset="sar")
    initial = [p.detach().clone() for _, p in params]
    assert all("layer4" not in n for n in method.param_names)
    ema, kept = None, 0
    for x in batches():
        out = method(x)
        z, ema, k1, k2 = sar_reference_step(ref, params, opt, x, 0.4 * math.log(C), ema)
        kept += k2
        torch.testing.assert_close(out, z, atol=1e-5, rtol=1e-5)
        assert_same_params(method, params)
        assert bool(method.ema_exists) == (ema is not None)
        if ema is not None:
            assert float(method.ema) == pytest.approx(ema, rel=1e-5)
    assert changed(params, initial) and kept > 0
    counters = method.stats()["counters"]
    assert counters["forwards"] == 6 and counters["backwards"] == 6 and counters["second_kept"] == kept


def test_sar_second_selection_drops_what_the_perturbed_forward_finds_uncertain():
    """S2 is S1 minus the samples whose entropy at ``theta + e`` is no longer under the margin. Over
    these four batches (SAR's rho, 0.05) S2 drops samples that S1 kept; the stage counts (``entropy_margin`` then ``entropy_margin_sam``),
    ``second_kept`` and the parameters after each step equal the reference's, whose update learns
    from S2 only."""
    method, ref, params, opt = pair("sar", preset="sar")
    ema, dropped, second = None, 0, 0
    for x in batches(4, seed=11):
        method(x)
        _, ema, k1, k2 = sar_reference_step(ref, params, opt, x, 0.4 * math.log(C), ema)
        stages = method.last_selection
        assert list(stages) == ["entropy_margin", "entropy_margin_sam"]
        assert int(stages["entropy_margin"].sum()) == k1 and int(stages["entropy_margin_sam"].sum()) == k2
        assert not bool((stages["entropy_margin_sam"] & ~stages["entropy_margin"]).any())  # S2 within S1
        assert_same_params(method, params)
        dropped += k1 - k2
        second += k2
    assert dropped >= 2 and second > 0, (dropped, second)
    assert method.stats()["counters"]["second_kept"] == second


def test_sar_extra_policy_masks_both_selections():
    method, ref, params, opt = pair("sar", preset="sar", extra_policies=["entropy_margin"],
                                    policy_kwargs={"entropy_margin": {"fraction": 0.2}})
    ema = None
    for x in batches(2):
        method(x)
        _, ema, _, _ = sar_reference_step(ref, params, opt, x, 0.4 * math.log(C), ema,
                                          extra_margin=0.2 * math.log(C))
        assert_same_params(method, params)


@pytest.mark.parametrize("skip_empty", [False, True])
def test_sar_empty_selection_momentum(skip_empty):
    method, ref, params, opt = pair("sar", preset="sar", step_on_empty=not skip_empty)
    xs = batches(2)
    method(xs[0])
    sar_reference_step(ref, params, opt, xs[0], 0.4 * math.log(C), None)
    before = [p.detach().clone() for p in method.adapted_parameters()]
    method.policies[0].margin = -1.0  # S1 empty
    method(xs[1])
    if skip_empty:  # the option: no update at all
        for p, q in zip(method.adapted_parameters(), before):
            assert torch.equal(p.detach(), q)
        assert method.stats()["counters"]["skipped_empty"] == 1
    else:  # the official behaviour: SGD runs on a zero gradient, momentum moves the weights
        sar_reference_step(ref, params, opt, xs[1], -1.0, None)
        assert_same_params(method, params)
        assert any(not torch.equal(p.detach(), q) for p, q in zip(method.adapted_parameters(), before))
        assert method.stats()["counters"]["empty_selection_steps"] == 1


def test_sar_recovery_resets_weights_keeps_momentum_and_ema():
    method, ref, params, opt = pair("sar", preset="sar", reset_constant=50.0)  # the EMA is always below
    initial = [p.detach().clone() for _, p in params]
    ema = None
    for x in batches(2):
        method(x)
        _, ema, _, _ = sar_reference_step(ref, params, opt, x, 0.4 * math.log(C), ema, reset_to=initial,
                                          reset_constant=50.0)
        assert_same_params(method, params)
        for p, q in zip(method.adapted_parameters(), initial):
            assert torch.equal(p.detach(), q)
        assert bool(method.ema_exists)  # kept after a recovery, as the official SAR.forward
    assert method.stats()["counters"]["recoveries"] == 2
    assert any(b.abs().sum() > 0 for b in momentum_of(method))
    fresh = methods.build("sar", tiny(), batch_size=BS, lr=LR, reset_constant=50.0,
                          reset_momentum_on_recovery=True, clear_ema_on_recovery=True)
    fresh(batches(1)[0])
    assert all(b.abs().sum() == 0 for b in momentum_of(fresh)) and not bool(fresh.ema_exists)
    method.reset()
    assert not bool(method.ema_exists)


# ---------------------------------------------------------------- DeYO
def official_patch(x: torch.Tensor, perm: torch.Tensor, p: int = 4) -> torch.Tensor:
    n, c, h, w = x.shape
    th, tw = h // p, w // p
    out = torch.empty_like(x)
    for i in range(n):
        for k in range(p * p):
            r, col = divmod(k, p)
            sr, sc = divmod(int(perm[i, k]), p)
            out[i, :, r * th:(r + 1) * th, col * tw:(col + 1) * tw] = x[i, :, sr * th:(sr + 1) * th, sc * tw:(sc + 1) * tw]
    return out


@pytest.mark.parametrize("arch", ["test_resnet", "test_vit"])
def test_deyo_matches_reference(arch):
    size, tau = 32, 0.2
    method, ref, params, opt = pair("deyo", arch=arch, preset="sar", transform_seed=123)
    initial = [p.detach().clone() for _, p in params]
    gen = torch.Generator().manual_seed(123)
    deyo_margin, e0 = 0.5 * math.log(C), 0.4 * math.log(C)
    total1 = total2 = 0
    for x in batches(size=size):
        out = method(x)
        z = ref(x)
        e = ent(z)
        ids1 = torch.where(e < deyo_margin)[0]
        total1 += len(ids1)
        if len(ids1):
            xp = x[ids1].detach()
            perm = torch.rand((xp.shape[0], 16), generator=gen).argsort(dim=-1)
            with torch.no_grad():
                zp = ref(official_patch(xp, perm))
            p, pp = z[ids1].softmax(1), zp.softmax(1)
            cls = p.argmax(1).reshape(-1, 1)
            plpd = (torch.gather(p, 1, cls) - torch.gather(pp, 1, cls)).reshape(-1)
            ids2 = torch.where(plpd > tau)[0]
            total2 += len(ids2)
            if len(ids2):
                es = e[ids1][ids2]
                coeff = 1 / torch.exp(es.detach() - e0) + 1 / torch.exp(-1.0 * plpd[ids2].detach())
                (es * coeff).mean(0).backward()
                opt.step()
        opt.zero_grad()
        torch.testing.assert_close(out, z.detach(), atol=1e-5, rtol=1e-5)
        assert_same_params(method, params)
    assert total2 > 0 and changed(params, initial)
    pol = method.stats()["policies"]
    assert pol["entropy_margin_kept"] == total1 and pol["plpd_kept"] == total2 and pol["plpd_seen"] == total1


# ---------------------------------------------------------------- wisdom of crowds
def test_crowds_matches_reference():
    method, ref, params, opt = pair("crowds")
    source = copy.deepcopy(ref).requires_grad_(False)  # copied after configure_model, as UniEnt
    kept_total = 0
    for i, x in enumerate(batches()):
        out = method(x)
        with torch.no_grad():
            p0 = source(x).softmax(1)
        values0, indices0 = p0.max(1)
        z = ref(x)
        values = z.softmax(1)[torch.arange(BS), indices0]
        sel = values >= values0
        if i == 0:
            assert sel.all()  # the same model: every sample ties
        kept_total += int(sel.sum())
        pm = z.softmax(1).mean(0)
        loss = ent(z)[sel].mean(0) - 0.5 * (-(pm * torch.log(pm)).sum())
        loss.backward()
        opt.step()
        opt.zero_grad()
        torch.testing.assert_close(out, z.detach(), atol=1e-5, rtol=1e-5)
        assert_same_params(method, params)
    assert method.stats()["policies"]["crowds_kept"] == kept_total
    assert method.hparams()["optimizer"]["lr"] == LR
    assert methods.build("crowds", tiny(), batch_size=64).lr == 1e-3


@pytest.mark.parametrize("skip_empty", [False, True])
def test_crowds_empty_selection(skip_empty):
    method, ref, params, opt = pair("crowds", margin=2.0, step_on_empty=not skip_empty)  # nothing can pass
    initial = [p.detach().clone() for p in method.adapted_parameters()]
    x = batches(1)[0]
    method(x)
    counters = method.stats()["counters"]
    if skip_empty:
        assert all(torch.equal(p.detach(), q) for p, q in zip(method.adapted_parameters(), initial))
        assert counters["skipped_empty"] == 1
    else:  # UniEnt steps on the diversity term alone
        z = ref(x)
        pm = z.softmax(1).mean(0)
        (-0.5 * (-(pm * torch.log(pm)).sum())).backward()
        opt.step()
        assert_same_params(method, params)
        assert counters["empty_selection_steps"] == 1 and counters["steps"] == 1


# ---------------------------------------------------------------- EATA-C, composition, presets
def test_eata_c_runs_and_is_marked_experimental():
    method = methods.build("eata_c", tiny(), batch_size=BS, lr=LR, fisher_data=torch.rand(16, 3, 32, 32), d_margin=0.6)
    initial = [p.detach().clone() for p in method.adapted_parameters()]
    for x in batches(2):
        out = method(x)
        assert torch.isfinite(out).all()
    assert any(not torch.equal(p.detach(), q) for p, q in zip(method.adapted_parameters(), initial))
    hp = method.hparams()
    assert hp["experimental"] is True and hp["parity_checked"] is False
    assert "EXPERIMENTAL" in type(method).__doc__ and method.stats()["counters"]["forwards"] == 4


@pytest.mark.parametrize("name,extra", [("eata", ["plpd"]), ("sar", ["crowds"]), ("tent", ["entropy_margin", "crowds"]),
                                        ("deyo", ["crowds"]), ("crowds", ["plpd"]), ("eta", ["crowds", "plpd"])])
def test_any_policy_on_any_method(name, extra):
    kwargs = {"fisher_data": torch.rand(16, 3, 32, 32)} if name == "eata" else {}
    method = methods.build(name, tiny(), batch_size=BS, lr=LR, extra_policies=extra, **kwargs)
    assert [p.name for p in method.policies][-len(extra):] == extra
    assert ("crowds" in extra or name == "crowds") == (method.frozen_source is not None)
    for x in batches(2):
        assert torch.isfinite(method(x)).all()
    pol = method.stats()["policies"]
    for p in extra:
        assert f"{p}_seen" in pol and f"{p}_kept" in pol
    state = method.state_dict()
    again = methods.build(name, tiny(), batch_size=BS, lr=LR, extra_policies=extra, **kwargs)
    again.load_state_dict(state)
    for key, value in again.state_dict().items():  # weights, buffers, counters and the optimizer state
        if torch.is_tensor(value):
            assert torch.equal(value, state[key]), key
    torch.testing.assert_close(again.optimizer.state_dict()["state"], method.optimizer.state_dict()["state"])
    if name != "deyo" and "plpd" not in extra:  # PLPD draws its patch shuffle from the global RNG
        x = batches(3)[2]
        torch.testing.assert_close(again(x), method(x))  # the restored method continues identically
        for p, q in zip(again.adapted_parameters(), method.adapted_parameters()):
            torch.testing.assert_close(p, q)


def test_presets_and_learning_rates():
    def lr(name, bs, **kw):
        return methods.build(name, tiny(), batch_size=bs, **kw).lr

    data = {"fisher_data": torch.rand(8, 3, 32, 32)}
    assert lr("sar", 64) == 2.5e-4 and lr("deyo", 64) == 2.5e-4 and lr("eata", 64, **data) == 2.5e-4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert lr("sar", 1) == pytest.approx(2.5e-4 / 64 * 2 * 2) and lr("deyo", 1) == pytest.approx(2.5e-4 / 64 * 2 * 2)
        assert lr("eta", 1) == pytest.approx(2.5e-4 / 64 * 2)
    vit = methods.build("sar", tiny("test_vit"), batch_size=64)
    assert vit.lr == pytest.approx(1e-3)
    assert "norm.weight" not in vit.param_names and all(n.startswith("blocks.") for n in vit.param_names)
    assert methods.build("deyo", tiny(), batch_size=BS).params_preset == "sar"
    assert methods.build("eta", tiny(), batch_size=BS).params_preset == "norm"
    assert methods.build("crowds", tiny(), batch_size=BS).params_preset == "norm"


# ---------------------------------------------------------------- composition details
def test_extra_plpd_on_eata_is_a_filter_on_the_eata_selection():
    """``build("eta", extra_policies=["plpd"])``: PLPD forwards the destroyed view of the samples EATA
    kept (S1 and S2), drops those with PLPD <= tau, and leaves EATA's weights alone (no product
    with DeYO's weights, which would scale the loss by ~exp(E0)); ``m`` moves before PLPD filters."""
    tau, seed, frac = 0.05, 31, 0.8  # every stage keeps some and drops some: 48 -> 45 -> 16 -> 8
    method, ref, params, opt = pair("eta", e_margin=frac, d_margin=0.6, extra_policies=["plpd"],
                                    policy_kwargs={"plpd": {"seed": seed, "threshold": tau}})
    assert method.policies[-1].reweight is False
    gen = torch.Generator().manual_seed(seed)
    e_margin = frac * math.log(C)
    m, kept_plpd = None, 0
    for x in batches(size=64):  # 64 px: a single kept image still has >1 value per BN channel
        out = method(x)
        z = ref(x)
        e = ent(z)
        ids1 = torch.where(e < e_margin)[0]
        if m is not None:
            cos = F.cosine_similarity(m.unsqueeze(0), z[ids1].softmax(1), dim=1)
            ids2 = ids1[torch.where(torch.abs(cos) < 0.6)[0]]
        else:
            ids2 = ids1
        new = z[ids2].softmax(1).detach()
        if new.shape[0] > 0:
            m = new.mean(0) if m is None else 0.9 * m + 0.1 * new.mean(0)
        ids3 = ids2[:0]
        if len(ids2):
            perm = torch.rand((len(ids2), 16), generator=gen).argsort(dim=-1)
            with torch.no_grad():
                zp = ref(official_patch(x[ids2], perm))
            p, pp = z[ids2].softmax(1), zp.softmax(1)
            cls = p.argmax(1, keepdim=True)
            plpd = (p.gather(1, cls) - pp.gather(1, cls)).reshape(-1)
            ids3 = ids2[torch.where(plpd > tau)[0]]
        kept_plpd += len(ids3)
        if len(ids3):
            (e[ids3] / torch.exp(e[ids3].detach() - e_margin)).mean(0).backward()
            opt.step()
        opt.zero_grad()
        torch.testing.assert_close(out, z.detach(), atol=1e-5, rtol=1e-5)
        assert_same_params(method, params)
    pol = method.stats()["policies"]
    assert 0 < kept_plpd < pol["plpd_seen"] == pol["redundancy_kept"] < pol["entropy_margin_kept"] < 3 * BS
    assert pol["plpd_kept"] == kept_plpd
    # DeYO's weights on request
    again = methods.build("eta", tiny(), batch_size=BS, extra_policies=["plpd"],
                          policy_kwargs={"plpd": {"reweight": True}})
    assert again.policies[-1].reweight is True
    # DeYO's own PLPD keeps its weights
    assert methods.build("deyo", tiny(), batch_size=BS).policies[-1].reweight is True


def test_repeated_policy_names_get_their_own_counters():
    """A second ``entropy_margin`` must not add into the first one's counts (EATA's num_samples_update_1)."""
    method = methods.build("eta", tiny(), batch_size=BS, lr=LR, extra_policies=["entropy_margin"],
                           policy_kwargs={"entropy_margin": {"fraction": 0.2}})
    x = batches(1)[0]
    with torch.no_grad():
        e = ent(copy.deepcopy(method.model)(x))
    method(x)
    pol = method.stats()["policies"]
    assert method.policy_keys == ["entropy_margin", "redundancy", "eata_weight", "entropy_margin_2"]
    assert pol["entropy_margin_seen"] == BS and pol["entropy_margin_kept"] == int((e < 0.4 * math.log(C)).sum())
    assert pol["entropy_margin_2_kept"] == int((e < 0.2 * math.log(C)).sum())
    assert 0 < pol["entropy_margin_2_kept"] < pol["entropy_margin_kept"]


@pytest.mark.parametrize("name,extra", [("crowds", []), ("sar", ["crowds"]), ("tent", ["entropy_margin", "crowds"])])
def test_the_frozen_source_model_moves_with_the_method(name, extra):
    method = methods.build(name, tiny(), batch_size=BS, lr=LR, extra_policies=extra)
    method.double()
    assert next(method.frozen_source.parameters()).dtype == torch.float64
    assert "source" not in " ".join(method.state_dict())  # still not a submodule
    out = method(batches(1)[0].double())
    assert out.dtype == torch.float64 and torch.isfinite(out).all()


def test_eta_reset_restores_weights_and_optimizer_but_keeps_m():
    method = methods.build("eta", tiny(), batch_size=BS, lr=LR, d_margin=0.6)
    initial = {k: v.clone() for k, v in method.model.state_dict().items()}
    for x in batches(2):
        method(x)
    red = method.policies[1]
    m = red.m.clone()
    assert bool(red.m_exists) and momentum_of(method)
    method.reset()
    for k, v in method.model.state_dict().items():
        assert torch.equal(v, initial[k]), k
    assert momentum_of(method) == [] and bool(red.m_exists) and torch.equal(red.m, m)
