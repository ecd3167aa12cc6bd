"""Fine-tune one (B, N) configuration: `accelerate launch scripts/finetune.py --task_name rte --glue_dir ...`
(the same as `bert-accum finetune`; the parser and the logic live in the package: bert_accum.cli)."""
import sys
from bert_accum.cli import script_main
if __name__ == "__main__":
    sys.exit(script_main("finetune", "python scripts/finetune.py"))
