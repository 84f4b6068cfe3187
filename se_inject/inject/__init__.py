"""Plan -> model: rebuild the blocks that own sites, check them, swap them in, take them out.

- ``rebuilt``: ``RebuiltBlock``, the traced copy of one block with SE calls in its graph;
- ``rewrite``: ``build_blocks`` / ``install`` / ``apply_plan`` / ``remove_se``;
- ``verify``: the post-build check (each rebuilt block computes what its original did);
- ``finetune``: selecting, freezing and grouping the inserted blocks for training.
"""
