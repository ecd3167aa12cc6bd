"""Fine-tune one (B, N) configuration: `accelerate launch scripts/finetune.py --task_name rte --glue_dir ...`.

All flags: `python scripts/finetune.py --help`. The logic lives in bert_accum.core.train.
"""

import sys

from bert_accum.cli import finetune_main

if __name__ == "__main__":
    sys.exit(finetune_main())
