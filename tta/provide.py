"""Providers of run inputs: what the command line hands a method beyond the stream's batches.

A method class declares its needs with ``run_inputs(hparams)`` (:mod:`tta.methods.inputs`);
:func:`provide_inputs` builds each from the run's parts and returns them as constructor keywords.
Python users pass the same keywords themselves (``tta.adapt(model, "eata", fisher_data=...)``),
so every method receives its inputs one way: at construction.

One provider per input kind:

* ``clean_images``: the data config's clean images (:func:`tta.data.clean.clean_data_for`);
* ``test_pass``: a callable that rebuilds the test stream unshuffled;
* ``diffusion_views``: the ``augment.diffusion`` options as a
  :class:`~tta.augment.diffusion.DiffusionViews` source, with the stream's sample-id -> image-name
  resolver (:class:`~tta.augment.mixed_views.StreamImageNames`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch

from .methods.inputs import RunInput


@dataclass
class RunParts:
    """What a run has to build inputs from (all optional: a missing part gives no input).

    Args:
        data: the data config (a plain dict).
        seed: the run's seed (orders the clean images).
        batch_size: the stream's batch size.
        device: where the run computes.
        test_stream: a callable returning the test stream again, unshuffled.
        stream: the test stream itself (sample ids -> file names for the view cache).
        augment: the ``augment`` options (``augment.diffusion``: the diffusion views).
        on_bad_image: ``skip`` or ``fail`` for clean images that do not decode.
        progress: show progress bars (diffusion generation).
    """

    data: Mapping[str, Any] | None = None
    seed: int = 0
    batch_size: int = 64
    device: torch.device | str = "cpu"
    test_stream: Callable[[], Iterable] | None = None
    stream: Any = None
    augment: Mapping[str, Any] | None = None
    on_bad_image: str | None = None
    progress: bool = True
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def diffusion_options(self) -> dict[str, Any]:
        return dict((self.augment or {}).get("diffusion") or {})


def _clean_images(need: RunInput, parts: RunParts) -> dict[str, Any]:
    from .data.clean import clean_data_for

    if parts.data is None:
        if need.required:
            raise ValueError(f"the method needs clean images ({need.keyword}=); {need.hint}")
        return {}
    images = clean_data_for(dict(parts.data), num_samples=int(need.options.get("num_samples", 2000)), seed=parts.seed,
                            batch_size=parts.batch_size, device=parts.device, required=need.required,
                            on_bad_image=parts.on_bad_image, purpose="EATA's Fisher" if need.keyword == "fisher_data"
                            else "clean images", hint=need.hint or None)
    if images is None:
        return {}
    parts.record["clean_images"] = {"num_samples": int(need.options.get("num_samples", 2000)), "seed": parts.seed,
                                    "from": str(parts.data.get("clean_root") or parts.data.get("fisher_split")
                                                or parts.data.get("root"))}
    return {need.keyword: images}


def _test_pass(need: RunInput, parts: RunParts) -> dict[str, Any]:
    if parts.test_stream is None:
        if need.required:
            raise ValueError(f"the method needs a pass over the test data ({need.keyword}=); {need.hint}")
        return {}
    parts.record["test_pass"] = {"shuffle": False}
    return {need.keyword: parts.test_stream}


def _diffusion_views(need: RunInput, parts: RunParts) -> dict[str, Any]:
    from .augment.mixed_views import StreamImageNames, build_diffusion_views

    options = dict(parts.diffusion_options)
    views = build_diffusion_views(options, required=need.required, device=parts.device, progress=parts.progress)
    if views is None:
        return {}
    names = StreamImageNames(parts.stream) if parts.stream is not None else None
    return {"diffusion_views": views, "image_names": names, "diffusion_mode": options.get("mode") or "add"}


PROVIDERS: dict[str, Callable[[RunInput, RunParts], dict[str, Any]]] = {
    "clean_images": _clean_images,
    "test_pass": _test_pass,
    "diffusion_views": _diffusion_views,
}


def provide_inputs(method_class: type, hparams: Mapping[str, Any], parts: RunParts) -> dict[str, Any]:
    """Constructor keywords with every input ``method_class`` declares for ``hparams``.

    A run that asks for diffusion views (``augment.diffusion.pipeline``) for a method that takes
    none is refused, so a configured option is never silently ignored.
    """
    needs = method_class.run_inputs(hparams)
    kinds = {need.kind for need in needs}
    if parts.diffusion_options.get("pipeline") and "diffusion_views" not in kinds:
        from .methods import METHODS

        takers = [name for name in METHODS.available()
                  if any(i.kind == "diffusion_views" for i in METHODS.get(name).run_inputs({}))]
        raise ValueError(f"augment.diffusion.pipeline is set but method {method_class.name!r} makes no augmented views "
                         f"(diffusion views feed view-based methods: {', '.join(takers)})")
    kwargs: dict[str, Any] = {}
    for need in needs:
        kwargs.update(PROVIDERS[need.kind](need, parts))
    return kwargs


__all__ = ["PROVIDERS", "RunParts", "provide_inputs"]
