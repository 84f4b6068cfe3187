"""Plan -> model: attach SE blocks or rebuild the blocks that own sites, check what was rebuilt,
install, and take them out again.

- ``build``: the one path every entry point takes (attach, rebuild, verify, install, or nothing);
- ``attach``: the SE hook on a module's output (the owner's code untouched);
- ``rebuilt``: ``RebuiltBlock``, the traced copy of one block with SE calls in its graph;
- ``rewrite``: ``build_blocks`` / ``remove_se``;
- ``verify``: the post-build check (each rebuilt block computes what its original did);
- ``finetune``: selecting, freezing and grouping the inserted blocks for training.
"""
