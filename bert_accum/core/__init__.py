"""The core: one run's configuration, data, model, accumulation windows, training loop and run folder.

Nothing here imports `bert_accum.study`; the drift controls (`bert_accum.controls`) are part of the loop.
"""
