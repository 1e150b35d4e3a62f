"""Prompt templates for CLIP zero-shot heads (data only).

* ``single`` -- ``"a photo of a {}."``: CLIP's default prompt, TPT's initial prompt and ADTE's
  prompt without ``--templates``.
* ``imagenet80`` -- the 80 hand-written ImageNet templates of OpenAI's CLIP (the "prompt
  ensemble" row of the TPT tables; identical to open_clip's ``OPENAI_IMAGENET_TEMPLATES``).
* ``tip7`` -- the 7 Tip-Adapter templates that ADTE uses with ``--templates``.

An ensemble head averages the L2-normalised embeddings of a class's prompts and renormalises.
"""
from __future__ import annotations

SINGLE: list[str] = ["a photo of a {}."]

IMAGENET_80: list[str] = [
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
]

TIP_ADAPTER_7: list[str] = [
    "a bad photo of the {}.",
    "a {} in a video game.",
    "a origami {}.",
    "a photo of the small {}.",
    "art of the {}.",
    "a photo of the large {}.",
    "itap of a {}.",
]

TEMPLATES: dict[str, list[str]] = {"single": SINGLE, "imagenet80": IMAGENET_80, "tip7": TIP_ADAPTER_7}
ALIASES: dict[str, str] = {"ensemble": "imagenet80", "openai80": "imagenet80", "adte": "tip7", "tip": "tip7"}


def get_templates(spec: "str | list[str] | tuple[str, ...]") -> list[str]:
    """Templates by name (``single``, ``imagenet80``, ``tip7`` or an alias) or as a given list.

    Every template must contain exactly one ``{}`` for the class name.
    """
    if isinstance(spec, str):
        key = ALIASES.get(spec, spec)
        if key not in TEMPLATES:
            raise ValueError(f"unknown prompt templates {spec!r}; use one of {sorted(TEMPLATES)}, "
                             f"an alias {sorted(ALIASES)}, or a list of strings with one '{{}}'")
        return list(TEMPLATES[key])
    templates = [str(t) for t in spec]
    if not templates or any(t.count("{}") != 1 for t in templates):
        raise ValueError(f"each prompt template needs exactly one '{{}}' for the class name, got {templates}")
    return templates
