"""Streams: datasets, corruptions, evaluation settings and data configs.

    from tta.data import build_stream, load_data_config
    stream, engine_options = build_stream(load_data_config("imagenet_c") | {"root": "/data/imagenet-c"},
                                          setting="continual", device="cuda")
    for batch in stream: ...   # Batch(images on the device in [0, 1], labels, domain, ids)
"""
from .benchmarks import (LOADERS, Benchmark, build_stream, class_list, load_benchmark,
                         num_classes_of)
from .clean import clean_data_for
from .configs import available as available_data_configs
from .configs import load_data_config
from .corruptions import ALL_CORRUPTIONS, CORRUPTIONS, EXTRA_CORRUPTIONS, corrupt
from .decode import BadImageError
from .settings import SETTING_DEFAULTS, dirichlet_order, imbalance_order
from .settings import available as available_settings
from .sources import ArraySource, FileSource, ImageSource, NoiseSource
from .stream import Batch, Domain, OrderHash, Segment, Stream

__all__ = [
    "ALL_CORRUPTIONS", "ArraySource", "BadImageError", "Batch", "Benchmark", "CORRUPTIONS", "Domain",
    "EXTRA_CORRUPTIONS", "FileSource", "ImageSource", "LOADERS", "NoiseSource", "OrderHash", "SETTING_DEFAULTS",
    "Segment", "Stream", "available_data_configs", "available_settings", "build_stream",
    "class_list", "clean_data_for", "corrupt", "dirichlet_order", "imbalance_order", "load_benchmark", "load_data_config",
    "num_classes_of",
]
