"""Sample-selection policies: which test samples (or views) a method learns from, and how much.

``tta.policies.build(name, **kwargs)`` builds a registered policy (``num_classes`` is passed only to
the policies that take it); ``tta.policies.available()`` lists the names. Each policy declares its
``level`` (``"samples"`` of a batch or ``"views"`` of one image) and ``needs`` (signals from the
method's context); :func:`check_compatible` says whether a policy can work inside a method.

One policy per module, named after it; adding one is a file with a ``@register("name")`` class
(see :mod:`tta.policies.confidence`) and one import line below.
"""
from __future__ import annotations

from .base import LEVELS, SIGNALS, BatchContext, Policy
from .compatibility import check_compatible
from .registry import POLICIES, available, build, register

# Importing the policy modules registers them.
from .entropy_margin import EntropyMargin, entropy_threshold  # noqa: E402
from .eata_weight import EATAWeight  # noqa: E402
from .redundancy import Redundancy  # noqa: E402
from .plpd import PLPD, occlude, occlusion_window, patch_shuffle, pixel_shuffle  # noqa: E402
from .crowds import Crowds  # noqa: E402
from .confidence import Confidence  # noqa: E402
from .cosine_filter import CosineFilter  # noqa: E402
from .difftpt_confidence import CandidateConfidence  # noqa: E402
from .view_ranking import ViewSelection  # noqa: E402
from .tpt_confidence import TPTConfidence  # noqa: E402
from .tsallis import TsallisRanking  # noqa: E402
from .memory import MemoryPolicy, SampleMemory  # noqa: E402
from .rotta_memory import RoTTAMemory  # noqa: E402
from .sotta_memory import SoTTAMemory  # noqa: E402
from .roid_weight import ROIDWeight  # noqa: E402
from .label_bias import DEFAULT_DOMAIN, LabelBias, load_bias_file, minmax_q_index, power_iteration  # noqa: E402

__all__ = ["DEFAULT_DOMAIN", "LEVELS", "PLPD", "POLICIES", "SIGNALS", "BatchContext", "CandidateConfidence",
           "Confidence", "CosineFilter", "Crowds", "EATAWeight", "EntropyMargin", "LabelBias", "MemoryPolicy", "Policy", "ROIDWeight", "Redundancy", "RoTTAMemory",
           "SampleMemory", "SoTTAMemory",
           "TPTConfidence", "TsallisRanking", "ViewSelection", "available", "build", "check_compatible",
           "entropy_threshold", "load_bias_file", "minmax_q_index", "occlude", "occlusion_window", "patch_shuffle",
           "pixel_shuffle", "power_iteration", "register"]
