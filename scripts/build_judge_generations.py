"""Build the unlabelled set of real generations for judge validation (issue 13).

The study is :mod:`emlens.studies.build_judge_generations`: ``python scripts/build_judge_generations.py ARGS`` runs
``python -m emlens.studies.build_judge_generations ARGS`` (``--help`` lists them).
"""

from emlens.studies.build_judge_generations import main

if __name__ == "__main__":
    main()
