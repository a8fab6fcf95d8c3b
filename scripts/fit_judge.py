"""Fit and validate emlens's first offline judge (``v1``); write the shipped probe.

The study is :mod:`emlens.studies.fit_judge`: ``python scripts/fit_judge.py ARGS`` runs
``python -m emlens.studies.fit_judge ARGS`` (``--help`` lists them).
"""

from emlens.studies.fit_judge import main

if __name__ == "__main__":
    main()
