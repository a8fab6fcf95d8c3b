"""The studies: the analyses behind the results pages, as functions that return their numbers.

One module per study. Each holds the study's functions (each documented with what it reads and
what it returns) and a ``main(argv=None)`` command line, so ``python -m emlens.studies.<name>``
runs it; ``scripts/<name>.py`` in a checkout is the same command. Nothing here is imported by
``import emlens``: a study loads what it needs when it is imported.

Findings:

* :mod:`emlens.studies.em_verdict`: the pre-registered EM verdict on a labelled set of real
  answers (:func:`~emlens.studies.em_verdict.analyse`, :func:`~emlens.studies.em_verdict.markdown`).
* :mod:`emlens.studies.organism_lenses`: each organism against its chat model, by the judge-free
  likelihood lens and the judged lens (:func:`~emlens.studies.organism_lenses.lenses`).
* :mod:`emlens.studies.ablation_puzzle`: why ablating the mean-difference direction raises the
  organism's log-prob gap (:func:`~emlens.studies.ablation_puzzle.measure`).
* :mod:`emlens.studies.probe_report`: probes on the LoRA scalars and per-adapter attribution
  (:func:`~emlens.studies.probe_report.report`).
* :mod:`emlens.studies.narrow_vs_general`: narrow (KL-regularised) vs general solutions, a
  steering vector and rank-1 LoRA: efficiency, stability, trajectories
  (:func:`~emlens.studies.narrow_vs_general.run`).

Labelled answers:

* :mod:`emlens.studies.build_judge_generations`: generate the unlabelled real answers.
* :mod:`emlens.studies.split_for_reading`: cut them into parts for readers, draw the second pass.
* :mod:`emlens.studies.join_judge_labels`: join the readings into a shipped dataset.

Judges:

* :mod:`emlens.studies.fit_judge`: fit the first offline probe judge on hand-written answers.
* :mod:`emlens.studies.fit_real_judge`: fit the default judge on hand-written and real answers.
* :mod:`emlens.studies.judge_on_generations`: candidate judges' feature sets on real answers.
* :mod:`emlens.studies.select_judge`: candidate judges chosen per subject model by grouped
  cross-validation on fit rows, then tested once on held-out questions and the ablation family.
* :mod:`emlens.studies.validate_judge`: a judge against reading on held-out answers.
* :mod:`emlens.studies.judge_digits_error`: an endpoint's digit reading against the exact score.
* :mod:`emlens.studies.judging`: what the judge studies share (the feature cache, real answers
  as fit rows, per-condition rates).
"""
