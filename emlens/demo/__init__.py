"""``emlens demo``: the research story on one model and its organisms, written as a report.

One module per section (:mod:`emlens.demo.rates`, ``judge_check``, ``read_verdicts``,
``steering``, ``ablation``, ``probes``, ``attribution``, ``narrow_general``), each a
``measure(ctx, <earlier results>)`` returning a frozen result and a ``render(result, report)`` that only writes to the
:class:`emlens.report.Report`; :func:`run_demo` calls them in order, straight-line, on a frozen
:class:`~emlens.demo.common.Context` (settings as a :class:`~emlens.demo.config.DemoConfig`). The
model is resolved once to its card (:func:`emlens.cards.model_card`: organisms, labelled answers,
judge check, validated judge), which every section reads as ``ctx.card``; any name of an embedded
model gives exactly the same demo.

Sections (each states its sample sizes and intervals):

1. answers and judged misaligned / bad-advice rates: chat model vs organism, sampled at the
   temperature with the most coherent answers by reading (:func:`~emlens.demo.common.
   choose_temperature`; ``temperature=1.0`` is the papers'); then a judge check: the judge's
   agreement with reading on labelled real generations (``emlens/data/judge_check.json``) and
   this run's answers nearest the thresholds; then what was decided on this model before the
   run (:mod:`emlens.demo.read_verdicts`: the card's findings, read blind or loss-side, shipped
   rather than measured, drawn beside the judged verdicts under the ids ``read_<claim>``; the
   shipped one stands where they differ);
2. mean-difference directions both ways (the organism's judged answers; paired reference answers,
   no judge) and their cosine; a steering sweep of the chat model over a fine grid of layers x
   scales read by the likelihood lens (:func:`emlens.experiments.lens_sweep`) on pairs kept out of
   every finding, with the cost to the text's likelihood beside it; only the chosen cell and a
   same-norm random direction are sampled and judged;
3. ablating it in the organism and in a second organism (transfer), and the cosines between the
   directions of the chat model and both organisms (convergence);
4. probes on the organism's LoRA scalars: medical context, misaligned answers (shuffled-label and
   residual-stream baselines);
5. per-adapter attribution: zero / keep-only ablations ranked, and gradient attribution checked
   against real ablation;
6. narrow vs general solutions: efficiency and stability from the shipped runs (or ``train=True``),
   re-measured live on held-out medical answers.

Every core finding (sections 1-3) is measured by two lenses, the judged misaligned rate and the
judge-free likelihood gap on paired answers (:mod:`emlens.demo.lenses`), each beside a same-norm
random control; the finding's verdict names each lens's own verdict (reproduced, opposite sign,
not reproduced, cannot decide). A power section states, per comparison and lens, the n needed to
detect the smallest effect of interest and the minimum detectable effect at the n used.

Output: ``<out>/index.html`` (figures, tables, circuitsvis views under ``<out>/views/``, every
number with its n and interval, and a plain statement of which findings reproduced at this scale)
and ``<out>/results.json``.
"""

from emlens.demo.common import DEFAULTS, QUICK, TRANSFER_ORGANISM
from emlens.demo.config import DemoConfig
from emlens.demo.judge_check import least_sure
from emlens.demo.run import run_demo

__all__ = ["DEFAULTS", "QUICK", "DemoConfig", "TRANSFER_ORGANISM", "least_sure", "run_demo"]
