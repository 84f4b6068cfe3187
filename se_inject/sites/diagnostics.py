"""What ``inject_se`` says when a plan is thin: how many modules were not analysed and why most
of them were not, and which option would find sites when none were found."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from ..analysis.causes import split_location
from ..plan import Plan

__all__ = ["unanalysed_summary", "no_sites_warning", "unanalysed_warning"]


def unanalysed_summary(plan: Plan) -> str:
    """``"7 modules unanalysed (top reason, 5 of them: Block.forward uses len() on a traced value
    (model.py:42))"``, or "" when none."""
    if not plan.unanalysed:
        return ""
    reasons = Counter(u.reason or "unknown" for u in plan.unanalysed)
    reason, count = reasons.most_common(1)[0]
    reason = _short(reason)
    n = len(plan.unanalysed)
    return f"{n} module{'s' if n != 1 else ''} unanalysed (top reason, {count} of them: {reason})"


def _short(reason: str, limit: int = 120) -> str:
    """The first sentence of a reason, at most ``limit`` characters (fx's messages run long),
    keeping the `` (file.py:line)`` the reason ends with: where to look is the useful part."""
    text, location = split_location(reason)
    first = text.split(". ", 1)[0]
    return (first if len(first) <= limit else first[: limit - 3] + "...") + location


def no_sites_warning(name: str, plan: Plan, alternatives: dict[str, Callable[[], Plan]]) -> str:
    """The warning for a plan without sites: skipped and unanalysed counts, and each of
    ``alternatives`` (an option such as ``plain=True`` and the plan it would give) that finds
    sites."""
    parts = [f"{len(plan.skipped)} skipped"]
    summary = unanalysed_summary(plan)
    if summary:
        parts.append(summary)
    text = f"no SE site found in {name} ({'; '.join(parts)}); the model is unchanged"
    helps = []
    for option, plan_with in alternatives.items():
        try:
            found = len(plan_with().sites)
        except Exception:  # noqa: BLE001 - a suggestion that fails is simply not made
            continue
        if found:
            helps.append(f"{option} finds {found} site{'s' if found != 1 else ''}")
    return f"{text}. {'; '.join(helps)}" if helps else text


def unanalysed_warning(name: str, plan: Plan) -> str | None:
    """One line when sites were found but some modules were not analysed (sites inside them
    may be missing), else None."""
    summary = unanalysed_summary(plan)
    if not summary:
        return None
    return f"SE inserted at {len(plan.sites)} sites of {name}; {summary}: sites inside them may be missing (see find_sites(...).unanalysed)"
