"""Gradient probe: `python scripts/probe.py --task_name rte --glue_dir DIR` (the same as `bert-accum probe`;
the parser and the logic live in the package: bert_accum.cli.parse_probe, bert_accum.study.probe)."""
import functools
import sys
from bert_accum.cli import parse_probe, script_main
parse = functools.partial(parse_probe, prog="python scripts/probe.py")
if __name__ == "__main__":
    sys.exit(script_main("probe", "python scripts/probe.py"))
