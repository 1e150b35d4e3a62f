"""The Fisher (EWC) anchor of EATA: ``beta * sum_k F_k (theta_k - theta0_k)^2``.

Estimation follows EATA's ``main.py`` (mr-eggplant/EATA):

* data: clean images (``fisher_size = 2000`` by default), in batches, the model already configured
  for adaptation (BatchNorm on batch statistics, train mode);
* per batch: pseudo-labels ``y = argmax z``, the batch-mean cross-entropy ``CE(z, y)``, its gradient
  with respect to the adapted parameters, squared, summed over batches;
* after the last batch the sum is divided by the number of batches; the anchor ``theta0`` is the
  parameter value at that time (the source weights). No optimizer step is ever taken.

The penalty is evaluated with ``torch._foreach`` kernels over all adapted tensors at once
(``||sqrt(F) * (theta - theta0)||^2`` per tensor), instead of the official Python loop over every
named parameter of the model at every step.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

FISHER_FILE_VERSION = 1


def images_of(batch: Any) -> torch.Tensor:
    """The image tensor of a batch given as a tensor, an ``(images, labels, ...)`` tuple/list, a
    dict with ``images``/``image``, or an object with an ``images`` attribute (a stream ``Batch``)."""
    if torch.is_tensor(batch):
        return batch
    if isinstance(batch, (tuple, list)) and batch and torch.is_tensor(batch[0]):
        return batch[0]
    if isinstance(batch, dict):
        for key in ("images", "image", "x"):
            if key in batch:
                return batch[key]
    if hasattr(batch, "images"):
        return batch.images
    raise ValueError(f"cannot find images in a Fisher batch of type {type(batch).__name__}: give tensors, "
                     f"(images, labels) tuples, dicts with 'images', or stream batches")


def check_fisher_images(images: Any, where: str = "fisher_data") -> torch.Tensor:
    """Check Fisher images like a test batch, with a ``ValueError`` naming ``where``: a float
    tensor ``(N, C, H, W)`` in [0, 1] (1e-3 tolerance), finite. A uint8 batch, NaN/Inf or 0..255
    floats would otherwise give a non-finite or meaningless Fisher, and with it every EATA update
    skipped or anchored to nothing. Costs one host sync (Fisher estimation is a one-off setup)."""
    if not torch.is_tensor(images):
        raise ValueError(f"{where}: expected a tensor of images, got {type(images).__name__}")
    if images.ndim != 4:
        raise ValueError(f"{where}: Fisher images must have shape (N, C, H, W), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"{where}: expected float images in [0, 1], got dtype {images.dtype} "
                         f"(convert uint8 images with images.float() / 255)")
    if images.numel() == 0:
        return images
    low, high = torch.stack(torch.aminmax(images.detach())).float().tolist()
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"{where}: the Fisher images contain NaN or Inf values; the Fisher would not be finite")
    if low < -1e-3 or high > 1 + 1e-3:
        raise ValueError(f"{where}: expected images in [0, 1] (the model applies its normalisation itself), got "
                         f"values in [{low:.4g}, {high:.4g}]")
    return images


def check_fisher_data(data: Any) -> None:
    """Check ``fisher_data`` at construction when it is one tensor of images (an iterable of
    batches is checked batch by batch when the Fisher is estimated)."""
    if torch.is_tensor(data):
        check_fisher_images(data)


def iterate_batches(data: Any, batch_size: int) -> Iterable[torch.Tensor]:
    """Image batches from ``data``: one tensor of images (cut into ``batch_size`` chunks) or an
    iterable of batches (see :func:`images_of`)."""
    if torch.is_tensor(data):
        yield from check_fisher_images(data).split(batch_size)
        return
    for i, batch in enumerate(data):
        yield check_fisher_images(images_of(batch), f"fisher_data batch {i}")


def estimate_fisher(model: nn.Module, params: Sequence[nn.Parameter], data: Any, *, fisher_size: int = 2000,
                    batch_size: int = 64) -> tuple[list[torch.Tensor], list[torch.Tensor], dict[str, int]]:
    """EATA's diagonal Fisher of ``params`` on clean data (see the module docstring).

    Uses the first ``fisher_size`` images of ``data`` (a last partial batch is cut to fit, as the
    official loader's last batch of 2000 = 31 x 64 + 16). Gradients are taken with
    ``torch.autograd.grad``, so ``.grad`` of the parameters is left untouched. Autocast is disabled.

    Returns ``(fisher, anchor, info)`` with one tensor per parameter and
    ``info = {"num_samples", "num_batches"}``.
    """
    params = list(params)
    if not params:
        raise ValueError("no parameters to estimate a Fisher for")
    device = params[0].device
    fisher = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    seen = batches = 0
    autocast_off = (torch.autocast(device_type=device.type, enabled=False)
                    if device.type in ("cuda", "cpu") else contextlib.nullcontext())
    with torch.enable_grad(), autocast_off:
        for images in iterate_batches(data, batch_size):
            if seen >= fisher_size:
                break
            images = images[: fisher_size - seen].to(device, non_blocking=True)
            if images.shape[0] == 0:
                continue
            logits = model(images)
            loss = F.cross_entropy(logits.float(), logits.detach().argmax(dim=1))
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            pairs = [(f, g) for f, g in zip(fisher, grads) if g is not None]
            if pairs:
                acc = [f for f, _ in pairs]
                torch._foreach_addcmul_(acc, [g.float() for _, g in pairs], [g.float() for _, g in pairs])
            seen += images.shape[0]
            batches += 1
    if batches == 0:
        raise ValueError("the Fisher data gave no images")
    torch._foreach_div_(fisher, float(batches))
    if not bool(torch.stack([f.isfinite().all() for f in fisher]).all()):  # one sync, once
        raise ValueError("the Fisher estimate is not finite (the model gives non-finite gradients on the Fisher "
                         "images): check the model and the images")
    anchor = [p.detach().clone() for p in params]
    return fisher, anchor, {"num_samples": seen, "num_batches": batches}


class FisherAnchor(nn.Module):
    """``alpha * sum_k F_k (theta_k - theta0_k)^2`` over named parameters, state in buffers.

    ``FisherAnchor(names, params, alpha)`` starts empty (``ready`` is false, the penalty is 0);
    fill it with :meth:`estimate` or :meth:`load` (or :meth:`set`). ``save``/``load`` use one
    ``torch.save`` file of ``{"names", "fisher", "anchor", "info"}`` keyed by parameter name.
    """

    def __init__(self, names: Sequence[str], params: Sequence[nn.Parameter], alpha: float = 2000.0):
        super().__init__()
        if len(names) != len(params):
            raise ValueError("one name per parameter")
        self.names = list(names)
        self.params = list(params)  # not registered: they belong to the model
        self.alpha = float(alpha)
        for i, p in enumerate(self.params):
            self.register_buffer(f"fisher_{i}", torch.zeros_like(p, dtype=torch.float32))
            self.register_buffer(f"anchor_{i}", p.detach().clone())
        self.register_buffer("ready", torch.zeros((), dtype=torch.bool))
        self.info: dict[str, Any] = {}

    # ------------------------------------------------------------------ state
    def fisher(self) -> list[torch.Tensor]:
        return [self._buffers[f"fisher_{i}"] for i in range(len(self.names))]

    def anchors(self) -> list[torch.Tensor]:
        return [self._buffers[f"anchor_{i}"] for i in range(len(self.names))]

    @property
    def is_ready(self) -> bool:
        return bool(self.ready)

    def set(self, fisher: Sequence[torch.Tensor], anchor: Sequence[torch.Tensor], info: dict[str, Any] | None = None) -> None:
        with torch.no_grad():
            for i, (f, a) in enumerate(zip(fisher, anchor)):
                self._buffers[f"fisher_{i}"].copy_(f)
                self._buffers[f"anchor_{i}"].copy_(a)
            self.ready.fill_(True)
        self.info = dict(info or {})

    def estimate(self, model: nn.Module, data: Any, *, fisher_size: int = 2000, batch_size: int = 64) -> None:
        """Estimate from clean ``data`` (see :func:`estimate_fisher`); the anchor is the current value."""
        fisher, anchor, info = estimate_fisher(model, self.params, data, fisher_size=fisher_size, batch_size=batch_size)
        self.set(fisher, anchor, {"source": "data", **info})

    def save(self, path: str | Path) -> None:
        if not self.is_ready:
            raise RuntimeError("no Fisher to save yet: estimate or load one first")
        torch.save({"version": FISHER_FILE_VERSION, "names": self.names,
                    "fisher": {n: f.cpu() for n, f in zip(self.names, self.fisher())},
                    "anchor": {n: a.cpu() for n, a in zip(self.names, self.anchors())},
                    "info": {k: v for k, v in self.info.items() if k != "path"}}, Path(path))

    def load(self, path: str | Path, strict: bool = True) -> None:
        """Load a file written by :meth:`save`. A file made for another model (or another parameter
        preset) raises a ``ValueError`` naming the adapted parameters it lacks and any shape
        mismatch; ``strict=False`` gives those parameters a zero Fisher instead (no anchor)."""
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"Fisher file not found: {path}")
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(blob, dict) or "fisher" not in blob or "anchor" not in blob:
            raise ValueError(f"{path} is not a Fisher file (expected keys 'fisher' and 'anchor')")
        fisher_in, anchor_in = blob["fisher"], blob["anchor"]
        missing = [n for n in self.names if n not in fisher_in or n not in anchor_in]
        mismatched = [f"{n}: file {tuple(fisher_in[n].shape)} vs model {tuple(p.shape)}"
                      for n, p in zip(self.names, self.params)
                      if n in fisher_in and (fisher_in[n].shape != p.shape or anchor_in[n].shape != p.shape)]
        if mismatched:
            raise ValueError(f"Fisher file {path} does not fit this model; shape mismatch for "
                             f"{len(mismatched)} parameter(s): {mismatched[:10]}")
        if missing and strict:
            raise ValueError(f"Fisher file {path} was computed for another model or parameter set: it has no "
                             f"entry for {len(missing)} of the {len(self.names)} adapted parameters: {missing[:20]}"
                             + (" ..." if len(missing) > 20 else ""))
        fisher = [fisher_in[n] if n in fisher_in else torch.zeros_like(p) for n, p in zip(self.names, self.params)]
        anchor = [anchor_in[n] if n in anchor_in else p.detach() for n, p in zip(self.names, self.params)]
        extra = sorted(set(fisher_in) - set(self.names))
        info = {**blob.get("info", {}), "source": "file", "path": str(path)}
        if missing:
            info["missing"] = missing
        if extra:
            info["ignored_entries"] = len(extra)
        self.set(fisher, anchor, info)

    # ------------------------------------------------------------------ the penalty
    def forward(self) -> torch.Tensor:
        """``alpha * sum_k ||sqrt(F_k) * (theta_k - theta0_k)||^2`` (differentiable in theta)."""
        params = self.params
        if not params:
            return torch.zeros(())
        diff = torch._foreach_sub([p.float() if p.dtype != torch.float32 else p for p in params], self.anchors())
        scaled = torch._foreach_mul(diff, torch._foreach_sqrt(self.fisher()))
        total = torch.stack(torch._foreach_norm(scaled)).square().sum()
        return self.alpha * total * self.ready

    def hparams(self) -> dict[str, Any]:
        return {"fisher_alpha": self.alpha, "fisher_tensors": len(self.names), **self.info}
