"""Is an organism emergently misaligned? The judge-free likelihood lens, organism vs chat model.

The study is :mod:`emlens.studies.organism_lenses`: ``python scripts/organism_lenses.py ARGS`` runs
``python -m emlens.studies.organism_lenses ARGS`` (``--help`` lists them).
"""

from emlens.studies.organism_lenses import main

if __name__ == "__main__":
    main()
