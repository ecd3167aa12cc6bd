"""Throughput benchmark: `python scripts/bench.py --task_name rte --glue_dir DIR` (the same as `bert-accum bench`;
the parser and the logic live in the package: bert_accum.cli.parse_bench, bert_accum.study.bench)."""
import functools
import sys
from bert_accum.cli import parse_bench, script_main
parse = functools.partial(parse_bench, prog="python scripts/bench.py")
if __name__ == "__main__":
    sys.exit(script_main("bench", "python scripts/bench.py"))
