"""Measure offline judges on real generations labelled by reading (``judge_generations``).

The study is :mod:`emlens.studies.judge_on_generations`: ``python scripts/judge_on_generations.py ARGS`` runs
``python -m emlens.studies.judge_on_generations ARGS`` (``--help`` lists them).
"""

from emlens.studies.judge_on_generations import main

if __name__ == "__main__":
    main()
