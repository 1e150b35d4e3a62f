"""LAME against a direct re-implementation of fiveai/LAME ``src/adaptation/lame.py`` (float64).

The reference step is written here the way the official code writes it: the frozen model in
``eval()``, ``probas`` and the head's input as features, the affinity classes, and
``laplacian_optimization`` with its host-side early stop (``.item()``, ``break``). LAME updates
nothing, so the comparison is the returned output (softmax of ``tta``'s ``log Y`` against the
reference's ``Y``) and an unchanged model after every batch.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import tta.methods as methods
from tta.data.digits import load_digits_split
from tta.models import load_classifier
from tta.objectives.laplacian import laplacian_optimization


# ---------------------------------------------------------------- the reference, from lame.py
def ref_knn_affinity(X, knn):
    N = X.size(0)
    dist = torch.norm(X.unsqueeze(0) - X.unsqueeze(1), dim=-1, p=2)
    n_neighbors = min(knn + 1, N)
    knn_index = dist.topk(n_neighbors, -1, largest=False).indices[:, 1:]
    W = torch.zeros(N, N, device=X.device, dtype=X.dtype)
    W.scatter_(dim=-1, index=knn_index, value=1.0)
    return W


def ref_rbf_affinity(X, knn):
    N = X.size(0)
    dist = torch.norm(X.unsqueeze(0) - X.unsqueeze(1), dim=-1, p=2)
    n_neighbors = min(knn, N)
    kth_dist = dist.topk(k=n_neighbors, dim=-1, largest=False).values[:, -1]
    sigma = kth_dist.mean()
    return torch.exp(- dist ** 2 / (2 * sigma ** 2))


def ref_linear_affinity(X, knn):
    return torch.matmul(X, X.t())


def ref_entropy_energy(Y, unary, pairwise, bound_lambda):
    return (unary * Y - bound_lambda * pairwise * Y + Y * torch.log(Y.clip(1e-20))).sum()


def ref_laplacian_optimization(unary, kernel, bound_lambda=1, max_steps=100):
    oldE = float('inf')
    Y = (-unary).softmax(-1)
    for i in range(max_steps):
        pairwise = bound_lambda * kernel.matmul(Y)
        exponent = -unary + pairwise
        Y = exponent.softmax(-1)
        E = ref_entropy_energy(Y, unary, pairwise, bound_lambda).item()
        if (i > 1 and (abs(E - oldE) <= 1e-8 * abs(oldE))):
            return Y, i
        oldE = E
    return Y, max_steps


def ref_run_step(clf, x, affinity, knn, force_symmetry):
    clf.eval()
    with torch.no_grad():
        feats = clf.net.features(clf.normalize(x))
        probas = clf.net.fc(feats).softmax(1)
        unary = - torch.log(probas + 1e-10)
        feats = F.normalize(feats, p=2, dim=-1)
        kernel = {"rbf": ref_rbf_affinity, "kNN": ref_knn_affinity, "linear": ref_linear_affinity}[affinity](feats, knn)
        if force_symmetry:
            kernel = 1 / 2 * (kernel + kernel.t())
        return ref_laplacian_optimization(unary, kernel)


def digits_batches(n=3, bs=48, seed=0):
    images, _ = load_digits_split("test")
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(images), generator=g)[: n * bs]
    noisy = (images[order].double() + 0.35 * torch.randn(n * bs, *images.shape[1:], generator=g, dtype=torch.float64))
    return list(noisy.clamp(0, 1).split(bs))


# ---------------------------------------------------------------- tests
@pytest.mark.parametrize("affinity,knn,force_symmetry", [("rbf", 5, False), ("kNN", 3, True), ("linear", 5, False)])
def test_lame_matches_the_official_run_step(affinity, knn, force_symmetry):
    clf = load_classifier("digits_cnn").double()
    ref = copy.deepcopy(clf)
    method = methods.build("lame", clf, batch_size=48, affinity=affinity, knn=knn, force_symmetry=force_symmetry)
    before = copy.deepcopy(method.model.state_dict())
    changed_argmax, iterations = 0, []
    for x in digits_batches():
        out = method(x)
        y, steps = ref_run_step(ref, x, affinity, knn, force_symmetry)
        iterations.append(steps)
        torch.testing.assert_close(out.softmax(1), y, atol=1e-12, rtol=1e-9)
        assert torch.equal(out.argmax(1), y.argmax(1))
        with torch.no_grad():
            changed_argmax += int((ref(x).argmax(1) != y.argmax(1)).sum())
        for k, v in method.model.state_dict().items():
            assert torch.equal(v, before[k]), k  # nothing is learned, BatchNorm statistics included
    assert changed_argmax > 0  # the Laplacian term changes predictions: the test can see it
    assert any(2 < s < 100 for s in iterations)  # the early stop fired before the last iteration
    assert method.stats()["counters"]["backwards"] == 0 and method.optimizer is None


def test_the_device_side_early_stop_returns_the_reference_iteration():
    g = torch.Generator().manual_seed(3)
    unary = -torch.log(torch.rand(20, 7, generator=g, dtype=torch.float64).softmax(1))
    feats = F.normalize(torch.randn(20, 5, generator=g, dtype=torch.float64), dim=-1)
    kernel = ref_rbf_affinity(feats, 5)
    y_ref, steps = ref_laplacian_optimization(unary, kernel)
    assert 2 < steps < 100
    torch.testing.assert_close(laplacian_optimization(unary, kernel), y_ref, atol=0, rtol=0)


def test_lame_single_image_and_identical_features_are_finite():
    method = methods.build("lame", load_classifier("digits_cnn"), batch_size=8)
    x = torch.rand(1, 3, 32, 32)
    assert torch.isfinite(method(x)).all()
    out = method(x.expand(4, -1, -1, -1))
    assert torch.isfinite(out).all() and torch.allclose(out, out[:1].expand(4, -1))
    with pytest.raises(ValueError, match="affinity"):
        methods.build("lame", load_classifier("digits_cnn"), affinity="gaussian")
