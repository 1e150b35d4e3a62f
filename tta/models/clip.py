"""open_clip models as classifiers: zero-shot heads, a CoOp prompt learner, fast causal text encoding.

Model specs (``load_classifier("clip:<rest>")`` or :func:`load_clip_classifier`)::

    clip:ViT-B-16/openai                 any open_clip architecture / pretrained tag
    clip:ViT-B/16/openai                 OpenAI spelling of the architecture, same thing
    clip:RN50/openai
    clip:<arch>/<checkpoint file>        a local open_clip state dict (.pt/.pth/.bin/.safetensors)
    clip:<arch>                          random weights (recorded as such); also clip:<arch>/random

An architecture that open_clip does not know is looked up as ``<arch>.json`` next to the checkpoint
(a model config in open_clip's format), so a custom or test model loads through the same path as
``ViT-B-16/openai``. The environment variable ``TTA_OPEN_CLIP_CONFIGS`` (paths separated by
``os.pathsep``) registers more config files or folders. An already-built open_clip model can be
passed to :func:`load_clip_classifier` instead of a spec.

What the classifier computes (TPT ``clip/custom_clip.py``, ADTE ``clip/custom_clip.py``):

* images in [0, 1] -> resize (short side, bicubic, antialiased) + centre crop to the model's
  resolution when they have another size -> CLIP mean/std -> image encoder -> L2-normalise;
* text features from the class names: either a **frozen head** (prompt templates, the mean of the
  L2-normalised per-template embeddings, renormalised; computed once in fp32 and cached) or the
  **prompt learner** (CoOp: learnable context vectors initialised from the token embeddings of
  "a photo of a", class name at the end, prompt "a photo of a {class}.", features at the EOT
  position);
* ``logits = logit_scale.exp() * img @ txt.T`` (plus ``logit_bias`` for SigLIP-style models).

Speed: CLIP's text transformer is causal, so the features at the end-of-text position do not
depend on the padding after it. Prompts are cut after the longest EOT position of the batch
(typically 10-20 tokens instead of 77), which gives the same features at a fraction of the cost.

Parameter presets on ``classifier.net`` (``configure_model(net, preset)``):

* ``prompt`` -- the CoOp context vectors only (TPT); switches the head to the prompt learner;
* ``ln``     -- LayerNorm affine parameters of the image encoder;
* ``norm``   -- BatchNorm/LayerNorm/GroupNorm affine parameters of the image encoder (for ViTs the
  same as ``ln``; for the ResNet CLIPs the BatchNorms);
* ``bn``     -- BatchNorm affine of the image encoder; ``sar`` -- ``norm`` minus SAR's exclusions;
* ``visual`` -- every image-encoder parameter;
* ``all``    -- every CLIP parameter (the text tower too; the template head is then re-encoded at
  every forward instead of cached).

The text tower is never touched by ``ln``/``norm``/``bn``/``sar``/``visual``, so the cached frozen
head stays valid for them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .classifier import Classifier, ModelInfo, pretrained_or_random
from .specs import MODEL_SPECS, Built, SpecRequest
from .clip_templates import get_templates
from .params import BN_TYPES, NORM_TYPES, _sar_excludes

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_CTX_INIT = "a photo of a"
_RANDOM_TAGS = ("", "none", "random", "null")
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".npz")


# ----------------------------------------------------------------------------------------- text tower
@dataclass
class TextTower:
    """The parts of an open_clip text encoder that prompt learning and truncation need."""

    token_embedding: nn.Embedding
    positional_embedding: torch.Tensor
    transformer: nn.Module
    ln_final: nn.Module
    text_projection: Any
    attn_mask: torch.Tensor | None
    pool_type: str
    eos_id: int | None
    context_length: int

    @property
    def causal(self) -> bool:
        return self.attn_mask is not None

    @property
    def truncatable(self) -> bool:
        """Whether cutting after the pooled token leaves the features unchanged."""
        return self.causal and self.pool_type in ("argmax", "eos", "first")

    def pool_index(self, tokens: torch.Tensor) -> torch.Tensor:
        """Position of the token whose output is the text feature (EOT for CLIP)."""
        if self.pool_type == "argmax":
            return tokens.argmax(dim=-1)
        if self.pool_type == "eos":
            return (tokens == self.eos_id).int().argmax(dim=-1)
        if self.pool_type == "first":
            return torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device)
        if self.pool_type == "last":
            return torch.full((tokens.shape[0],), tokens.shape[1] - 1, dtype=torch.long, device=tokens.device)
        raise ValueError(f"text pooling {self.pool_type!r} is not supported for prompt encoding")

    def encode_embeddings(self, x: torch.Tensor, pool_index: torch.Tensor) -> torch.Tensor:
        """Text features (not normalised) of token embeddings ``x`` (N, L, D), as open_clip's
        ``encode_text`` computes them after its token-embedding lookup."""
        length = x.shape[1]
        cast = self.transformer.get_cast_dtype() if hasattr(self.transformer, "get_cast_dtype") else x.dtype
        x = x.to(cast) + self.positional_embedding[:length].to(cast)
        mask = self.attn_mask[:length, :length] if self.attn_mask is not None else None
        x = self.transformer(x, attn_mask=mask)
        x = self.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), pool_index]
        if self.text_projection is not None:
            x = self.text_projection(x) if isinstance(self.text_projection, nn.Linear) else x @ self.text_projection
        return x

    def encode_tokens(self, tokens: torch.Tensor, truncate: bool = True) -> torch.Tensor:
        """Text features of token ids (N, context_length), cut after the longest pooled position."""
        index = self.pool_index(tokens)
        if truncate and self.truncatable and tokens.shape[0]:
            tokens = tokens[:, : int(index.max()) + 1]
        return self.encode_embeddings(self.token_embedding(tokens), index)


def text_tower(model: nn.Module) -> TextTower | None:
    """The text tower of an open_clip ``CLIP`` / ``CustomTextCLIP`` (``None`` for HF text encoders,
    CoCa-style towers with a class token, or bidirectional towers with a padding mask)."""
    owner = model.text if hasattr(model, "text") and hasattr(model.text, "token_embedding") else model
    if not hasattr(owner, "token_embedding") or not hasattr(owner, "transformer"):
        return None
    if getattr(owner, "cls_emb", None) is not None or getattr(owner, "use_pad_mask", False):
        return None
    pool = getattr(owner, "text_pool_type", None) or getattr(owner, "pool_type", "argmax")
    eos = getattr(owner, "text_eos_id", None) if owner is model else getattr(owner, "eos_id", None)
    return TextTower(owner.token_embedding, owner.positional_embedding, owner.transformer, owner.ln_final,
                     owner.text_projection, getattr(owner, "attn_mask", None), pool, eos,
                     int(owner.positional_embedding.shape[0]))


# ------------------------------------------------------------------------------------ prompt learner
class PromptLearner(nn.Module):
    """CoOp-style learnable context (TPT's ``PromptLearner``, class token at the end).

    ``ctx`` (n_ctx x D) is initialised from the token embeddings of ``ctx_init`` ("a photo of a":
    4 vectors), or randomly (std 0.02, ``n_ctx`` vectors) when ``ctx_init`` is empty. The prompt
    of class ``k`` is ``[SOT] ctx_1..ctx_n <tokens of "{name}."> [EOT]``, stored cut after the
    longest EOT position when the tower is causal.

    As in TPT (``n_ctx = len(ctx_init.split(" "))``), ``n_ctx`` is the number of *words* of
    ``ctx_init`` (underscores read as spaces), and the context is the embeddings of its first
    ``n_ctx`` tokens. For an initialisation whose words are single BPE tokens ("a photo of a") that
    is all of it; for one with a multi-token word ("itap of a": 3 words, 4 tokens) the remaining
    tokens stay fixed in front of the class name, exactly as the official code builds the prompt.
    ``ctx_tokens="all"`` (an option, off by default) learns every token of ``ctx_init`` instead.
    TPT's class token in the middle (``[CLS]`` inside ``ctx_init``) is not supported.
    """

    CTX_TOKENS = ("words", "all")

    def __init__(self, tower: TextTower, tokenizer: Callable, class_names: Sequence[str],
                 ctx_init: str | None = DEFAULT_CTX_INIT, n_ctx: int = 4, truncate: bool = True,
                 ctx_tokens: str = "words"):
        super().__init__()
        if ctx_tokens not in self.CTX_TOKENS:
            raise ValueError(f"ctx_tokens must be one of {self.CTX_TOKENS}, not {ctx_tokens!r}")
        embedding = tower.token_embedding
        device = embedding.weight.device
        with torch.no_grad():
            if ctx_init:
                init = ctx_init.replace("_", " ")
                if "[CLS]" in init:
                    raise ValueError("a class token inside ctx_init ('[CLS]', TPT's 'middle' position) is not supported")
                init_tokens = tokenizer([init]).to(device)
                n_tokens = int(tower.pool_index(init_tokens)[0]) - 1  # tokens between SOT and EOT
                # TPT: n_ctx = len(ctx_init.split(" ")) words (never more than the tokens there are)
                n_ctx = n_tokens if ctx_tokens == "all" else min(len(init.split(" ")), n_tokens)
                ctx = embedding(init_tokens)[0, 1:1 + n_ctx].clone()
                prefix_text = init
            else:
                ctx = torch.empty(n_ctx, embedding.weight.shape[1], device=device)
                nn.init.normal_(ctx, std=0.02)
                prefix_text = " ".join(["X"] * n_ctx)
            names = [name.replace("_", " ") for name in class_names]
            tokens = tokenizer([f"{prefix_text} {name}." for name in names]).to(device)
            index = tower.pool_index(tokens)
            length = int(index.max()) + 1 if (truncate and tower.truncatable) else tokens.shape[1]
            full = embedding(tokens[:, :length])
        self.n_ctx = n_ctx
        self.prefix_text = prefix_text
        self.ctx = nn.Parameter(ctx)
        self.register_buffer("ctx_init_state", ctx.detach().clone())
        self.register_buffer("token_prefix", full[:, :1].clone(), persistent=False)
        self.register_buffer("token_suffix", full[:, 1 + n_ctx:].clone(), persistent=False)
        self.register_buffer("pool_index", index, persistent=False)

    @property
    def num_classes(self) -> int:
        return self.token_prefix.shape[0]

    @property
    def length(self) -> int:
        """Tokens per prompt after truncation."""
        return self.token_prefix.shape[1] + self.n_ctx + self.token_suffix.shape[1]

    def forward(self) -> torch.Tensor:
        """Prompt embeddings (C, L, D) with the current context."""
        ctx = self.ctx.unsqueeze(0).expand(self.num_classes, -1, -1)
        return torch.cat([self.token_prefix, ctx.to(self.token_prefix.dtype), self.token_suffix], dim=1)

    @torch.no_grad()
    def reset(self) -> None:
        self.ctx.copy_(self.ctx_init_state)


# ------------------------------------------------------------------------------------------ the net
class ClipNet(nn.Module):
    """An open_clip model with a class head: ``net(normalised images) -> logits``.

    Args:
        clip: the open_clip model (``encode_image`` and a text tower).
        tokenizer: open_clip tokenizer of the model (callable: list of strings -> token ids).
        class_names: one name per class, in label order.
        templates: prompt templates of the frozen head (``single``, ``imagenet80``, ``tip7`` or a list).
        ctx_init, n_ctx: prompt learner initialisation (TPT: "a photo of a", 4).
        ctx_tokens: ``words`` (TPT: one learnable vector per word of ``ctx_init``) or ``all`` (every
            token of it); see :class:`PromptLearner`.
        text_batch: prompts encoded at once when building the frozen head.
        truncate: cut prompts after the longest EOT position (identical features, faster).
    """

    MODES = ("frozen", "prompt", "live")

    def __init__(self, clip: nn.Module, tokenizer: Callable, class_names: Sequence[str],
                 templates: str | Sequence[str] = "single", ctx_init: str | None = DEFAULT_CTX_INIT,
                 n_ctx: int = 4, text_batch: int = 1000, truncate: bool = True, ctx_tokens: str = "words"):
        super().__init__()
        self.clip = clip
        self.tokenizer = tokenizer
        self.text_batch = text_batch
        self.truncate = truncate
        self.ctx_init, self.n_ctx, self.ctx_tokens = ctx_init, n_ctx, ctx_tokens
        self.text_mode = "frozen"
        self.register_buffer("frozen_text", None, persistent=False)
        self.prompt: PromptLearner | None = None
        self.set_head(class_names, templates)

    # --------------------------------------------------------------- head
    def set_head(self, class_names: Sequence[str] | None = None, templates: str | Sequence[str] | None = None) -> None:
        """Change the class names and/or the templates of the frozen head (the caches are rebuilt)."""
        if class_names is not None:
            if len(class_names) == 0:
                raise ValueError("a CLIP head needs at least one class name")
            self.class_names = [str(n) for n in class_names]
            tower = text_tower(self.clip)  # a new prompt learner: rebuild a method that tunes the old one
            self.prompt = (PromptLearner(tower, self.tokenizer, self.class_names, self.ctx_init, self.n_ctx,
                                         self.truncate, self.ctx_tokens) if tower is not None else None)
        if templates is not None:
            self.templates = get_templates(templates)
            self.template_spec = templates if isinstance(templates, str) else "custom"
        self.frozen_text = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def tower(self) -> TextTower | None:
        return text_tower(self.clip)

    def set_mode(self, mode: str) -> None:
        """``frozen`` (cached template head), ``prompt`` (CoOp context) or ``live`` (template head
        re-encoded at every call, for when the text tower itself adapts)."""
        if mode not in self.MODES:
            raise ValueError(f"text mode must be one of {self.MODES}, not {mode!r}")
        if mode == "prompt" and self.prompt is None:
            raise ValueError("this open_clip text tower does not support prompt learning "
                             "(HF text encoder, class token or bidirectional attention)")
        self.text_mode = mode

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """L2-normalised features of a list of prompt strings (fp32, chunked, truncated)."""
        device = self.clip.logit_scale.device
        tower = self.tower
        out = []
        for start in range(0, len(prompts), self.text_batch):
            tokens = self.tokenizer(list(prompts[start:start + self.text_batch])).to(device)
            feats = (tower.encode_tokens(tokens, self.truncate) if tower is not None
                     else self.clip.encode_text(tokens))
            out.append(F.normalize(feats.float(), dim=-1))
        return torch.cat(out)

    def template_features(self) -> torch.Tensor:
        """The template head: mean of the normalised per-template embeddings, renormalised."""
        names = [n.replace("_", " ") for n in self.class_names]
        prompts = [t.format(name) for name in names for t in self.templates]
        feats = self.encode_prompts(prompts).view(len(names), len(self.templates), -1)
        return F.normalize(feats.mean(dim=1), dim=-1)

    def prompt_features(self) -> torch.Tensor:
        """Normalised text features of the prompt learner's prompts (differentiable in ``ctx``)."""
        feats = self.tower.encode_embeddings(self.prompt(), self.prompt.pool_index)
        return F.normalize(feats, dim=-1)

    def text_features(self) -> torch.Tensor:
        """The (C, D) normalised class embeddings of the current head."""
        if self.text_mode == "prompt":
            return self.prompt_features()
        if self.text_mode == "live":
            return self.template_features()
        device = self.clip.logit_scale.device
        if self.frozen_text is None or self.frozen_text.device != device:
            with torch.no_grad(), torch.autocast(device.type, enabled=False):
                self.frozen_text = self.template_features()
        return self.frozen_text

    # --------------------------------------------------------------- image side and logits
    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised image features of normalised images."""
        return F.normalize(self.clip.encode_image(x), dim=-1)

    def logits(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        scale = self.clip.logit_scale.exp()
        out = scale * image_features @ text_features.to(image_features.dtype).T
        if getattr(self.clip, "logit_bias", None) is not None:
            out = out + self.clip.logit_bias
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(self.encode_image(x), self.text_features())

    # --------------------------------------------------------------- adaptable parameters
    def adaptable_params(self, preset: str) -> list[tuple[str, nn.Parameter]] | None:
        """Parameter presets of a CLIP model (see the module docstring); ``prompt`` switches the head
        to the prompt learner, ``all`` to a live template head."""
        visual = self.clip.visual
        if preset == "prompt":
            self.set_mode("prompt")
            return [("prompt.ctx", self.prompt.ctx)]
        if preset == "all":
            self.set_mode("live")
            return [(f"clip.{n}", p) for n, p in self.clip.named_parameters()]
        if preset == "visual":
            return [(f"clip.visual.{n}", p) for n, p in visual.named_parameters()]
        types = {"ln": (nn.LayerNorm,), "norm": NORM_TYPES, "sar": NORM_TYPES, "bn": BN_TYPES}.get(preset)
        if types is None:
            raise ValueError(f"unknown parameter preset {preset!r} for a CLIP model; choose one of "
                             f"prompt, ln, norm, bn, sar, visual, all")
        chosen = []
        for name, module in visual.named_modules():
            if not isinstance(module, types) or (preset == "sar" and _sar_excludes(name)):
                continue
            for pname, param in module.named_parameters(recurse=False):
                if pname in ("weight", "bias"):
                    chosen.append((f"clip.visual.{name}.{pname}" if name else f"clip.visual.{pname}", param))
        return chosen


# ----------------------------------------------------------------------------------- the classifier
def _resize_center_crop(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize the short side to ``size`` (bicubic, antialiased) and centre-crop, as CLIP's preprocessing."""
    import torchvision.transforms.v2.functional as TF

    if x.shape[-2] == x.shape[-1] and size[0] == size[1]:
        return TF.resize(x, list(size), interpolation=TF.InterpolationMode.BICUBIC, antialias=True).clamp_(0, 1)
    x = TF.resize(x, min(size), interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    return TF.center_crop(x, list(size)).clamp_(0, 1)


class ClipClassifier(Classifier):
    """The :class:`~tta.models.Classifier` interface over a :class:`ClipNet`.

    ``classifier(x)`` takes images in [0, 1] and returns CLIP logits; ``features(x)`` /
    ``encode_image(x)`` the normalised image embeddings; ``text_features()`` the current class
    embeddings; ``net`` is what ``configure_model`` works on.
    """

    def __init__(self, net: ClipNet, info: ModelInfo):
        super().__init__(net, info, fixed_input_size=True)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        size = tuple(self.info.input_size)
        if tuple(x.shape[-2:]) != size:
            x = _resize_center_crop(x, size)
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.encode_image(self.normalize(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The L2-normalised image embedding (the input of the text-defined head)."""
        return self.encode_image(x)

    def text_features(self) -> torch.Tensor:
        return self.net.text_features()

    def logits_from_features(self, image_features: torch.Tensor, text_features: torch.Tensor | None = None) -> torch.Tensor:
        return self.net.logits(image_features, self.text_features() if text_features is None else text_features)

    def set_head(self, class_names: Sequence[str] | None = None, templates: str | Sequence[str] | None = None) -> None:
        self.net.set_head(class_names, templates)
        self.info.num_classes = self.net.num_classes
        self.info.notes.append(f"head: {self.net.num_classes} classes, templates {self.net.template_spec!r}")

    @property
    def class_names(self) -> list[str]:
        return self.net.class_names

    @property
    def num_classes(self) -> int:
        return self.net.num_classes

    @property
    def input_size(self) -> tuple[int, int]:
        return tuple(self.info.input_size)

    def head(self) -> nn.Linear:
        raise NotImplementedError("a CLIP classifier has no linear head: its classes are text embeddings "
                                  "(use text_features() / logits_from_features())")


# ---------------------------------------------------------------------------------------- loading
def _register_extra_configs(checkpoint: Path | None, arch: str) -> None:
    import open_clip

    for entry in filter(None, os.environ.get("TTA_OPEN_CLIP_CONFIGS", "").split(os.pathsep)):
        open_clip.add_model_config(entry)
    if arch in open_clip.list_models() or checkpoint is None:
        return
    candidate = checkpoint.parent / f"{arch}.json"
    if candidate.is_file():
        open_clip.add_model_config(candidate)


def parse_clip_spec(rest: str) -> tuple[str, str | None]:
    """``"ViT-B-16/openai"`` -> ``("ViT-B-16", "openai")``; ``"ViT-B/16/openai"`` -> the same;
    ``"tiny//tmp/w.pt"`` -> ``("tiny", "/tmp/w.pt")``; ``"RN50"`` -> ``("RN50", None)``."""
    rest = rest.strip()
    if not rest:
        raise ValueError("empty CLIP spec: use clip:<arch>/<pretrained tag or checkpoint file>, e.g. clip:ViT-B-16/openai")
    arch, _, tag = rest.partition("/")
    head, _, tail = tag.partition("/")
    if head and head.isdigit():
        arch, tag = f"{arch}-{head}", tail  # OpenAI spelling: ViT-B/16, ViT-L/14@336px
    return arch, (tag or None)


def _tokenizer_for(arch: str | None, clip: nn.Module) -> Callable:
    import open_clip

    if arch is not None:
        try:
            return open_clip.get_tokenizer(arch)
        except Exception:  # noqa: BLE001 - unknown config: fall back to CLIP's BPE tokenizer
            pass
    context = getattr(clip, "context_length", None) or 77
    return lambda texts: open_clip.tokenize(texts, context_length=context)


def _preprocess_of(clip: nn.Module) -> tuple[tuple, tuple, tuple[int, int]]:
    cfg = getattr(clip.visual, "preprocess_cfg", None) or {}
    mean = tuple(cfg.get("mean") or getattr(clip.visual, "image_mean", None) or OPENAI_MEAN)
    std = tuple(cfg.get("std") or getattr(clip.visual, "image_std", None) or OPENAI_STD)
    size = cfg.get("size") or getattr(clip.visual, "image_size", 224)
    size = (size, size) if isinstance(size, int) else tuple(size)
    return mean, std, size


def create_open_clip(arch: str, tag: str | None, pretrained: str | bool = "auto") -> tuple[nn.Module, str, list[str]]:
    """Build an open_clip model from an architecture and a pretrained tag or checkpoint file.

    Returns ``(model, weights label, notes)``. For a published tag that was trained with QuickGELU
    (OpenAI's weights) the model is built with QuickGELU, as ``clip.load`` does. With
    ``pretrained="auto"`` a tag that cannot be downloaded gives random weights and a loud warning
    (recorded in the notes); ``pretrained=True`` makes that an error.
    """
    import open_clip

    notes: list[str] = []
    path = Path(tag).expanduser() if tag and (os.sep in tag or tag.endswith(_CHECKPOINT_SUFFIXES)) else None
    _register_extra_configs(path, arch)
    if arch not in open_clip.list_models():
        where = f" (and no {arch}.json next to {path})" if path else ""
        raise ValueError(f"unknown open_clip architecture {arch!r}{where}; e.g. ViT-B-16, ViT-L-14, RN50. "
                         f"Known: {', '.join(open_clip.list_models()[:12])}, ...")
    if path is not None:
        if not path.is_file():
            raise FileNotFoundError(f"CLIP checkpoint not found: {path}")
        return open_clip.create_model(arch, pretrained=str(path)), str(path), notes
    if tag is None or tag.lower() in _RANDOM_TAGS or pretrained is False or pretrained == "false":
        if tag is None:
            notes.append(f"clip:{arch} without a pretrained tag: RANDOM weights")
        return open_clip.create_model(arch, pretrained=None), "random", notes
    cfg = open_clip.get_pretrained_cfg(arch, tag)
    if not cfg:
        raise ValueError(f"unknown pretrained tag {tag!r} for open_clip {arch}; available: "
                         f"{open_clip.list_pretrained_tags_by_model(arch)} (or give a checkpoint file)")
    quick_gelu = bool(cfg.get("quick_gelu", False))
    model, loaded = pretrained_or_random(
        lambda: open_clip.create_model(arch, pretrained=tag, force_quick_gelu=quick_gelu),
        lambda: open_clip.create_model(arch, pretrained=None, force_quick_gelu=quick_gelu),
        f"open_clip {arch}/{tag}", pretrained,
        f"Pass model_pretrained=true to make this an error, or clip:{arch}/<checkpoint file>.", notes)
    return model, f"pretrained:{tag}" if loaded else "random", notes


def build_clip_net(
    spec: str | nn.Module,
    *,
    num_classes: int | None = None,
    weights: str | Path | None = None,
    class_names: Sequence[str] | None = None,
    templates: str | Sequence[str] = "single",
    pretrained: str | bool = "auto",
    tokenizer: Callable | None = None,
    ctx_init: str | None = DEFAULT_CTX_INIT,
    n_ctx: int = 4,
    ctx_tokens: str = "words",
    truncate: bool = True,
    device: str | torch.device | None = None,
) -> tuple[ClipNet, ModelInfo]:
    """The :class:`ClipNet` and its :class:`ModelInfo` (see :func:`load_clip_classifier`)."""
    from .clip_classnames import IMAGENET_CLASSES

    if class_names is None:
        if num_classes not in (None, 1000):
            raise ValueError(f"a CLIP classifier for {num_classes} classes needs their names: pass class_names= "
                             f"(on the command line they come from the data config's `classes`)")
        class_names = IMAGENET_CLASSES
    class_names = list(class_names)
    if num_classes is not None and num_classes != len(class_names):
        raise ValueError(f"num_classes={num_classes} but {len(class_names)} class names were given")
    arch = None
    if isinstance(spec, nn.Module):
        clip, label, notes = spec, "given", []
        spec_name = f"clip:{type(spec).__name__}"
    else:
        arch, tag = parse_clip_spec(spec)
        clip, label, notes = create_open_clip(arch, tag, pretrained)
        spec_name = f"clip:{spec}"
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"weights file not found: {path}")
        import open_clip

        open_clip.load_checkpoint(clip, str(path), weights_only=True)
        label = str(path)
    if device is not None:
        clip = clip.to(device)
    clip.eval()
    tokenizer = tokenizer or _tokenizer_for(arch, clip)
    mean, std, size = _preprocess_of(clip)
    net = ClipNet(clip, tokenizer, class_names, templates, ctx_init=ctx_init, n_ctx=n_ctx, truncate=truncate,
                  ctx_tokens=ctx_tokens)
    notes.append(f"head: {len(class_names)} classes, templates {net.template_spec!r}")
    origin = "weights" if label != "random" else "model_config"
    info = ModelInfo(spec_name, "open_clip", label, mean, std, size, num_classes=len(class_names), notes=notes,
                     normalization_source=origin, input_channels=3, crop_pct=1.0)
    return net, info


def load_clip_classifier(
    spec: str | nn.Module,
    *,
    num_classes: int | None = None,
    weights: str | Path | None = None,
    class_names: Sequence[str] | None = None,
    templates: str | Sequence[str] = "single",
    pretrained: str | bool = "auto",
    tokenizer: Callable | None = None,
    ctx_init: str | None = DEFAULT_CTX_INIT,
    n_ctx: int = 4,
    ctx_tokens: str = "words",
    truncate: bool = True,
    device: str | torch.device | None = None,
) -> ClipClassifier:
    """A :class:`ClipClassifier` from ``"<arch>/<tag or file>"`` (the part after ``clip:``) or an
    open_clip model.

    Args:
        num_classes: number of classes; without ``class_names`` only 1000 (ImageNet) has default names.
        weights: a local state dict loaded into the built model after creation (strict, ``weights_only``).
        class_names: one name per class (default: the 1,000 ImageNet names CLIP and TPT use).
        templates: frozen-head prompt templates: ``single``, ``imagenet80``, ``tip7`` or a list.
        pretrained: ``auto`` / ``True`` / ``False``, as in :func:`~tta.models.load_classifier`.
        tokenizer: for a model object (default: the arch's open_clip tokenizer, else CLIP's BPE).
        ctx_init, n_ctx, ctx_tokens: prompt learner initialisation (:class:`PromptLearner`);
        truncate: EOT truncation of prompts.
    """
    net, info = build_clip_net(spec, num_classes=num_classes, weights=weights, class_names=class_names,
                               templates=templates, pretrained=pretrained, tokenizer=tokenizer, ctx_init=ctx_init,
                               n_ctx=n_ctx, ctx_tokens=ctx_tokens, truncate=truncate, device=device)
    return ClipClassifier(net, info)


@MODEL_SPECS.register("clip:", help="clip:<arch>/<pretrained tag or checkpoint file>  open_clip zero-shot classifier "
                                    "(class names from the data config), e.g. clip:ViT-B-16/openai")
def clip_spec(rest: str, request: SpecRequest) -> Built:
    """``load_classifier("clip:...")``: the text head is built from ``request``'s class names and templates."""
    net, info = build_clip_net(rest, num_classes=request.num_classes, weights=request.weights,
                               class_names=request.resolve_class_names(), templates=request.templates or "single",
                               pretrained=request.pretrained)
    return Built(net, info, fixed_input_size=True, weights_loaded=True, head_sized=True, wrap=ClipClassifier)


__all__ = ["ClipClassifier", "ClipNet", "PromptLearner", "TextTower", "build_clip_net", "create_open_clip",
           "load_clip_classifier", "parse_clip_spec", "text_tower"]
