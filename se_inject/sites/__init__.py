"""The placement policy: model -> plan.

- ``records``: the planner's records (units, candidates, the rules' shared context);
- ``units``: tracing a model into analysis units, its parts where the whole does not trace;
- ``residual``, ``concatenation`` (inception and dense), ``plain``: the placement rules, one
  signature each (``records.Rule``), listed in ``driver.RULES``;
- ``linear``, ``gates``, ``fit``: checks the rules share (linear blocks, existing attention,
  the scaled tensor's channel axis);
- ``rebuild``: owner location, owner-local names and rebuildability;
- ``selection``: include/exclude, stages and resolutions, stage numbering, free names;
- ``driver``: ``build_plan``, which runs the phases in order.

"Rule N" in comments is the N-th placement rule, as numbered in the README ("How sites are
found").
"""

from .driver import build_plan, example_args

__all__ = ["build_plan", "example_args"]
