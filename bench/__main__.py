"""``python -m bench <name> [options]``: every benchmark and tool (``python -m bench --help``)."""
import os
import sys

from bench.cli import main

if __name__ == "__main__":
    rc = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # everything is written; skip the interpreter's teardown of torch/Dynamo/Triton state (seconds
    # on a small CPU, most of a --quick run's tail)
    os._exit(rc)
