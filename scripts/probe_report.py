"""Probes on the shipped organism's LoRA scalars, and per-adapter attribution (issue 6).

The study is :mod:`emlens.studies.probe_report`: ``python scripts/probe_report.py ARGS`` runs
``python -m emlens.studies.probe_report ARGS`` (``--help`` lists them).
"""

from emlens.studies.probe_report import main

if __name__ == "__main__":
    main()
