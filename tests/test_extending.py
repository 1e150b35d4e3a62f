"""The README's "extending" example: a new policy (``tta/policies/confidence.py``, FixMatch's
confidence threshold) is built by name and runs inside two different methods, Tent and ETA.

Each method runs a few batches of the digits test split with ``extra_policies=["confidence"]``
next to a hand-written reference step that uses the same model and optimizer settings and learns
only from the samples the rule keeps. The policy counters must equal the hand-computed masks, the
logits must be the reference's, and the adapted parameters must equal the reference's, so a sample
below the threshold contributed nothing to the update.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import tta.methods as methods
import tta.policies as policies
from tta.data.digits import load_digits_split
from tta.models import load_classifier

BS = 48
BATCHES = 3
THRESHOLD = 0.95  # the policy's default (FixMatch's)


@pytest.fixture(scope="module")
def batches() -> list[torch.Tensor]:
    images, _ = load_digits_split("test")
    return list(images[: BS * BATCHES].split(BS))


def entropy(z: torch.Tensor) -> torch.Tensor:
    return -(z.softmax(1) * z.log_softmax(1)).sum(1)


def confident(z: torch.Tensor) -> torch.Tensor:
    return z.detach().softmax(1).max(1).values >= THRESHOLD


def reference_step(ref, z: torch.Tensor, keep: torch.Tensor, weights: torch.Tensor | None = None) -> None:
    """SGD on the mean (weighted) entropy of the kept samples only; no step when none is kept."""
    if not bool(keep.any()):
        return
    e = entropy(z)
    per_sample = e if weights is None else e * weights
    ref.optimizer.zero_grad()
    per_sample[keep].mean().backward()
    ref.optimizer.step()


def assert_same_params(method, ref) -> None:
    ours, theirs = dict(method.model.named_parameters()), dict(ref.model.named_parameters())
    for name, p in theirs.items():
        if p.requires_grad:
            torch.testing.assert_close(ours[name].detach(), p.detach(), atol=1e-6, rtol=1e-5, msg=name)


def moved(method, initial: dict[str, torch.Tensor]) -> bool:
    return any(not torch.equal(p.detach(), initial[n]) for n, p in method.model.named_parameters() if p.requires_grad)


def test_the_policy_is_built_by_name():
    policy = policies.build("confidence", num_classes=10)  # num_classes offered, not taken
    assert isinstance(policy, policies.Confidence) and policy.name == "confidence"
    assert policy.level == "samples" and policy.needs == () and policy.threshold == THRESHOLD


def test_confidence_inside_tent_learns_only_from_confident_samples(batches):
    method = methods.build("tent", load_classifier("digits_cnn"), batch_size=BS, extra_policies=["confidence"])
    ref = methods.build("tent", load_classifier("digits_cnn"), batch_size=BS)  # its model and optimizer only
    initial = {n: p.detach().clone() for n, p in method.model.named_parameters()}
    kept = 0
    for x in batches:
        z = ref.model(x)
        keep = confident(z)
        reference_step(ref, z, keep)
        out = method(x)
        torch.testing.assert_close(out, z.detach(), atol=1e-5, rtol=1e-5)
        kept += int(keep.sum())
    stats = method.stats()["policies"]
    assert stats["confidence_seen"] == BS * BATCHES and stats["confidence_kept"] == kept
    assert 0 < kept < BS * BATCHES  # the rule drops some samples and keeps some
    assert_same_params(method, ref)
    assert moved(method, initial)
    # the test can fail: Tent on every sample ends elsewhere
    plain = methods.build("tent", load_classifier("digits_cnn"), batch_size=BS)
    for x in batches:
        plain(x)
    assert any(not torch.allclose(p, q, atol=1e-6)
               for p, q in zip(plain.model.parameters(), method.model.parameters()) if p.requires_grad)


def test_confidence_inside_eta_filters_after_the_methods_own_policies(batches):
    d_margin = 0.6  # keeps part of each batch after the first, so the redundancy filter is exercised
    method = methods.build("eta", load_classifier("digits_cnn"), batch_size=BS, d_margin=d_margin,
                           extra_policies=["confidence"])
    assert method.policy_keys == ["entropy_margin", "redundancy", "eata_weight", "confidence"]
    ref = methods.build("eta", load_classifier("digits_cnn"), batch_size=BS)  # its model and optimizer only
    e_margin = 0.4 * math.log(10)
    m = None
    seen = kept = 0
    for x in batches:
        z = ref.model(x)
        e, p = entropy(z).detach(), z.detach().softmax(1)
        alive = e < e_margin  # EATA's reliability filter
        if m is not None:  # EATA's redundancy filter, then the running mean of the kept predictions
            alive = alive & (F.cosine_similarity(m.unsqueeze(0), p, dim=1).abs() < d_margin)
        if bool(alive.any()):
            m = p[alive].mean(0) if m is None else 0.9 * m + 0.1 * p[alive].mean(0)
        keep = alive & confident(z)  # the new policy, last
        reference_step(ref, z, keep, weights=torch.exp(e_margin - e))  # EATA's weight exp(E0 - H)
        out = method(x)
        torch.testing.assert_close(out, z.detach(), atol=1e-5, rtol=1e-5)
        seen, kept = seen + int(alive.sum()), kept + int(keep.sum())
    stats = method.stats()["policies"]
    assert stats["confidence_seen"] == stats["eata_weight_kept"] == seen
    assert stats["confidence_kept"] == kept and 0 < kept < seen
    assert_same_params(method, ref)
