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

Run folders are never overwritten silently, and a killed run continues where it stopped:

* ``checkpoint_every=50`` (default): ``checkpoint.pt`` is written into the run folder (atomically)
  every 50 batches and at the end of every domain (:mod:`tta.checkpoint`; 0: no checkpoints);
  it is removed once ``run.json`` is written.
* ``resume=true``: the same command into the same folder continues from ``checkpoint.pt`` and
  ends with the ``run.json`` an uninterrupted run writes (same device); without a checkpoint it
  starts from the beginning. Another configuration than the checkpoint's is refused.
* a folder holding a finished ``run.json`` is refused unless ``overwrite=true`` (with
  ``resume=true`` it is left as it is: resuming a sweep reruns only its unfinished jobs); a folder holding
  an unfinished run's checkpoint is refused unless ``resume=true`` (continue) or
  ``overwrite=true`` (start over).
* a run that fails writes ``run.json`` with ``"status": "failed"`` and the error, then re-raises
  (``python -m tta.report`` lists it, and folders without ``run.json``, as not finished).

Values are checked before anything is built: ``method.*`` against the types of the method's
constructor defaults (``method.lr=abc`` is an error naming ``method.lr``), and the run's own
numbers and switches. ``guard=reset_on_collapse`` attaches the collapse guard (:mod:`tta.guard`).
"""
from __future__ import annotations

import copy
import inspect
import logging
import math
import random
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
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
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------ checks
def _split_union(annotation: str) -> list[str]:
    """``"float | None"`` -> ``["float", "None"]`` (``|`` inside brackets is kept)."""
    parts, depth, token = [], 0, ""
    for ch in annotation:
        depth += ch in "[("
        depth -= ch in "])"
        if ch == "|" and depth == 0:
            parts.append(token.strip())
            token = ""
        else:
            token += ch
    return parts + [token.strip()]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not (
        isinstance(value, float) and math.isnan(value))


_SIMPLE = {
    "float": ("a number", _is_number),
    "int": ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    "bool": ("true or false", lambda v: isinstance(v, bool)),
    "str": ("a string", lambda v: isinstance(v, str)),
    "None": ("null", lambda v: v is None),
}


def _expected(annotation: Any, default: Any) -> list[str] | None:
    """The simple kinds a value may have (``None``: not checked)."""
    if isinstance(annotation, str) and annotation:
        kinds = []
        for token in _split_union(annotation):
            base = token.split("[")[0].strip()
            if token in _SIMPLE:
                kinds.append(token)
            elif base in ("tuple", "Sequence", "list") and all(t.strip() in ("float", "int", "...")
                                                                for t in token[len(base) + 1:-1].split(",")):
                kinds.append("numbers")
            else:
                return None  # an object (a Policy, a callable, Any ...): left to the constructor
        return kinds
    kinds = {bool: "bool", int: "int", float: "float", str: "str"}
    return [kinds[type(default)]] if type(default) in kinds else None


def _matches(value: Any, kind: str) -> bool:
    if kind == "numbers":
        return isinstance(value, (list, tuple)) and all(_is_number(v) for v in value)
    return _SIMPLE[kind][1](value)


def check_method_config(name: str, values: dict[str, Any]) -> None:
    """Check ``method.*`` values against the types of the method's constructor defaults, with an
    error naming the key (``method.lr=abc``: "method.lr must be a number ..., got 'abc'")."""
    cls = methods.METHODS.get(name)
    signature: dict[str, inspect.Parameter] = {}
    for klass in reversed(cls.__mro__):
        if "__init__" in vars(klass):
            for param in inspect.signature(klass.__init__).parameters.values():
                if param.kind is param.KEYWORD_ONLY:
                    signature[param.name] = param
    errors = []
    for key, value in values.items():
        param = signature.get(key)
        if param is None:
            continue  # the constructor says what it does not take
        kinds = _expected(param.annotation, param.default)
        if kinds is None or any(_matches(value, k) for k in kinds):
            continue
        words = " or ".join(_SIMPLE[k][0] if k in _SIMPLE else "a list of numbers" for k in kinds)
        errors.append(f"method.{key} must be {words} ({name}'s default: {param.default!r}), got {value!r}")
    if errors:
        raise ValueError("invalid method value" + ("s" if len(errors) > 1 else "") + ": " + "; ".join(errors))


def check_run_config(cfg: dict[str, Any]) -> None:
    """The run's own keys: numbers are numbers, switches are true/false (clear errors, before
    anything is built). The stream's numbers (``batch_size >= 1``, ``max_samples``, ``severity``)
    are checked where the stream is built, with the same kind of message."""
    errors = []
    seed = cfg.get("seed")
    if not (isinstance(seed, int) and not isinstance(seed, bool)):
        errors.append(f"seed must be an integer, got {seed!r}")
    every = cfg.get("checkpoint_every", 0)
    if not (isinstance(every, int) and not isinstance(every, bool) and every >= 0):
        errors.append(f"checkpoint_every must be an integer >= 0 (0: no checkpoints), got {every!r}")
    log_every = cfg.get("log_every", 10)
    if not (isinstance(log_every, int) and not isinstance(log_every, bool) and log_every >= 1):
        errors.append(f"log_every must be an integer >= 1, got {log_every!r}")
    try:
        from .loggers import parse_names

        parse_names(cfg.get("logger"))
    except ValueError as error:
        errors.append(str(error))
    for key in ("resume", "overwrite", "amp", "channels_last", "compile", "fast", "source_accuracy", "progress",
                "shuffle"):
        if key in cfg and not isinstance(cfg[key], bool):
            errors.append(f"{key} must be true or false, got {cfg[key]!r}")
    if errors:
        raise ValueError("invalid run value" + ("s" if len(errors) > 1 else "") + ": " + "; ".join(errors))
    check_method_config(cfg["method"]["name"], {k: v for k, v in cfg["method"].items() if k != "name"})


# ------------------------------------------------------------------------------------------ the run folder
OUTPUTS = ("run.json", "results.md", "results.png")


class RunFolderError(ValueError):
    """The run folder holds a run that this command would overwrite."""


def run_folder_state(out_dir: Path) -> str:
    """``"empty"``, ``"finished"``, ``"failed"`` (a run.json saying so) or ``"unfinished"``
    (a checkpoint and no run.json)."""
    from .checkpoint import CHECKPOINT_NAME
    from .record import read_json

    record = out_dir / "run.json"
    if record.is_file():
        try:
            status = read_json(record).get("status", "finished")
        except ValueError:
            status = "failed"  # unreadable: nothing worth keeping silently
        return "failed" if status != "finished" else "finished"
    return "unfinished" if (out_dir / CHECKPOINT_NAME).is_file() else "empty"


def check_run_folder(out_dir: Path, *, resume: bool, overwrite: bool) -> str:
    """Refuse to overwrite a finished run (unless ``overwrite``; ``resume`` leaves it as it is) or
    an unfinished one (unless ``resume`` or ``overwrite``); returns the folder's state
    (:func:`run_folder_state`)."""
    state = run_folder_state(out_dir)
    if state == "finished" and not (overwrite or resume):
        raise RunFolderError(f"{out_dir} holds a finished run (run.json): pass overwrite=true to replace it, or "
                             f"choose another folder (hydra.run.dir=...)")
    if state == "unfinished" and not (resume or overwrite):
        raise RunFolderError(f"{out_dir} holds an unfinished run (checkpoint.pt): pass resume=true to continue it "
                             f"or overwrite=true to start it over")
    return state


def _precheck(argv: Sequence[str]) -> None:
    """Before Hydra writes into the run folder (``.hydra/``): refuse a single run whose
    ``hydra.run.dir=`` holds a run it must not touch. (Sweep folders are checked per job.)"""
    if any(a in ("-m", "--multirun") for a in argv):
        return
    values = dict(a.split("=", 1) for a in argv if "=" in a and not a.startswith("-"))
    folder = values.get("hydra.run.dir")
    if not folder:
        return
    flag = lambda key: values.get(key, "false").strip().lower() in ("true", "1", "yes", "on")  # noqa: E731
    try:
        check_run_folder(Path(folder), resume=flag("resume"), overwrite=flag("overwrite"))
    except RunFolderError as error:
        sys.exit(f"Error: {error}")


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


def execute(cfg: dict[str, Any], out_dir: Path, overrides: list[str] | None = None,
            sweep: Path | None = None) -> dict[str, Any]:
    """Run one configuration (a plain dict) into ``out_dir`` and write its outputs; returns the record.

    First the run folder (module docstring: a finished run is replaced only with ``overwrite``,
    an unfinished one is continued with ``resume``) and the values are checked; a run that fails
    after that writes ``run.json`` with ``"status": "failed"`` and the error, then re-raises.
    ``sweep``: the sweep folder of a multirun job (the run loggers group its runs by it).
    """
    from .checkpoint import CHECKPOINT_NAME
    from .record import failed_record, write_json

    out_dir = Path(out_dir)
    resume, overwrite = bool(cfg.get("resume", False)), bool(cfg.get("overwrite", False))
    state = check_run_folder(out_dir, resume=resume, overwrite=overwrite)
    if state == "finished" and resume and not overwrite:  # e.g. a sweep resumed: its finished jobs stay as they are
        from .record import read_json

        log.info("%s holds a finished run: nothing to resume", out_dir)
        return read_json(out_dir / "run.json")
    out_dir.mkdir(parents=True, exist_ok=True)
    continuing = resume and state != "finished" and (out_dir / CHECKPOINT_NAME).is_file()
    if not continuing:  # start over: nothing of an earlier run may be mistaken for this one's
        for name in (*OUTPUTS, CHECKPOINT_NAME):
            (out_dir / name).unlink(missing_ok=True)
    started = time.time()
    try:
        check_run_config(cfg)
        session = _Session(cfg, out_dir, continuing)
        return _execute(cfg, out_dir, overrides, session, sweep)
    except BaseException as error:  # a KeyboardInterrupt is recorded too, then re-raised
        write_json(out_dir / "run.json", failed_record(config=cfg, error=error, wall_time_s=time.time() - started,
                                                       checkpoint=(out_dir / CHECKPOINT_NAME).is_file()))
        raise


class _Session:
    """The checkpoint side of one run: the checkpoint to continue from (read and checked against
    this configuration before anything is built), the collapse guard, the writer."""

    def __init__(self, cfg: dict[str, Any], out_dir: Path, continuing: bool):
        from .checkpoint import CHECKPOINT_NAME, comparable_config, config_differences, load_checkpoint

        self.cfg = cfg
        self.path = out_dir / CHECKPOINT_NAME
        self.config_key = comparable_config(cfg)
        self.every = int(cfg.get("checkpoint_every", 0) or 0)
        self.saved = load_checkpoint(self.path) if continuing else None
        self.writer = None
        self.history: list[dict[str, Any]] = []
        if self.saved is not None:
            differ = config_differences(self.saved["config"], self.config_key)
            if differ:
                raise ValueError(f"{self.path} was written by another configuration (differs in: {', '.join(differ)}); "
                                 f"resume with the same command, or pass overwrite=true without resume to start over")
            self.history = list(self.saved.get("history") or [])

    def prepare(self, method: Any, device: torch.device) -> dict[str, Any]:
        """Attach the guard, restore a checkpoint's method and RNG states; the engine's keywords."""
        from .checkpoint import Checkpointer, restore_method, set_rng_state

        if self.cfg.get("guard") is not None:
            from .guard import attach_guard

            attach_guard(method, self.cfg["guard"])
        progress = None
        if self.saved is not None:
            method.to(device)  # the optimizer state loads onto the parameters' device
            restore_method(method, self.saved["method"])
            progress = self.saved["progress"]
            self.history.append({"from_batch": (progress.get("stream") or {}).get("next_batch", progress["done"]),
                                 "batches_done": progress["done"], "wall_time_s": progress["wall_time_s"]})
            log.info("resuming from %s after %d batches", self.path, progress["done"])
        if self.every:
            self.writer = Checkpointer(self.path, method, config=self.config_key, every=self.every,
                                       history=self.history)
        if self.saved is not None:
            set_rng_state(self.saved["rng"])  # last: nothing between here and the next batch draws random numbers
        return {"resume": progress, "checkpoint": self.writer, "checkpoint_every": self.every}

    def record(self) -> dict[str, Any]:
        """What run.json keeps about checkpoints and resumptions."""
        info = self.writer.info() if self.writer is not None else {"every": 0}
        return {"status": "finished", "checkpoints": {**info, "resumed": self.history}}

    def finish(self) -> None:
        self.path.unlink(missing_ok=True)  # run.json now holds what the checkpoint was kept for


def _execute(cfg: dict[str, Any], out_dir: Path, overrides: list[str] | None = None,
             session: _Session | None = None, sweep: Path | None = None) -> dict[str, Any]:
    """The run itself (:func:`execute` checks the folder and records a failure).

    ``overrides``: Hydra's task overrides, which tell the method keys the command line set (the
    benchmark protocol fills the others, :func:`tta.protocols.for_run`); ``None``: a method value
    that differs from the method default counts as set."""
    from . import protocols
    from .data.benchmarks import build_stream, num_classes_of
    from .provide import RunParts, provide_inputs
    from .data.folders import fit_preprocess_to_model
    from .stream_rate import check_stream_rate, resolve_relative_cost

    seed_everything(cfg["seed"])
    device = resolve_device(cfg["device"])
    data = dict(cfg["data"])
    method_cfg = dict(cfg["method"])
    method_name = method_cfg.pop("name")
    classifier = build_classifier(cfg, data, num_classes_of(data))
    num_classes = num_classes_of(data) or classifier.num_classes  # an image folder may leave it to the model
    method_cfg, data, protocol_record = protocols.for_run(cfg, data, method_name, method_cfg,
                                                          method_defaults(method_name), num_classes, overrides)
    data, _ = fit_preprocess_to_model(data, classifier.info.input_size, crop_pct=classifier.info.crop_pct)
    source = copy.deepcopy(classifier) if cfg.get("source_accuracy", True) else None
    setting = dict(cfg["setting"])
    if setting.get("name") == "ccc":  # its options live in the top-level ccc group (ccc.difficulty=...)
        setting.update({k: v for k, v in dict(cfg.get("ccc") or {}).items() if v is not None})

    def make_stream(shuffle: bool):
        return build_stream(data, setting=setting, severity=cfg.get("severity"), seed=cfg["seed"],
                            batch_size=cfg.get("batch_size"), device=device, shuffle=shuffle,
                            max_samples=cfg.get("max_samples"), on_bad_image=cfg.get("on_bad_image"),
                            channels=classifier.input_channels)

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
    session = session or _Session(cfg, out_dir, continuing=False)
    resumable = session.prepare(method, device)  # guard; a checkpoint's state; the checkpoint writer
    evaluation = dict(cfg.get("eval") or {})
    stream_rate = check_stream_rate(evaluation.get("stream_rate") or 0)
    relative_cost = resolve_relative_cost(evaluation.get("relative_cost"), method_name) if stream_rate else None
    loggers = open_loggers(cfg, out_dir, method_name, overrides, sweep)
    if loggers is not None:
        loggers.log_hparams({"config": cfg, "protocol": protocol_record, "method": method.hparams()})
    try:
        record = _adapt_and_write(cfg, out_dir, data, method_name, method, classifier, stream, source, device, parts,
                                  protocol_record, session, stream_rate, relative_cost, resumable, engine_options,
                                  loggers)
    except BaseException:
        if loggers is not None:
            loggers.close(failed=True)
        raise
    if loggers is not None:
        for name in OUTPUTS:
            loggers.log_artifact(out_dir / name)
        loggers.close()
    return record


def open_loggers(cfg: dict[str, Any], out_dir: Path, method_name: str, overrides: list[str] | None,
                 sweep: Path | None):
    """The run loggers ``logger=`` names (:mod:`tta.loggers`; ``None`` when none): named after the
    sweep's overrides (or the method), grouped by the sweep folder in a multirun."""
    from .loggers import build_loggers, parse_names

    if not parse_names(cfg.get("logger")):
        return None
    options = dict(cfg.get("logger_options") or {})
    group = options.get("group") or (str(sweep) if sweep is not None else None)
    name = ",".join(overrides or []) or method_name
    return build_loggers(cfg.get("logger"), out_dir=out_dir, name=name, group=group, group_dir=sweep,
                         project=options.get("project") or "tta",
                         options={k: v for k, v in options.items() if isinstance(v, dict)})


def _adapt_and_write(cfg, out_dir, data, method_name, method, classifier, stream, source, device, parts,
                     protocol_record, session, stream_rate, relative_cost, resumable, engine_options,
                     loggers) -> dict[str, Any]:
    """The online run and its outputs (run.json, results.md, results.png)."""
    from . import engine
    from .curves import curve_chart, curve_summary
    from .record import build_record, write_json
    from .report import bar_chart, domain_table, stream_rate_summary

    outcome = engine.run(method, stream, source_model=source, device=device, amp=cfg.get("amp", False),
                         channels_last=cfg.get("channels_last", False), compile=cfg.get("compile", False),
                         fast=cfg.get("fast", False), stream_rate=stream_rate, relative_cost=relative_cost,
                         progress=cfg.get("progress", True), logger=loggers,
                         log_every=int(cfg.get("log_every", 10) or 10), **resumable, **engine_options)
    record = build_record(config=cfg, model_info=classifier.info.to_dict(), method_hparams=method.hparams(),
                          stream_info=stream.describe(), outcome=outcome, device=device)
    out_dir.mkdir(parents=True, exist_ok=True)
    record["inputs"] = {**parts.record, **method.input_records()}  # what the method was handed beyond the batches
    record["protocol"] = protocol_record  # the benchmark protocol and where each hyperparameter came from
    record["selection"] = outcome.get("selection")  # what each selection stage kept, and its precision
    record["stream_rate"] = outcome.get("stream_rate")  # the rate, C (declared or measured), batches adapted/skipped
    if outcome.get("batches") is not None:  # per-batch counts (the ccc setting's running-window curve)
        record["batches"] = outcome["batches"]
    record["speed"] = outcome.get("speed")  # the speed options used (fast=true resolved: amp, channels_last, compile)
    record.update(session.record())  # "status": "finished", checkpoints written, resumptions
    write_json(out_dir / "run.json", record)
    title = f"{method_name} on {data['name']} ({classifier.info.spec})"
    table = domain_table(outcome["results"], outcome.get("selection"))
    rate_line = stream_rate_summary(outcome.get("stream_rate"))
    if rate_line:
        table += f"\n\n{rate_line}"
    (out_dir / "results.md").write_text(f"# {title}\n\naccuracy (%)\n\n{table}\n")
    ccc_line = curve_summary(record)
    if ccc_line:  # a long single-domain stream: the running-window curve says more than one bar
        table += f"\n\n{ccc_line}"
        (out_dir / "results.md").write_text(f"# {title}\n\naccuracy (%)\n\n{table}\n")
        curve_chart([record], out_dir / "results.png", title)
    else:
        bar_chart(outcome["results"], out_dir / "results.png", title)
    session.finish()
    print(f"\n{title}: accuracy (%)\n{table}\n\nrun folder: {out_dir} ({outcome['wall_time_s']:.1f} s)")
    return record


def main() -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    _precheck(sys.argv[1:])
    register_configs()

    @hydra.main(config_path="conf", config_name="config", version_base=None)
    def _main(cfg) -> None:
        started = time.time()
        plain = OmegaConf.to_container(cfg, resolve=True)
        hydra_cfg = HydraConfig.get()
        out_dir = Path(hydra_cfg.runtime.output_dir)
        sweep = Path(hydra_cfg.sweep.dir) if str(hydra_cfg.mode) == "RunMode.MULTIRUN" else None
        execute(plain, out_dir, overrides=list(hydra_cfg.overrides.task), sweep=sweep)
        log.info("finished in %.1f s", time.time() - started)

    _main()


if __name__ == "__main__":
    main()
