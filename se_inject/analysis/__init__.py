"""Graph facts, one small module each; nothing here decides placement (``se_inject.sites``) or
changes a model (``se_inject.inject.rewrite``).

- ``tracing``: the fx tracer and ``trace``; ``mode_reads``: whether a trace read ``training``;
  ``draws``: whether it drew random numbers outside the graph;
  ``calls``: recorded calls and standalone-call checks;
- ``shapes``: meta/fake shape propagation, inputs recorded in a forward pass; ``shortcuts``:
  output shapes of costly layers (recurrent, linear, norms) computed instead of run;
- ``node_names``: owner-local qualified node names (the planner's and the rewriter's one implementation);
- ``dataflow``: data edges, dominators, regions, parametric path costs;
- ``ops``: op tables and predicates; ``axes``: channel axes and channel slices;
- ``attention``: existing channel attention; ``owners``: owner traces shared by planner and rewriter;
- ``sandbox``: ``preserved_state``, which runs analysis alone (``analysis_lock``) and puts the
  user's modules back as they were after a forward, and ``collection_paused`` (no cyclic
  garbage collection during analysis); ``hooks``: the user's hooks off while analysis runs.
"""
