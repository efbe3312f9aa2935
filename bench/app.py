"""Start-to-first-points and click-to-card times of the app in a real browser (see explorer/benchmarks/app.py)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from explorer.benchmarks import main  # noqa: E402

main("app") if __name__ == "__main__" else None
