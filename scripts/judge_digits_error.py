"""How far an endpoint's reading of a digit-splitting judge is from the exact score.

The study is :mod:`emlens.studies.judge_digits_error`: ``python scripts/judge_digits_error.py ARGS`` runs
``python -m emlens.studies.judge_digits_error ARGS`` (``--help`` lists them).
"""

from emlens.studies.judge_digits_error import main

if __name__ == "__main__":
    main()
