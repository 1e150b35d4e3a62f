"""A recipe: an adapting model behind Ray Serve, with request batching (``pip install "tta-toolkit[serve]"``).

Adaptation learns from batches; requests arrive one image at a time. ``@serve.batch`` collects
single-image requests into the batches the method adapts on (up to ``max_batch_size`` images,
waiting at most ``batch_wait_timeout_s`` for a batch to fill), and every request gets its own
image's answer::

    from ray import serve
    from tta.serve.ray_serve import app

    serve.start(http_options={"host": "127.0.0.1", "port": 8000})
    serve.run(app("digits_gn", "tent", state_dir="/var/lib/tta"), name="tta", route_prefix="/")
    # POST /  {"image": [[[...]]]}  (C x H x W floats in [0, 1])  ->  {"class": 3, "logits": [...]}
    # GET /metrics  (Prometheus text, tta.serve.metrics)      GET /stats  (counters, JSON)

or ``python -m tta.serve.ray_serve --model digits_gn --method tent --state-dir /var/lib/tta``.

What the replica does:

* **state**: the adapted state (``adapted.state_dict()``: weights, optimizer state, method state,
  counters; tensors and plain containers) is written atomically to ``<state_dir>/adapted_state.pt``
  every ``save_every`` batches and restored at start with ``torch.load(..., weights_only=True)``
  (loading it runs no code); a restarted replica continues from the last save, counters included;
* **the lock**: the batch is adapted, and the state saved, under the method's lock
  (``adapted.lock``); ``/stats`` and ``/metrics`` read under it too, between two batches;
* **the guard** (:mod:`tta.guard`) is on (``guard="reset_on_collapse"`` by default);
* **metrics**: ``/metrics`` serves the replica's :class:`~tta.serve.metrics.MetricsExporter`
  registry (updated after every batch, from the step monitor: no host sync in the step);
* **bad requests** are refused with HTTP 400 and a message before they join a batch (not JSON,
  no ``image``, not numbers, wrong shape or channels, values outside [0, 1] or not finite): they
  never reach the weights or the counters, and the other requests of the batch are unaffected.

**Several replicas** (``num_replicas=k``) each hold their own adapted copy and adapt on the share of
the requests Ray routes to them; their states diverge. They save to the same file (atomic
replace, the last writer wins), so after a restart every replica starts from the most recent state
any of them saved. ``/metrics`` and ``/stats`` answer for the replica that handles the request.
Keep one replica per adapted state when one coherent state matters; scale out when each replica
adapting on its own share is acceptable.
"""
from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path
from typing import Any, Mapping

import torch

try:
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError('the Ray Serve recipe needs ray[serve]: pip install "tta-toolkit[serve]"') from error

STATE_NAME = "adapted_state.pt"


class BadRequest(ValueError):
    """A request this deployment refuses (HTTP 400)."""


def parse_image(payload: Any, channels: int, size: tuple[int, int] | None) -> torch.Tensor:
    """The request's image as a float tensor ``(C, H, W)`` in [0, 1], or :class:`BadRequest` saying what is wrong."""
    if not isinstance(payload, Mapping) or "image" not in payload:
        raise BadRequest('expected a JSON object {"image": [[[...]]]} (C x H x W numbers in [0, 1])')
    try:
        image = torch.tensor(payload["image"], dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError):
        raise BadRequest('"image" must be a nested list of numbers, C x H x W (one image per request)') from None
    if image.dim() != 3:
        raise BadRequest(f'"image" must have 3 dimensions (C x H x W, one image per request), got shape {tuple(image.shape)}')
    if image.shape[0] != channels:
        raise BadRequest(f"expected {channels} channels, got shape {tuple(image.shape)}")
    if size is not None and tuple(image.shape[1:]) != tuple(size):
        raise BadRequest(f"expected an image of {size[0]} x {size[1]} pixels, got shape {tuple(image.shape)}")
    if not bool(torch.isfinite(image).all()) or float(image.min()) < 0.0 or float(image.max()) > 1.0:
        raise BadRequest("image values must be finite and in [0, 1]")
    return image


@serve.deployment(ray_actor_options={"num_cpus": 0})
class AdaptingModel:
    """One replica: an adapting model (``tta.adapt(model, method, guard=guard, **adapt_kwargs)``),
    its saved state, its metrics (module docstring).

    Args:
        model: a model spec (``"digits_gn"``, ``"timm:..."``, ...) or an ``nn.Module``.
        method: a registered method.
        state_dir: where the state is saved and restored from (``None``: never saved).
        save_every: batches between two saves.
        guard: the collapse guard (``None``: off).
        adapt_kwargs: further keywords of :func:`tta.adapt`.
        max_batch_size, batch_wait_timeout_s: ``@serve.batch``'s batching.
        input_size: the ``(H, W)`` every request must have (``None``: the model's, when it declares one).
    """

    def __init__(self, model: Any, method: str = "tent", *, state_dir: str | None = None, save_every: int = 10,
                 guard: Any = "reset_on_collapse", adapt_kwargs: Mapping[str, Any] | None = None,
                 max_batch_size: int = 16, batch_wait_timeout_s: float = 0.05,
                 input_size: tuple[int, int] | None = None):
        import tta
        from .metrics import MetricsExporter

        if int(save_every) < 1:
            raise ValueError(f"save_every must be a number of batches >= 1, got {save_every!r}")
        self.adapted = tta.adapt(model, method, guard=guard, **dict(adapt_kwargs or {}))
        self.save_every = int(save_every)
        self.state_path = Path(state_dir) / STATE_NAME if state_dir else None
        self.channels = int(getattr(self.adapted.model, "input_channels", 3))
        declared = input_size or getattr(self.adapted.model.info, "input_size", None)
        self.input_size = tuple(declared) if declared else None
        self.restored = False
        self.metrics = MetricsExporter(self.adapted)
        if self.state_path is not None and self.state_path.is_file():
            state = torch.load(self.state_path, map_location="cpu", weights_only=True)
            self.adapted.load_state_dict(state)
            self.restored = True
            self.metrics.monitor.mark_checkpoint(self.state_path.stat().st_mtime)
        self.metrics.update()
        self.since_save = 0
        self.saves = 0
        self.predict_batch.set_max_batch_size(int(max_batch_size))
        self.predict_batch.set_batch_wait_timeout_s(float(batch_wait_timeout_s))

    # ------------------------------------------------------------------ the batch
    def _adapt(self, images: list[torch.Tensor]) -> list[dict[str, Any]]:
        x = torch.stack(images).to(next(self.adapted.parameters()).device)
        with self.adapted.lock:  # adapt and save as one unit: a save never holds half a batch
            logits = self.adapted(x).detach().float().cpu()
            self.since_save += 1
            if self.state_path is not None and self.since_save >= self.save_every:
                self.save()
        self.metrics.update()
        return [{"class": int(row.argmax()), "logits": row.tolist()} for row in logits]

    def save(self) -> None:
        """Write the adapted state atomically (tensors and plain containers: ``weights_only`` loads it)."""
        from ..checkpoint import save_atomic, to_cpu

        with self.adapted.lock:
            self.state_path.parent.mkdir(parents=True, exist_ok=True)
            save_atomic(to_cpu(dict(self.adapted.state_dict())), self.state_path)
            self.since_save = 0
            self.saves += 1
        self.metrics.mark_checkpoint()

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.05)
    async def predict_batch(self, images: list[torch.Tensor]) -> list[dict[str, Any]]:
        return await asyncio.get_running_loop().run_in_executor(None, self._adapt, images)

    # ------------------------------------------------------------------ HTTP
    def stats(self) -> dict[str, Any]:
        with self.adapted.lock:
            stats = self.adapted.stats()
            checksum = float(sum(p.detach().double().abs().sum() for p in self.adapted.adapted_parameters()))
        return {"counters": stats["counters"], "restored": self.restored, "saves": self.saves,
                "adapted_checksum": checksum if math.isfinite(checksum) else None,
                "state_path": None if self.state_path is None else str(self.state_path), "time": time.time()}

    async def __call__(self, request: Request):
        path = request.url.path.rstrip("/").rsplit("/", 1)[-1]
        if request.method == "GET" and path == "metrics":
            self.metrics.update()
            return PlainTextResponse(self.metrics.text(), media_type="text/plain; version=0.0.4")
        if request.method == "GET" and path == "stats":
            return JSONResponse(self.stats())
        if request.method != "POST":
            return JSONResponse({"error": "POST one image as JSON {\"image\": ...}; GET /metrics or /stats"},
                                status_code=405)
        try:
            try:
                payload = await request.json()
            except ValueError:
                raise BadRequest("the request body is not JSON") from None
            image = parse_image(payload, self.channels, self.input_size)
        except BadRequest as error:
            return JSONResponse({"error": str(error)}, status_code=400)
        return JSONResponse(await self.predict_batch(image))


def app(model: Any, method: str = "tent", *, num_replicas: int = 1, num_cpus: float = 0, **options: Any):
    """The Ray Serve application of one :class:`AdaptingModel` deployment (``options``: its arguments)."""
    return AdaptingModel.options(num_replicas=int(num_replicas),
                                 ray_actor_options={"num_cpus": num_cpus}).bind(model, method, **options)


def main(argv: list[str] | None = None) -> None:
    """``python -m tta.serve.ray_serve --model digits_gn --method tent --state-dir DIR [--port 8000]``."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--method", default="tent")
    parser.add_argument("--state-dir", default=None)
    parser.add_argument("--save-every", type=int, default=10)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--batch-wait-timeout-s", type=float, default=0.05)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--no-guard", action="store_true")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(app(args.model, args.method, num_replicas=args.replicas, state_dir=args.state_dir,
                  save_every=args.save_every, guard=None if args.no_guard else "reset_on_collapse",
                  max_batch_size=args.max_batch_size, batch_wait_timeout_s=args.batch_wait_timeout_s),
              name="tta", route_prefix="/", blocking=True)


if __name__ == "__main__":
    main()


__all__ = ["AdaptingModel", "BadRequest", "STATE_NAME", "app", "main", "parse_image"]
