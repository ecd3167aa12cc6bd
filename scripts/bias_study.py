"""The bias study's tables, figures and biases.md: `python scripts/bias_study.py` (the same as
`bert-accum bias-study`; see bert_accum.cli)."""
import sys
from bert_accum.cli import script_main
if __name__ == "__main__":
    sys.exit(script_main("bias-study", "python scripts/bias_study.py"))
