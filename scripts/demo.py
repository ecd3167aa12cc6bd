"""The offline demo study: `python scripts/demo.py` (the same as `bert-accum demo`; see bert_accum.cli)."""
import sys
from bert_accum.cli import script_main
if __name__ == "__main__":
    sys.exit(script_main("demo", "python scripts/demo.py"))
