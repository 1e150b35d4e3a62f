"""Diffusion views as a view source for any view-based method (TPT, ADTE, DiffTPT).

:class:`DiffusionViewGenerator` wraps a :class:`~tta.augment.views.ViewGenerator` (the original +
random resized crops) and a :class:`~tta.augment.diffusion.DiffusionViews` source, with the same
interface (``plan``, ``__call__``, ``hparams``), so a method that makes its views with a
``ViewGenerator`` takes diffusion views without a change:

* ``mode="add"`` (DiffTPT's layout): ``[original, crops..., diffusion views...]``;
* ``mode="replace"``: ``[original, diffusion views...]`` (the crops are not made).

Each diffusion view (``R x R``, 512 for Stable Diffusion) becomes Resize(S, bicubic) +
CenterCrop(S) at the method's resolution ``S``, as DiffTPT's ``data_transform_diffu``.

**Image ids for the view cache.** The engine hands a view-based method the stream's sample ids
(``Batch.ids``: ``code(domain) << 32 | index``). :class:`StreamImageNames` turns them into the
names the view cache is keyed by, from the stream's own parts:

* an image file that the stream passes on unchanged: its path relative to the dataset root
  (``<class>/<file>``), the id ``scripts/generate_diffusion_views.py`` uses, so pre-generated
  views are found;
* a file the stream resizes/crops first (``data.resize``/``data.crop``): the same path with
  ``@resize224-crop224-bicubic`` appended, since the conditioning image differs (the script
  makes those with ``--resize/--crop``);
* a corrupted or transformed image (``gaussian_noise/5``): the domain name in front,
  ``gaussian_noise/5/<class>/<file>``;
* a sample without a file (arrays, noise): ``<domain>/#<index>``.

Without a resolver the names are ``#<sample id>`` (unique within one stream).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch

from .diffusion import DEFAULT_PIPELINE, DiffusionViews
from .views import ViewGenerator, ViewPlan, resize_center_crop

MODES = ("add", "replace")
ImageNames = Callable[[Sequence[int]], list[str]]


def preprocess_tag(preprocess: Any) -> str:
    """``""`` for an image used as decoded, else ``"@resize224-crop224-bicubic"``-style."""
    if preprocess is None:
        return ""
    resize, crop = getattr(preprocess, "resize", None) or None, getattr(preprocess, "crop", None) or None
    if resize is None and crop is None:  # 0 / None: the image as decoded
        return ""
    parts = [f"resize{resize}" if resize is not None else None, f"crop{crop}" if crop is not None else None,
             getattr(preprocess, "interpolation", None) if resize is not None else None]
    return "@" + "-".join(p for p in parts if p)


def default_names(ids: Sequence[int]) -> list[str]:
    return [f"#{int(i)}" for i in ids]


class StreamImageNames:
    """Sample ids of a :class:`~tta.data.stream.Stream` -> view-cache image names (module docstring)."""

    def __init__(self, stream: Any):
        self.parts: dict[int, Any] = {}
        for part in getattr(stream, "parts", []):
            self.parts.setdefault(int(part.code), part)
        self._positions: dict[int, dict[int, int]] = {}

    def _position(self, part: Any, low: int) -> int:
        if part.ids is None:
            return low
        table = self._positions.get(id(part))
        if table is None:
            table = {int(v): i for i, v in enumerate(part.ids.tolist())}
            self._positions[id(part)] = table
        return table[low]

    def name(self, sample_id: int) -> str:
        sample_id = int(sample_id)
        part = self.parts.get(sample_id >> 32)
        if part is None:
            return f"#{sample_id}"
        low = sample_id & 0xFFFFFFFF
        source = part.source
        key = None
        if hasattr(source, "files"):
            keys = source.keys(np.asarray([self._position(part, low)]))
            key = keys[0] if keys else None
        modified = part.corruption is not None or part.transform is not None or part.ood
        if key is None:
            return f"{part.name}/#{low}"
        name = key + preprocess_tag(getattr(source, "preprocess", None))
        return f"{part.name}/{name}" if modified else name

    def __call__(self, ids: Sequence[int] | torch.Tensor) -> list[str]:
        ids = ids.tolist() if torch.is_tensor(ids) else ids
        return [self.name(i) for i in ids]


class MixedPlan(ViewPlan):
    """A :class:`ViewPlan` that also remembers the ids of the batch (for the diffusion views) and the
    cache reads started ahead, by image slice."""

    ids: list[int]
    ahead: dict

    @classmethod
    def wrap(cls, plan: ViewPlan, ids: list[int]) -> "MixedPlan":
        out = cls(plan.crops, plan.flips, plan.augmix, plan.height, plan.width)
        out.ids, out.ahead = ids, {}
        return out


class DiffusionViewGenerator:
    """``[original, crops (mode="add")..., diffusion views...]`` per image; see the module docstring.

    Args:
        base: the conventional views (its ``num_views`` counts the original).
        diffusion: the diffusion view source (``num_views`` variations per image).
        mode: ``add`` or ``replace``.
        num_diffusion: diffusion views used per image (default: all of ``diffusion.num_views``).
        names: sample ids -> cache image names (default ``#<id>``; the CLI uses :class:`StreamImageNames`).
    """

    def __init__(self, base: ViewGenerator, diffusion: DiffusionViews, *, mode: str = "add",
                 num_diffusion: int | None = None, names: ImageNames | None = None):
        if mode not in MODES:
            raise ValueError(f"diffusion view mode must be one of {MODES}, not {mode!r}")
        num_diffusion = diffusion.num_views if num_diffusion is None else int(num_diffusion)
        if not 0 <= num_diffusion <= diffusion.num_views:
            raise ValueError(f"num_diffusion={num_diffusion} but the diffusion source makes {diffusion.num_views} "
                             f"views per image (augment.diffusion.num_views)")
        self.base, self.diffusion, self.mode = base, diffusion, mode
        self.num_diffusion = num_diffusion
        self.names: ImageNames = names or default_names
        self.size = base.size
        self.requested = 0  # diffusion views asked for (cache hits + generated)

    @property
    def num_views(self) -> int:
        kept = self.base.num_views if self.mode == "add" else 1
        return kept + self.num_diffusion

    @property
    def num_conventional(self) -> int:
        """Views from the base generator per image, the original included."""
        return self.base.num_views if self.mode == "add" else 1

    def plan(self, ids: Sequence[int] | torch.Tensor, height: int, width: int, salt: int = 0) -> MixedPlan:
        ids = ids.tolist() if torch.is_tensor(ids) else [int(i) for i in ids]
        return MixedPlan.wrap(self.base.plan(ids, height, width, salt), ids)

    def diffusion_views(self, x: torch.Tensor, ids: Sequence[int], cached: Any = None) -> torch.Tensor:
        """(N, num_diffusion, 3, S, S) diffusion views of ``x`` at the method's resolution."""
        if self.num_diffusion == 0:
            return x.new_zeros(x.shape[0], 0, 3, self.size, self.size)
        names = self.names(list(ids))
        views = (self.diffusion(x, names, cached=cached) if cached is not None else self.diffusion(x, names))
        views = views[:, : self.num_diffusion]
        self.requested += views.shape[0] * views.shape[1]
        n, k = views.shape[:2]
        return resize_center_crop(views.flatten(0, 1), self.size).view(n, k, 3, self.size, self.size).to(x.dtype)

    def __call__(self, x: torch.Tensor, ids: Sequence[int] | torch.Tensor | None = None, salt: int = 0,
                 plan: ViewPlan | None = None, images: slice | None = None) -> torch.Tensor:
        """Views (n, num_views, 3, S, S) of ``x`` (N, 3, H, W) in [0, 1]; arguments as ``ViewGenerator``."""
        if plan is None or not isinstance(plan, MixedPlan):
            given = list(range(x.shape[0])) if ids is None else ids
            plan = self.plan(given, x.shape[-2], x.shape[-1], salt)
        start, stop, _ = (images or slice(None)).indices(x.shape[0])
        if self.mode == "add":
            conventional = self.base(x, plan=plan, images=images)
        else:
            conventional = resize_center_crop(x[start:stop], self.size).unsqueeze(1)
        cached = plan.ahead.pop((start, stop), None)
        following = (stop, min(stop + (stop - start), len(plan.ids)))
        if (self.num_diffusion and following[0] < following[1] and following not in plan.ahead
                and callable(getattr(self.diffusion, "read_ahead", None)) and self.diffusion.cache is not None):
            # TPT/ADTE go image by image: read the next image's cached views while this one is tuned
            plan.ahead[following] = self.diffusion.read_ahead(self.names(plan.ids[following[0]:following[1]]))
        diffusion = self.diffusion_views(x[start:stop], plan.ids[start:stop], cached)
        return torch.cat([conventional, diffusion.to(conventional.device)], dim=1)

    def stats(self) -> dict[str, Any]:
        """What the run record keeps under ``augment.diffusion``."""
        return describe_diffusion(self.diffusion, requested=self.requested)

    def hparams(self) -> dict[str, Any]:
        return {**self.base.hparams(), "num_views": self.num_views, "mode": self.mode,
                "num_conventional": self.num_conventional, "num_diffusion": self.num_diffusion,
                "diffusion": {k: v for k, v in self.diffusion.key_params.items()}}


def describe_diffusion(diffusion: DiffusionViews, requested: int | None = None) -> dict[str, Any]:
    """Generation parameters, cache folder and counts (``cache_hits``, ``generated``, ``invalid``)."""
    cache = diffusion.cache
    return {**diffusion.key_params, "num_views": diffusion.num_views, "device": str(diffusion.device),
            "dtype": str(diffusion.dtype).removeprefix("torch."), "batch_size": diffusion.batch_size,
            "cache_dir": None if cache is None else str(cache.dir), "requested": requested,
            **diffusion.stats}


# ---------------------------------------------------------------------------------------- the CLI
def build_diffusion_views(cfg: dict[str, Any] | None, *, required: bool = False, device: Any = None,
                          progress: bool = True) -> DiffusionViews | None:
    """A :class:`DiffusionViews` from the CLI's ``augment.diffusion`` group (``None`` when it names no
    pipeline and ``required`` is false; the default pipeline when it names none and ``required``)."""
    cfg = dict(cfg or {})
    pipeline = cfg.pop("pipeline", None)
    if pipeline is None and not required:
        return None
    dtype = cfg.pop("dtype", None)
    dtypes = {None: None, "float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16,
              "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32}
    if dtype not in dtypes:
        raise ValueError(f"augment.diffusion.dtype must be one of float16, bfloat16, float32 (or null), not {dtype!r}")
    cfg.pop("mode", None)
    known = ("revision", "pipeline_class", "num_views", "steps", "guidance_scale", "strength", "seed", "resolution",
             "cache_dir", "device", "batch_size")
    unknown = sorted(set(cfg) - set(known))
    if unknown:
        raise ValueError(f"unknown augment.diffusion option(s) {unknown}; "
                         f"known: pipeline, mode, dtype, {', '.join(known)}")
    kwargs = {k: cfg[k] for k in known if k in cfg and (cfg[k] is not None or k == "cache_dir")}
    kwargs.setdefault("device", device)
    return DiffusionViews(pipeline or DEFAULT_PIPELINE, dtype=dtypes[dtype], progress=progress, **kwargs)


__all__ = ["DiffusionViewGenerator", "MODES", "MixedPlan", "StreamImageNames", "build_diffusion_views", "describe_diffusion",
           "preprocess_tag"]
