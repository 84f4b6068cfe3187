"""What an injection did, for people: counts, the report, tables, plots and gate statistics.

- ``complexity``: parameters and multiply-adds before and after (``torch.utils.flop_counter``);
- ``summary``: the ``Report`` of one named injection (plain data, JSON-ready);
- ``render``: the CLI's tables; ``plot``: the sites over the network, as a PNG;
- ``gate_statistics``: what the SE gates do after training, per block and per class.
"""
