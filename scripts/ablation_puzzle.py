"""Why does ablating the mean-difference direction *raise* the organism's log-prob gap?

The study is :mod:`emlens.studies.ablation_puzzle`: ``python scripts/ablation_puzzle.py ARGS`` runs
``python -m emlens.studies.ablation_puzzle ARGS`` (``--help`` lists them).
"""

from emlens.studies.ablation_puzzle import main

if __name__ == "__main__":
    main()
