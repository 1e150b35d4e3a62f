"""Command line: ``python -m tta.run [overrides]`` (Hydra).

With no arguments: Tent on the embedded digits-C benchmark (severity 5). Examples::

    python -m tta.run method=eata policies.extra=[plpd] severity=3 seed=1
    python -m tta.run model=torchvision:resnet50:IMAGENET1K_V1 data=imagenet_c data.root=/data/imagenet-c
    python -m tta.run -m method=tent,eata,deyo seed=1,2,3      # a sweep; merge with python -m tta.report

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

# Keyword arguments a method takes from the CLI's other keys, not from ``method.*``.
_NOT_FROM_METHOD_GROUP = {"model", "num_classes", "batch_size", "extra_policies", "policy_kwargs"}


def method_defaults(name: str) -> dict[str, Any]:
    """The keyword defaults of a registered method, gathered along its class hierarchy."""
    cls = methods.METHODS.get(name)
    defaults: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        if "__init__" not in vars(klass):
            continue
        for param in inspect.signature(klass.__init__).parameters.values():
            if param.kind is param.KEYWORD_ONLY and param.name not in _NOT_FROM_METHOD_GROUP:
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


def execute(cfg: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """Run one configuration (a plain dict) and write its outputs; returns the run record."""
    from . import engine
    from .data.benchmarks import build_stream
    from .models.classifier import load_classifier
    from .record import build_record, write_json
    from .report import bar_chart, domain_table

    seed_everything(cfg["seed"])
    device = resolve_device(cfg["device"])
    data = dict(cfg["data"])
    method_cfg = dict(cfg["method"])
    method_name = method_cfg.pop("name")
    spec = cfg.get("model") or data.get("model")
    if not spec:
        raise ValueError(f"data config {data['name']!r} names no default model: pass model=<spec>")
    num_classes = data.get("num_classes")
    classifier = load_classifier(spec, num_classes=num_classes, weights=cfg.get("model_weights"),
                                 pretrained=cfg.get("model_pretrained", "auto"),
                                 normalization=cfg.get("normalization", "weights"))
    source = copy.deepcopy(classifier) if cfg.get("source_accuracy", True) else None
    stream, engine_options = build_stream(data, setting=cfg["setting"]["name"], severity=cfg.get("severity"),
                                          seed=cfg["seed"], batch_size=cfg.get("batch_size"), device=device,
                                          shuffle=cfg.get("shuffle", True))
    method = methods.build(method_name, classifier, num_classes=num_classes, batch_size=stream.batch_size,
                           extra_policies=list(cfg["policies"]["extra"] or []),
                           policy_kwargs=dict(cfg["policies"].get("kwargs") or {}), **method_cfg)
    outcome = engine.run(method, stream, source_model=source, device=device, amp=cfg.get("amp", False),
                         channels_last=cfg.get("channels_last", False), compile=cfg.get("compile", False),
                         progress=cfg.get("progress", True), **engine_options)
    record = build_record(config=cfg, model_info=classifier.info.to_dict(), method_hparams=method.hparams(),
                          stream_info=stream.describe(), outcome=outcome, device=device)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "run.json", record)
    title = f"{method_name} on {data['name']} ({classifier.info.spec})"
    table = domain_table(outcome["results"])
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
        execute(plain, out_dir)
        log.info("finished in %.1f s", time.time() - started)

    _main()


if __name__ == "__main__":
    main()
