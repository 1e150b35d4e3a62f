"""Evaluation settings: how the domains of a benchmark become one ordered stream.

A setting turns a :class:`~tta.data.benchmark.Benchmark` (its domains, e.g. 15 corruptions at
severity 5, and optionally its clean images) into a :class:`Plan`: the parts the samples come from,
the exact sample order as segments, and the engine options it implies. ``setting=<name>`` on the
command line picks one (``tta/conf/setting/<name>.yaml`` lists its options); from Python,
``build_stream(config, setting={"name": "label_shift", "order": "dirichlet", "delta": 0.01})``.

============== ==========================================================================================
setting        stream
============== ==========================================================================================
reset_each_shift  the domains one after another, each shuffled; the model is reset at every domain change
continual      the same order, never reset
mixed_domains  all domains concatenated and shuffled together, one pass, no reset ("mix_shifts");
               scored as one domain, ``mixed``
gradual        per corruption, severities 1→5→1 (``severities``), continual
label_shift    per domain a class-imbalanced order, reset per domain (``reset_each_domain``):
               ``order=imbalance`` (SAR/DeYO's rule, ``imbalance_ratio``, ``total``, ``steps``),
               ``order=dirichlet`` (``delta``, ``slots``) or ``order=file`` (``order_file``: .npy indices)
bs1            ``reset_each_shift`` with batch size 1 (``batch_size=1`` works in every setting)
open_set       out-of-distribution samples (label -1) mixed into each domain (``ood``, ``ood_fraction``);
               scored by accuracy on the in-distribution samples and AUROC of the max-softmax confidence
forgetting     continual with the clean images interleaved before the first and after every domain
               (EATA's continual protocol); clean accuracy before and after in ``results.forgetting``
long_stream    continual over the domain list repeated ``rounds`` times (cut it with ``max_samples=``)
ccc            a CCC-style stream (Press et al., NeurIPS 2023): corruption pairs that change continuously,
               generated from clean images (``difficulty``, ``speed``, ``max_samples``, ``calibration``;
               :mod:`tta.data.ccc`), continual, scored as one domain ``ccc``
============== ==========================================================================================

Every setting is seeded by the stream seed; the same seed gives the same order (and, with the
per-sample corruption seeds, the same images). ``max_samples`` cuts any of them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .benchmark import Benchmark
from .checks import severity_list
from .sources import ImageSource
from .stream import Domain, Segment, domain_order, shuffled

# The open-set setting's out-of-distribution images: ``needed -> (source, corrupt it like the domain)``.
# Loading them is the data layer's job (``tta.data.benchmarks.ood_source``); the caller passes it in.
OodSource = Callable[[int], tuple[ImageSource, bool]]

SEVERITIES_UP_DOWN = [1, 2, 3, 4, 5, 4, 3, 2, 1]

SETTING_DEFAULTS: dict[str, dict[str, Any]] = {
    "reset_each_shift": {"reset_each_domain": True},
    "continual": {"reset_each_domain": False},
    "mixed_domains": {"reset_each_domain": False},
    "gradual": {"reset_each_domain": False, "severities": SEVERITIES_UP_DOWN},
    "label_shift": {"reset_each_domain": True, "order": "imbalance", "imbalance_ratio": 500000, "total": None,
                    "steps": None, "delta": 0.1, "slots": None, "order_file": None},
    "bs1": {"reset_each_domain": True, "batch_size": 1},
    "open_set": {"reset_each_domain": True, "ood": "noise", "ood_fraction": 0.5, "ood_data": None,
                 "ood_root": None, "ood_corrupt": True},
    "forgetting": {"reset_each_domain": False, "clean_samples": None},
    "long_stream": {"reset_each_domain": False, "rounds": 10},
    "ccc": {"reset_each_domain": False, "batch_size": 64},  # oripress/CCC eval.py line 33
}
COMMON_OPTIONS = ("name", "batch_size", "reset_each_domain")
# options a setting takes from its own top-level group (``ccc.difficulty=hard``), not from ``setting.``
GROUP_OPTIONS: dict[str, dict[str, Any]] = {
    "ccc": {"difficulty": None, "speed": None, "max_samples": None, "calibration": None, "target": None,
            "window": None, "flip": None, "crop_scale": None},
}


@dataclass
class Plan:
    parts: list[Domain]
    segments: list[Segment]
    engine: dict[str, Any]
    summarize: Callable[[dict], dict] | None = None
    info: dict[str, Any] = field(default_factory=dict)


def available() -> list[str]:
    return sorted(SETTING_DEFAULTS)


def resolve(setting: str | dict[str, Any] | None) -> dict[str, Any]:
    """A setting name or dict (``{"name": ..., option: value}``) with every option filled in."""
    if setting is None:
        setting = "reset_each_shift"
    options = {"name": setting} if isinstance(setting, str) else dict(setting)
    name = options.get("name")
    if name not in SETTING_DEFAULTS:
        raise ValueError(f"unknown setting {name!r}; available: {', '.join(available())}")
    defaults = {**SETTING_DEFAULTS[name], **GROUP_OPTIONS.get(name, {})}
    unknown = sorted(set(options) - set(defaults) - set(COMMON_OPTIONS))
    if unknown:
        raise ValueError(f"setting {name!r} has no option(s) {', '.join(unknown)}; its options: "
                         f"{', '.join(sorted(set(defaults) | {'batch_size'}))}")
    resolved = {"name": name, "batch_size": None, **defaults, **options}
    return resolved


def severities_needed(options: dict[str, Any]) -> list[int] | None:
    """Severities the setting needs from the loader (``None``: the data config's)."""
    if options["name"] == "gradual":
        return sorted(set(severity_list(options["severities"], "gradual setting: severities")))
    return None


def plan(benchmark: Benchmark, options: dict[str, Any], *, seed: int, shuffle: bool = True,
         ood_source: OodSource | None = None) -> Plan:
    """The :class:`Plan` of ``options`` (from :func:`resolve`) over ``benchmark``.

    ``ood_source(needed)`` gives the open-set setting its out-of-distribution images
    (:func:`tta.data.benchmarks.build_stream` passes one built from the setting's options)."""
    builder = _BUILDERS[options["name"]]
    result = builder(benchmark, options, seed, shuffle, ood_source)
    result.engine.setdefault("reset_each_domain", bool(options["reset_each_domain"]))
    result.info = {"setting": options["name"], "setting_options": {k: v for k, v in options.items() if k != "name"},
                   **result.info}
    return result


# ---------------------------------------------------------------------------------------------
# orders
# ---------------------------------------------------------------------------------------------


def _rng(seed: int, *salt: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed % 2**64, *salt]))


def imbalance_order(labels: np.ndarray, *, imbalance_ratio: float = 500000, total: int | None = None,
                    steps: int | None = None, seed: int = 0) -> np.ndarray:
    """SAR/DeYO's online label-shift order ("label_shifts"): indices into ``labels``, with repeats.

    The rule (docs/benchmarks.md): ``total`` samples (default ``2 N``: 100,000 for ImageNet-C's 50,000)
    in ``steps`` time steps (default: the number of classes, 1,000) of equal size. The classes are
    shuffled once; at step ``t`` the dominant class is the ``t``-th of that order and each sample's
    label is drawn from ``q_t``: the dominant class with probability ``IR / (IR + C - 1)``, every
    other class ``1 / (IR + C - 1)`` (``IR = imbalance_ratio``; 500,000 is almost a pure class
    order). Each drawn label takes the next image of its class from a per-class shuffled list
    (reshuffled when used up), so images repeat only as often as the counts require. The images
    SAR/DeYO's shipped order files pick may differ (only their rule is published); pass those files
    with ``order=file`` for exact parity.
    """
    labels = np.asarray(labels, dtype=np.int64)
    classes = np.unique(labels)
    c = len(classes)
    total = 2 * len(labels) if total is None else int(total)
    steps = c if steps is None else int(steps)
    if total < 1 or steps < 1:
        raise ValueError(f"label shift needs total >= 1 and steps >= 1, got total={total}, steps={steps}")
    rng = _rng(seed, 0x1AB5)
    class_order = rng.permutation(c)
    sizes = np.full(steps, total // steps, dtype=np.int64)
    sizes[: total % steps] += 1
    p_major = imbalance_ratio / (imbalance_ratio + c - 1)
    p_minor = 1.0 / (imbalance_ratio + c - 1)
    members = [np.flatnonzero(labels == k) for k in classes]
    pools: list[list[int]] = [[] for _ in classes]
    out = np.empty(total, dtype=np.int64)
    position = 0
    for t in range(steps):
        probs = np.full(c, p_minor)
        probs[class_order[t % c]] = p_major
        probs /= probs.sum()
        for k in rng.choice(c, size=int(sizes[t]), p=probs):
            if not pools[k]:
                pools[k] = list(rng.permutation(members[k])[::-1])
            out[position] = pools[k].pop()
            position += 1
    return out


def dirichlet_order(labels: np.ndarray, *, delta: float = 0.1, slots: int | None = None, seed: int = 0) -> np.ndarray:
    """A non-i.i.d. class order by a Dirichlet(δ) split (the NOTE / RoTTA rule): a permutation.

    Time is cut into ``slots`` (default: the number of classes, at most 100). Each class's images
    (shuffled) are split over the slots by proportions drawn from ``Dirichlet(δ, ..., δ)``; within a
    slot the class chunks come in random order. Small δ: long single-class runs; large δ: i.i.d.
    """
    labels = np.asarray(labels, dtype=np.int64)
    classes = np.unique(labels)
    if delta <= 0:
        raise ValueError(f"dirichlet delta must be positive, got {delta}")
    slots = (len(classes) if len(classes) <= 100 else 100) if slots is None else int(slots)
    rng = _rng(seed, 0xD1C1)
    proportions = rng.dirichlet([float(delta)] * slots, size=len(classes))
    per_slot: list[list[np.ndarray]] = [[] for _ in range(slots)]
    for k, share in zip(classes, proportions):
        members = rng.permutation(np.flatnonzero(labels == k))
        cuts = (np.cumsum(share)[:-1] * len(members)).astype(np.int64)
        for s, chunk in enumerate(np.split(members, cuts)):
            if len(chunk):
                per_slot[s].append(chunk)
    out = []
    for chunks in per_slot:
        for i in rng.permutation(len(chunks)):
            out.append(chunks[i])
    return np.concatenate(out).astype(np.int64) if out else np.zeros(0, dtype=np.int64)


def order_from_file(path: str, n: int) -> np.ndarray:
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"label-shift order file not found: {file}")
    order = np.asarray(np.load(file), dtype=np.int64).reshape(-1)
    if len(order) == 0 or order.min() < 0 or order.max() >= n:
        raise ValueError(f"order file {file} holds indices in [{order.min() if len(order) else '-'}, "
                         f"{order.max() if len(order) else '-'}] but the domain has {n} samples (indices are into "
                         f"the domain in ImageFolder order: classes in class-list order, files sorted)")
    return order


# ---------------------------------------------------------------------------------------------
# builders
# ---------------------------------------------------------------------------------------------


def _sequential(bench: Benchmark, seed: int, shuffle: bool) -> tuple[list[Domain], list[Segment]]:
    parts = list(bench.domains)
    segments = [Segment(d.name, np.full(len(d), i), domain_order(len(d), seed, d.name, shuffle)) for i, d in enumerate(parts)]
    return parts, segments


def _plain(bench, options, seed, shuffle, ood_source=None) -> Plan:
    parts, segments = _sequential(bench, seed, shuffle)
    return Plan(parts, segments, {})


def _mixed(bench, options, seed, shuffle, ood_source=None) -> Plan:
    parts = list(bench.domains)
    part = np.concatenate([np.full(len(d), i, dtype=np.int64) for i, d in enumerate(parts)])
    index = np.concatenate([np.arange(len(d), dtype=np.int64) for d in parts])
    order = domain_order(len(index), seed, "mixed", shuffle)
    return Plan(parts, [Segment("mixed", part[order], index[order])], {"reset_each_domain": False},
                info={"mixed_domains": [d.name for d in parts]})


def corruption_and_severity(domain: Domain) -> tuple[str, int | float | None]:
    if domain.corruption is not None:
        return domain.corruption, domain.severity
    name, _, severity = domain.name.rpartition("/")
    if name and severity.isdigit():
        return name, int(severity)
    if name and severity.replace(".", "", 1).isdigit():  # a fractional severity, "fog/2.5"
        return name, float(severity)
    return domain.name, None


def _gradual(bench, options, seed, shuffle, ood_source=None) -> Plan:
    severities = severity_list(options["severities"], "gradual setting: severities")
    by_key: dict[tuple[str, int | float | None], int] = {}
    corruptions: list[str] = []
    for i, d in enumerate(bench.domains):
        corruption, severity = corruption_and_severity(d)
        by_key[(corruption, severity)] = i
        if corruption not in corruptions:
            corruptions.append(corruption)
    segments = []
    for corruption in corruptions:
        for visit, severity in enumerate(severities):
            if (corruption, severity) not in by_key:
                raise ValueError(f"gradual setting: no domain {corruption}/{severity} in {bench.name} (severities "
                                 f"{severities} are needed)")
            i = by_key[(corruption, severity)]
            d = bench.domains[i]
            segments.append(Segment(d.name, np.full(len(d), i), domain_order(len(d), seed, d.name, shuffle, visit)))
    return Plan(list(bench.domains), segments, {"reset_each_domain": bool(options["reset_each_domain"])})


def _label_shift(bench, options, seed, shuffle, ood_source=None) -> Plan:
    kind = options["order"]
    if kind not in ("imbalance", "dirichlet", "file"):
        raise ValueError(f"label_shift order must be imbalance, dirichlet or file, got {kind!r}")
    if options.get("order_file"):
        kind = "file"  # a shipped order file (e.g. SAR's total_100000_ir_500000_class_order_shuffle_yes.npy)
    elif kind == "file":
        raise ValueError("label_shift with order=file needs setting.order_file=<path to a .npy of indices>")
    cache: dict[bytes, np.ndarray] = {}
    segments = []
    for i, d in enumerate(bench.domains):
        labels = d.labels.numpy()
        key = labels.tobytes()
        if key not in cache:
            if kind == "file":
                cache[key] = order_from_file(options["order_file"], len(labels))
            elif kind == "imbalance":
                cache[key] = imbalance_order(labels, imbalance_ratio=float(options["imbalance_ratio"]),
                                             total=options["total"], steps=options["steps"], seed=seed)
            else:
                cache[key] = dirichlet_order(labels, delta=float(options["delta"]), slots=options["slots"], seed=seed)
        order = cache[key]
        segments.append(Segment(d.name, np.full(len(order), i), order))
    return Plan(list(bench.domains), segments, {}, info={"label_order": kind})


def _open_set(bench, options, seed, shuffle, ood_source=None) -> Plan:
    if ood_source is None:
        raise ValueError("the open_set setting needs its out-of-distribution images: pass ood_source= to plan() "
                         "(build_stream does)")
    fraction = float(options["ood_fraction"])
    if not 0 < fraction < 1:
        raise ValueError(f"open_set ood_fraction must be in (0, 1), got {fraction}")
    ids = list(bench.domains)
    counts = [int(round(len(d) * fraction / (1 - fraction))) for d in ids]
    source, corruptible = ood_source(sum(counts))
    parts = list(ids)
    segments = []
    offset = 0
    for i, (d, n_ood) in enumerate(zip(ids, counts)):
        corruption, severity = corruption_and_severity(d)
        corrupt_ood = bool(options["ood_corrupt"]) and corruptible and severity is not None and _known(corruption)
        if source.name == "noise":  # distinct noise images per domain: one part, disjoint indices
            name = "ood:noise"
            ood_index = np.arange(offset, offset + n_ood, dtype=np.int64)
            offset += n_ood
        else:
            name = f"ood:{source.name}/{d.name}" if corrupt_ood else f"ood:{source.name}"
            perm = shuffled(len(source), seed, f"ood:{d.name}")
            ood_index = np.resize(perm, n_ood).astype(np.int64)
        existing = [j for j, p in enumerate(parts) if p.name == name]
        if existing:
            j = existing[0]
        else:
            parts.append(Domain(name, source, corruption=corruption if corrupt_ood else None,
                                severity=severity if corrupt_ood else None, ood=True))
            j = len(parts) - 1
        part = np.concatenate([np.full(len(d), i), np.full(n_ood, j)])
        index = np.concatenate([np.arange(len(d)), ood_index])
        order = shuffled(len(index), seed, f"{d.name}+ood")
        segments.append(Segment(d.name, part[order], index[order]))
    return Plan(parts, segments, {"open_set": True},
                info={"ood": {"source": source.name, "fraction": fraction, "num_samples": int(sum(counts))}})


def _known(corruption: str) -> bool:
    from .corruptions import ALL_CORRUPTIONS

    return corruption in ALL_CORRUPTIONS


def _forgetting(bench, options, seed, shuffle, ood_source=None) -> Plan:
    if bench.clean is None:
        raise ValueError(f"the forgetting setting needs clean images, and {bench.name} has none configured (set "
                         f"data.clean_root to the clean test images)")
    clean = bench.clean() if callable(bench.clean) else bench.clean
    clean = Domain("clean", clean.source, ids=clean.ids, transform=clean.transform, corruption=clean.corruption,
                   severity=clean.severity)
    parts, corrupted = _sequential(bench, seed, shuffle)
    parts.append(clean)
    c = len(parts) - 1
    chosen = np.arange(len(clean), dtype=np.int64)
    if options.get("clean_samples"):
        chosen = np.sort(shuffled(len(clean), seed, "clean-subset")[: int(options["clean_samples"])])

    def clean_pass(k: int) -> Segment:
        order = chosen[domain_order(len(chosen), seed, "clean", shuffle, k)]
        return Segment(f"clean@{k}", np.full(len(order), c), order)

    segments = [clean_pass(0)]
    for k, segment in enumerate(corrupted, start=1):
        segments += [segment, clean_pass(k)]
    return Plan(parts, segments, {"reset_each_domain": bool(options["reset_each_domain"])}, summarize=summarize_forgetting,
                info={"clean_samples_per_pass": int(len(chosen))})


def summarize_forgetting(domains: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Results without the clean passes in the mean; clean accuracy before/after under ``forgetting``."""
    from ..metrics import mean_over_domains

    clean = {k: v for k, v in domains.items() if k.startswith("clean@")}
    shifted = {k: v for k, v in domains.items() if not k.startswith("clean@")}
    results: dict[str, Any] = {"mean": mean_over_domains(shifted), "domains": shifted}
    if clean:
        passes = sorted(clean, key=lambda k: int(k.split("@")[1]))
        before, after = clean[passes[0]], clean[passes[-1]]
        results["forgetting"] = {
            "clean_accuracy_before": before["accuracy"], "clean_accuracy_after": after["accuracy"],
            "clean_accuracy_drop": before["accuracy"] - after["accuracy"],
            "source_clean_accuracy": before.get("source_accuracy"),
            "passes": {k: clean[k] for k in passes},
        }
    return results


def _long_stream(bench, options, seed, shuffle, ood_source=None) -> Plan:
    rounds = int(options["rounds"])
    if rounds < 1:
        raise ValueError(f"long_stream rounds must be >= 1, got {rounds}")
    parts = list(bench.domains)
    segments = [Segment(d.name, np.full(len(d), i), domain_order(len(d), seed, d.name, shuffle, r))
                for r in range(rounds) for i, d in enumerate(parts)]
    return Plan(parts, segments, {"reset_each_domain": bool(options["reset_each_domain"])}, info={"rounds": rounds})


def _ccc(bench, options, seed, shuffle, ood_source=None) -> Plan:
    from .ccc.setting import plan_ccc

    parts, segments, record = plan_ccc(bench.clean, options, seed=seed)
    return Plan(parts, segments, {"reset_each_domain": False, "per_batch_accuracy": True}, info={"ccc": record})


_BUILDERS: dict[str, Callable[..., Plan]] = {
    "reset_each_shift": _plain, "continual": _plain, "mixed_domains": _mixed, "gradual": _gradual,
    "label_shift": _label_shift, "bs1": _plain, "open_set": _open_set, "forgetting": _forgetting,
    "long_stream": _long_stream, "ccc": _ccc,
}  # bs1 is reset_each_shift; its batch_size option (1) is applied by build_stream
