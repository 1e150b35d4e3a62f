"""Command line: ``python -m tta.run [overrides]`` (Hydra).

With no arguments: Tent on the embedded digits-C benchmark (severity 5). Examples::

    python -m tta.run method=eata policies.extra=[plpd] severity=3 seed=1
    python -m tta.run model=torchvision:resnet50:IMAGENET1K_V1 data=imagenet_c data.root=/data/imagenet-c
    python -m tta.run -m method=tent,eata,deyo seed=1,2,3      # a sweep; merge with python -m tta.report
    python -m tta.run -m method=eata data=imagenet_c data.root=/data/imagenet-c data.clean_root=/data/imagenet \
        method.fisher_path=fishers/resnet50.pt seed=1,2,3      # EATA's Fisher: estimated once, saved, then loaded

EATA's Fisher comes from the data config's clean images (:func:`fisher_data`: digits-C's training
split; ImageNet-C / CIFAR-C: ``data.clean_root``, on-the-fly configs default to ``data.root``),
``method.fisher_size`` (2000) of them in an order seeded by ``seed``. ``method.fisher_path=<file>``
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

# Keyword arguments a method takes from the CLI's other keys, not from ``method.*``.
_NOT_FROM_METHOD_GROUP = {"model", "num_classes", "batch_size", "extra_policies", "policy_kwargs", "fisher_data",
                          "diffusion_views", "image_names"}  # DiffTPT: built from augment.diffusion


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


def takes_keyword(name: str, keyword: str) -> bool:
    """Whether the registered method ``name`` (or a base class of it) takes keyword ``keyword``."""
    cls = methods.METHODS.get(name)
    return any("__init__" in vars(k) and keyword in inspect.signature(k.__init__).parameters for k in cls.__mro__)


def fisher_data(data: dict[str, Any], seed: int, *, fisher_size: int = 2000, batch_size: int = 64,
                device: torch.device | str = "cpu", required: bool = True, on_bad_image: str | None = None) -> Any:
    """Clean images for EATA's Fisher from the data config, in an order seeded by the run's seed (as
    EATA's ``main.py`` shuffles before taking its ``fisher_size`` images); ``None`` when there are none.

    * ``fisher_split`` (digits-C): that clean split, as one shuffled tensor;
    * ImageNet-C / CIFAR-10/100-C (released and on the fly): ``fisher_size`` images of the clean set
      in ``data.clean_root`` (on-the-fly configs: default ``data.root``), a stream of batches that
      reads only those images (:func:`tta.data.clean.clean_batches`). Missing clean images raise a
      ``FileNotFoundError`` naming the folder, ``data.clean_root`` and ``method.fisher_path`` (when
      ``required``; else ``None``).
    """
    kind = data.get("kind", data["name"])
    split = data.get("fisher_split")
    if split:
        if kind != "digits_c":
            raise ValueError(f"fisher_split is only implemented for digits_c data, not {kind!r}: "
                             f"pass method.fisher_path=<file saved by EATA.save_fisher()>")
        from .data.digits import load_digits_split

        images, _ = load_digits_split(split)
        order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed))
        return images[order]
    from .data.clean import CLEAN_KINDS, clean_batches

    if kind not in CLEAN_KINDS:
        return None
    try:
        return clean_batches(data, num_samples=fisher_size, seed=seed, batch_size=batch_size, device=device,
                             purpose="EATA's Fisher", on_bad_image=on_bad_image)
    except FileNotFoundError as error:
        if not required:
            return None
        raise FileNotFoundError(f"{error}; or pass method.fisher_path=<Fisher file> (saved there by a first run "
                                f"that had the clean images, or by EATA.save_fisher())") from None


def method_fisher_data(method_cfg: dict[str, Any], data: dict[str, Any], seed: int, **options: Any) -> Any:
    """EATA's ``fisher_data`` (see :func:`fisher_data`), unless ``method.fisher_path`` is an existing
    file: to a path that does not exist yet EATA saves the Fisher it computes (one per sweep)."""
    path = method_cfg.get("fisher_path")
    if path and Path(str(path)).expanduser().is_file():
        return None
    try:
        return fisher_data(data, seed, fisher_size=int(method_cfg.get("fisher_size") or 2000),
                           required=method_cfg.get("fisher_alpha", 1) != 0, **options)
    except FileNotFoundError as error:
        if not path:
            raise
        raise FileNotFoundError(f"method.fisher_path={path} does not exist yet, and the clean images to compute "
                                f"it are missing: {error}") from None


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
    from .models.classifier import load_classifier

    spec = cfg.get("model") or data.get("model")
    if not spec:
        raise ValueError(f"data config {data['name']!r} names no default model: pass model=<spec>")
    if isinstance(spec, str) and spec.startswith("clip:"):  # CLIP: the text head needs the class names
        from .data.folders import clip_class_names
        from .models.clip import load_clip_classifier

        return load_clip_classifier(spec[5:], num_classes=num_classes, weights=cfg.get("model_weights"),
                                    class_names=clip_class_names(data), templates=data.get("templates") or "single",
                                    pretrained=cfg.get("model_pretrained", "auto"))
    return load_classifier(spec, num_classes=num_classes, weights=cfg.get("model_weights"),
                           pretrained=cfg.get("model_pretrained", "auto"),
                           normalization=cfg.get("normalization", "weights"))


def execute(cfg: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """Run one configuration (a plain dict) and write its outputs; returns the run record."""
    from . import engine
    from .data.benchmarks import build_stream, num_classes_of
    from .record import build_record, write_json
    from .report import bar_chart, domain_table

    seed_everything(cfg["seed"])
    device = resolve_device(cfg["device"])
    data = dict(cfg["data"])
    method_cfg = dict(cfg["method"])
    method_name = method_cfg.pop("name")
    num_classes = num_classes_of(data)
    classifier = build_classifier(cfg, data, num_classes)
    source = copy.deepcopy(classifier) if cfg.get("source_accuracy", True) else None
    def make_stream(shuffle: bool):
        return build_stream(data, setting=dict(cfg["setting"]), severity=cfg.get("severity"), seed=cfg["seed"],
                            batch_size=cfg.get("batch_size"), device=device, shuffle=shuffle,
                            max_samples=cfg.get("max_samples"), on_bad_image=cfg.get("on_bad_image"))

    stream, engine_options = make_stream(cfg.get("shuffle", True))
    if takes_keyword(method_name, "fisher_data"):  # EATA: clean images unless method.fisher_path exists
        method_cfg["fisher_data"] = method_fisher_data(method_cfg, data, cfg["seed"], device=device,
                                                       batch_size=stream.batch_size, on_bad_image=cfg.get("on_bad_image"))
    method = methods.build(method_name, classifier, num_classes=num_classes, batch_size=stream.batch_size,
                           extra_policies=list(cfg["policies"]["extra"] or []),
                           policy_kwargs=dict(cfg["policies"].get("kwargs") or {}), **method_cfg)
    if getattr(method, "wants_prepass_data", False):  # ADTE's transductive pre-pass: the same data, unshuffled
        method.set_prepass_data(lambda: make_stream(False)[0])
    from .augment.mixed_views import attach_diffusion_views

    diffusion_record = attach_diffusion_views(method, (cfg.get("augment") or {}).get("diffusion"), stream,
                                              device=device, progress=cfg.get("progress", True))
    outcome = engine.run(method, stream, source_model=source, device=device, amp=cfg.get("amp", False),
                         channels_last=cfg.get("channels_last", False), compile=cfg.get("compile", False),
                         progress=cfg.get("progress", True), **engine_options)
    record = build_record(config=cfg, model_info=classifier.info.to_dict(), method_hparams=method.hparams(),
                          stream_info=stream.describe(), outcome=outcome, device=device)
    out_dir.mkdir(parents=True, exist_ok=True)
    if diffusion_record is not None:  # diffusion views: parameters, cache hits, generated
        record["augment"] = {"diffusion": diffusion_record()}
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
