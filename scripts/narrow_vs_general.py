"""Narrow vs general solutions (steering vector and rank-1 LoRA, with and without the KL term).

The study is :mod:`emlens.studies.narrow_vs_general`: ``python scripts/narrow_vs_general.py ARGS``
runs ``python -m emlens.studies.narrow_vs_general ARGS`` (``--help`` lists them).
"""

from emlens.studies.narrow_vs_general import main

if __name__ == "__main__":
    main()
