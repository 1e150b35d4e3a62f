"""The contract between methods, the engine and the command line.

* two families over one core; policies are assembled after the whole constructor ran;
* a policy's level and needs are checked when a method is built;
* a method declares what it needs from the run (``run_inputs``), and one provider builds it;
* the engine calls every method the same way; ``engine.py`` and ``run.py`` name no method;
* the learning-rate rule reads the network, not its name.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import tta
from tta import methods
from tta.methods import BatchMethod, RunInput, ViewMethod, model_family
from tta.models import load_classifier
from tta.policies import EntropyMargin, Policy
from tta.provide import RunParts, provide_inputs

REPO = Path(__file__).resolve().parents[1]
BATCH = ["source", "norm", "tent", "eta", "eata", "sar", "deyo", "crowds", "eata_c", "rdumb", "lame", "cotta", "rotta", "sotta",
         "roid"]
VIEWS = ["tpt", "difftpt", "adte", "zero", "tda", "ctpt"]


def digits():
    return load_classifier("digits_cnn")


def test_every_method_belongs_to_one_family():
    assert sorted(methods.available()) == sorted(BATCH + VIEWS)
    for name in BATCH:
        assert issubclass(methods.METHODS.get(name), BatchMethod) and methods.METHODS.get(name).policy_level == "samples"
    for name in VIEWS:
        assert issubclass(methods.METHODS.get(name), ViewMethod) and methods.METHODS.get(name).policy_level == "views"


def test_a_recipe_sets_its_fields_after_super_and_its_policies_see_them():
    class Strict(BatchMethod):  # a new recipe, written the plain way: fields after super().__init__()
        def __init__(self, model, *, fraction: float = 0.1, **kwargs):
            super().__init__(model, **kwargs)
            self.fraction = fraction

        def default_policies(self) -> list[Policy]:
            return [EntropyMargin(fraction=self.fraction)]

    class Stricter(Strict):  # a subclass without its own __init__ assembles once too
        pass

    for cls in (Strict, Stricter):
        method = cls(digits(), fraction=0.2, extra_policies=["confidence"])
        assert [p.name for p in method.policies] == ["entropy_margin", "confidence"]
        assert method.policies[0].fraction == 0.2
        assert sorted(method.stats()["policies"]) == ["confidence_kept", "confidence_seen", "entropy_margin_kept",
                                                      "entropy_margin_seen"]


@pytest.mark.parametrize("method,policy", [("tent", "tsallis"), ("eata", "tpt_confidence"), ("sar", "cosine_filter")])
def test_a_view_policy_on_a_batch_method_is_refused_naming_both(method, policy):
    with pytest.raises(ValueError) as error:
        methods.build(method, digits(), extra_policies=[policy], fisher_alpha=0) if method == "eata" else \
            methods.build(method, digits(), extra_policies=[policy])
    assert repr(policy) in str(error.value) or policy in str(error.value)
    assert method in str(error.value)


def test_run_inputs_are_declared_per_hyperparameters(tmp_path):
    eata = methods.METHODS.get("eata")
    [need] = eata.run_inputs({"fisher_size": 300})
    assert (need.kind, need.keyword, need.required, need.options["num_samples"]) == ("clean_images", "fisher_data",
                                                                                     True, 300)
    assert eata.run_inputs({"fisher_alpha": 0}) == []
    saved = tmp_path / "fisher.pt"
    saved.write_bytes(b"")
    assert eata.run_inputs({"fisher_path": str(saved)}) == []
    assert methods.METHODS.get("tent").run_inputs({}) == []
    kinds = {name: [i.kind for i in methods.METHODS.get(name).run_inputs({})] for name in VIEWS}
    assert kinds == {"tpt": ["diffusion_views"], "difftpt": ["diffusion_views"],
                     "adte": ["diffusion_views", "test_pass"], "zero": ["diffusion_views"],
                     "tda": ["diffusion_views"], "ctpt": ["diffusion_views"]}
    assert methods.METHODS.get("difftpt").run_inputs({})[0].required
    assert not methods.METHODS.get("difftpt").run_inputs({"num_diffusion": 0})[0].required
    with pytest.raises(ValueError, match="unknown run input kind"):
        RunInput("memory_bank", keyword="bank")


def test_the_provider_hands_eata_its_clean_images_as_the_declared_keyword():
    from tta.data import load_data_config

    data = dict(load_data_config("digits_c"))
    parts = RunParts(data=data, seed=3, batch_size=64)
    kwargs = provide_inputs(methods.METHODS.get("eata"), {"fisher_size": 100}, parts)
    assert list(kwargs) == ["fisher_data"] and kwargs["fisher_data"].shape == (100, 3, 32, 32)
    assert parts.record["clean_images"]["num_samples"] == 100
    assert provide_inputs(methods.METHODS.get("tent"), {}, RunParts(data=data)) == {}
    with pytest.raises(ValueError, match="makes no augmented views"):
        provide_inputs(methods.METHODS.get("tent"), {}, RunParts(data=data, augment={"diffusion": {"pipeline": "x"}}))
    folder = {"name": "mine", "kind": "image_folder", "root": "/nowhere"}
    with pytest.raises(ValueError, match="fisher_path"):
        provide_inputs(methods.METHODS.get("eata"), {}, RunParts(data=folder))


def test_the_engine_calls_every_method_with_ids_and_domain():
    from tta import engine
    from tta.data.stream import Batch

    seen = []

    class Spy(BatchMethod):
        def forward(self, x, ids=None, domain=None):
            seen.append((ids.tolist(), domain))
            return super().forward(x, ids=ids, domain=domain)

    stream = [Batch(torch.rand(4, 3, 32, 32), torch.zeros(4, dtype=torch.long), d, torch.arange(4) + 10 * i)
              for i, d in enumerate(["a", "a", "b"])]
    engine.run(Spy(digits(), batch_size=4), stream, progress=False, device="cpu")
    assert seen == [([0, 1, 2, 3], "a"), ([10, 11, 12, 13], "a"), ([20, 21, 22, 23], "b")]


def test_engine_and_run_name_no_method():
    generic = {"source", "norm"}  # method names that are also plain words ("the source model")
    names = [n for n in methods.available() if n not in generic]
    names += ["fisher", "prepass", "diffusion", "views", "source[0]", "takes_batch_info"]
    for path in ("tta/engine.py", "tta/run.py"):
        code = "\n".join(line for line in (REPO / path).read_text().splitlines()
                         if not line.lstrip().startswith("#"))
        code = re.sub(r'"""(.|\n)*?"""', "", code)  # docstrings may give examples
        for name in names:
            hits = re.findall(rf"(?<![\w.]){re.escape(name)}(?!\w)", code)
            assert not hits, f"{path} names {name!r}"
        for name in generic:  # as a method name, it would be a string
            assert not re.findall(rf"[\"']{name}[\"']", code), f"{path} names method {name!r}"


def test_public_api_is_unchanged():
    adapted = tta.adapt(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                      nn.Linear(4, 5)), mean=(0.5,) * 3, std=(0.5,) * 3)
    assert isinstance(adapted, tta.Method) and isinstance(adapted, methods.Method)
    out = adapted(torch.rand(8, 3, 16, 16))
    assert out.shape == (8, 5)
    assert isinstance(methods.build("tent", digits()), methods.Method)


# ---------------------------------------------------------------------- the learning-rate rule
def _timm(name: str) -> nn.Module:
    timm = pytest.importorskip("timm")
    return timm.create_model(name, pretrained=False, num_classes=10)


@pytest.mark.parametrize("build,family", [
    (lambda: _timm("test_resnet"), "cnn"),
    (lambda: _timm("efficientnet_b0"), "cnn"),          # BatchNorm CNN with a `.blocks` attribute
    (lambda: _timm("mobilenetv3_small_050"), "cnn"),    # likewise
    (lambda: _timm("test_vit"), "vit"),
    (lambda: __import__("torchvision").models.resnet18(num_classes=10), "cnn"),
    (lambda: __import__("torchvision").models.mobilenet_v3_small(num_classes=10), "cnn"),
    (lambda: __import__("torchvision").models.VisionTransformer(image_size=32, patch_size=16, num_layers=1, num_heads=2,
                                                                hidden_dim=8, mlp_dim=8, num_classes=10), "vit"),
])
def test_the_model_family_comes_from_the_network(build, family):
    net = build()
    assert model_family(net) == family
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lr = methods.build("tent", load_classifier(net, mean=(0.5,) * 3, std=(0.5,) * 3), batch_size=64).lr
    assert lr == pytest.approx(1e-3 if family == "vit" else 2.5e-4)


@pytest.mark.parametrize("name", ["tent", "eta", "sar", "crowds", "cotta"])
@pytest.mark.parametrize("caller_mode", [torch.no_grad, torch.inference_mode])
def test_a_method_learns_the_same_inside_an_evaluation_loop_without_gradients(name, caller_mode):
    """Evaluation loops run under ``torch.no_grad()`` (or ``inference_mode``); a learning method
    still takes its step there, exactly as when called with gradients on (the official code's
    ``@torch.enable_grad()``), and gives the same logits, weights and counters."""
    from tta.data.digits import load_digits_split

    images, _ = load_digits_split("test")
    batches = images[:48].split(16)  # clean digits: confident, so ETA's entropy filter keeps some
    reference, inside = (methods.build(name, digits(), lr=1e-2) for _ in range(2))
    for x in batches:
        torch.manual_seed(1)
        expected = reference(x)
        torch.manual_seed(1)
        with caller_mode():
            got = inside(x.clone())
        assert torch.equal(got, expected)
    assert inside.stats()["counters"] == reference.stats()["counters"]
    assert inside.stats()["counters"]["steps"] > 0
    assert all(torch.equal(a, b) for a, b in zip(inside.adapted_parameters(), reference.adapted_parameters()))
