"""Join the reading labels of real generations into a shipped dataset (``judge_generations``).

The study is :mod:`emlens.studies.join_judge_labels`: ``python scripts/join_judge_labels.py ARGS`` runs
``python -m emlens.studies.join_judge_labels ARGS`` (``--help`` lists them).
"""

from emlens.studies.join_judge_labels import main

if __name__ == "__main__":
    main()
