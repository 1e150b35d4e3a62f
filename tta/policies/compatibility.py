"""Whether a policy can work inside a method: same level, and every signal it needs provided.

A method calls :func:`check_compatible` for each policy when it is built, so a combination that
cannot work (a view ranking inside a batch method, which would treat a batch as one image's views;
a policy needing the frozen source model inside a method that keeps none) fails at build time with
a ``ValueError`` naming both, instead of running and silently selecting the wrong samples.
"""
from __future__ import annotations

from typing import Iterable

from .base import LEVELS, SIGNALS, Policy

#: what a policy of each level does, and what a method of each level adapts on
POLICY_LEVEL_TEXT = {"samples": "ranks or weights the samples of a batch", "views": "ranks the views of one image"}
METHOD_LEVEL_TEXT = {"samples": "adapts on batches of samples", "views": "adapts on the views of one image at a time"}


def _one_of(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def check_compatible(policy: Policy, *, level: str, provides: Iterable[str], method: str,
                     alternatives: Iterable[str] = ()) -> None:
    """Raise a ``ValueError`` naming the policy and the method when ``policy`` cannot work in it.

    Args:
        policy: a built policy (its ``level`` and ``needs`` are read from the instance).
        level: what the method's policies rank: ``"samples"`` or ``"views"``.
        provides: the signals the method's context provides (keys of :data:`~tta.policies.base.SIGNALS`).
        method: the method's name, for the message.
        alternatives: names of methods of the policy's level, suggested in the message.
    """
    provides = set(provides)
    if level not in LEVELS:
        raise ValueError(f"method {method!r}: unknown policy level {level!r}; expected one of {LEVELS}")
    unknown = sorted(provides - set(SIGNALS))
    if unknown:
        raise ValueError(f"method {method!r} provides unknown signals {unknown}; known: {sorted(SIGNALS)}")
    name = getattr(policy, "name", type(policy).__name__)
    policy_level = getattr(policy, "level", None)
    if policy_level not in LEVELS:
        raise ValueError(f"policy {name!r} declares no valid level ({policy_level!r}); expected one of {LEVELS}")
    if policy_level != level:
        others = list(dict.fromkeys(alternatives))
        hint = _one_of(others) if others else f"a method that {METHOD_LEVEL_TEXT[policy_level]}"
        raise ValueError(f"policy {name!r} {POLICY_LEVEL_TEXT[policy_level]}; method {method!r} "
                         f"{METHOD_LEVEL_TEXT[level]}: use it with {hint}")
    needs = tuple(getattr(policy, "needs", ()))
    bad = [s for s in needs if s not in SIGNALS]
    if bad:
        raise ValueError(f"policy {name!r} needs unknown signals {bad}; known: {sorted(SIGNALS)}")
    missing = [s for s in needs if s not in provides]
    if missing:
        what = " and ".join(SIGNALS[s] for s in missing)
        raise ValueError(f"policy {name!r} needs {what}; method {method!r} does not provide "
                         f"{'it' if len(missing) == 1 else 'them'}")
