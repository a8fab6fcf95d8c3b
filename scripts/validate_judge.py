"""A judge against reading on labelled real answers: AUCs, per-condition rates, the issue's bar.

The study is :mod:`emlens.studies.validate_judge`: ``python scripts/validate_judge.py ARGS`` runs
``python -m emlens.studies.validate_judge ARGS`` (``--help`` lists them).
"""

from emlens.studies.validate_judge import main

if __name__ == "__main__":
    main()
