"""Seeded subsets of a dataset: ``data.subset=N``, ``data.subset_seed``, ``data.subset_file``.

DiffTPT evaluates on 1,000-image subsets (its generator draws 5 images per class of ImageNet-R;
docs/methods/difftpt.md), and its diffusion views cost about a minute of GPU time per image, so a
run on a fixed, recorded subset is the normal way to run it. Any method can use the same option.

* ``data.subset=N`` draws ``N`` samples without replacement, seeded by ``data.subset_seed``
  (default: the run seed), and keeps them in dataset order (the stream shuffles them as usual).
* ``data.subset_file=<path>`` reuses a list: a text file with one sample key per line (``#``
  comments allowed) or a ``run.json`` whose ``stream.subset.keys`` it reads.
* The list is written into the run record (``stream.subset``: size, seed, file, keys).

A sample's *key* is its file path relative to the dataset root when the source has files (the
same id :class:`~tta.augment.diffusion.DiffusionViews` caches views under) and its index, as a
decimal string, otherwise. The same keys are selected in every domain of the stream (every
corruption and severity of a ``-C`` benchmark), so domains stay comparable; a domain that lacks
a key is an error. Sample ids, corruption seeds and labels are those of the full dataset: a
subset run sees exactly the images the full run sees for those samples.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .sources import ImageSource
from .stream import Domain


class SubsetSource(ImageSource):
    """The samples ``index`` of another source, in that order (reads and decoding are delegated)."""

    def __init__(self, base: ImageSource, index: np.ndarray):
        self.base = base
        self.index = np.asarray(index, dtype=np.int64)
        self.labels = base.labels[torch.from_numpy(self.index)]
        self.name = getattr(base, "name", "images")
        self.heavy = getattr(base, "heavy", False)
        if hasattr(base, "files"):  # the stream hands file keys to the batch when a source has files
            self.files = [base.files[i] for i in self.index]

    def __getattr__(self, name: str) -> Any:  # image_size, root, preprocess ... of the base source
        if name == "base" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.base, name)

    def read(self, index: np.ndarray, mode: str = "cpu", on_bad: str = "skip") -> Any:
        return self.base.read(self.index[np.asarray(index, dtype=np.int64)], mode, on_bad)

    def finish(self, raw: Any, device: torch.device):
        return self.base.finish(raw, device)

    def keys(self, index: np.ndarray) -> list[str] | None:
        return self.base.keys(self.index[np.asarray(index, dtype=np.int64)])

    def describe(self) -> dict[str, Any]:
        return {**self.base.describe(), "num_samples": len(self), "subset_of": len(self.base)}


def sample_keys(domain: Domain) -> list[str]:
    """The key of every sample of ``domain``: its relative file path, or its index as a string."""
    n = len(domain)
    keys = domain.source.keys(np.arange(n)) if hasattr(domain.source, "files") else None
    return list(keys) if keys else [str(i) for i in range(n)]


def read_subset_file(path: str | os.PathLike) -> list[str]:
    """Sample keys from a list file (one per line) or from a run record (``stream.subset.keys``)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"data.subset_file: no such file {path}")
    text = path.read_text()
    if path.suffix == ".json":
        record = json.loads(text)
        subset = (record.get("stream") or {}).get("subset") or record.get("subset") or {}
        keys = subset.get("keys") if isinstance(subset, dict) else None
        if not keys:
            raise ValueError(f"data.subset_file: {path} is a JSON file without stream.subset.keys "
                             f"(pass a run.json of a subset run or a text file with one key per line)")
        return [str(k) for k in keys]
    keys = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not keys:
        raise ValueError(f"data.subset_file: {path} lists no samples")
    return keys


def draw_subset(keys: Sequence[str], size: int, seed: int) -> list[int]:
    """``size`` distinct positions of ``keys``, seeded, in increasing order."""
    if int(size) < 1:
        raise ValueError(f"data.subset must be a positive number of samples, got {size}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed) % 2**63, 0x5B5E7]))
    chosen = rng.choice(len(keys), size=min(int(size), len(keys)), replace=False)
    return sorted(int(i) for i in chosen)


def subset_domain(domain: Domain, index: np.ndarray) -> Domain:
    """``domain`` restricted to the samples ``index``, keeping their ids (so corruption seeds) and labels."""
    index = np.asarray(index, dtype=np.int64)
    ids = (domain.ids[torch.from_numpy(index)] if domain.ids is not None else torch.from_numpy(index.copy()))
    source = SubsetSource(domain.source, index)
    return dataclasses.replace(domain, images=source, labels=source.labels, ids=ids)


def apply_subset(domains: Sequence[Domain], *, size: int | None = None, seed: int = 0,
                 file: str | os.PathLike | None = None) -> tuple[list[Domain], dict[str, Any] | None]:
    """Restrict every domain to the same subset of samples; returns the domains and the record entry.

    ``file`` wins over ``size`` (with both, ``size`` must not exceed the list's length and the
    first ``size`` keys are used). Neither: the domains unchanged and ``None``.
    """
    domains = list(domains)
    if file is None and size is None:
        return domains, None
    if not domains:
        raise ValueError("data.subset: the dataset has no domains")
    reference = sample_keys(domains[0])
    if file is not None:
        keys = read_subset_file(file)
        if size is not None:
            if int(size) > len(keys):
                raise ValueError(f"data.subset={size} but {file} lists only {len(keys)} samples")
            keys = keys[:int(size)]
    else:
        keys = [reference[i] for i in draw_subset(reference, int(size), seed)]
    if len(set(keys)) != len(keys):
        raise ValueError("data.subset_file lists a sample twice")
    out = []
    for domain in domains:
        own = reference if domain is domains[0] else sample_keys(domain)
        position = {k: i for i, k in enumerate(own)}
        missing = [k for k in keys if k not in position]
        if missing:
            raise ValueError(f"data.subset: {len(missing)} of the {len(keys)} listed samples are not in domain "
                             f"{domain.name!r}, e.g. {', '.join(missing[:3])}")
        out.append(subset_domain(domain, np.asarray([position[k] for k in keys], dtype=np.int64)))
    info = {"size": len(keys), "seed": None if file is not None else int(seed),
            "file": None if file is None else str(file), "num_available": len(reference), "keys": keys}
    return out, info
