"""Files: checkpoints out and back in, atomic writes, architecture signatures.

- ``checkpoint``: the checkpoint format and ``save``; ``restore``: ``load``, rebuilding the base
  model from what the checkpoint records, or refusing;
- ``signature``: what a model's layers are beyond keys and shapes, compared on rebuild;
- ``atomic``: writes that leave the old file intact on any failure or interrupt.
"""
