"""Fit the offline probe judge on answers labelled by reading, and test it where it never looked.

The study is :mod:`emlens.studies.fit_real_judge`: ``python scripts/fit_real_judge.py ARGS`` runs
``python -m emlens.studies.fit_real_judge ARGS`` (``--help`` lists them).
"""

from emlens.studies.fit_real_judge import main

if __name__ == "__main__":
    main()
