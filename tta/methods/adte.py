"""ADTE: adaptive debiasing Tsallis entropy (Jinx630/ADTE @ b9e6085, "[ICLR2026]"; docs/methods/adte.md).

Training-free and episodic, on a frozen CLIP (a ZERO-style pipeline, FarinaMatteo/zero): per test
image, 64 views (the original + 63 random resized crops with flips), their zero-shot logits
``z_v`` and ``p_v = softmax(z_v)``; each view gets a score and the ``max(floor(64 * 0.1), 1) = 6``
views with the lowest score vote: the prediction is ``argmax sum_{kept} softmax(z_v)``.
``method(x)`` returns ``log(mean_{kept} softmax(z_v))`` per image (same argmax; proper
probabilities for NLL/ECE).

View scores (``score``):

* ``adte`` (default): ``s_v = sum_c p_{v,c}^{q_c} / (1 - q_c)`` with a class-specific Tsallis index
  ``q_c`` from the estimated label bias ``b`` (exactly the released formula);
* ``tsallis``: one index ``q`` (``--use_adte --same_q --scale_w 0.1``; the official score needs
  ``--use_adte``: the README's "Tsallis Entropy" command, without it, ranks by Shannon entropy;
  ``tsallis_q=0.1`` is the README value, the argparse default of ``--scale_w`` is 0.5):
  ``(1 - sum_c p_c^q) / (q - 1)``;
* ``shannon``: ``-sum_c p_c log(p_c + 1e-8)`` (ZERO / ADTE without ``--use_adte``).

``label_adjust=True`` votes with ``softmax(z_v - b)`` instead (the older ADTE variant; off in the
current code). ``vote=True`` replaces the soft vote by ZERO's zero-temperature vote (argmax counts
of the kept views, ties broken by the other views in ADTE-score order; :mod:`tta.objectives.vote`);
``method(x)`` then returns log vote shares.

The label bias (``bias``):

* ``prepass`` (the released default, ``pre_compute_q=1``): a **transductive pre-pass** over the
  whole test set in a fixed order before the first prediction. Per image, the mean of its 64 view
  logits goes into a per-class memory (20 slots, gap between the two largest mean logits >= 1.0,
  smallest-gap slot overwritten unconditionally once full), ``P[:, j]`` = mean softmax of class
  ``j``'s entries, ``q`` = power iteration (eps 1e-4, 500 iterations, L2-normalised), ``b = ln
  max(q, 1e-12)``, ``q_c`` = min-max map of ``b`` to [0.01, 0.9]
  (:class:`~tta.policies.LabelBias`). The pre-pass draws its own views (a different
  random draw from the evaluation pass, as the two official data loaders do). It runs lazily on the
  first batch, over ``prepass_data`` -- on the command line ``tta.run`` hands over the same data
  config as an unshuffled stream -- or through :meth:`ADTE.prepass` from Python. One bias per
  domain of that stream. With ``q_path`` the result is saved there and reused when the file
  exists (a file saved by the official code, a bare ``ln q`` tensor, is read too).
* ``online``: the memory is filled from the stream itself, image by image, and the bias is
  recomputed after each image (``update_every``). It works from the first sample: until the memory
  holds ``min_entries`` entries the bias is uniform (``b = 0``, so every ``q_c = 0.01``, the
  official min-max map of a flat bias). The released online path (``pre_compute_q=0``) never sets
  ``q_c`` and divides by ``1 - 1 = 0``; this one does not, and it uses the pre-pass settings (20
  slots, gap ``>= 1.0``, normalised power iteration) where the released per-sample code has 10
  slots, gap ``> 1``, no normalisation and a uniform bias until 100 entries (``min_entries=100``
  ``memory_size=10`` come close). The online estimate restarts at every domain change.
* ``uniform``: no bias estimate (``b = 0``).

No backpropagation; the CLIP head is the frozen template head (``templates``: ``single`` = "a photo
of a {}." as the released default, ``tip7`` = the 7 Tip-Adapter templates of ``--templates``).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from ..objectives import views_kept
from ..policies import DEFAULT_DOMAIN, LabelBias, Policy, TsallisRanking, load_bias_file, minmax_q_index
from .inputs import RunInput
from .registry import register
from .views import ViewMethod

log = logging.getLogger(__name__)
BIAS_MODES = ("prepass", "online", "uniform")
SCORES = ("adte", "tsallis", "shannon")
PREPASS_SALT = 1  # view seeds of the pre-pass differ from those of the evaluation pass (salt 0)



def _batches(data: Any) -> Iterable[tuple[torch.Tensor, torch.Tensor | None, str]]:
    """(images, ids, domain) from a stream of :class:`~tta.data.stream.Batch`, tensors or tuples."""
    for item in data:
        if hasattr(item, "images"):
            yield item.images, getattr(item, "ids", None), getattr(item, "domain", DEFAULT_DOMAIN)
        elif torch.is_tensor(item):
            yield item, None, DEFAULT_DOMAIN
        else:
            yield item[0], None, DEFAULT_DOMAIN


@register("adte")
class ADTE(ViewMethod):
    """ADTE on a frozen CLIP model (``model=clip:...``); see the module docstring.

    Args:
        num_views: views per image incl. the original (64); gamma: kept fraction (0.1).
        score: ``adte``, ``tsallis`` (fixed ``tsallis_q``) or ``shannon``.
        label_adjust: vote with ``softmax(z - b)``.
        bias: ``prepass`` (transductive, default), ``online`` or ``uniform``.
        q_path: bias file to save the pre-pass to and to reuse.
        prepass_data: an iterable (or a callable returning one) of batches for the pre-pass.
        memory_size, gap, eps, max_iter, q_range: the bias estimate (20, 1.0, 1e-4, 500, (0.01, 0.9)).
        min_entries, update_every: online mode (uniform until ``min_entries`` memory entries).
        templates: frozen-head templates for this run (``single``, ``tip7``, ``imagenet80``; default:
            the model's).
        view_batch: views per image-encoder call (memory bound; a multiple of ``num_views``).
        seed: base seed of the views.
    """

    paper = "ADTE, ICLR 2026 (Jinx630/ADTE, a fork of FarinaMatteo/zero)"
    default_params = "ln"
    learns = False
    input_keywords = ViewMethod.input_keywords + ("prepass_data",)

    @classmethod
    def run_inputs(cls, hparams: Mapping[str, Any]) -> list[RunInput]:
        """The test stream for the pre-pass (bias ``prepass`` without an existing ``q_path``), and
        optional diffusion views."""
        needs = super().run_inputs(hparams)
        q_path = hparams.get("q_path")
        if hparams.get("bias", "prepass") == "prepass" and not (q_path and Path(str(q_path)).expanduser().is_file()):
            needs.append(RunInput("test_pass", keyword="prepass_data", required=False))
        return needs

    def __init__(self, model, *, num_views: int = 64, gamma: float = 0.1, score: str = "adte",
                 tsallis_q: float = 0.1, label_adjust: bool = False, bias: str = "prepass", q_path: str | None = None,
                 prepass_data: Iterable | Callable[[], Iterable] | None = None, memory_size: int = 20,
                 gap: float = 1.0, eps: float = 1e-4, max_iter: int = 500,
                 q_range: Sequence[float] = (0.01, 0.9), min_entries: int = 1, update_every: int = 1,
                 templates: str | None = None, view_batch: int = 1024, seed: int = 0, **kwargs: Any):
        if score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, not {score!r}")
        if bias not in BIAS_MODES:
            raise ValueError(f"bias must be one of {BIAS_MODES}, not {bias!r}")
        super().__init__(model, num_views=num_views, seed=seed, **kwargs)
        if templates is not None:
            self.model.set_head(templates=templates)
        self.gamma, self.score_name = float(gamma), score
        self.label_adjust, self.bias_mode, self.q_path = bool(label_adjust), bias, q_path
        self.min_entries, self.update_every = int(min_entries), max(int(update_every), 1)
        self.view_batch = max(int(view_batch), self.num_views)
        self._ranking_options = dict(score=score, q=tsallis_q, online=False, memory_size=memory_size, gap=gap,
                                     eps=eps, max_iter=max_iter, q_range=tuple(q_range))
        self.estimator = LabelBias(self.num_classes, memory_size, gap, eps, max_iter, tuple(q_range))
        self.prepass_data = prepass_data
        self.domain_bias: dict[str, torch.Tensor] = {}
        self.current_domain: str | None = None
        self.online_seen = 0
        for name in ("prepass_images", "prepass_written"):
            self.counters.add(name, 0)
        self.register_buffer("log_bias", torch.zeros(self.num_classes))

    def default_policies(self) -> list[Policy]:
        """ADTE's view ranking (its class-specific Tsallis index is set from the label bias)."""
        return [TsallisRanking(fraction=self.gamma, num_classes=self.num_classes, **self._ranking_options)]

    def combine_policies(self, own: list[Policy], extra: list[Policy]) -> list[Policy]:
        """ADTE votes with one view ranking: an extra ``tsallis`` ranking replaces its own; nothing else
        combines with the vote."""
        for policy in extra:
            if not isinstance(policy, TsallisRanking):
                raise ValueError(f"policy {policy.name!r} cannot be combined with method 'adte': ADTE votes with one "
                                 f"view ranking (an extra 'tsallis' ranking replaces its own)")
        return super().combine_policies(own, extra)

    @property
    def ranking(self) -> TsallisRanking:
        """The view ranking that votes."""
        return self.policies[0]

    # ------------------------------------------------------------------ bias
    @torch.no_grad()
    def use_bias(self, log_bias: torch.Tensor) -> None:
        """Use ``b = ln q`` from now on (sets the class-specific Tsallis index of the ranking)."""
        self.log_bias.copy_(log_bias.to(self.log_bias.device).float().view(-1))
        self.ranking.set_bias(self.log_bias)

    @torch.no_grad()
    def prepass(self, data: Iterable | None = None, *, save: bool = True) -> dict[str, torch.Tensor]:
        """The transductive pre-pass over ``data`` (default: ``prepass_data``), in its order.

        Returns and stores ``{domain: b}``; writes ``q_path`` when set.
        """
        data = self.prepass_data if data is None else data
        if callable(data):
            data = data()
        if data is None:
            raise ValueError("ADTE with bias='prepass' needs the test data for its pre-pass: call "
                             "method.prepass(batches), pass prepass_data=, give q_path= to a saved bias, or use "
                             "bias='online'")
        device = self.log_bias.device
        estimators: dict[str, LabelBias] = {}
        counter = 0
        for images, ids, domain in _batches(data):
            images = images.to(device, non_blocking=True)
            if ids is None:
                ids = list(range(counter, counter + images.shape[0]))
            counter += images.shape[0]
            est = estimators.get(domain)
            if est is None:
                est = estimators[domain] = LabelBias(self.num_classes, self.estimator.memory_size, self.estimator.gap,
                                                     self.estimator.eps, self.estimator.max_iter,
                                                     self.estimator.q_range).to(device)
            logits = self.view_logits(images, ids, salt=PREPASS_SALT)
            for one in logits:
                self.counters.add("prepass_written", est.observe(one).long())
            self.counters.add("prepass_images", images.shape[0])
        if not estimators:
            raise ValueError("the ADTE pre-pass data is empty")
        table = {}
        for domain, est in estimators.items():
            table[domain] = est.log_bias()
            log.info("ADTE pre-pass %s: %d memory entries", domain, int(est.entries))
        self.domain_bias.update({k: v.clone() for k, v in table.items()})
        if save and self.q_path:
            self.save_bias(self.q_path, estimators)
        return table

    def save_bias(self, path: str | Path, estimators: dict[str, LabelBias] | None = None) -> None:
        path = Path(path).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        domains = {}
        for name, b in self.domain_bias.items():
            entry = {"log_bias": b.cpu(), "q_index": minmax_q_index(b, *self.estimator.q_range).cpu()}
            if estimators and name in estimators:
                entry.update(memory=estimators[name].memory.cpu(), gaps=estimators[name].gaps.cpu())
            domains[name] = entry
        torch.save({"domains": domains, "num_classes": self.num_classes, "num_views": self.num_views,
                    "model": self.model.info.spec, "memory_size": self.estimator.memory_size,
                    "gap": self.estimator.gap}, path)

    def _bias_for(self, domain: str | None) -> torch.Tensor:
        if not self.domain_bias:
            if self.q_path and Path(self.q_path).expanduser().is_file():
                self.domain_bias = load_bias_file(self.q_path)
                log.info("ADTE: label bias read from %s", self.q_path)
            else:
                self.prepass()
        key = domain if domain in self.domain_bias else None
        if key is None:
            if len(self.domain_bias) == 1:
                key = next(iter(self.domain_bias))
            elif DEFAULT_DOMAIN in self.domain_bias:
                key = DEFAULT_DOMAIN
            else:
                raise KeyError(f"no ADTE label bias for domain {domain!r}; the pre-pass saw {sorted(self.domain_bias)}")
        b = self.domain_bias[key]
        if b.numel() != self.num_classes:
            raise ValueError(f"ADTE label bias for {key!r} has {b.numel()} classes, the model {self.num_classes}")
        return b

    @property
    def needs_bias(self) -> bool:
        """Whether the label bias is used at all (the adte score or label adjustment)."""
        return self.score_name == "adte" or self.label_adjust

    def _enter_domain(self, domain: str | None) -> None:
        if self.bias_mode == "prepass" and self.needs_bias and (domain != self.current_domain or not self.domain_bias):
            self.use_bias(self._bias_for(domain))
        self.current_domain = domain

    # ------------------------------------------------------------------ per batch
    def forward(self, x: torch.Tensor, ids: torch.Tensor | Sequence[int] | None = None,
                domain: str | None = None) -> torch.Tensor:
        ids = self.begin_image_batch(x, ids)
        self._enter_domain(domain)
        logits = self.view_logits(x, ids)                              # (N, V, C)
        if self.bias_mode == "online" and self.needs_bias:
            weights = []
            for one in logits:                                         # the bias depends on the images before
                self.estimator.observe(one)
                self.online_seen += 1
                if self.online_seen % self.update_every == 0:
                    b = self.estimator.log_bias()
                    self.use_bias(torch.where(self.estimator.entries >= self.min_entries, b, torch.zeros_like(b)))
                weights.append(self.ranking.select(one))
            weights = torch.stack(weights)
        else:
            weights = self.ranking.select(logits)                      # (N, V)
        self.count_policy(self.policy_keys[0], weights.numel(), (weights > 0).sum())
        z = logits - self.log_bias if self.label_adjust else logits
        if self.vote:                                                  # ZERO's vote instead of the soft mean
            return self.vote_over_views(z, weights, self.ranking.score(logits))
        probs = (z.softmax(dim=-1) * weights.unsqueeze(-1)).sum(dim=1)  # sum of softmax over the kept views
        kept = views_kept(self.num_views, self.gamma)
        return torch.log((probs / kept).clamp_min(torch.finfo(torch.float32).tiny))

    def reset(self) -> None:
        """A new domain: the online estimate restarts; pre-computed biases stay."""
        if self.bias_mode == "online":
            self.estimator.reset()
            self.online_seen = 0
            self.use_bias(torch.zeros_like(self.log_bias))
        self.reset_state()

    def hparams(self) -> dict[str, Any]:
        out = super().hparams()
        out.update(gamma=self.gamma, score=self.score_name, label_adjust=self.label_adjust,
                   bias=self.bias_mode, q_path=self.q_path, templates=self.model.net.template_spec,
                   bias_domains=sorted(self.domain_bias),
                   memory_size=self.estimator.memory_size, gap=self.estimator.gap,
                   q_range=list(self.estimator.q_range))
        return out
