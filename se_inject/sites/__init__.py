"""The placement policy: model -> plan.

- ``records``: the planner's records (units, candidates, the rules' shared context);
- ``units``: tracing a model into analysis units, its parts where the whole does not trace;
- ``residual``, ``concatenation`` (inception and dense), ``plain``: the placement rules, one
  signature each (``records.Rule``), listed in ``driver.RULES``;
- ``linear``, ``existing_attention``, ``fit``: checks the rules share (linear blocks, existing
  attention, the scaled tensor's channel axis);
- ``rebuild``: owner location, owner-local names and rebuildability;
- ``selection``: applying the request's Selection (include/exclude, stages, resolutions), stage
  numbering, free names;
- ``inputs``: the example input a model is analysed on, and whether it fits the model;
- ``diagnostics``: the warnings that explain a plan with no or few sites;
- ``driver``: ``build_plan``, which runs the phases in order.

The plan itself (:mod:`se_inject.plan`) and the request (:mod:`se_inject.request`) live at the
top level: every later stage reads them.

"Rule N" in comments is the N-th placement rule, as numbered in the README ("How sites are
found").
"""

from .driver import Analysis, build_plan, example_args

__all__ = ["Analysis", "build_plan", "example_args"]
