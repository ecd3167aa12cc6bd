"""bert_accum: measure and explain why gradient accumulation drifts from the large batch on BERT/GLUE."""

__version__ = "0.1.0"
