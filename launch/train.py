"""`resurgo-train` / `python -m resurgo.launch.train`: one training run, in this process or in a warm one.

Where the node runs a warm template (RESURGO_WARM_TEMPLATE, `launch/warm_template.py`), this process
imports nothing heavy: the template forks the rank from its warm state and this process stands in
for it. Elsewhere it trains itself (`launch/training.py`).
"""

from __future__ import annotations

import sys

from resurgo.launch.warm_template import run_in_template


def main() -> None:
    code = run_in_template(sys.argv)
    if code is not None:
        sys.exit(code)
    from resurgo.launch import training

    training.main()


if __name__ == "__main__":
    main()
