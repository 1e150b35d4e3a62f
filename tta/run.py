"""Command line: ``python -m tta.run [overrides]`` (Hydra).

With no arguments: Tent on the embedded digits-C benchmark (severity 5). Examples::

    python -m tta.run method=eata policies.extra=[plpd] severity=3 seed=1
    python -m tta.run model=torchvision:resnet50:IMAGENET1K_V1 data=imagenet_c data.root=/data/imagenet-c
    python -m tta.run -m method=tent,eata,deyo seed=1,2,3      # a sweep; merge with python -m tta.report
    python -m tta.run -m method=eata data=imagenet_c data.root=/data/imagenet-c data.clean_root=/data/imagenet \
        method.fisher_path=fishers/resnet50.pt seed=1,2,3      # EATA's Fisher: estimated once, saved, then loaded

What a method needs beyond the batches (EATA's clean images, ADTE's pass over the test data,
DiffTPT's diffusion views) it declares itself (:mod:`tta.methods.inputs`); :func:`tta.provide.provide_inputs`
builds it from the data config and the ``augment`` options. EATA's clean images: digits-C's training
split; ImageNet-C / CIFAR-C: ``data.clean_root`` (on-the-fly configs default to ``data.root``),
``method.fisher_size`` (2000) of them in an order seeded by ``seed``; ``method.fisher_path=<file>``
loads that file if it exists, else estimates the Fisher and saves it there.

Writes ``run.json``, ``results.md`` and ``results.png`` into the run folder (``hydra.run.dir``).
"""
from __future__ import annotations

import copy
import inspect
import logging
import random
import time
from pathlib import Path
from typing import Any

import torch

from . import methods
from .data import configs as data_configs

log = logging.getLogger("tta.run")

# Constructor keywords every method takes from the run's other keys, not from ``method.*``.
_FROM_THE_RUN = {"model", "num_classes", "batch_size", "extra_policies", "policy_kwargs"}


def method_defaults(name: str) -> dict[str, Any]:
    """The hyperparameter defaults of a registered method (its keyword-only constructor arguments
    along its class hierarchy, less the run's wiring and the run inputs it declares)."""
    cls = methods.METHODS.get(name)
    skip = _FROM_THE_RUN | set(cls.input_keywords)
    defaults: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        if "__init__" not in vars(klass):
            continue
        for param in inspect.signature(klass.__init__).parameters.values():
            if param.kind is param.KEYWORD_ONLY and param.name not in skip:
                value = param.default
                defaults[param.name] = list(value) if isinstance(value, tuple) else value
    return defaults


def register_configs() -> None:
    """Expose every registered method and every data config as Hydra config-group options."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for name in methods.available():
        store.store(group="method", name=name, node={"name": name, **method_defaults(name)})
    for name in data_configs.available():
        node = data_configs.load_data_config(name)
        node.setdefault("root", None)
        for key in ("subset", "subset_seed", "subset_file"):  # seeded subsets (tta/data/subset.py)
            node.setdefault(key, None)
        store.store(group="data", name=name, node=node)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda was asked for but no CUDA device is available")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def build_classifier(cfg: dict[str, Any], data: dict[str, Any], num_classes: int):
    """The model the command line names (or the data config's default), with the dataset's head."""
    from .data.folders import clip_class_names
    from .models.classifier import load_classifier

    spec = cfg.get("model") or data.get("model")
    if not spec:
        raise ValueError(f"data config {data['name']!r} names no default model: pass model=<spec>")
    return load_classifier(spec, num_classes=num_classes, weights=cfg.get("model_weights"),
                           pretrained=cfg.get("model_pretrained", "auto"),
                           normalization=cfg.get("normalization", "weights"),
                           allow_pickle=bool(cfg.get("model_allow_pickle", False)),
                           input_channels=cfg.get("model_input_channels"), input_size=cfg.get("model_input_size"),
                           model_dir=cfg.get("model_dir"),
                           class_names=lambda: clip_class_names(data),  # called only by specs with a text head
                           templates=data.get("templates") or "single")


def execute(cfg: dict[str, Any], out_dir: Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Run one configuration (a plain dict) and write its outputs; returns the run record.

    ``overrides``: Hydra's task overrides, which tell the method keys the command line set (the
    benchmark protocol fills the others, :func:`tta.protocols.for_run`); ``None``: a method value
    that differs from the method default counts as set."""
    from . import protocols
    from . import engine
    from .data.benchmarks import build_stream, num_classes_of
    from .provide import RunParts, provide_inputs
    from .record import build_record, write_json
    from .report import bar_chart, domain_table

    seed_everything(cfg["seed"])
    device = resolve_device(cfg["device"])
    data = dict(cfg["data"])
    method_cfg = dict(cfg["method"])
    method_name = method_cfg.pop("name")
    num_classes = num_classes_of(data)
    method_cfg, data, protocol_record = protocols.for_run(cfg, data, method_name, method_cfg,
                                                          method_defaults(method_name), num_classes, overrides)
    classifier = build_classifier(cfg, data, num_classes)
    source = copy.deepcopy(classifier) if cfg.get("source_accuracy", True) else None
    def make_stream(shuffle: bool):
        return build_stream(data, setting=dict(cfg["setting"]), severity=cfg.get("severity"), seed=cfg["seed"],
                            batch_size=cfg.get("batch_size"), device=device, shuffle=shuffle,
                            max_samples=cfg.get("max_samples"), on_bad_image=cfg.get("on_bad_image"))

    stream, engine_options = make_stream(cfg.get("shuffle", True))
    method_class = methods.METHODS.get(method_name)
    parts = RunParts(data=data, seed=cfg["seed"], batch_size=stream.batch_size, device=device,
                     test_stream=lambda: make_stream(False)[0], stream=stream,
                     augment=cfg.get("augment"), on_bad_image=cfg.get("on_bad_image"),
                     progress=cfg.get("progress", True))
    inputs = provide_inputs(method_class, method_cfg, parts)
    method = methods.build(method_name, classifier, num_classes=num_classes, batch_size=stream.batch_size,
                           extra_policies=list(cfg["policies"]["extra"] or []),
                           policy_kwargs=dict(cfg["policies"].get("kwargs") or {}), **method_cfg, **inputs)
    outcome = engine.run(method, stream, source_model=source, device=device, amp=cfg.get("amp", False),
                         channels_last=cfg.get("channels_last", False), compile=cfg.get("compile", False),
                         progress=cfg.get("progress", True), **engine_options)
    record = build_record(config=cfg, model_info=classifier.info.to_dict(), method_hparams=method.hparams(),
                          stream_info=stream.describe(), outcome=outcome, device=device)
    out_dir.mkdir(parents=True, exist_ok=True)
    record["inputs"] = {**parts.record, **method.input_records()}  # what the method was handed beyond the batches
    record["protocol"] = protocol_record  # the benchmark protocol and where each hyperparameter came from
    record["selection"] = outcome.get("selection")  # what each selection stage kept, and its precision
    write_json(out_dir / "run.json", record)
    title = f"{method_name} on {data['name']} ({classifier.info.spec})"
    table = domain_table(outcome["results"], outcome.get("selection"))
    (out_dir / "results.md").write_text(f"# {title}\n\naccuracy (%)\n\n{table}\n")
    bar_chart(outcome["results"], out_dir / "results.png", title)
    print(f"\n{title}: accuracy (%)\n{table}\n\nrun folder: {out_dir} ({outcome['wall_time_s']:.1f} s)")
    return record


def main() -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    register_configs()

    @hydra.main(config_path="conf", config_name="config", version_base=None)
    def _main(cfg) -> None:
        started = time.time()
        plain = OmegaConf.to_container(cfg, resolve=True)
        out_dir = Path(HydraConfig.get().runtime.output_dir)
        execute(plain, out_dir, overrides=list(HydraConfig.get().overrides.task))
        log.info("finished in %.1f s", time.time() - started)

    _main()


if __name__ == "__main__":
    main()
