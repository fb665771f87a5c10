"""False-negative detection study (the code: ``benchmarks/fnstudy/``, docs/fn-study.md).

    .venv/bin/python benchmarks/fn_study.py            # ~10 minutes on 2 CPU cores
    .venv/bin/python benchmarks/fn_study.py --quick    # ~1 minute smoke run

Writes ``benchmarks/results/fn_study.json``, ``fn_f1.png`` and ``fn_lambda.png``
(``--quick`` writes ``fn_study_quick.json`` etc. instead, never overwriting the full
results; ``--suffix`` names other variants, e.g. ``--seed 1 --suffix _seed1``).
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # fnstudy beside this file; this checkout

from fnstudy.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
