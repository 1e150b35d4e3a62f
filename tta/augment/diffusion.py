"""Diffusion-generated views for DiffTPT (Feng et al., "Diverse Data Augmentation with Diffusions
for Effective Test-time Prompt Tuning", ICCV 2023).

DiffTPT adds to TPT's 64 augmented views 63 *variations* of the test image produced offline by
Stable Diffusion image variations (``lambdalabs/sd-image-variations-diffusers`` at revision
``v2.0``, guidance scale 3, otherwise diffusers defaults: 50 steps, 512x512). The model is
conditioned on the test image after ToTensor, Resize((224, 224), bicubic, no antialias) and CLIP
Normalize (docs/methods/difftpt.md). :class:`DiffusionViews` produces these views with the same
pipeline and conditioning, seeds each variation, batches the work and caches the views on disk
(:mod:`tta.augment.view_cache`). ``scripts/generate_diffusion_views.py`` pre-generates them for a
whole dataset.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from tta.augment.view_cache import InvalidCacheEntry, ViewCache

logger = logging.getLogger(__name__)

DEFAULT_PIPELINE = "lambdalabs/sd-image-variations-diffusers"
DEFAULT_REVISION = "v2.0"
DEFAULT_CACHE_DIR = "~/.cache/tta/diffusion_views"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_CONDITIONING = "clip224-bicubic-noantialias"  # recorded in the cache key
IMAGE_CONDITIONING = "resize-bicubic-antialias"


def clip_condition(images: torch.Tensor) -> torch.Tensor:
    """DiffTPT's conditioning transform on ToTensor output ``(N, 3, H, W)`` in [0, 1].

    It squashes the image to 224x224 (bicubic, no antialias, aspect ratio not kept) and
    normalises with the CLIP mean and std, as the official generator does.
    """
    import torchvision.transforms.functional as TF  # here, not at import: torchvision loads torch._dynamo
    from torchvision.transforms import InterpolationMode

    resized = TF.resize(images, [224, 224], interpolation=InterpolationMode.BICUBIC, antialias=False)
    return TF.normalize(resized, CLIP_MEAN, CLIP_STD)


def variation_seed(seed: int, image_id: str, view: int) -> int:
    """Stable 63-bit seed of variation ``view`` of image ``image_id`` (same in every process)."""
    digest = hashlib.sha256(json.dumps([seed, image_id, view]).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Round pipeline output in [0, 1] to uint8, as diffusers/PIL do when they make images.

    Raises:
        FloatingPointError: the pipeline produced non-finite pixels (an fp16 overflow, say).
    """
    if not torch.isfinite(images).all():
        raise FloatingPointError("the diffusion pipeline produced non-finite pixels; try dtype=torch.float32")
    return images.float().mul(255).round().clamp(0, 255).to(torch.uint8)


@dataclass(frozen=True)
class PipelineSpec:
    """How to call a pipeline class: its conditioning, output size and img2img strength."""

    cls: type
    img2img: bool  # True: (prompt, image, strength) call; False: image-variation call
    resolution: int
    strength: float | None


def _pipeline_class(source: str, revision: str | None, given: str | type | None) -> type:
    import diffusers

    if isinstance(given, type):
        return given
    name = given or diffusers.DiffusionPipeline.load_config(source, revision=revision)["_class_name"]
    return getattr(diffusers, name)


def _default_resolution(source: str, revision: str | None) -> int:
    """The pipeline's default output side: UNet sample size times the VAE's downsampling."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet = UNet2DConditionModel.load_config(source, subfolder="unet", revision=revision)
    vae = AutoencoderKL.load_config(source, subfolder="vae", revision=revision)
    return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)


class DiffusionViews:
    """Seeded, batched, disk-cached diffusion views of images (DiffTPT's view source).

    ``views(images, ids)`` returns ``num_views`` variations of each image as a float tensor
    ``(N, num_views, 3, R, R)`` in [0, 1] on ``images.device``. Views already in the cache are
    loaded. The others are generated in batches of ``batch_size`` pipeline images and then
    cached. ``stats`` counts ``cache_hits``, ``generated``, and ``invalid`` (cache files that
    failed validation and were regenerated).

    Args:
        pipeline: a Hugging Face hub name, or a local folder written by ``save_pretrained``.
            Both load through ``from_pretrained``.
        revision: hub revision. ``None`` means ``"v2.0"`` for the default pipeline and the
            hub default otherwise. It is ignored for local folders.
        pipeline_class: a diffusers pipeline class or its name. ``None`` reads
            ``_class_name`` from ``model_index.json``. Pipelines whose ``__call__`` has no
            ``prompt`` are driven like ``StableDiffusionImageVariationPipeline``: CLIP
            conditioning as in DiffTPT, output ``resolution``. Pipelines with a ``prompt``
            are driven as img2img (``StableDiffusionImg2ImgPipeline``, ...): empty prompt, the
            image resized to ``resolution`` (bicubic, antialias) as the init image, and
            ``strength``. That mode is an extension; DiffTPT does not use it.
        num_views: variations kept per image, indices ``0 .. num_views-1``.
        steps: inference steps (diffusers default 50).
        guidance_scale: classifier-free guidance (DiffTPT: 3). With an empty prompt, img2img
            guidance has no effect.
        strength: img2img only. ``None`` means the pipeline's own default (0.8 for SD img2img).
        seed: base seed. Variation ``k`` of image ``id`` starts from a CPU
            ``torch.Generator`` seeded with ``variation_seed(seed, id, k)``. So it is the same
            whatever the batch, the order, ``num_views`` or the device that draws the noise.
            Tiny floating-point differences between batch compositions can remain (see Notes).
        resolution: output side ``R``. ``None`` means the pipeline default (512 for SD 1.x),
            resolved from the saved configs.
        cache_dir: cache root (:mod:`tta.augment.view_cache`); ``None`` disables caching.
        device: where the pipeline runs; ``None`` means CUDA if available, else CPU.
        dtype: pipeline weights dtype; ``None`` means fp16 on CUDA, fp32 otherwise.
        batch_size: images per pipeline call (one generator each).
        progress: show a tqdm bar when a call generates more than one batch.

    Cache key: pipeline (absolute path for local folders), revision, pipeline class, steps,
    guidance, strength, seed, resolution and conditioning. Device, dtype, batch size and
    ``num_views`` are left out. Ids must name the image *content*, for instance
    ``"<corruption>/<severity>/<path>"``: the cache cannot tell that an id now points to
    a different image.

    Notes:
        Decisions and deviations from the official code (``image_generator_R.py`` and
        ``diffuData`` at DiffTPT commit 03f1169):

        - **63, not 65.** The official script generates ``dfu_times = 65`` variations, but
          the evaluation reads only ``_0`` ... ``_62`` (``view_num = batch_size - 1``).
          Because seeding is per variation, generating 65 and keeping 63 gives the same 63
          views as generating 63. So only ``num_views`` views are generated and cached. There
          is no ``num_generated`` option.
        - **Seeding.** The official script uses the global RNG without a seed, 5 images per
          call. Here each variation is seeded by (``seed``, id, k), which makes the views
          reproducible but not pixel-identical to the official ones (those never were).
        - **Precision.** The official script runs in fp32. The default here is fp16 on CUDA,
          for speed and memory. Because dtype is not in the cache key, fp16 and fp32 views
          share a cache.
        - **Storage.** The official script saves views with the source extension (JPEG,
          quality 75, for ImageNet-R). We keep lossless PNG, which is the pipeline output
          rounded to uint8.
        - **Safety checker.** The official script replaces it with a pass-through function.
          We load with ``safety_checker=None``, which has the same effect: no image is blacked
          out.
        - **Conditioning input.** The pipeline is given the preprocessed tensor. Its
          ``_encode_image`` runs ``feature_extractor`` only on non-tensor input, so the CLIP
          image processor is skipped, exactly as in the official script, which also passes a
          tensor. For parity, pass the *original* image (ToTensor of the file, any size), not
          a test-time crop. ``scripts/generate_diffusion_views.py`` does that.
        - **Batch invariance.** Noise is per variation, but the UNet runs on the whole batch,
          and BLAS kernels may round differently at different batch sizes. So a pixel may
          differ by one uint8 level between a view generated alone and in a batch; none did
          in the tests, on CPU and on CUDA in fp16. Cached views are exact.
    """

    def __init__(
        self,
        pipeline: str | Path = DEFAULT_PIPELINE,
        revision: str | None = None,
        *,
        pipeline_class: str | type | None = None,
        num_views: int = 63,
        steps: int = 50,
        guidance_scale: float = 3.0,
        strength: float | None = None,
        seed: int = 0,
        resolution: int | None = None,
        cache_dir: str | Path | None = DEFAULT_CACHE_DIR,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        batch_size: int = 8,
        progress: bool = True,
    ) -> None:
        local = Path(pipeline).expanduser()
        self.source = str(local.resolve()) if local.is_dir() else str(pipeline)
        if local.is_dir():
            self.revision = None
        else:
            self.revision = revision or (DEFAULT_REVISION if self.source == DEFAULT_PIPELINE else None)
        self.num_views, self.steps, self.guidance_scale = num_views, steps, float(guidance_scale)
        self.seed, self.batch_size, self.progress = seed, batch_size, progress
        self.cache_dir = cache_dir
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        self._pipeline_class, self._strength, self._resolution = pipeline_class, strength, resolution
        self.stats = {"cache_hits": 0, "generated": 0, "invalid": 0}

    # ----------------------------------------------------------------- configuration (lazy)
    @cached_property
    def spec(self) -> PipelineSpec:
        """Pipeline class, mode, resolution and strength, read from the saved configs."""
        cls = _pipeline_class(self.source, self.revision, self._pipeline_class)
        params = inspect.signature(cls.__call__).parameters
        if "image" not in params:
            raise ValueError(f"{cls.__name__} takes no image: not an image-variation or img2img pipeline")
        img2img, strength = "prompt" in params, self._strength
        if strength is not None and not (img2img and "strength" in params):
            raise ValueError(f"strength does not apply to {cls.__name__}")
        if img2img and strength is None and "strength" in params:
            strength = float(params["strength"].default)
        resolution = self._resolution or _default_resolution(self.source, self.revision)
        return PipelineSpec(cls, img2img, int(resolution), strength)

    @property
    def key_params(self) -> dict[str, Any]:
        """Everything that determines the pixels of a view, apart from the image and index."""
        spec = self.spec
        return {
            "pipeline": self.source, "revision": self.revision, "pipeline_class": spec.cls.__name__,
            "steps": self.steps, "guidance_scale": self.guidance_scale, "strength": spec.strength,
            "seed": self.seed, "resolution": spec.resolution,
            "conditioning": IMAGE_CONDITIONING if spec.img2img else CLIP_CONDITIONING,
        }

    @cached_property
    def cache(self) -> ViewCache | None:
        """The on-disk cache for these parameters (``None`` when caching is off)."""
        return None if self.cache_dir is None else ViewCache(self.cache_dir, self.key_params)

    @cached_property
    def pipe(self) -> Any:
        """The diffusers pipeline, loaded on first use, with the safety checker removed."""
        cls = self.spec.cls
        kwargs: dict[str, Any] = {}
        if "safety_checker" in inspect.signature(cls.__init__).parameters:
            kwargs.update(safety_checker=None, requires_safety_checker=False)
        pipe = cls.from_pretrained(self.source, revision=self.revision, **kwargs)
        pipe.set_progress_bar_config(disable=True)
        # Cast after loading: from_pretrained's dtype keyword was renamed across diffusers versions,
        # and diffusers and transformers components may load in different dtypes.
        modules = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
        if all(m.dtype == self.dtype for m in modules):
            return pipe.to(self.device)
        return pipe.to(self.device, self.dtype)

    @cached_property
    def _io(self) -> ThreadPoolExecutor:
        """Threads for PNG encoding and decoding, which release the GIL. Writes overlap the GPU."""
        return ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="tta-views")

    @cached_property
    def _reader(self) -> ThreadPoolExecutor:
        """One thread that reads the cache ahead (:meth:`read_ahead`) while the caller computes."""
        return ThreadPoolExecutor(max_workers=1, thread_name_prefix="tta-views-ahead")

    # ----------------------------------------------------------------- public API
    def __call__(self, images: torch.Tensor, ids: Sequence[str], cached: Future | list | None = None) -> torch.Tensor:
        """Views of ``images`` (float ``(N, 3, H, W)`` in [0, 1]); ``ids`` unique per image.

        ``cached``: the result (or the future) of :meth:`read_ahead` for the same ``ids``, so the
        cache reads overlapped other work; views missing from it are generated as usual.

        Returns:
            float tensor ``(N, num_views, 3, R, R)`` in [0, 1] (multiples of 1/255) on
            ``images.device``.
        """
        _check_batch(images, ids)
        if isinstance(cached, Future):
            cached = cached.result()
        if cached is not None and len(cached) != len(ids):
            raise ValueError(f"cached views for {len(cached)} images, but {len(ids)} ids")
        grid = ([list(row) for row in cached] if cached is not None else
                [self._read_all(image_id, count_invalid=True) for image_id in ids])
        todo = [(i, k) for i, row in enumerate(grid) for k, view in enumerate(row) if view is None]
        self.stats["cache_hits"] += len(ids) * self.num_views - len(todo)
        for i, k, view in self._generate(images, ids, todo):
            grid[i][k] = view
        views = torch.stack([torch.stack(row) for row in grid]).to(images.device)
        return views.float().div_(255)

    def read_ahead(self, ids: Sequence[str]) -> Future:
        """Start reading the cached views of ``ids`` in the background; pass the future to the call
        for the same ids (``cached=``). Reads only: nothing is generated or written."""
        ids = list(ids)
        return self._reader.submit(lambda: [self._read_all(image_id, count_invalid=True) for image_id in ids])

    def missing(self, image_id: str) -> list[int]:
        """Indices of the variations of ``image_id`` that have no valid cache entry."""
        return [k for k, view in enumerate(self._read_all(image_id)) if view is None]

    # ----------------------------------------------------------------- internals
    def _read_all(self, image_id: str, count_invalid: bool = False) -> list[torch.Tensor | None]:
        """The cached views of one image (``None`` where missing or invalid), read in parallel."""
        if self.cache is None:
            return [None] * self.num_views
        views = list(self._io.map(lambda k: self._read(image_id, k), range(self.num_views)))
        for k, view in enumerate(views):
            if isinstance(view, InvalidCacheEntry):
                views[k] = None
                if count_invalid:
                    logger.warning("regenerating invalid cached view: %s", view)
                    self.stats["invalid"] += 1
        return views

    def _read(self, image_id: str, k: int) -> torch.Tensor | InvalidCacheEntry | None:
        try:
            return self.cache.load(image_id, k, self.spec.resolution)
        except InvalidCacheEntry as err:
            return err

    def _condition(self, images: torch.Tensor) -> torch.Tensor:
        """The pipeline's image input: DiffTPT's CLIP conditioning, or the img2img init image."""
        images = images.to(self.device)
        if not torch.isfinite(images).all() or images.min() < 0 or images.max() > 1:
            raise ValueError("images must be finite and in [0, 1] (ToTensor output)")
        if not self.spec.img2img:
            return clip_condition(images)
        import torchvision.transforms.functional as TF
        from torchvision.transforms import InterpolationMode

        side = [self.spec.resolution] * 2
        return TF.resize(images, side, InterpolationMode.BICUBIC, antialias=True).clamp_(0, 1)

    def _call_kwargs(self, cond: torch.Tensor, generators: list[torch.Generator]) -> dict[str, Any]:
        kwargs = {"image": cond, "num_inference_steps": self.steps, "guidance_scale": self.guidance_scale,
                  "generator": generators, "output_type": "pt"}
        if self.spec.img2img:
            kwargs["prompt"] = [""] * len(cond)
            if self.spec.strength is not None:
                kwargs["strength"] = self.spec.strength
        else:
            kwargs["height"] = kwargs["width"] = self.spec.resolution
        return kwargs

    def _generate(self, images: torch.Tensor, ids: Sequence[str],
                  todo: list[tuple[int, int]]) -> Iterator[tuple[int, int, torch.Tensor]]:
        """Generate the views ``todo`` = [(image index, variation index)], caching them in the
        background; every write has finished (or raised) when the iterator is exhausted."""
        if not todo:
            return
        cond = self._condition(images)
        writes = []
        bar = tqdm(total=len(todo), unit="view", desc="diffusion views", leave=False,
                   disable=not self.progress or len(todo) <= self.batch_size)
        try:
            for start in range(0, len(todo), self.batch_size):
                chunk = todo[start:start + self.batch_size]
                rows = torch.tensor([i for i, _ in chunk], device=cond.device)
                generators = [torch.Generator().manual_seed(variation_seed(self.seed, ids[i], k))
                              for i, k in chunk]
                pixels = to_uint8(self.pipe(**self._call_kwargs(cond[rows], generators)).images).cpu()
                for (i, k), view in zip(chunk, pixels):
                    if self.cache is not None:
                        writes.append(self._io.submit(self.cache.save, ids[i], k, view))
                    yield i, k, view
                self.stats["generated"] += len(chunk)
                bar.update(len(chunk))
        finally:
            bar.close()
            for write in writes:
                write.result()


def _check_batch(images: torch.Tensor, ids: Sequence[str]) -> None:
    if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise ValueError(f"images must be float (N, 3, H, W), got {tuple(images.shape)} {images.dtype}")
    if len(ids) != images.shape[0] or len(set(ids)) != len(ids):
        raise ValueError("ids must be unique, one per image")
