"""Benchmark protocols: the hyperparameters the reference code uses *for a benchmark*, per method.

A method's defaults (its constructor's keyword defaults) are the ImageNet-C values of its paper's
code. The small benchmarks of the field (CIFAR-10/100-C) run under another protocol: Tent's CIFAR
configuration and the per-method configurations of mariodoebler/test-time-adaptation (Adam, lr 1e-3,
batch 200, EATA's redundancy margin per class count, ...). Running a 10-class benchmark with the
1,000-class values silently turns selection off (EATA's ``d_margin`` 0.05 rejects almost every
sample of a 10-class model), so each data config names its protocol (``protocol:`` key) and the
command line can name another (``protocol=<name>``).

Every value below is data with its source (repository, commit, file); ``docs/benchmarks/protocols.md``
is the same table for readers. Resolution order for a method's keyword arguments, lowest first:

1. the method's default (its constructor),
2. the protocol's value for that method,
3. what the command line (or the caller) gave.

:func:`resolve` is pure and returns the keyword arguments with the origin of each
(``"method default"``, ``"protocol"``, ``"command line"``). The stream's batch size comes from the
protocol when ``batch_size`` is not given (a setting's own batch size, e.g. ``bs1``, still wins).

A value that depends on the number of classes and exists only for some class counts (EATA's
``d_margin``: 0.4 for CIFAR-10, 0.1 for CIFAR-100) is a :class:`ByClasses`; another class count is a
``ValueError`` unless the value is given. Values tuned for 1,000 classes (``d_margin`` 0.05, the
method default and the ``imagenet`` protocol's) produce a warning on a model with fewer than
:data:`FEW_CLASSES` classes (:func:`class_count_warnings`).
"""
from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

ORIGINS = ("method default", "protocol", "command line")
FEW_CLASSES = 100
"""Below this many classes a threshold tuned for 1,000 classes is warned about."""


@dataclass(frozen=True)
class Cited:
    """A protocol value and where it comes from (a key of :data:`SOURCES`).

    ``tuned_for``: the class count the value was tuned for, when it depends on it (EATA's ``d_margin``)."""

    value: Any
    source: str
    tuned_for: int | None = None


@dataclass(frozen=True)
class ByClasses:
    """A value that depends on the number of classes, known for some class counts only."""

    values: Mapping[int, Any]
    source: str

    def at(self, num_classes: int) -> Any:
        if num_classes not in self.values:
            raise KeyError(num_classes)
        return self.values[num_classes]


@dataclass(frozen=True)
class Protocol:
    """One benchmark protocol: a stream batch size and per-method hyperparameters."""

    name: str
    description: str
    batch_size: Cited | None
    methods: Mapping[str, Mapping[str, Cited | ByClasses]]
    notes: Mapping[str, str] = field(default_factory=dict)

    def entries(self, method: str) -> Mapping[str, Cited | ByClasses]:
        return self.methods.get(method, {})


# ----------------------------------------------------------------------------- sources
# Repositories at the commits read (see docs/benchmarks/protocols.md for the lines).
TENT = "DequanWang/tent@e9e926a"
MARIO = "mariodoebler/test-time-adaptation@8b2ed63"
EATA_REPO = "mr-eggplant/EATA@f739b36"
SAR_REPO = "mr-eggplant/SAR@20f6e24"
DEYO_REPO = "Jhyun17/DeYO@3d7d289"
UNIENT = "gaozhengqing/UniEnt@af7faa8"
TDA_REPO = "kdiAAA/TDA@e697fb0"
CTPT_REPO = "hee-suk-yoon/C-TPT@085e6c2"
CCC = "oripress/CCC@656dec3"
LAME_REPO = "fiveai/LAME@d2e5f63"
COTTA_REPO = "qinenergy/cotta@c212a20"
ROTTA_REPO = "BIT-DA/RoTTA@67e34c9"
SOTTA_REPO = "taeckyung/SoTTA@50b3333"

SOURCES: dict[str, str] = {
    "eata-main": f"{EATA_REPO} main.py (--batch_size 64, SGD 0.00025 momentum 0.9, --e_margin 0.4 ln 1000, "
                 f"--d_margin 0.05, --fisher_alpha 2000, --fisher_size 2000)",
    "sar-main": f"{SAR_REPO} main.py (--test_batch_size 64, lr rule 2.5e-4 ResNet / 1e-3*bs/64 ViT, doubled "
                f"for SAR at bs 1, SGD/SAM momentum 0.9, --sar_margin_e0 0.4 ln 1000); sam.py rho 0.05; sar.py 0.2",
    "deyo-main": f"{DEYO_REPO} config.py (--test_batch_size 64, --deyo_margin 0.5, --deyo_margin_e0 0.4, "
                 f"--plpd_threshold 0.2) and main.py (lr rule, doubled at bs 1, SGD momentum 0.9)",
    "unient-imagenet": f"{UNIENT} imagenet/main.py (--method SGD, --lr 0.001, --momentum 0.9, --alpha 0.5)",
    "tent-cifar": f"{TENT} cfgs/tent.yaml (Adam, LR 1e-3, BETA 0.9, WD 0, STEPS 1, BATCH_SIZE 200); "
                  f"cifar10c.py setup_optimizer (Adam betas (BETA, 0.999))",
    "mario-cifar": f"{MARIO} classification/cfgs/cifar10_c/*.yaml and cifar100_c/*.yaml (OPTIM Adam, LR 1e-3, "
                   f"BETA 0.9, WD 0, STEPS 1, TEST.BATCH_SIZE 200); methods/base.py setup_optimizer",
    "mario-eata": f"{MARIO} classification/cfgs/cifar10_c/eata.yaml, eta.yaml (D_MARGIN 0.4), cifar100_c/eata.yaml, "
                  f"eta.yaml (D_MARGIN 0.1); eata.yaml: FISHER_ALPHA 1.0, SOURCE.NUM_SAMPLES 2000",
    "mario-conf": f"{MARIO} classification/conf.py (EATA.MARGIN_E0 0.4, SAR.RESET_CONSTANT_EM 0.2, DEYO.MARGIN 0.5, "
                  f"DEYO.PLPD 0.2, OPTIM.MOMENTUM 0.9)",
    "mario-sar": f"{MARIO} classification/methods/sar.py setup_optimizer (SAM over SGD, lr OPTIM.LR, momentum "
                 f"OPTIM.MOMENTUM, whatever OPTIM.METHOD says; SAM rho 0.05)",
    "unient-cifar": f"{UNIENT} cifar/main.py (--method Adam, --lr 0.001, --alpha 0.5)",
    "tda-imagenet": f"{TDA_REPO} configs/imagenet.yaml (positive: shot_capacity 3, alpha 2.0, beta 5.0; negative: "
                    f"shot_capacity 2, alpha 0.117, beta 1.0, entropy_threshold 0.2-0.5, mask_threshold 0.03-1.0); "
                    f"utils.py:127-130 (ImageNet: one view, the CLIP preprocess)",
    "tda-views": f"{TDA_REPO} utils.py:94-105, 132-135 (A/V/R/S: AugMixAugmenter(n_views=63, augmix=True), i.e. "
                 f"the original + 63 AugMix views)",
    "tda-imagenet_a": f"{TDA_REPO} configs/imagenet_a.yaml (positive alpha 2.0, beta 5.0)",
    "tda-imagenet_v": f"{TDA_REPO} configs/imagenet_v.yaml (positive alpha 1.0, beta 8.0)",
    "tda-imagenet_r": f"{TDA_REPO} configs/imagenet_r.yaml (positive alpha 1.0, beta 8.0)",
    "tda-imagenet_s": f"{TDA_REPO} configs/imagenet_s.yaml (positive alpha 2.363, beta 7.45)",
    "tda-templates-tip7": f"{TDA_REPO} datasets/imagenet.py:173-179, imagenet_a.py:7-15, imagenetv2.py:6-12 (the 7 "
                          f"Tip-Adapter templates; utils.py:44-61 averages their normalised embeddings)",
    "tda-templates-80": f"{TDA_REPO} datasets/imagenet_r.py:7-86, imagenet_sketch.py:6-85 (the 80 OpenAI ImageNet "
                        f"templates)",
    "ctpt-fg": f"{CTPT_REPO} test_tpt_ctpt_fg.sh (ImageNet and the fine-grained sets: lambda_term 50, no "
               f"--I_augmix, so augmix = len(set_id) > 1: off for I, tpt_classification.py:270-271)",
    "ctpt-ds": f"{CTPT_REPO} test_tpt_ctpt_ds.sh (the natural shifts A/R/K/V: lambda_term 20, --I_augmix, so "
               f"augmix = len(set_id) >= 1: on, tpt_classification.py:266-268)",
    "ccc-rdumb": f"{CCC} models/rdumb.py (SGD 0.00025 momentum 0.9 line 38, e_margin 0.4 ln 1000 line 25, "
                 f"d_margin 0.05 lines 26-28, reset every 1000 batches line 50) and eval.py (batch_size 64 line 33)",
    "mario-rdumb": f"{MARIO} classification/cfgs/cifar10_c/rdumb.yaml and cifar100_c/rdumb.yaml "
                   f"(RESET_AFTER_NUM_UPDATES 1000 line 3, EATA.D_MARGIN 0.4 line 35, FISHER_ALPHA 0)",
    "lame-defaults": f"{LAME_REPO} src/config/defaults.py lines 65-68 (LAME_KNN 5, LAME_AFFINITY 'rbf', "
                     f"LAME_FORCE_SYMMETRY False; configs/method/best/LAME keeps them) and src/adaptation/lame.py "
                     f"line 125 (bound_lambda 1, max_steps 100)",
    "mario-lame": f"{MARIO} classification/conf.py lines 212-215 (LAME.AFFINITY rbf, KNN 5, FORCE_SYMMETRY False); "
                  f"cfgs/cifar10_c/lame.yaml, cifar100_c/lame.yaml (TEST.BATCH_SIZE 200)",
    "cotta-imagenet": f"{COTTA_REPO} imagenet/cfgs/10orders/cotta/cotta0-9.yaml (SGD, LR 0.01, WD 0, STEPS 1, "
                      f"BATCH_SIZE 64; lines 24-31), imagenet/imagenetc.py lines 117-123 (momentum 0.9, nesterov), "
                      f"imagenet/cotta.py (32 augmented passes only when the anchor's mean confidence < 0.1, lines "
                      f"100-106; symmetric loss, lines 114 and 131-134; EMA 0.999, line 119; restore 0.001, line 125)",
    "cotta-cifar": f"{COTTA_REPO} cifar/cfgs/cifar10/cotta.yaml and cifar100/cotta.yaml lines 26-34 (Adam, LR 1e-3, "
                   f"WD 0, STEPS 1, MT 0.999, RST 0.01, AP 0.92 / 0.72; BATCH_SIZE 200 line 5), cifar/cotta.py "
                   f"(32 augmented passes always, lines 101-110; one-sided loss, lines 112 and 129-132)",
    "rotta-cifar": f"{ROTTA_REPO} configs/adapter/rotta.yaml (Adam line 5, LR 1e-3 line 8, WD 0 line 9, NU 0.001, "
                   f"MEMORY_SIZE 64, UPDATE_FREQUENCY 64, LAMBDA_T 1, LAMBDA_U 1, ALPHA 0.05 lines 17-22; its batch 64, "
                   f"line 2) and core/configs/defaults.py lines 95-101",
    "mario-rotta": f"{MARIO} classification/cfgs/imagenet_c/rotta.yaml (Adam, LR 0.001, WD 0, BATCH_SIZE 64) and "
                   f"conf.py lines 249-254 (ROTTA.MEMORY_SIZE 64, UPDATE_FREQUENCY 64, NU 0.001, ALPHA 0.05, LAMBDA_T/U 1): "
                   f"RoTTA's own code has no ImageNet run",
    "sotta-tta-sh": f"{SOTTA_REPO} tta.sh (update_every_x 64, memory_size 64, weight_decay 0, lines 70-75; SoTTA: "
                    f"lr 0.001, bn_momentum 0.2, high_threshold 0.99 CIFAR-10 / 0.66 CIFAR-100 / 0.33 ImageNet, --esm, "
                    f"lines 171-195), utils/sam_optimizer.py (rho 0.05, line 43), utils/loss_functions.py (temperature 1)",
    "mario-roid": f"{MARIO} classification/methods/roid.py (loss normalised by TEST.BATCH_SIZE, line 85) and conf.py "
                  f"(ROID.USE_WEIGHTING, USE_PRIOR_CORRECTION, USE_CONSISTENCY True, MOMENTUM_SRC 0.99, MOMENTUM_PROBS 0.9, "
                  f"TEMPERATURE 1/3, lines 265-270; OPTIM.MOMENTUM 0.9 line 134, NESTEROV True line 140); "
                  f"cfgs/imagenet_c/roid.yaml (SGD, LR 0.00025, WD 0, lines 24-29; BATCH_SIZE 64) and "
                  f"cfgs/cifar10_c/roid.yaml, cifar100_c/roid.yaml (Adam, LR 1e-3, WD 0, lines 26-31; BATCH_SIZE 200)",
    "eata_c-from-eata": "EATA-C has no public code: EATA's value for this benchmark, a decision of this toolkit "
                        "(docs/benchmarks/protocols.md)",
}


def _as_eata_c(entries: Mapping[str, Cited | ByClasses]) -> dict[str, Cited | ByClasses]:
    """EATA's entries, cited as this toolkit's decision for EATA-C (no reference code exists)."""
    out: dict[str, Cited | ByClasses] = {}
    for key, entry in entries.items():
        out[key] = (ByClasses(entry.values, "eata_c-from-eata") if isinstance(entry, ByClasses)
                    else Cited(entry.value, "eata_c-from-eata", entry.tuned_for))
    return out


def _imagenet() -> Protocol:
    sgd_rule = lambda src: {"optimizer": Cited("sgd", src), "lr": Cited(None, src),  # noqa: E731
                            "momentum": Cited(0.9, src), "weight_decay": Cited(0.0, src), "steps": Cited(1, src)}
    eta = {**sgd_rule("eata-main"), "e_margin": Cited(0.4, "eata-main"),
           "d_margin": Cited(0.05, "eata-main", tuned_for=1000)}
    eata = {**eta, "fisher_alpha": Cited(2000.0, "eata-main"), "fisher_size": Cited(2000, "eata-main")}
    return Protocol(
        name="imagenet",
        description="ImageNet-C as EATA, SAR and DeYO run it: SGD momentum 0.9, the SAR/DeYO learning-rate "
                    "rule (lr null: 2.5e-4 at batch >= 32 for CNNs, 1e-3 * bs / 64 for ViTs), batch 64",
        batch_size=Cited(64, "eata-main"),
        methods={
            "tent": sgd_rule("sar-main"),
            "eta": eta,
            "eata": eata,
            "eata_c": _as_eata_c(eata),
            "sar": {**sgd_rule("sar-main"), "e_margin": Cited(0.4, "sar-main"), "rho": Cited(0.05, "sar-main"),
                    "reset_constant": Cited(0.2, "sar-main")},
            "deyo": {**sgd_rule("deyo-main"), "deyo_margin": Cited(0.5, "deyo-main"),
                     "margin_e0": Cited(0.4, "deyo-main"), "plpd_threshold": Cited(0.2, "deyo-main")},
            "rdumb": {"optimizer": Cited("sgd", "ccc-rdumb"), "lr": Cited(2.5e-4, "ccc-rdumb"),
                      "momentum": Cited(0.9, "ccc-rdumb"), "weight_decay": Cited(0.0, "ccc-rdumb"),
                      "steps": Cited(1, "ccc-rdumb"), "e_margin": Cited(0.4, "ccc-rdumb"),
                      "d_margin": Cited(0.05, "ccc-rdumb", tuned_for=1000), "reset_every": Cited(1000, "ccc-rdumb")},
            "cotta": {"optimizer": Cited("sgd", "cotta-imagenet"), "lr": Cited(0.01, "cotta-imagenet"),
                      "momentum": Cited(0.9, "cotta-imagenet"), "nesterov": Cited(True, "cotta-imagenet"),
                      "weight_decay": Cited(0.0, "cotta-imagenet"), "steps": Cited(1, "cotta-imagenet"),
                      "mt": Cited(0.999, "cotta-imagenet"), "rst": Cited(0.001, "cotta-imagenet"),
                      "ap": Cited(0.1, "cotta-imagenet"), "num_augs": Cited(32, "cotta-imagenet"),
                      "loss": Cited("symmetric", "cotta-imagenet"), "augment_always": Cited(False, "cotta-imagenet")},
            "rotta": {"optimizer": Cited("adam", "mario-rotta"), "lr": Cited(1e-3, "mario-rotta"),
                      "weight_decay": Cited(0.0, "mario-rotta"), "steps": Cited(1, "mario-rotta"), "nu": Cited(0.001, "mario-rotta"),
                      "capacity": Cited(64, "mario-rotta"), "update_every": Cited(64, "mario-rotta"), "lambda_t": Cited(1.0, "mario-rotta"),
                      "lambda_u": Cited(1.0, "mario-rotta"), "alpha": Cited(0.05, "mario-rotta")},
            "sotta": {"optimizer": Cited("adam", "sotta-tta-sh"), "lr": Cited(1e-3, "sotta-tta-sh"),
                      "weight_decay": Cited(0.0, "sotta-tta-sh"), "threshold": Cited(0.33, "sotta-tta-sh"),
                      "capacity": Cited(64, "sotta-tta-sh"), "update_every": Cited(64, "sotta-tta-sh"),
                      "bn_momentum": Cited(0.2, "sotta-tta-sh"), "rho": Cited(0.05, "sotta-tta-sh"),
                      "temperature": Cited(1.0, "sotta-tta-sh")},
            "roid": {"optimizer": Cited("sgd", "mario-roid"), "lr": Cited(2.5e-4, "mario-roid"),
                     "momentum": Cited(0.9, "mario-roid"), "nesterov": Cited(True, "mario-roid"),
                     "weight_decay": Cited(0.0, "mario-roid"), "steps": Cited(1, "mario-roid"),
                     "use_weighting": Cited(True, "mario-roid"), "use_consistency": Cited(True, "mario-roid"),
                     "use_prior_correction": Cited(True, "mario-roid"), "momentum_src": Cited(0.99, "mario-roid"),
                     "momentum_probs": Cited(0.9, "mario-roid"), "temperature": Cited(1 / 3, "mario-roid")},
            "lame": {"affinity": Cited("rbf", "lame-defaults"), "knn": Cited(5, "lame-defaults"),
                     "force_symmetry": Cited(False, "lame-defaults"), "bound_lambda": Cited(1.0, "lame-defaults"),
                     "max_steps": Cited(100, "lame-defaults")},
            "crowds": {"optimizer": Cited("sgd", "unient-imagenet"), "lr": Cited(1e-3, "unient-imagenet"),
                       "momentum": Cited(0.9, "unient-imagenet"), "alpha": Cited(0.5, "unient-imagenet")},
            "tda": {"num_views": Cited(1, "tda-imagenet"), "augmix": Cited(False, "tda-imagenet"),
                    "pos_alpha": Cited(2.0, "tda-imagenet"), "pos_beta": Cited(5.0, "tda-imagenet"),
                    "templates": Cited("tip7", "tda-templates-tip7")},
            "ctpt": {"dispersion": Cited(50.0, "ctpt-fg"), "augmix": Cited(False, "ctpt-fg")},
        },
        notes={"eata_c": "EATA-C has no public code: it takes EATA's values (a decision)",
               "crowds": "no official code: UniEnt's re-implementation (batch 32 there; the protocol's 64 here)"},
    )


def _cifar() -> Protocol:
    adam = lambda src: {"optimizer": Cited("adam", src), "lr": Cited(1e-3, src),  # noqa: E731
                        "weight_decay": Cited(0.0, src), "steps": Cited(1, src)}
    eta = {**adam("mario-cifar"), "e_margin": Cited(0.4, "mario-conf"),
           "d_margin": ByClasses({10: 0.4, 100: 0.1}, "mario-eata")}
    eata = {**eta, "fisher_alpha": Cited(1.0, "mario-eata"), "fisher_size": Cited(2000, "mario-eata")}
    return Protocol(
        name="cifar",
        description="CIFAR-10/100-C as Tent's CIFAR config and mariodoebler/test-time-adaptation run it: "
                    "Adam (betas 0.9, 0.999), lr 1e-3, no weight decay, one step, batch 200",
        batch_size=Cited(200, "tent-cifar"),
        methods={
            "tent": adam("tent-cifar"),
            "eta": eta,
            "eata": eata,
            "eata_c": _as_eata_c(eata),
            "sar": {"optimizer": Cited("sgd", "mario-sar"), "lr": Cited(1e-3, "mario-sar"),
                    "momentum": Cited(0.9, "mario-sar"), "weight_decay": Cited(0.0, "mario-cifar"),
                    "steps": Cited(1, "mario-cifar"), "e_margin": Cited(0.4, "mario-conf"),
                    "rho": Cited(0.05, "mario-sar"), "reset_constant": Cited(0.2, "mario-conf")},
            "deyo": {**adam("mario-cifar"), "deyo_margin": Cited(0.5, "mario-conf"),
                     "margin_e0": Cited(0.4, "mario-conf"), "plpd_threshold": Cited(0.2, "mario-conf")},
            "rdumb": {**adam("mario-cifar"), "e_margin": Cited(0.4, "mario-conf"),
                      "d_margin": ByClasses({10: 0.4, 100: 0.4}, "mario-rdumb"),
                      "reset_every": Cited(1000, "mario-rdumb")},
            "cotta": {**adam("cotta-cifar"), "mt": Cited(0.999, "cotta-cifar"), "rst": Cited(0.01, "cotta-cifar"),
                      "ap": ByClasses({10: 0.92, 100: 0.72}, "cotta-cifar"), "num_augs": Cited(32, "cotta-cifar"),
                      "loss": Cited("one_sided", "cotta-cifar"), "augment_always": Cited(True, "cotta-cifar")},
            "rotta": {"optimizer": Cited("adam", "rotta-cifar"), "lr": Cited(1e-3, "rotta-cifar"),
                      "weight_decay": Cited(0.0, "rotta-cifar"), "steps": Cited(1, "rotta-cifar"), "nu": Cited(0.001, "rotta-cifar"),
                      "capacity": Cited(64, "rotta-cifar"), "update_every": Cited(64, "rotta-cifar"), "lambda_t": Cited(1.0, "rotta-cifar"),
                      "lambda_u": Cited(1.0, "rotta-cifar"), "alpha": Cited(0.05, "rotta-cifar")},
            "sotta": {"optimizer": Cited("adam", "sotta-tta-sh"), "lr": Cited(1e-3, "sotta-tta-sh"),
                      "weight_decay": Cited(0.0, "sotta-tta-sh"), "threshold": ByClasses({10: 0.99, 100: 0.66}, "sotta-tta-sh"),
                      "capacity": Cited(64, "sotta-tta-sh"), "update_every": Cited(64, "sotta-tta-sh"),
                      "bn_momentum": Cited(0.2, "sotta-tta-sh"), "rho": Cited(0.05, "sotta-tta-sh"),
                      "temperature": Cited(1.0, "sotta-tta-sh")},
            "roid": {"optimizer": Cited("adam", "mario-roid"), "lr": Cited(1e-3, "mario-roid"),
                     "weight_decay": Cited(0.0, "mario-roid"), "steps": Cited(1, "mario-roid"),
                     "use_weighting": Cited(True, "mario-roid"), "use_consistency": Cited(True, "mario-roid"),
                     "use_prior_correction": Cited(True, "mario-roid"), "momentum_src": Cited(0.99, "mario-roid"),
                     "momentum_probs": Cited(0.9, "mario-roid"), "temperature": Cited(1 / 3, "mario-roid")},
            "lame": {"affinity": Cited("rbf", "mario-lame"), "knn": Cited(5, "mario-lame"),
                     "force_symmetry": Cited(False, "mario-lame"), "bound_lambda": Cited(1.0, "lame-defaults"),
                     "max_steps": Cited(100, "lame-defaults")},
            "crowds": {"optimizer": Cited("adam", "unient-cifar"), "lr": Cited(1e-3, "unient-cifar"),
                       "alpha": Cited(0.5, "unient-cifar")},
        },
        notes={"sar": "the reference's SAR ignores OPTIM.METHOD: SAM over SGD (momentum 0.9) at lr 1e-3",
               "eata_c": "EATA-C has no public code: it takes EATA's CIFAR values (a decision)",
               "crowds": "no official code: UniEnt's CIFAR setup (Adam 1e-3)"},
    )


#: the CLIP natural-shift sets: (protocol / data config name, TDA config key, positive alpha, beta, TDA templates)
NATURAL_SHIFTS = (("imagenet_a", "tda-imagenet_a", 2.0, 5.0, "tip7"), ("imagenet_v2", "tda-imagenet_v", 1.0, 8.0, "tip7"),
                  ("imagenet_r", "tda-imagenet_r", 1.0, 8.0, "imagenet80"),
                  ("imagenet_sketch", "tda-imagenet_s", 2.363, 7.45, "imagenet80"))


def _natural_shift(name: str, tda_source: str, pos_alpha: float, pos_beta: float, templates: str) -> Protocol:
    """ImageNet's protocol plus what the CLIP methods' reference code sets for one natural-shift set."""
    base = _imagenet()
    methods = {k: dict(v) for k, v in base.methods.items()}
    methods["tda"] = {"num_views": Cited(64, "tda-views"), "augmix": Cited(True, "tda-views"),
                      "pos_alpha": Cited(pos_alpha, tda_source), "pos_beta": Cited(pos_beta, tda_source),
                      "templates": Cited(templates, "tda-templates-tip7" if templates == "tip7" else "tda-templates-80")}
    methods["ctpt"] = {"dispersion": Cited(20.0, "ctpt-ds"), "augmix": Cited(True, "ctpt-ds")}
    return Protocol(name=name, description=f"{name} for the CLIP methods: the imagenet protocol, plus the values the "
                                           f"CLIP reference code sets for this set (TDA's views and cache, C-TPT's "
                                           f"lambda and AugMix)",
                    batch_size=base.batch_size, methods=methods, notes=dict(base.notes))


PROTOCOLS: dict[str, Protocol] = {p.name: p for p in (_imagenet(), _cifar(),
                                                      *(_natural_shift(*entry) for entry in NATURAL_SHIFTS))}

#: method defaults that were tuned for a class count (the 1,000 ImageNet classes)
DEFAULTS_TUNED_FOR: dict[str, int] = {"d_margin": 1000}


def available() -> list[str]:
    return sorted(PROTOCOLS)


def get(name: str | Protocol | None) -> Protocol | None:
    """The protocol called ``name`` (``None``/``"none"``: no protocol, the method defaults)."""
    if name is None or isinstance(name, Protocol):
        return name
    if str(name).lower() in ("none", "null", "defaults"):
        return None
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; use one of {', '.join(available())} (or none: the methods' "
                         f"own defaults)")
    return PROTOCOLS[name]


def resolve(method: str, protocol: str | Protocol | None, num_classes: int, defaults: Mapping[str, Any],
            given: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """A method's keyword arguments: ``defaults`` < the protocol's values < ``given``.

    Args:
        method: the registered method name.
        protocol: a protocol name, a :class:`Protocol`, or ``None`` (method defaults only).
        num_classes: the model's class count (for :class:`ByClasses` values).
        defaults: the method's defaults (``tta.run.method_defaults(method)``).
        given: values the user gave explicitly (command line or keyword arguments).

    Returns:
        ``(kwargs, origins)``: every key of ``defaults`` and ``given``, and for each where its value came
        from (``"method default"``, ``"protocol"``, ``"command line"``).

    Raises:
        ValueError: a protocol entry the method does not take (a table error), or a class-count
            dependent value with no entry for ``num_classes`` that was not given.
    """
    proto = get(protocol)
    kwargs, origins = dict(defaults), {k: "method default" for k in defaults}
    for key, entry in (proto.entries(method).items() if proto is not None else ()):
        if key not in defaults:
            raise ValueError(f"protocol {proto.name!r}: method {method!r} takes no hyperparameter {key!r}")
        if key in given:
            continue
        if isinstance(entry, ByClasses):
            try:
                value = entry.at(num_classes)
            except KeyError:
                known = ", ".join(str(c) for c in sorted(entry.values))
                raise ValueError(
                    f"protocol {proto.name!r} gives {method}'s {key} for {known} classes only, and this model has "
                    f"{num_classes}: pass method.{key}=<value> (or another protocol)") from None
        else:
            value = entry.value
        kwargs[key], origins[key] = value, "protocol"
    for key, value in given.items():
        kwargs[key], origins[key] = value, "command line"
    return kwargs, origins


def tuned_for(method: str, protocol: str | Protocol | None, key: str, origin: str) -> int | None:
    """The class count the value of ``key`` was tuned for, given its origin (``None``: not class-specific)."""
    if origin == "method default":
        return DEFAULTS_TUNED_FOR.get(key)
    proto = get(protocol)
    if origin == "protocol" and proto is not None:
        entry = proto.entries(method).get(key)
        if isinstance(entry, Cited):
            return entry.tuned_for
    return None


def class_count_warnings(method: str, protocol: str | Protocol | None, origins: Mapping[str, str],
                         num_classes: int) -> list[str]:
    """Messages for thresholds tuned for 1,000 classes on a model with fewer than :data:`FEW_CLASSES`."""
    out = []
    for key, origin in origins.items():
        count = tuned_for(method, protocol, key, origin)
        if count is not None and num_classes < FEW_CLASSES <= count:
            source = "the method default" if origin == "method default" else f"protocol {get(protocol).name!r}"
            out.append(f"{method}: {key} comes from {source}, tuned for {count} classes, and this model has "
                       f"{num_classes}: it may reject almost every sample. Pass protocol='cifar' (the CIFAR-10/100 "
                       f"values) or {key}=<value>.")
    return out


def method_keywords(method: str) -> list[str]:
    """The keyword-only constructor arguments of a registered method, along its class hierarchy."""
    from .methods import METHODS

    names: list[str] = []
    for klass in reversed(METHODS.get(method).__mro__):
        init = vars(klass).get("__init__")
        if init is None or klass is object:
            continue
        names.extend(p.name for p in inspect.signature(init).parameters.values()
                     if p.kind is p.KEYWORD_ONLY and p.name not in names)
    return names


def for_adapt(method: str, protocol: str | Protocol | None, num_classes: int,
              overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments :func:`tta.adapt` builds ``method`` with: the protocol's values (if any) under
    ``overrides``; warns once about class-count thresholds the caller left at a 1,000-class value."""
    defaults = dict.fromkeys(method_keywords(method))  # only the names matter: the defaults stay the method's
    kwargs, origins = resolve(method, protocol, num_classes, defaults, dict(overrides))
    for message in class_count_warnings(method, protocol, origins, num_classes):
        warnings.warn(message, stacklevel=3)
    return {k: v for k, v in kwargs.items() if origins[k] != "method default"}


def batch_size(protocol: str | Protocol | None) -> int | None:
    """The protocol's stream batch size (``None``: no protocol or none given)."""
    proto = get(protocol)
    return None if proto is None or proto.batch_size is None else int(proto.batch_size.value)


def given_from_overrides(overrides: Sequence[str], group: str = "method") -> dict[str, str]:
    """Keys set on a Hydra command line under ``group`` (``method.lr=1e-3`` -> ``{"lr": "1e-3"}``).

    ``overrides`` are Hydra's task overrides (``HydraConfig.get().overrides.task``). Only the names
    matter here (the values come from the composed config); a group choice (``method=eata``) is not
    a hyperparameter. ``~method.x`` (a deletion) counts as not given."""
    out: dict[str, str] = {}
    prefix = f"{group}."
    for item in overrides:
        text = str(item).strip()
        if text.startswith("~"):
            continue
        text = text.lstrip("+")
        key, _, value = text.partition("=")
        if key.startswith(prefix):
            out[key[len(prefix):].split(".")[0]] = value
    return out


def for_run(cfg: Mapping[str, Any], data: Mapping[str, Any], method: str, method_cfg: Mapping[str, Any],
            defaults: Mapping[str, Any], num_classes: int,
            overrides: Sequence[str] | None = None) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The protocol wiring of ``tta.run``: resolved method keywords, the data config to stream, and the record.

    ``method_cfg`` is the composed ``method`` node (defaults and command-line values mixed). With
    ``overrides`` (Hydra's task overrides) the command-line keys are read from them; without (a
    Python caller of ``tta.run.execute``) a value that differs from the method default counts as given.

    Returns ``(kwargs, data, record)``: ``data`` carries the protocol's batch size when the run
    gives none; ``record`` goes into run.json under ``protocol``: ``name``, ``chosen_by`` (``data
    config`` or ``command line``), ``origins`` (every hyperparameter and ``batch_size``: ``method
    default``, ``protocol``, ``command line``; the batch size also ``setting`` or ``data config``),
    ``resolved`` (the values), ``sources`` (for each value from the protocol, a key of
    :data:`SOURCES`), ``references`` (those keys' texts), ``notes`` and ``warnings``.
    """
    name = cfg.get("protocol")
    chosen_by = "command line" if name is not None else ("data config" if data.get("protocol") else None)
    name = name if name is not None else data.get("protocol")
    proto = get(name)
    if overrides is not None:
        keys = given_from_overrides(overrides)
        given = {k: method_cfg[k] for k in keys if k in method_cfg}
    else:
        given = {k: v for k, v in method_cfg.items() if k in defaults and v != defaults[k]}
    given.update({k: v for k, v in method_cfg.items() if k not in defaults})  # run inputs and unknown keys: as given
    kwargs, origins = resolve(method, proto, num_classes, defaults, given)
    messages = class_count_warnings(method, proto, origins, num_classes)
    for message in messages:
        warnings.warn(message, stacklevel=2)
    data = dict(data)
    setting_bs = (cfg.get("setting") or {}).get("batch_size")
    if cfg.get("batch_size") is not None or "batch_size" in given_from_overrides(overrides or (), group="data"):
        bs_origin = "command line"  # batch_size=..., or data.batch_size=... (the data config's value, as typed)
    elif setting_bs is not None:
        bs_origin = "setting"
    elif batch_size(proto) is not None:
        bs_origin = "protocol"
        data["batch_size"] = batch_size(proto)
    else:
        bs_origin = "data config"
    record = {
        "name": proto.name if proto is not None else None,
        "chosen_by": chosen_by,
        "origins": {**{k: origins[k] for k in defaults if k in origins}, "batch_size": bs_origin},
        "resolved": {k: kwargs[k] for k in defaults if k in kwargs},
        "sources": {k: proto.entries(method)[k].source for k, o in origins.items() if o == "protocol"},
        "notes": [proto.notes[method]] if proto is not None and method in proto.notes else [],
        "warnings": messages,
    }
    if bs_origin == "protocol":
        record["sources"]["batch_size"] = proto.batch_size.source
    record["references"] = {key: SOURCES[key] for key in dict.fromkeys(record["sources"].values())}
    return kwargs, data, record


__all__ = ["ByClasses", "Cited", "DEFAULTS_TUNED_FOR", "FEW_CLASSES", "ORIGINS", "PROTOCOLS", "Protocol", "SOURCES",
           "available", "batch_size", "class_count_warnings", "for_adapt", "for_run", "get", "given_from_overrides",
           "method_keywords", "resolve", "tuned_for"]
