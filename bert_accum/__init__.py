"""bert_accum: measure and explain why gradient accumulation drifts from the large batch on BERT/GLUE."""

__version__ = "0.1.0"

__all__ = ["ExactAccumulationTrainer"]


def __getattr__(name):
    # Lazy, so that `import bert_accum` does not import transformers.
    if name == "ExactAccumulationTrainer":
        from .integrations import ExactAccumulationTrainer

        return ExactAccumulationTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
