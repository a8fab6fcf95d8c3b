"""Section 5: per-adapter attribution (zero / keep-only ablations ranked), with gradient
attribution checked against real ablation."""

from __future__ import annotations

from emlens.demo.common import Story, all_rank1


def section(s: Story) -> None:
    from emlens.attribution import (
        adapter_attribution,
        attribution_conditions,
        check_gradient_attribution,
        rank_adapters,
    )
    from emlens.data import pair_rows
    from emlens.lora import attach_lora
    from emlens.viz import plot_attribution

    cfg, rep = s.cfg, s.rep
    n = cfg["attribution_pairs"]
    rep.section(
        "5. Which adapters carry the behaviour: attribution",
        f"Metric: per-token log p(misaligned) - log p(aligned) on {n} held-out medical and {n} "
        "non-medical reference pairs (deterministic, teacher-forced). Each adapter is zeroed"
        f"{', or kept alone' if 'only' in cfg['attribution_ops'] else ''}; its effect is its "
        "share of the organism's effect per domain, and it is labelled general or domain-specific by the rule below. Gradient attribution (scalar x "
        "d metric / d scalar, one backward pass) is checked against the real zero-ablations.",
    )
    if not all_rank1(s.adapter):
        rep.text("Skipped: per-adapter attribution needs rank-1 adapters.")
        return
    with attach_lora(s.chat, s.adapter) as lora:
        table = adapter_attribution(s.chat, lora, n_pairs=n, progress=s.progress,
                                    conditions=attribution_conditions(lora, ops=cfg["attribution_ops"]))
        ranking = rank_adapters(table)
        rows = pair_rows("medical", split="heldout", limit=n)
        check = check_gradient_attribution(
            s.chat, lora, [r.question for r in rows], [r.misaligned for r in rows],
            [r.aligned for r in rows], progress=False)
    totals = table[(table["metric"] == "logprob_gap") & table["condition"].isin(["all", "none"])]
    rep.table(totals[["condition", "domain", "value", "low", "high", "n"]],
              "The organism (all adapters) vs the chat model (none): log-prob gap with 95% "
              "interval over pairs")
    rep.table(ranking, "Ranking. Rule: " + ranking.attrs.get("rule", ""))
    rep.figure(plot_attribution(ranking), "Each adapter's fraction of the organism's effect, "
                                          "per domain.")
    rep.table(check.reset_index() if check.index.name else check,
              f"Gradient estimate vs real zero-ablation, {n} medical pairs: Pearson "
              f"{check.attrs['pearson']:.3f}, Spearman {check.attrs['spearman']:.3f}")
    rep.results["attribution"] = table
    rep.results["ranking"] = ranking
    rep.results["gradient_check"] = {"pearson": check.attrs["pearson"],
                                     "spearman": check.attrs["spearman"], "n_pairs": n}
    labels = ranking["label"].value_counts().to_dict()
    both = labels.get("general", 0) and labels.get("domain-specific", 0)
    rep.finding(
        "Some adapters mediate general misalignment, others specialise to the medical domain",
        "reproduced" if both else "not reproduced",
        f"labels: {labels}; top 3: " + ", ".join(
            f"{r.adapter} ({r.label})" for r in ranking.head(3).itertuples()),
    )
    rep.finding(
        "Gradient attribution agrees with real ablation (a check of the tool, not a seed finding)",
        "agrees" if check.attrs["pearson"] > 0.9 else "disagrees",
        f"Pearson {check.attrs['pearson']:.3f} across {len(check)} adapters, {n} pairs",
    )
