"""Test seams kept out of the public signatures: run an emlens function with a stand-in."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from unittest import mock

import emlens.attribution
import emlens.evaluation
import emlens.experiments


def load_file(path: Path) -> ModuleType:
    """A module imported from its file: the scripts and build scripts outside the package."""
    spec = importlib.util.spec_from_file_location(f"emlens_file_{path.parent.name}_{path.stem}",
                                                  path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def with_generate(fake, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` with ``emlens.evaluate``'s call to ``generate`` replaced by ``fake``
    (called as ``fake(model, prompts, sampling=..., interventions=..., progress=...)``)."""
    with mock.patch.object(emlens.evaluation, "generate", fake):
        return fn(*args, **kwargs)


def with_evaluate(fake, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` with the experiments' and attribution's ``evaluate`` replaced by
    ``fake`` (same signature as :func:`emlens.evaluate`)."""
    with mock.patch.object(emlens.experiments, "evaluate", fake), \
            mock.patch.object(emlens.attribution, "evaluate", fake):
        return fn(*args, **kwargs)
