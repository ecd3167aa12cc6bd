"""bert_accum: measure and explain why gradient accumulation drifts from the large batch on BERT/GLUE.

The public exact accumulation kit (``from bert_accum import WindowSampler, ...``) lives in
:mod:`bert_accum.kit`, the exact drop-in Hugging Face Trainer in :mod:`bert_accum.integrations`; both are
imported on first use, so ``import bert_accum`` stays cheap (no torch, no transformers).
"""

from .errors import BertAccumError, DoubleDivisionError

__version__ = "0.1.0"

_KIT_NAMES = (
    "AccumulationWindow",
    "WindowSampler",
    "WindowCollator",
    "install_invariant_dropout",
    "window_loss_scales",
    "check_accelerator",
)
_INTEGRATION_NAMES = ("ExactAccumulationTrainer",)

__all__ = [*_KIT_NAMES, *_INTEGRATION_NAMES, "BertAccumError", "DoubleDivisionError"]


def __getattr__(name: str):
    """Load the kit or the Trainer integration (and torch with them) only when one of their names is asked for."""
    if name in _KIT_NAMES:
        from . import kit

        return getattr(kit, name)
    if name in _INTEGRATION_NAMES:
        from . import integrations

        return getattr(integrations, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_KIT_NAMES, *_INTEGRATION_NAMES])
