"""Adapters that bring the project's exact accumulation to other training loops (importing this imports transformers)."""

from .trainer import ExactAccumulationTrainer

__all__ = ["ExactAccumulationTrainer"]
