"""Dense vs uniformly narrowed 70 % subnet of the embedded model (see explorer/benchmarks/dense.py)."""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from explorer.benchmarks import dense  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=dense.__doc__)
    dense.add_arguments(parser)
    dense.run(parser.parse_args())
