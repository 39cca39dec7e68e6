"""The benchmark report from a checkout: ``python bench/report.py bench.json --output bench_report``.

The same as ``advface bench-report`` (advface_engine/speed/report.py): a Markdown table, a PNG plot per
batch-size sweep of throughput per backend with the ratio to the naive baseline, and the speedups, printed;
several JSON files are compared side by side.
"""

from __future__ import annotations

import sys

from advface_engine.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench-report", *sys.argv[1:]]))
