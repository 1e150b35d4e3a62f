"""What a method needs from the run besides the stream's batches: the one declared contract.

A method class declares its needs with :meth:`~tta.methods.core.Method.run_inputs`, a
classmethod over the hyperparameters it will be built with, returning :class:`RunInput` entries.
Whoever builds the method (the command line, :func:`tta.adapt`, a user) hands each input over as a
constructor keyword; the command line builds them with :func:`tta.provide.provide_inputs`, from the
data config and the ``augment`` options, through one code path for every method.

Kinds (the vocabulary; a new kind needs one provider in :mod:`tta.provide`):

* ``clean_images`` -- clean images of the source distribution (EATA's Fisher information):
  a tensor of images in [0, 1] or an iterable of batches. Options: ``num_samples``.
* ``test_pass`` -- a callable that returns the test stream again, unshuffled, for a transductive
  pre-pass before the first prediction (ADTE's label-bias estimate).
* ``diffusion_views`` -- a :class:`~tta.augment.diffusion.DiffusionViews` source plus the
  sample-id -> image-name resolver of the stream (DiffTPT; optional for TPT and ADTE). Its
  keywords are fixed: ``diffusion_views``, ``image_names``, ``diffusion_mode``.

Every method is called the same way, ``method(x, ids=..., domain=...)``: sample ids (which seed
per-sample randomness such as TPT's views) and the domain name come with every batch and need no
declaration. Methods that do not use them ignore them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

INPUT_KINDS = ("clean_images", "test_pass", "diffusion_views")
DIFFUSION_KEYWORDS = ("diffusion_views", "image_names", "diffusion_mode")


@dataclass(frozen=True)
class RunInput:
    """One input a method needs from the run.

    Args:
        kind: one of :data:`INPUT_KINDS`.
        keyword: the constructor keyword that takes it (the ``diffusion_views`` kind uses
            :data:`DIFFUSION_KEYWORDS`).
        required: the method cannot run without it (a provider that has none raises, naming
            ``hint``); optional inputs are provided when the run has them.
        options: kind-specific options (``clean_images``: ``num_samples``).
        hint: what else the user can do, for the error message (e.g. a precomputed file).
    """

    kind: str
    keyword: str
    required: bool = True
    options: Mapping[str, Any] = field(default_factory=dict)
    hint: str = ""

    def __post_init__(self) -> None:
        if self.kind not in INPUT_KINDS:
            raise ValueError(f"unknown run input kind {self.kind!r}; known: {', '.join(INPUT_KINDS)}")


__all__ = ["DIFFUSION_KEYWORDS", "INPUT_KINDS", "RunInput"]
