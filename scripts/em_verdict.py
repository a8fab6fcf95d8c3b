"""Is an organism emergently misaligned on general questions? The pre-registered analysis.

The study is :mod:`emlens.studies.em_verdict`: ``python scripts/em_verdict.py ARGS`` runs
``python -m emlens.studies.em_verdict ARGS`` (``--help`` lists them).
"""

from emlens.studies.em_verdict import main

if __name__ == "__main__":
    main()
