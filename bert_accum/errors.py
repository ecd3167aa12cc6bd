"""User-facing errors: one line, non-zero exit, no traceback."""


class BertAccumError(Exception):
    """A problem with the user's input (flags, data, model folder).

    Entry points catch it, print ``error: <message>`` on one line and exit with status 2,
    so a user sees what to fix rather than a traceback.
    """


class NonFiniteLossError(BertAccumError):
    """Training produced a NaN/inf loss; the message names the optimizer and micro step."""


class DoubleDivisionError(BertAccumError):
    """An ``accelerate.Accelerator`` with ``gradient_accumulation_steps > 1`` next to the kit's loss scaling:
    ``accelerator.backward`` would divide every loss by N a second time."""
