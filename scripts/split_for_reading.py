"""Split a blind ``to_label.jsonl`` into parts for several readers, and draw the second-pass sample.

The study is :mod:`emlens.studies.split_for_reading`: ``python scripts/split_for_reading.py ARGS`` runs
``python -m emlens.studies.split_for_reading ARGS`` (``--help`` lists them).
"""

from emlens.studies.split_for_reading import main

if __name__ == "__main__":
    main()
