"""`python -m bert_accum TOOL ...`: the `bert-accum` command."""

import sys

from .cli import main

sys.exit(main())
