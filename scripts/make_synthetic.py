"""Write the synthetic (not GLUE) task to <output_dir>/Synthetic/{train,dev}.tsv: `python scripts/make_synthetic.py
--output_dir data` (the same as `bert-accum make-synthetic`; see bert_accum.cli)."""
import sys
from bert_accum.cli import script_main
if __name__ == "__main__":
    sys.exit(script_main("make-synthetic", "python scripts/make_synthetic.py"))
