"""GGUF exports in llama.cpp: dense vs a whole-head 70 % subnet (see explorer/benchmarks/llamacpp.py)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from explorer.benchmarks import main  # noqa: E402

main("llamacpp") if __name__ == "__main__" else None
