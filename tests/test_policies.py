"""Selection policies against independent re-derivations on fixed logits (EATA, SAR, DeYO, wisdom of crowds),
and the policy contract: level, needs, ``build`` and ``check_compatible``."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tta.policies as policies
from tta.policies import PLPD, BatchContext, check_compatible, occlude, occlusion_window, patch_shuffle, pixel_shuffle

C = 10


def entropy_of(logits: torch.Tensor) -> torch.Tensor:
    p = logits.softmax(1)
    return -(p * logits.log_softmax(1)).sum(1)


def fixed_logits(n: int = 12, c: int = C, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.5, 12.0, n).unsqueeze(1)  # from near-uniform to confident
    return torch.randn(n, c, generator=g) * scale


def ctx_for(logits: torch.Tensor, x: torch.Tensor | None = None, model=None, source=None) -> BatchContext:
    x = x if x is not None else torch.zeros(logits.shape[0], 3, 8, 8)
    return BatchContext(x, logits, model or (lambda images: torch.zeros(images.shape[0], logits.shape[1])),
                        (lambda: source) if source is not None else None)


class Fixed(nn.Module):
    """Returns fixed logits whatever the input (a stand-in for a model)."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, x):
        return self.logits[: x.shape[0]]


def test_registry_lists_the_policies():
    assert {"entropy_margin", "redundancy", "eata_weight", "plpd", "crowds"} <= set(policies.available())
    for name in ("entropy_margin", "redundancy", "eata_weight", "plpd", "crowds"):
        policy = policies.build(name, num_classes=C)
        assert isinstance(policy, nn.Module) and policy.name == name
        assert isinstance(policy.hparams(), dict)


# ---------------------------------------------------------------- entropy margin and EATA weight
@pytest.mark.parametrize("num_classes", [10, 1000])
def test_entropy_margin_is_strict_and_scales_with_ln_c(num_classes):
    logits = fixed_logits(16, num_classes)
    ent = entropy_of(logits)
    alive = torch.ones(16, dtype=torch.bool)
    alive[3] = False
    weight = policies.build("entropy_margin")(ctx_for(logits), alive)
    expected = ((ent < 0.4 * math.log(num_classes)) & alive).float()
    assert torch.equal(weight, expected)
    assert 0 < expected.sum() < 15  # the fixture has samples on both sides
    # strict inequality: a sample whose entropy equals the margin exactly is excluded
    boundary = policies.build("entropy_margin", margin=float(ent[5]))(ctx_for(logits), torch.ones(16, dtype=torch.bool))
    assert weight.dtype == torch.float32 and boundary[5] == 0
    assert torch.equal(boundary, (ent < ent[5]).float())


def test_eata_weight_is_exp_e0_minus_entropy_on_alive_samples():
    logits = fixed_logits()
    alive = torch.tensor([True, False] * 6)
    weight = policies.build("eata_weight")(ctx_for(logits.requires_grad_()), alive)
    e0 = 0.4 * math.log(C)
    expected = torch.where(alive, torch.exp(e0 - entropy_of(logits.detach())), torch.zeros(12))
    torch.testing.assert_close(weight, expected)
    assert not weight.requires_grad


# ---------------------------------------------------------------- redundancy (EATA)
def test_redundancy_first_batch_keeps_all_alive_and_sets_m_to_their_mean():
    policy = policies.build("redundancy", num_classes=C)
    logits = fixed_logits()
    alive = torch.tensor([True, True, False, True] * 3)
    assert not bool(policy.m_exists)
    keep = policy(ctx_for(logits), alive)
    assert torch.equal(keep, alive.float())
    probs = logits.softmax(1)
    torch.testing.assert_close(policy.m, probs[alive].mean(0))
    assert bool(policy.m_exists)


def test_redundancy_cosine_filter_and_moving_average():
    policy = policies.build("redundancy", num_classes=C)
    first, second = fixed_logits(seed=1), fixed_logits(seed=2)
    alive = torch.ones(12, dtype=torch.bool)
    policy(ctx_for(first), alive)
    m = first.softmax(1).mean(0)
    # pick a d_margin between the cosines so that the filter keeps some and drops some
    probs = second.softmax(1)
    cos = F.cosine_similarity(m.unsqueeze(0), probs, dim=1).abs()
    policy.d_margin = float(cos.median())
    alive2 = torch.ones(12, dtype=torch.bool)
    alive2[0] = False
    keep = policy(ctx_for(second), alive2)
    expected = alive2 & (cos < float(cos.median()))  # strict: the median sample itself is dropped
    assert torch.equal(keep, expected.float()) and 0 < expected.sum() < 11
    torch.testing.assert_close(policy.m, 0.9 * m + (1 - 0.9) * probs[expected].mean(0))


def test_redundancy_default_margin_and_empty_sets():
    policy = policies.build("redundancy", num_classes=C)
    logits = fixed_logits()
    none = torch.zeros(12, dtype=torch.bool)
    # empty kept set while m is missing: m stays missing
    assert policy(ctx_for(logits), none).sum() == 0
    assert not bool(policy.m_exists) and torch.count_nonzero(policy.m) == 0
    policy(ctx_for(logits), torch.ones(12, dtype=torch.bool))
    m = policy.m.clone()
    # empty kept set once m exists: m unchanged
    policy(ctx_for(fixed_logits(seed=3)), none)
    assert torch.equal(policy.m, m)
    # the same predictions again: |cos| ~ 1 >= 0.05, everything is redundant, m unchanged
    same = m.log().unsqueeze(0).repeat(12, 1)
    assert policy(ctx_for(same), torch.ones(12, dtype=torch.bool)).sum() == 0
    assert torch.equal(policy.m, m)


def test_redundancy_state_survives_reset_and_travels_in_state_dict():
    policy = policies.build("redundancy", num_classes=C)
    policy(ctx_for(fixed_logits()), torch.ones(12, dtype=torch.bool))
    m = policy.m.clone()
    policy.reset()  # as the official code: reset() does not clear m
    assert bool(policy.m_exists) and torch.equal(policy.m, m)
    other = policies.build("redundancy", num_classes=C)
    other.load_state_dict(policy.state_dict())
    assert bool(other.m_exists) and torch.equal(other.m, m)
    policy.clear()
    assert not bool(policy.m_exists)


# ---------------------------------------------------------------- crowds
def test_crowds_keeps_when_adapted_is_at_least_as_confident_in_source_class():
    source = fixed_logits(seed=4)
    adapted = source.clone()
    adapted[0] += torch.nn.functional.one_hot(source[0].argmax(), C) * 1.0  # more confident: kept
    adapted[1] -= torch.nn.functional.one_hot(source[1].argmax(), C) * 1.0  # less confident: dropped
    adapted[2] = source[2] + 3.0  # a constant shift: identical softmax, a tie in value
    ctx = ctx_for(adapted, source=Fixed(source))
    alive = torch.ones(12, dtype=torch.bool)
    alive[5] = False
    keep = policies.build("crowds")(ctx, alive)
    p_o, p_a = source.softmax(1), adapted.softmax(1)
    c_o = p_o.argmax(1)
    expected = alive & (p_a[torch.arange(12), c_o] >= p_o[torch.arange(12), c_o])
    assert torch.equal(keep, expected.float())
    assert keep[0] == 1 and keep[1] == 0 and keep[3] == 1 and keep[5] == 0  # identical rows: ties kept
    # a margin moves the boundary: p_a[c_o] >= p_o[c_o] + margin
    strict = policies.build("crowds", margin=0.05)(ctx_for(adapted, source=Fixed(source)), alive)
    assert torch.equal(strict, (alive & (p_a[torch.arange(12), c_o] >= p_o[torch.arange(12), c_o] + 0.05)).float())
    assert policies.build("crowds").needs == ("source",)


def test_crowds_without_source_model_is_a_clear_error():
    with pytest.raises(RuntimeError, match="source model"):
        policies.build("crowds")(ctx_for(fixed_logits()), torch.ones(12, dtype=torch.bool))


@pytest.mark.parametrize("name,extra,forwards", [("crowds", [], 2), ("tent", ["crowds"], 2), ("tent", [], 1),
                                                  ("eta", [], 1)])
def test_the_frozen_source_pass_is_counted(name, extra, forwards):
    """``crowds`` asks for the frozen source model's logits: one more forward per batch (per step)."""
    import tta.methods as methods
    from tta.models import load_classifier

    method = methods.build(name, load_classifier("digits_cnn"), batch_size=8, extra_policies=extra)
    for _ in range(2):
        method(torch.rand(8, 3, 32, 32))
    stats = method.stats()
    assert stats["counters"]["forwards"] == 2 * forwards and stats["per_batch"]["forwards"] == forwards


# ---------------------------------------------------------------- DeYO's transforms
def test_patch_shuffle_permutes_tiles_per_image_and_is_seeded():
    x = torch.rand(5, 3, 32, 32)
    out = patch_shuffle(x, 4, torch.Generator().manual_seed(7))
    again = patch_shuffle(x, 4, torch.Generator().manual_seed(7))
    assert torch.equal(out, again)
    perm = torch.rand((5, 16), generator=torch.Generator().manual_seed(7)).argsort(dim=1)

    def tile(img, k):
        r, c = divmod(int(k), 4)
        return img[:, r * 8:(r + 1) * 8, c * 8:(c + 1) * 8]

    perms = []
    for i in range(5):
        for k in range(16):  # output tile k (row-major) is input tile perm[i, k]
            assert torch.equal(tile(out[i], k), tile(x[i], perm[i, k]))
        perms.append(tuple(perm[i].tolist()))
    assert len(set(perms)) > 1  # one permutation per image
    assert sorted(perm[0].tolist()) == list(range(16))
    # not a multiple of the grid: resized down and back, shape preserved
    odd = patch_shuffle(torch.rand(2, 3, 30, 30), 4, torch.Generator().manual_seed(0))
    assert odd.shape == (2, 3, 30, 30)


def test_pixel_shuffle_shares_one_permutation():
    # DeYO's pixel transform: one ``torch.randperm(H*W)`` for the whole batch (not argsort of noise)
    x = torch.rand(3, 3, 6, 6)
    out = pixel_shuffle(x, torch.Generator().manual_seed(3))
    perm = torch.randperm(36, generator=torch.Generator().manual_seed(3))
    assert torch.equal(out, x.flatten(2)[:, :, perm].view_as(x))


def test_destroying_transforms_draw_from_the_global_cpu_rng_like_deyo():
    """Default (no seed): the official calls on the global CPU RNG, so ``torch.manual_seed``
    reproduces DeYO's draws: ``argsort(torch.rand(N, P*P))`` (patch), ``torch.randperm(H*W)`` (pixel)."""
    x = torch.rand(4, 3, 16, 16)
    torch.manual_seed(17)
    patch, pixel = patch_shuffle(x, 4), pixel_shuffle(x)
    torch.manual_seed(17)
    perm = torch.argsort(torch.rand(4, 16), dim=-1)
    pix = torch.randperm(16 * 16)
    tiles = x.reshape(4, 3, 4, 4, 4, 4).permute(0, 2, 4, 1, 3, 5).reshape(4, 16, 3, 4, 4)
    expected = tiles[torch.arange(4).unsqueeze(-1), perm].reshape(4, 4, 4, 3, 4, 4).permute(0, 3, 1, 4, 2, 5)
    assert torch.equal(patch, expected.reshape(4, 3, 16, 16))
    assert torch.equal(pixel, x.flatten(2)[:, :, pix].view_as(x))
    # the policy with a seed owns one CPU generator: the same draws for every device it is asked about
    policy = PLPD(seed=5)
    assert policy.generator(torch.device("cpu")) is policy.generator(torch.device("meta"))
    assert policy.generator(torch.device("meta")).device.type == "cpu"


def test_occlusion_window_scales_with_the_image():
    assert occlusion_window(224, 224) == (56, 168, 56, 168)
    assert occlusion_window(32, 32) == (8, 24, 8, 24)
    x = torch.rand(2, 3, 32, 32)
    out = occlude(x)
    mean = x.mean(dim=(2, 3))
    assert torch.allclose(out[:, :, 8:24, 8:24], mean[:, :, None, None].expand(2, 3, 16, 16))
    mask = torch.ones(32, 32, dtype=torch.bool)
    mask[8:24, 8:24] = False
    assert torch.equal(out[:, :, mask], x[:, :, mask])


@pytest.mark.parametrize("kind", ["patch", "pixel", "occ"])
def test_transforms_commute_with_per_channel_normalisation(kind):
    x = torch.rand(4, 3, 32, 32)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    policy = PLPD(aug_type=kind, seed=11)
    a = (policy.destroy(x) - mean) / std
    policy = PLPD(aug_type=kind, seed=11)
    b = policy.destroy((x - mean) / std)
    torch.testing.assert_close(a, b)


# ---------------------------------------------------------------- PLPD
class CountingBN(nn.Module):
    """A tiny deterministic BatchNorm net (batch statistics) that counts its forwards."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4, track_running_stats=False)
        self.fc = nn.Linear(4 * 16, C)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        h = F.adaptive_avg_pool2d(torch.relu(self.bn(self.conv(x))), 4)
        return self.fc(h.flatten(1)) * 5


def test_plpd_mask_and_weight_match_deyo():
    model = CountingBN()
    x = torch.rand(12, 3, 16, 16)
    with torch.no_grad():
        logits = model(x)
    alive = torch.tensor([True] * 9 + [False] * 3)
    # re-derivation, written the official way: index the alive subset, destroy, forward it alone
    idx = torch.where(alive)[0]
    destroyed = patch_shuffle(x[idx], 4, torch.Generator().manual_seed(21))
    with torch.no_grad():
        prime = model(destroyed)  # BatchNorm statistics of the alive subset only
    p, pp = logits[idx].softmax(1), prime.softmax(1)
    cls = p.argmax(1, keepdim=True)
    plpd = (p.gather(1, cls) - pp.gather(1, cls)).squeeze(1)
    threshold = float(plpd.median())
    policy = PLPD(seed=21, threshold=threshold)
    weight = policy(ctx_for(logits, x, model), alive)
    keep = plpd > threshold  # strict: the median sample is dropped
    ent = entropy_of(logits[idx])
    w = torch.exp(0.4 * math.log(C) - ent) + torch.exp(plpd)
    expected = torch.zeros(12)
    expected[idx[keep]] = w[keep]
    torch.testing.assert_close(weight, expected)
    assert 0 < keep.sum() < 9
    mask = PLPD(seed=21, threshold=threshold, reweight=False)(ctx_for(logits, x, model), alive)
    assert torch.equal(mask, (expected > 0).float())


def test_plpd_view_is_shared_through_the_context_and_skipped_when_nothing_is_alive():
    model = CountingBN()
    x = torch.rand(8, 3, 16, 16)
    with torch.no_grad():
        logits = model(x)
    model.calls = 0
    ctx = ctx_for(logits, x, model)
    alive = torch.ones(8, dtype=torch.bool)
    first = PLPD(seed=1, threshold=-1.0)(ctx, alive)
    second = PLPD(seed=1, threshold=-1.0, reweight=False)(ctx, alive)
    assert model.calls == 1 and torch.equal(second, (first > 0).float())
    model.calls = 0
    out = PLPD()(ctx_for(logits, x, model), torch.zeros(8, dtype=torch.bool))
    assert model.calls == 0 and out.sum() == 0


def test_policies_deepcopy_and_move():
    """A deep copy is independent (buffers and the PLPD generator), and ``.double()`` / ``.to(device)``
    move every buffer of a policy (the running prediction, ADTE's label-bias memory)."""
    red = policies.build("redundancy", num_classes=C)
    assert "m" in dict(red.named_buffers()) and "m_exists" in dict(red.named_buffers())
    red(ctx_for(fixed_logits()), torch.ones(12, dtype=torch.bool))
    m = red.m.clone()
    twin = copy.deepcopy(red).double()
    assert twin.m.dtype == torch.float64 and twin.m_exists.dtype == torch.bool  # floats converted, flags not
    assert red.m.dtype == torch.float32 and torch.equal(twin.m, m.double())
    twin.clear()
    assert bool(red.m_exists) and torch.equal(red.m, m)  # the original is untouched
    meta = copy.deepcopy(red).to(torch.device("meta"))  # a real device move without a GPU
    assert {b.device.type for b in meta.buffers()} == {"meta"} and red.m.device.type == "cpu"

    ranking = policies.build("tsallis", num_classes=C).double()
    assert ranking.q_index.dtype == ranking.log_bias.dtype == ranking.bias.memory.dtype == torch.float64
    assert ranking.bias.entries.dtype == torch.long
    moved = copy.deepcopy(ranking).to(torch.device("meta"))
    assert {b.device.type for b in moved.buffers()} == {"meta"}
    assert {b.device.type for b in ranking.buffers()} == {"cpu"}

    policy = PLPD(seed=3)
    torch.rand(4, generator=policy.generator())  # advance the policy's own generator
    clone = copy.deepcopy(policy)
    assert clone.generator() is not policy.generator()
    assert torch.equal(torch.rand(4, generator=clone.generator()), torch.rand(4, generator=policy.generator()))


# ---------------------------------------------------------------- the contract: level, needs, build
def test_every_policy_declares_its_level_and_needs():
    expected = {"entropy_margin": ("samples", ()), "eata_weight": ("samples", ()), "redundancy": ("samples", ()),
                "plpd": ("samples", ("model",)), "crowds": ("samples", ("source",)), "confidence": ("samples", ()),
                "cosine_filter": ("views", ()), "difftpt_confidence": ("views", ()), "tpt_confidence": ("views", ()),
                "tsallis": ("views", ())}
    assert set(expected) <= set(policies.available())
    for name, (level, needs) in expected.items():
        policy = policies.build(name, num_classes=C)
        assert (policy.level, tuple(policy.needs)) == (level, needs), name
    # needs may depend on the settings: the cosine filter on embeddings needs them
    assert policies.build("cosine_filter", on="embeddings").needs == ("embeddings",)
    assert policies.build("cosine_filter", on="logits").needs == ()


def test_build_passes_num_classes_only_to_policies_that_take_it():
    assert policies.build("redundancy", num_classes=7).m.shape == (7,)
    assert policies.build("tsallis", num_classes=7).q_index.shape == (7,)
    policies.build("entropy_margin", num_classes=7)  # offered, not taken
    with pytest.raises(TypeError):  # it is not part of these constructors
        policies.EntropyMargin(num_classes=7)
    with pytest.raises(TypeError):  # any other unknown keyword is still an error
        policies.build("entropy_margin", nonsense=1)


def test_a_policy_must_declare_a_known_level_and_known_needs():
    with pytest.raises(TypeError, match="level"):
        type("Bad", (policies.Policy,), {"level": "pixels"})
    with pytest.raises(TypeError, match="unknown signals"):
        type("Bad", (policies.Policy,), {"needs": ("labels",)})


def test_check_compatible_names_the_policy_and_the_method():
    tsallis = policies.build("tsallis", num_classes=C)
    with pytest.raises(ValueError) as err:
        check_compatible(tsallis, level="samples", provides={"source", "model"}, method="tent",
                         alternatives=["tpt", "difftpt", "adte"])
    assert str(err.value) == ("policy 'tsallis' ranks the views of one image; method 'tent' adapts on batches of "
                              "samples: use it with tpt, difftpt or adte")
    with pytest.raises(ValueError, match="policy 'entropy_margin' ranks or weights the samples of a batch; method 'tpt' "
                                         "adapts on the views of one image at a time: use it with a method that "
                                         "adapts on batches of samples"):
        check_compatible(policies.build("entropy_margin"), level="views", provides={"embeddings"}, method="tpt")
    with pytest.raises(ValueError, match="policy 'crowds' needs the frozen source model .*method 'eta' does not provide it"):
        check_compatible(policies.build("crowds"), level="samples", provides={"model"}, method="eta")
    with pytest.raises(ValueError, match="policy 'cosine_filter' needs image embeddings of the views; method 'x'"):
        check_compatible(policies.build("cosine_filter", on="embeddings"), level="views", provides=set(), method="x")
    with pytest.raises(ValueError, match="unknown policy level"):
        check_compatible(tsallis, level="images", provides=set(), method="x")
    with pytest.raises(ValueError, match="unknown signals"):
        check_compatible(tsallis, level="views", provides={"labels"}, method="x")
    # compatible combinations pass
    check_compatible(tsallis, level="views", provides=set(), method="tpt")
    check_compatible(policies.build("cosine_filter", on="embeddings"), level="views", provides={"embeddings"}, method="x")
    check_compatible(policies.build("crowds"), level="samples", provides={"source", "model"}, method="tent")
    check_compatible(PLPD(), level="samples", provides={"source", "model"}, method="eta")


# ---------------------------------------------------------------- confidence (the extending example)
def test_confidence_keeps_max_probability_at_or_above_the_threshold():
    logits = fixed_logits()
    alive = torch.ones(12, dtype=torch.bool)
    alive[-1] = False
    top = logits.softmax(1).max(1).values
    threshold = float(top[6])
    keep = policies.build("confidence", threshold=threshold)(ctx_for(logits), alive)
    expected = alive & (top >= threshold)  # inclusive: sample 6 itself is kept
    assert torch.equal(keep, expected.float()) and keep[6] == 1 and 0 < expected.sum() < 11
    assert policies.build("confidence").threshold == 0.95  # FixMatch's
    with pytest.raises(ValueError, match="threshold"):
        policies.build("confidence", threshold=1.5)


# ---------------------------------------------------------------- shared formulas (tta.objectives)
def test_the_two_keep_counts_and_the_entropy_forms():
    from tta.objectives import floor_fraction, shannon_entropy, shannon_entropy_of_probs, views_kept

    # TPT/ADTE: at least one view; DiffTPT: Python's int(n * ratio) on the device (int(127 * 0.8) = 101)
    assert [views_kept(v, 0.1) for v in (5, 10, 64)] == [1, 1, 6]
    assert floor_fraction(torch.tensor(127), 0.8).item() == int(127 * 0.8) == 101
    assert floor_fraction(torch.tensor(2), 0.3).item() == 0
    logits = fixed_logits()
    torch.testing.assert_close(shannon_entropy(logits), entropy_of(logits))
    torch.testing.assert_close(shannon_entropy(logits.T, dim=0), entropy_of(logits))
    p = logits.softmax(1)
    assert torch.equal(shannon_entropy_of_probs(p), -(p * torch.log(p + 1e-8)).sum(-1))  # ADTE's smoothed form


# ---------------------------------------------------------------- the Tsallis score, by hand
#: four views of one image over five classes: the probabilities behind the view logits below
TSALLIS_VIEWS = [(0.49, 0.49, 0.01, 0.005, 0.005), (0.9, 0.025, 0.025, 0.025, 0.025),
                 (0.6, 0.37, 0.01, 0.01, 0.01), (0.85, 0.05, 0.05, 0.03, 0.02)]
#: ``(1 - sum_c p_c^0.1) / (0.1 - 1)`` of each view, worked out by hand (to 6 digits)
TSALLIS_Q01 = (2.967406, 3.061701, 3.053811, 3.162909)
#: ``-sum_c p_c log p_c`` of each view, likewise
SHANNON = (0.798118, 0.463712, 0.812524, 0.621151)


def test_tsallis_score_by_hand_and_it_ranks_views_unlike_shannon():
    """``score="tsallis"`` is ``(1 - sum p^q) / (q - 1)``: on four fixed views it gives the values
    worked out by hand, and with half of the views kept it keeps the two that spread their mass over
    two classes (views 0 and 2), where Shannon's entropy keeps the two with one dominant class and a
    flat tail (views 1 and 3)."""
    logits = torch.tensor(TSALLIS_VIEWS, dtype=torch.float64).log()
    tsallis = policies.build("tsallis", num_classes=5, score="tsallis", q=0.1, fraction=0.5)
    shannon = policies.build("tsallis", num_classes=5, score="shannon", fraction=0.5)
    torch.testing.assert_close(tsallis.score(logits).double(), torch.tensor(TSALLIS_Q01, dtype=torch.float64),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(shannon.score(logits).double(), torch.tensor(SHANNON, dtype=torch.float64),
                               rtol=1e-5, atol=1e-6)
    assert tsallis.select(logits).tolist() == [1.0, 0.0, 1.0, 0.0]
    assert shannon.select(logits).tolist() == [0.0, 1.0, 0.0, 1.0]
