"""Model wrappers: one interface (images in [0, 1] -> logits) over timm, torchvision, open_clip,
RobustBench and your own models.

Importing the package registers every model-spec loader (timm style): each loader module adds its
prefixes to the leaf registry ``tta.models.specs``, which ``load_classifier`` consults.
"""
from .classifier import Classifier, ModelInfo, available_specs, find_head, load_classifier, resize_head
from . import clip, custom, digits, hubs, robustbench  # noqa: E402,F401  (the loaders register themselves)
from .params import PRESETS, collect_params, configure_model, use_batch_statistics

__all__ = ["Classifier", "ModelInfo", "PRESETS", "available_specs", "collect_params", "configure_model", "find_head",
           "load_classifier", "resize_head", "use_batch_statistics"]
