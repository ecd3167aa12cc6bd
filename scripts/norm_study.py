"""BatchNorm under gradient accumulation: `python scripts/norm_study.py` (the same as `bert-accum norm-study`;
the parser and the logic live in the package: bert_accum.cli.parse_norm_study, bert_accum.study.normstudy)."""
import functools
import sys
from bert_accum.cli import parse_norm_study, script_main
parse = functools.partial(parse_norm_study, prog="python scripts/norm_study.py")
if __name__ == "__main__":
    sys.exit(script_main("norm-study", "python scripts/norm_study.py"))
