"""The Hugging Face Trainer study's tables, figure and trainer.md: `python scripts/trainer_study.py` (the same as
`bert-accum trainer-study`; see bert_accum.cli)."""
import sys
from bert_accum.cli import script_main
if __name__ == "__main__":
    sys.exit(script_main("trainer-study", "python scripts/trainer_study.py"))
