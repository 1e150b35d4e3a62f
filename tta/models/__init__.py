"""Model wrappers: one interface (images in [0, 1] -> logits) over timm, torchvision and open_clip."""
from .classifier import Classifier, ModelInfo, find_head, load_classifier, resize_head
from .params import PRESETS, collect_params, configure_model, use_batch_statistics

__all__ = ["Classifier", "ModelInfo", "PRESETS", "collect_params", "configure_model", "find_head",
           "load_classifier", "resize_head", "use_batch_statistics"]
