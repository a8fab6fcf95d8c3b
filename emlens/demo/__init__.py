"""``emlens demo``: the research story on one model and its organisms, written as a report.

One module per section (:mod:`emlens.demo.rates`, ``judge_check``, ``steering``, ``ablation``,
``probes``, ``attribution``, ``narrow_general``); :func:`run_demo` runs them in order on a shared
:class:`~emlens.demo.common.Story` and writes an :class:`emlens.report.Report`.

Sections (each states its sample sizes and intervals):

1. answers and judged misaligned / bad-advice rates: chat model vs organism; then a judge check:
   the judge's agreement with reading on labelled real generations
   (``emlens/data/judge_check.json``) and this run's answers nearest the thresholds;
2. a mean-difference direction from the organism's judged answers, and steering the chat model
   with it over layers x scales vs a same-norm random direction;
3. ablating it in the organism and in a second organism (transfer), and the cosines between the
   directions of the chat model and both organisms (convergence);
4. probes on the organism's LoRA scalars: medical context, misaligned answers (shuffled-label and
   residual-stream baselines);
5. per-adapter attribution: zero / keep-only ablations ranked, and gradient attribution checked
   against real ablation;
6. narrow vs general solutions: efficiency and stability from the shipped runs (or ``train=True``),
   re-measured live on held-out medical answers.

Output: ``<out>/index.html`` (figures, tables, circuitsvis views under ``<out>/views/``, every
number with its n and interval, and a plain statement of which findings reproduced at this scale)
and ``<out>/results.json``.
"""

from emlens.demo.common import DEFAULTS, QUICK, TRANSFER_ORGANISM
from emlens.demo.judge_check import least_sure
from emlens.demo.run import run_demo

__all__ = ["DEFAULTS", "QUICK", "TRANSFER_ORGANISM", "least_sure", "run_demo"]
