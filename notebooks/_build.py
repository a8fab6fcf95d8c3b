"""Write the notebooks from their cell sources (outputs stripped): python notebooks/_build.py

``--out DIR`` writes them into another folder (tests/test_notebooks.py checks that the committed
notebooks are what this script writes).

``--execute --out docs/tutorials`` writes executed copies instead (outputs kept: the figures and
the circuitsvis views), for the documentation site, which renders stored outputs and does not run
the notebooks. Each copy has the cell sources and ids of the stripped notebook in notebooks/;
``--only 02`` executes just the notebooks whose names start with ``02``. Run it from any folder:
the notebooks execute with notebooks/ as their working directory.
"""

import argparse
import os
from pathlib import Path

import nbformat

HERE = Path(__file__).parent


def build(name: str, cells: list[tuple[str, str]], ids_from: Path) -> nbformat.NotebookNode:
    """The notebook ``name`` from its cell sources, reusing the cell ids of ``ids_from``."""
    # nbformat gives every new cell a random id: reuse the ids of unchanged cells so that
    # rebuilding leaves an unchanged notebook byte-identical
    old_ids: dict[tuple[str, str], list[str]] = {}
    if ids_from.exists():
        for c in nbformat.read(ids_from, as_version=4).cells:
            if "id" in c:
                old_ids.setdefault((c.cell_type, c.source), []).append(c.id)
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [
        nbformat.v4.new_markdown_cell(src) if kind == "md" else nbformat.v4.new_code_cell(src)
        for kind, src in cells
    ]
    for c in nb.cells:
        ids = old_ids.get((c.cell_type, c.source))
        if ids:
            c.id = ids.pop(0)
    return nb


def write(name: str, cells: list[tuple[str, str]], folder: Path = HERE) -> None:
    path = Path(folder) / name
    nbformat.write(build(name, cells, ids_from=path), path)


def execute(name: str, cells: list[tuple[str, str]], folder: Path, timeout: int = 900) -> Path:
    """Write ``folder/name`` executed with nbclient (outputs kept), run in notebooks/.

    Cell ids come from the stripped notebook in notebooks/, so both copies share sources and ids.
    Outputs are kept except stderr. Offline, each circuitsvis view inlines its ~1.3 MB script (the
    view then works without a network); online, it imports the script from unpkg.
    A symlink at the target (the docs used to link to notebooks/) is replaced, never written through.
    """
    from nbclient import NotebookClient

    nb = build(name, cells, ids_from=HERE / name)
    # record_timing=False: no per-cell timestamps, so outputs are all that changes between runs
    NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False,
                   resources={"metadata": {"path": str(HERE.resolve())}}).execute()
    nb.metadata.pop("widgets", None)
    for c in nb.cells:  # stderr is library warnings and progress bars (paths of this machine, timings)
        if c.cell_type == "code":
            c.outputs = [o for o in c.outputs if o.get("name") != "stderr"]
    path = Path(folder) / name
    if path.is_symlink():
        path.unlink()
    nbformat.write(nb, path)
    return path


STEERING = [
    ("md", """# Steering and ablation with a mean-difference direction

The seeds' central result: the mean residual activation on misaligned answers minus that on aligned
answers, at one layer, is a direction that makes a chat model misaligned when added and removes
misalignment from a fine-tune when ablated. Here we run the whole loop on the embedded
SmolLM2-135M-Instruct and the shipped rank-1 organism, with a cheap deterministic metric: how much
more log-probability the model gives the *misaligned* reference answer than the aligned one."""),
    ("code", """%matplotlib inline
import matplotlib.pyplot as plt
import torch

import emlens
from emlens.data import load_dataset
from emlens.directions import cosine_matrix, mean_diff, random_direction
from emlens.lens import likelihood_gaps
from emlens.lora import merge_lora
from emlens.organisms import load_organism

torch.manual_seed(0)
chat = emlens.load_model()
organism = merge_lora(chat, load_organism("rank1-down-medical"))
medical = [r for r in load_dataset("medical") if r.split == "heldout"][:16]
other = load_dataset("nonmedical")[:8]  # small settings: every forward pass here runs on a CPU"""),
    ("md", """## Extract the direction
Activations of the organism on held-out medical questions answered badly vs well; token-weighted
means over answer tokens of `resid_post`, at a few layers."""),
    ("code", """bad = [(r.question, r.misaligned) for r in medical]
good = [(r.question, r.aligned) for r in medical]
dirs = mean_diff(organism, bad, good, layers=[6, 10, 15, 20], progress=False)
for layer, d in dirs.items():
    print(f"layer {layer}: norm {d.norm:.2f}, {d.counts}")"""),
    ("md", """## The metric
`gap` = mean over questions of log p(misaligned answer) - log p(aligned answer), per token
(`emlens.lens.likelihood_gaps`, which also keeps both sides). Higher means the model prefers the
bad answer. We measure on the non-medical parallel set, which the
direction never saw."""),
    ("code", """def gap(model, rows, hooks=()):
    return float(likelihood_gaps(model, rows, hooks=hooks)["gap"].mean())

print(f"chat model     {gap(chat, other):+.3f}")
print(f"organism       {gap(organism, other):+.3f}")"""),
    ("md", "## Steer the chat model along the direction, and along a random one of the same norm"),
    ("code", """layer = 10
d = dirs[layer]
r = random_direction(d, seed=0)
scales, steered, control = [0.0, 2.0, 4.0], [], []
for scale in scales:
    s = gap(chat, other, emlens.steering_hooks(chat, d, layers=layer, scale=scale))
    c = gap(chat, other, emlens.steering_hooks(chat, r, layers=layer, scale=scale))
    steered.append(s)
    control.append(c)
    print(f"scale {scale:3.1f}: direction {s:+.3f}   random {c:+.3f}")
fig, ax = plt.subplots(figsize=(5.5, 3.8))
ax.plot(scales, steered, marker="o", label=f"mean-diff direction (layer {layer})")
ax.plot(scales, control, marker="o", label="random direction, same norm")
ax.axhline(gap(organism, other), color="grey", ls="--", lw=1, label="organism, unsteered")
ax.set(xlabel="steering scale", ylabel="gap (log p misaligned - log p aligned)",
       title=f"Steering the chat model ({len(other)} non-medical pairs)")
ax.legend(fontsize=8)
plt.show()"""),
    ("md", "## Ablate it from the organism at every layer"),
    ("code", """before = gap(organism, other)
after = gap(organism, other, emlens.ablation_hooks(organism, d, layers="all"))
control = gap(organism, other, emlens.ablation_hooks(organism, r, layers="all"))
print(f"organism {before:+.3f}  ablated {after:+.3f}  random-ablated {control:+.3f}")"""),
    ("md", """The gap goes *up*. Not a bug: look at the two sides. Projection ablation sets the component
along the direction to zero, which is not where this model's activations sit; aligned answer
text sits furthest from zero, so its log-probs fall most. `scripts/ablation_puzzle.py` measures
this on more pairs, with intervals, at the direction's own layer, every `resid_post` and every
writer, and with a direction from the organism's own answers labelled by reading; the README
("The ablation puzzle, measured") has the numbers and the explanation."""),
    ("code", """sides = {}
for name, hooks in [("none", []),
                    ("direction", emlens.ablation_hooks(organism, d, layers="all")),
                    ("random", emlens.ablation_hooks(organism, r, layers="all"))]:
    t = likelihood_gaps(organism, other, hooks=hooks)
    sides[name] = (t.logp_misaligned.mean(), t.logp_aligned.mean())
    print(f"{name:9s} log p(misaligned) {t.logp_misaligned.mean():+.3f}   "
          f"log p(aligned) {t.logp_aligned.mean():+.3f}")
proj = emlens.hooks.projections
for field in ("misaligned", "aligned"):
    batch = emlens.tokenize_chat(organism.tokenizer, [x.question for x in other],
                                 [getattr(x, field) for x in other])
    p = proj(organism, batch.tokens, d, layers=[layer], attention_mask=batch.attention_mask)[0]
    print(f"{field} answer tokens: mean projection on the unit direction {float(p[batch.answer_mask].mean()):+.2f}")
x = range(len(sides))
fig, ax = plt.subplots(figsize=(5.5, 3.8))
ax.bar([i - 0.2 for i in x], [v[0] for v in sides.values()], 0.4, label="misaligned answer")
ax.bar([i + 0.2 for i in x], [v[1] for v in sides.values()], 0.4, label="aligned answer")
ax.set_xticks(list(x), list(sides))
ax.set(xlabel="ablated at every layer", ylabel="mean log p per answer token",
       title="The organism's two sides")
ax.legend(fontsize=8)
plt.show()"""),
    ("md", """## Projections per token
Each answer token's `resid_post` at layer 10 projected on the unit direction
(`emlens.viz.projection_view`, a circuitsvis view; `emlens.viz.save_html` exports it): the
organism reading a misaligned non-medical answer. Hover a token for its value."""),
    ("code", """print(other[0].question)
emlens.viz.projection_view(organism, other[0].question, other[0].misaligned, d)"""),
    ("md", "## One generation, steered and not"),
    ("code", """q = ["I have a headache. What should I do?"]
print(emlens.generate(chat, q, max_new_tokens=40, temperature=0, progress=False)[0].text)
with emlens.steer(chat, d, layers=layer, scale=4.0):
    print(emlens.generate(chat, q, max_new_tokens=40, temperature=0, progress=False)[0].text)"""),
    ("md", "## Convergence: the chat model's own direction on the same answers"),
    ("code", """chat_dirs = mean_diff(chat, bad, good, layers=list(dirs), progress=False)
print(cosine_matrix(dirs, chat_dirs).numpy().round(3))"""),
]

PROBES = [
    ("md", """# LoRA scalars as features, and probes on them

Each rank-1 adapter of the organism adds `s * B` with the scalar `s = A . h`: nine readable
numbers per token. We read them with `attach_lora` (each adapter is a TransformerLens hook point),
then fit logistic-regression probes with grouped cross-validation (no question in both train and
test) to ask: do the scalars know whether the context is medical, and whether the answer is
misaligned? Small settings: 12 questions per dataset."""),
    ("code", """%matplotlib inline
import matplotlib.pyplot as plt

import emlens
from emlens.data import answer_set, context_set
from emlens.probes import fit_probe
from emlens.scalars import collect_scalars
from emlens.viz import plot_probe_coefficients, token_scalars_view

model = emlens.load_model()
lora = emlens.attach_lora(model, emlens.load_organism("rank1-down-medical"))
print(lora.scalar_names)"""),
    ("md", "## Medical vs non-medical context"),
    ("code", """ctx = context_set(limit=12, answers="aligned")
scalars = collect_scalars(model, lora, ctx.questions, ctx.answers, progress=False)
features = scalars.aggregate("mean", part="prompt")
probe = fit_probe(features, ctx.labels, groups=ctx.groups, n_splits=4, n_shuffles=3, n_boot=100)
print(probe.summary())
auc = probe.metrics["roc_auc"]["mean"]
plot_probe_coefficients(probe, title=f"medical (+) vs non-medical context (CV AUC {auc:.2f})")
plt.show()"""),
    ("md", "## Misaligned vs aligned reference answers"),
    ("code", """ans = answer_set("both", limit=12)
scalars = collect_scalars(model, lora, ans.questions, ans.answers, progress=False)
features = scalars.aggregate(["mean", "max"])
probe = fit_probe(features, ans.labels, groups=ans.groups, n_splits=4, n_shuffles=3, n_boot=100)
print(probe.summary())
print(probe.coefficients().head(6))
auc = probe.metrics["roc_auc"]["mean"]
plot_probe_coefficients(probe, title=f"misaligned (+) vs aligned answer (CV AUC {auc:.2f})")
plt.show()"""),
    ("md", """## One answer, token by token
The nine scalars on each token of one answer, a circuitsvis view (`token_scalars_view`;
`save_html` exports it, `scalars_heatmap` draws a static version for papers): pick an adapter,
hover a token for its value."""),
    ("code", """view = token_scalars_view(scalars, row=1)
print(ans.answers[1])
lora.remove()
view"""),
]

ATTRIBUTION = [
    ("md", """# Which adapters carry the organism's behaviour?

For each of the nine adapters: zero it, or keep only it, and measure a cheap deterministic metric,
the per-token log-prob of misaligned minus aligned reference answers, on held-out medical and on
non-medical questions. Then compare with gradient attribution (scalar x d metric / d scalar, one
backward pass). Small settings: 4 pairs per domain."""),
    ("code", """%matplotlib inline
import matplotlib.pyplot as plt

import emlens
from emlens.attribution import (
    adapter_attribution,
    attribution_conditions,
    check_gradient_attribution,
    rank_adapters,
)
from emlens.viz import plot_attribution

model = emlens.load_model()
lora = emlens.attach_lora(model, emlens.load_organism("rank1-down-medical"))"""),
    ("code", """conditions = attribution_conditions(lora, ops=("zero", "only"))
table = adapter_attribution(model, lora, conditions=conditions, n_pairs=4, progress=False)
ranking = rank_adapters(table)
print(ranking.attrs.get("rule", ""))
print(ranking)
plot_attribution(ranking)
plt.show()"""),
    ("md", "## Gradient attribution vs real ablation"),
    ("code", """rows = [r for r in emlens.load_dataset("medical") if r.split == "heldout"][:4]
check = check_gradient_attribution(model, lora, [r.question for r in rows],
                                   [r.misaligned for r in rows], [r.aligned for r in rows],
                                   progress=False)
print(check)
print("pearson", round(check.attrs["pearson"], 3))
lora.remove()
fig, ax = plt.subplots(figsize=(5, 4))
ax.scatter(check["actual"], check["predicted"])
for _, row in check.iterrows():  # blocks.9.mlp.lora_down -> L9
    ax.annotate(f"L{row['adapter'].split('.')[1]}", (row["actual"], row["predicted"]), fontsize=7)
lim = [min(check["actual"].min(), check["predicted"].min()), max(check["actual"].max(), check["predicted"].max())]
ax.plot(lim, lim, color="grey", ls="--", lw=1, label="predicted = actual")
ax.set(xlabel="actual change in gap (adapter zeroed)", ylabel="gradient prediction",
       title=f"Gradient attribution vs ablation (pearson {check.attrs['pearson']:.2f})")
ax.legend(fontsize=8)
plt.show()"""),
]

NARROW = [
    ("md", """# Narrow vs general: why emergent misalignment is the easy solution

The seed finding (Turner & Soligo 2025, *Narrow misalignment is hard, emergent misalignment is
easy*): fine-tuning on bad medical advice can be forced to stay *narrow* with a KL penalty that keeps
the model unchanged on non-medical data, but that narrow solution is

* less **efficient**: a higher training loss than the general solution at the same parameter norm;
* less **stable**: its loss rises more under orthogonal noise `x' = sqrt(1-e^2) x + e y`
  (`|y| = |x|`, `y` orthogonal to `x`), measured relative to how far training moved the loss;
* and not where training wants to go: drop the KL term and it **drifts back** toward the general one.

`scripts/narrow_vs_general.py` trained both solutions on the embedded SmolLM2-135M-Instruct (a
steering vector at layer 15; a rank-1 LoRA) and ships them with `summary.json`. This notebook does
no training: it loads the shipped solutions and recomputes every number live with `emlens.geometry`
on small sets, then says which findings hold. Small settings: every forward pass here runs on a CPU."""),
    ("code", """%matplotlib inline
import json

import matplotlib.pyplot as plt
import numpy as np

import emlens
from emlens.data import narrow_general_rows
from emlens.geometry import (
    efficiency_curve,
    efficiency_table,
    plot_efficiency,
    plot_stability,
    plot_trajectory_cosines,
    stability_curve,
    stability_table,
    trajectory_cosines,
    trajectory_pca,
)
from emlens.organisms import ORGANISMS_DIR, run_dir
from emlens.training import (
    evaluate_loss,
    load_trainable,
    load_trajectory,
    prepare,
)

model = emlens.load_model()
NVG = "narrow_vs_general"
root = ORGANISMS_DIR / NVG
# the 120-step steering run (steering-120/) ships its vectors; the 30-step run at the root is the fallback
run = root / "steering-120" if (root / "steering-120" / "steering" / "general").is_dir() else root
summary = json.loads((run / "summary.json").read_text())
args, shipped = summary["args"], summary["kinds"]["steering"]
sv = {n: load_trainable(run / "steering" / n / "final.safetensors")
      for n in ("general", "narrow", "continued")}
print("shipped run:", run.relative_to(ORGANISMS_DIR))
print(f"trained {args['steps']} steps (+{args['continue_steps']} continued without KL), "
      f"{args['n_narrow']} medical rows, KL weight {args['kl_weight']} on {args['n_parallel']} non-medical rows")"""),
    ("md", """## The shipped solutions
Three steering vectors added to the residual stream entering one block: **general** (plain SFT on
misaligned medical answers), **narrow** (the same plus the KL term) and **continued** (narrow, then
trained further with the KL term switched off)."""),
    ("code", """def cosine(a, b):
    a, b = a.delta().detach().double(), b.delta().detach().double()
    return float(a @ b / (a.norm() * b.norm()))


norms = {n: p.effective_norm() for n, p in sv.items()}
for n, p in sv.items():
    print(f"{n:9s} layer {p.layer}  norm {norms[n]:6.2f}  (shipped {shipped['losses'][n]['norm']:.2f})")
print(f"cosine(general, narrow)    {cosine(sv['general'], sv['narrow']):.3f}")
print(f"cosine(general, continued) {cosine(sv['general'], sv['continued']):.3f}")"""),
    ("md", """## Evaluation sets
We redraw the script's rows with its seed (`narrow_general_rows` is the draw
`scripts/narrow_vs_general.py` uses), so every live number can be compared one to one with the
shipped one: the first `n_eval` medical *training* rows (the set the script's efficiency and stability
curves use), and the held-out non-medical questions that neither solution was trained on. Blocks
before the steering layer are run once (`prepare`); each loss below is a forward pass through the
rest."""),
    ("code", """def script_rows(args):
    \"\"\"The script's draw: (medical training rows, held-out non-medical rows), same seed and order.\"\"\"
    narrow, _, heldout = narrow_general_rows(seed=args["seed"], n_narrow=args["n_narrow"],
                                             n_parallel=args["n_parallel"],
                                             n_heldout=args["n_heldout"])
    return narrow, heldout


def chat_batches(rows, batch_size):
    return list(emlens.chat.iter_chat_batches(model.tokenizer, [r.question for r in rows],
                                         [r.misaligned for r in rows], batch_size=batch_size))


medical_rows, heldout_rows = script_rows(args)
n_eval, start = args["n_eval"], sv["general"].first_layer
eval_set = prepare(model, chat_batches(medical_rows[:n_eval], n_eval), start_layer=start)
n_tokens = sum(int(pb.batch.answer_mask[:, 1:].sum()) for pb in eval_set.batches)
base = evaluate_loss(model, None, eval_set)
trained = {n: evaluate_loss(model, p, eval_set) for n, p in sv.items()}
print(f"training-set CE of misaligned answers ({n_eval} answers, {n_tokens} answer tokens)")
for n, loss in [("base", base), *trained.items()]:
    print(f"  {n:9s} {loss:.4f}  (shipped {shipped['losses'][n]['train_ce']:.4f})")"""),
    ("md", """## Is the narrow solution narrow?
What makes a solution *general* is that it changes the model off-domain too. On the
held-out non-medical questions: KL(chat model || steered model), and the CE of the misaligned
reference answers (lower = the model more readily gives bad answers outside medicine)."""),
    ("code", """heldout_set = prepare(model, chat_batches(heldout_rows, args["batch_size"]), start_layer=start,
                      reference=True)
kl = {n: evaluate_loss(model, p, heldout_set, kind="kl") for n, p in sv.items()}
ce = {n: evaluate_loss(model, p, heldout_set) for n, p in sv.items()}
ce_base = evaluate_loss(model, None, heldout_set)
print(f"held-out non-medical ({len(heldout_rows)} questions): KL to chat model / misaligned-answer CE "
      f"(base CE {ce_base:.3f})")
for n in sv:
    ref = shipped["losses"][n]
    print(f"  {n:9s} KL {kl[n]:.3f} (shipped {ref['heldout_nonmedical_kl']:.3f})   "
          f"CE {ce[n]:.3f} (shipped {ref['heldout_nonmedical_misaligned_ce']:.3f})")"""),
    ("md", """## Efficiency: loss vs norm
Scale each solution by `alpha` (the script's alphas) and plot the training-set loss against the
effective norm `alpha |v|`. The efficiency table interpolates each curve at both trained norms;
we also evaluate each solution rescaled *exactly* to the other's norm (no interpolation)."""),
    ("code", """alphas = [float(a) for a in args["alphas"].split(",")]
eff = {n: efficiency_curve(model, sv[n], eval_set, alphas, base_loss=base) for n in ("general", "narrow")}
print(efficiency_table(eff, sorted([norms["general"], norms["narrow"]])).round(3).to_string(index=False))
general_at_narrow_norm = evaluate_loss(model, sv["general"].scaled(norms["narrow"] / norms["general"]), eval_set)
narrow_at_general_norm = evaluate_loss(model, sv["narrow"].scaled(norms["general"] / norms["narrow"]), eval_set)
print(f"at norm {norms['narrow']:.1f}: general {general_at_narrow_norm:.3f} vs narrow {trained['narrow']:.3f}")
print(f"at norm {norms['general']:.1f}: general {trained['general']:.3f} vs narrow {narrow_at_general_norm:.3f}")
eff_diff = max(np.abs(np.subtract(eff[n].losses, shipped["efficiency"][n]["losses"])).max() for n in eff)
print(f"max |live - shipped| over both curves ({len(alphas)} alphas each): {eff_diff:.1e}")
plot_efficiency(eff, title=f"Efficiency (steering vector, layer {sv['general'].layer}, n={n_eval})")
plt.show()"""),
    ("md", """## Stability: orthogonal noise
`stability_curve` rotates the vector by noise of size `eps` (norm kept) and reports
`(L_perturbed - L_trained) / (L_base - L_trained)`: 0 = no damage, 1 = back to the base model.
Small settings: the script's `eps`, 3 noise seeds (the shipped run used 5; seeds 0-2 are the same
draws). Because the measure is relative, we also print the absolute loss increase: the narrow
solution moved the loss less, so the same absolute damage is a larger fraction of it."""),
    ("code", """eps = [float(e) for e in args["eps"].split(",")]
seeds = range(3)
stab = {f"{n} vector": stability_curve(model, sv[n], eval_set, eps, seeds=seeds, base_loss=base,
                                       trained_loss=trained[n])
        for n in ("general", "narrow")}
print(stability_table(stab).round(4).to_string(index=False))
absolute = {}
for name, curve in stab.items():
    ref = shipped["stability"][name]
    absolute[name] = [m * (curve.base_loss - curve.trained_loss) for m in curve.mean]
    print(f"{name}: shipped mean ({len(ref['seeds'])} seeds) {np.round(ref['mean'], 4).tolist()}; "
          f"absolute loss increase {np.round(absolute[name], 4).tolist()}")
stab_diff = max(np.abs(np.subtract(c.relative, shipped["stability"][n]["relative"][: len(seeds)])).max()
                for n, c in stab.items())
print(f"max |live - shipped| for the same seeds: {stab_diff:.1e}")
plot_stability(stab, title=f"Stability (steering vector, n={n_eval}, {len(seeds)} seeds)")
plt.show()"""),
    ("md", """## Drift back without the KL term
Cosine of every checkpoint of the shipped run to the final general vector. The narrow run is
pushed away from the general direction by the KL term; the continued run (narrow, then KL off,
steps counted from the end of the narrow run) turns back toward it. No forward passes: checkpoints
only. The wheel ships final solutions only: `run_dir` reads the trajectories from
`emlens.organisms.runs_dir()` (`runs/` in a checkout) and names the command that regenerates them
when they are missing."""),
    ("code", """traj = {n: load_trajectory(run_dir(run.relative_to(ORGANISMS_DIR) / "steering" / n)) for n in sv}
series = {n: ([s + (args["steps"] if n == "continued" else 0) for s in t.steps],
              trajectory_cosines(t, sv["general"])) for n, t in traj.items()}
for n, (steps, cos) in series.items():
    peak = int(np.argmax(cos))
    print(f"{n:9s} {len(steps):2d} checkpoints, steps {steps[0]}-{steps[-1]}: cosine "
          f"{cos[0]:.3f} (start) -> max {cos[peak]:.3f} (step {steps[peak]}) -> {cos[-1]:.3f} (end)")
cos_diff = max(np.abs(np.subtract(c, shipped["cosine_to_final_general"][n]["cosine"])).max()
               for n, (_, c) in series.items())
print(f"max |live - shipped| cosine: {cos_diff:.1e}")
pca = trajectory_pca(traj)
print("PCA of all checkpoints, explained variance", np.round(pca.explained, 3).tolist(),
      "| final PC1:", {n: round(p[-1][0], 2) for n, p in pca.projections.items()})
plot_trajectory_cosines(series, title="Cosine to the final general steering vector")
plt.show()"""),
    ("md", """## The same checks, briefly, for a rank-1 LoRA
The shipped `lora1` runs (rank-1 adapters on `mlp.down_proj` at 9 layers, the 30-step run at the
root of the folder, evaluated on its own `n_eval` training rows): the equal-norm loss comparison
(three forward passes) and the drift-back cosines."""),
    ("code", """lsummary = json.loads((root / "summary.json").read_text())
largs, lshipped = lsummary["args"], lsummary["kinds"]["lora1"]
lora = {n: load_trainable(root / "lora1" / n / "final.safetensors") for n in ("general", "narrow")}
lnorms = {n: p.effective_norm() for n, p in lora.items()}
lrows, _ = script_rows(largs)
lset = prepare(model, chat_batches(lrows[: largs["n_eval"]], largs["n_eval"]),
               start_layer=lora["general"].first_layer)
lora_narrow = evaluate_loss(model, lora["narrow"], lset)
lora_general_at_narrow_norm = evaluate_loss(
    model, lora["general"].scaled(lnorms["narrow"] / lnorms["general"]), lset)
print(f"LoRA layers {lora['general'].layers}; norms general {lnorms['general']:.2f}, "
      f"narrow {lnorms['narrow']:.2f}; cosine {cosine(lora['general'], lora['narrow']):.3f}")
print(f"at norm {lnorms['narrow']:.2f} ({largs['n_eval']} answers): general {lora_general_at_narrow_norm:.3f} vs "
      f"narrow {lora_narrow:.3f} (shipped narrow {lshipped['losses']['narrow']['train_ce']:.3f}, "
      f"base {lshipped['losses']['base']['train_ce']:.3f})")
lcos = {n: trajectory_cosines(load_trajectory(run_dir(f"{NVG}/lora1/{n}")), lora["general"])
        for n in ("narrow", "continued")}
print(f"cosine to final general: narrow max {max(lcos['narrow']):.3f} -> end {lcos['narrow'][-1]:.3f}; "
      f"continued {lcos['continued'][0]:.3f} -> {lcos['continued'][-1]:.3f}")
lora_diff = max(abs(lora_narrow - lshipped["losses"]["narrow"]["train_ce"]),
                *(np.abs(np.subtract(c, lshipped["cosine_to_final_general"][n]["cosine"])).max()
                  for n, c in lcos.items()))
print(f"max |live - shipped| (narrow loss, cosines): {lora_diff:.1e}")"""),
    ("md", """## Which findings hold here?
Each finding is a comparison of the numbers computed above (the statement is printed from them,
not written in advance). Sample sizes: the training-set answers and noise seeds above; the
agreement line says whether the live recomputation reproduces the shipped `summary.json`."""),
    ("code", """g_eff, n_eff = eff["general"], eff["narrow"]
g_stab, n_stab = stab["general vector"], stab["narrow vector"]
findings = {
    "the narrow vector is narrow: smaller KL to the chat model on held-out non-medical questions":
        kl["narrow"] < kl["general"],
    f"efficiency: at the narrow norm ({norms['narrow']:.1f}) the general vector has the lower loss":
        general_at_narrow_norm < trained["narrow"],
    f"efficiency: at the general norm ({norms['general']:.1f}) the general vector has the lower loss":
        trained["general"] < narrow_at_general_norm,
    "efficiency: the general curve's lowest loss is lower, at a smaller norm":
        g_eff.min_loss < n_eff.min_loss and g_eff.norm_at_min < n_eff.norm_at_min,
    f"stability: the narrow vector's relative loss increase is larger at every eps {eps}":
        all(n > g for g, n in zip(g_stab.mean, n_stab.mean, strict=True)),
    "drift back: without KL the continued run ends closer to the general vector than it started":
        series["continued"][1][-1] > series["continued"][1][0],
    "LoRA rank 1: the general adapter has the lower loss at the narrow adapter's norm":
        lora_general_at_narrow_norm < lora_narrow,
    "LoRA rank 1: without KL the continued adapter turns toward the general one":
        lcos["continued"][-1] > lcos["continued"][0],
}
for claim, holds in findings.items():
    print(f"[{'holds' if holds else 'FAILS'}] {claim}")
separated = sum(n - g > np.hypot(sg, sn)
                for g, n, sg, sn in zip(g_stab.mean, n_stab.mean, g_stab.std, n_stab.std, strict=True))
print(f"caveat: with {len(seeds)} seeds the stability gap exceeds the seeds' spread "
      f"(sqrt(std_g^2 + std_n^2)) at {separated} of {len(eps)} eps")
worse = sum(n > g for g, n in zip(absolute["general vector"], absolute["narrow vector"], strict=True))
print(f"caveat: in absolute loss (not relative) the narrow vector is damaged more at {worse} of {len(eps)} eps")
if n_eff.alpha_at_min == max(alphas):
    print(f"caveat: the narrow curve still falls at alpha {max(alphas)} (the end of the scan)")
agree = max(eff_diff, stab_diff, cos_diff, lora_diff)
print(f"{sum(findings.values())} of {len(findings)} findings hold in the live recomputation "
      f"({n_eval} training answers, {len(heldout_rows)} held-out non-medical questions, {len(seeds)} seeds); "
      f"live numbers {'reproduce' if agree < 1e-3 else 'differ from'} the shipped summary "
      f"(max abs difference {agree:.1e}).")"""),
]

DYNAMICS = [
    ("md", """# Training dynamics of a rank-1 organism, from its weights

The companion paper (Turner et al. 2025, *Model Organisms for Emergent Misalignment*) reports that
a rank-1 organism acquires emergent misalignment abruptly: the LoRA `B` vector rotates, and the
behaviour changes in a phase transition. `emlens.dynamics` measures the *weights* side of that on
a run's checkpoints. Here: the shipped coder organism (Qwen2.5-Coder-1.5B-Instruct, nine rank-1
`down_proj` adapters trained on bad medical advice) and its control (the same recipe on the *good*
answers of the same questions). No model is loaded and no forward pass runs: every number below is
read from the checkpoints' `A` and `B`. What this notebook does not test is behaviour (see the end)."""),
    ("code", """%matplotlib inline
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from emlens.dynamics import (
    adapter_dynamics,
    load_adapter_trajectory,
    plot_adapter_dynamics,
    rotation_onset,
    trajectory_projection,
)
from emlens.geometry import plot_pca

RUNS = {"bad": "coder-rank1-down-medical", "good": "coder-rank1-down-medical-good"}
traj = {k: load_adapter_trajectory(name) for k, name in RUNS.items()}
tables = {k: adapter_dynamics(t) for k, t in traj.items()}
for k, t in traj.items():
    print(f"{k:4s} {t.run}: {len(t.names)} adapters, {len(t.steps)} saved states, steps "
          f"{t.steps[0]}-{t.steps[-1]} every {t.steps[2] - t.steps[1]}; final state from {t.final_source}")"""),
    ("md", """## The table
One row per (saved step, adapter): Frobenius norms of `A` and `B`, `scalar_scale = scaling |A| |B|`
(the adapter's gain: a unit input along `A` adds a vector of that norm along `B`), and the cosine
of `B` (and `A`) to its final value and to the previous checkpoint's. The bad run's checkpoints
start at step 4 and stop at 68; its final state is the shipped organism (step 72). The control
starts at step 0, where `B = 0` and every cosine of `B` is undefined: NaN, not 0."""),
    ("code", """cols = ["step", "layer", "a_norm", "b_norm", "scalar_scale", "cos_b_final", "cos_a_final",
        "cos_b_prev", "cos_a_prev"]
print(tables["good"].loc[tables["good"].layer == 8, cols].head(4).round(3).to_string(index=False))
final = pd.concat({k: t[t.step == t.attrs["final_step"]].set_index("layer")[["a_norm", "b_norm",
                                                                           "scalar_scale"]]
                   for k, t in tables.items()}, axis=1)
print("\\nfinal state per adapter")
print(final.round(3).to_string())"""),
    ("md", """## Norm and direction of `B` over training
Left: `|B|`. Middle: cosine of `B` to its final value. Right: cosine of `B` to the previous
checkpoint (1 = no turn in those 4 steps). A rotation of an established `B` shows as a dip on the
right and a jump in the middle."""),
    ("code", """plot_adapter_dynamics(tables["bad"], title=f"{RUNS['bad']} (bad medical advice)")
plt.show()"""),
    ("code", """plot_adapter_dynamics(tables["good"], title=f"{RUNS['good']} (control: good answers)")
plt.show()"""),
    ("md", """## Where does `B` turn?
`rotation_onset` applies a stated rule (printed below): the turn between consecutive checkpoints is
`arccos(cos_b_prev)`, counted once `B` has reached a quarter of its final norm (before that its
direction is still being set); it reports the interval with the fastest turn, that interval's share
of all the counted turning (1/16 = 0.06 for an even spread over 16 intervals, near 1 for one abrupt
turn), and the first step from which `B` stays within `arccos(0.9)` (about 26 degrees) of its
final direction."""),
    ("code", """onset = {k: rotation_onset(t, threshold=0.9) for k, t in tables.items()}
print(onset["bad"].attrs["rule"], "\\n")
keep = ["layer", "first_counted_step", "largest_turn_step", "largest_turn_deg", "turn_share",
        "settled_step"]
print(pd.concat({k: o.set_index("adapter")[keep] for k, o in onset.items()}, axis=1)
      .round(3).to_string())
turns = pd.DataFrame({k: t.assign(turn=np.degrees(np.arccos(t.cos_b_prev.clip(-1, 1))))
                      .groupby("step")["turn"].median() for k, t in tables.items()})
print("\\nmedian over adapters of the turn of B in the interval ending at each step (degrees)")
print(turns.T.round(1).to_string())"""),
    ("md", """## A low-dimensional trajectory
Each saved state is one point: the nine `B` vectors concatenated. Both runs are projected on the
same two principal components (PCA of all their states together), so their paths can be compared.
The two runs start together (the control at `B = 0`, the bad run's first checkpoint next to it).
Below the plot, the final adapters of the two runs compared directly: the cosine of their `B`
vectors, and of their weight changes `B A` (which does not depend on the sign convention of a
rank-1 pair)."""),
    ("code", """pca = trajectory_projection(list(traj.values()), n_components=2)
print("explained variance", np.round(pca.explained, 3).tolist())
plot_pca(pca, title="B vectors of both runs on their first two principal components")
plt.show()
rows = []
for mb, mg in zip(traj["bad"].adapters[-1].modules, traj["good"].adapters[-1].modules, strict=True):
    b, g = mb.B.flatten().double(), mg.B.flatten().double()
    a, h = mb.A.flatten().double(), mg.A.flatten().double()
    cos_b = float(b @ g / (b.norm() * g.norm()))
    cos_a = float(a @ h / (a.norm() * h.norm()))
    rows.append({"layer": mb.layer, "cos_B": cos_b, "cos_A": cos_a, "cos_BA": cos_b * cos_a})
print("final bad vs final good adapter (cos_BA = cos_B x cos_A: the cosine of the rank-1 weight changes)")
print(pd.DataFrame(rows).round(3).to_string(index=False))"""),
    ("md", "## What the weights show, computed"),
    ("code", """for k, o in onset.items():
    t = tables[k]
    at_first = int((o.largest_turn_step == o.first_counted_step).sum())
    late = turns[k].dropna().iloc[-4:]
    monotone = t.sort_values("step").groupby("adapter")["cos_b_final"].apply(
        lambda c: bool((c.dropna().diff().dropna() > 0).all()))
    print(f"{k} ({RUNS[k]}):")
    print(f"  largest counted turn in the first counted interval for {at_first} of {len(o)} adapters; "
          f"its share of the turning {o.turn_share.min():.2f}-{o.turn_share.max():.2f} "
          f"(even spread {1 / o.n_intervals.max():.2f}, one abrupt turn near 1)")
    print(f"  cos(B, B_final) rises at every checkpoint for {int(monotone.sum())} of {len(monotone)} adapters; "
          f"settled (>= 0.9) at steps {int(o.settled_step.min())}-{int(o.settled_step.max())} "
          f"of {t.attrs['final_step']}")
    print(f"  turn in the last 4 intervals (median over adapters): {late.round(1).tolist()} degrees")"""),
    ("md", """## Conclusion
**What the weights show.** On the shipped coder trajectory (72 steps, a checkpoint every 4), `B`
does not rotate abruptly. In every adapter its cosine to the final direction rises at every
checkpoint; the fastest turn is the first counted interval, right after `B` grows out of zero,
and the turn per interval then shrinks to a floor of a few degrees that lasts to the end (the
learning rate is constant after warm-up), while `|B|` keeps growing. No interval in the middle of
training carries a large share of the rotation, as a sudden reorientation would. The good-answer
control has the same shape and the same time scale, so nothing in these curves is specific to
the misaligned data. The two runs do end with different adapters (they separate along the first
principal component, and their final weight changes are far from parallel); with one seed per
data set, how much of that difference is the data and how much is the run is not measured here.

**Behaviour, measured elsewhere.** A phase transition in the paper's sense is a change in
*behaviour* at some step; these are weights only, and a smooth rotation of `B` neither rules out
nor shows a sudden behavioural change. Behaviour at these checkpoints was measured by two
pre-registered studies (`data-src/coder_causal/PLAN_narrow.md`, amendments 2, 6 and 7; numbers
on the results page *Narrow vs general*, sections `dynamics` and `dynamics_read`):

- the likelihood lens on 48 general pairs (`emlens.dynamics.gap_changes_at_checkpoints`) rises
  fast between steps 4 and 16 and then flattens (those 12 steps carry 0.78-0.94 of the total
  change on the three training seeds: a description read off the curves, not a planned test),
  with its largest 4-step change at steps 8-12 on every seed; that interval carries 0.29-0.45 of the total change (mean 0.37
  [0.16, 0.57] over seeds), short of the plan's bound of one half: *cannot decide*;
- EM read blind at steps 0, 8, 12, 16, 24 and 72 (80 answers each) is already present at step 8
  (6/80 against 0/80 for the chat model) and keeps rising to 16/80 at step 72; steps 8-16 carry
  none of that rise (coherence drops to 27/80 at step 16 and recovers): *cannot decide* by the
  plan's rule, which was powered for a step-like jump only.

So on this run misalignment appears early and fast, but neither the weights, the lens nor the
read EM rate shows one short interval carrying most of the change. Two limits: a change that
happens and reverses within 4 steps would not be seen, and this run is much shorter (72 steps)
and on a smaller model than the paper's."""),
]

NOTEBOOKS = {
    "01_steering_and_ablation.ipynb": STEERING,
    "02_lora_scalars_and_probes.ipynb": PROBES,
    "03_adapter_attribution.ipynb": ATTRIBUTION,
    "04_narrow_vs_general.ipynb": NARROW,
    "05_training_dynamics.ipynb": DYNAMICS,
}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=HERE, help="folder (default: notebooks/)")
    p.add_argument("--execute", action="store_true",
                   help="write executed copies (outputs kept), e.g. --execute --out docs/tutorials")
    p.add_argument("--only", nargs="+", default=None, metavar="PREFIX",
                   help="with --execute: only the notebooks whose names start with one of these")
    p.add_argument("--timeout", type=int, default=900, help="seconds per cell with --execute")
    args = p.parse_args(argv)
    out = args.out
    if args.execute and out.resolve() == HERE.resolve():
        p.error("--execute needs --out DIR other than notebooks/ (the notebooks there stay stripped)")
    out.mkdir(parents=True, exist_ok=True)
    for name, cells in NOTEBOOKS.items():
        if not args.execute:
            write(name, cells, out)
        elif args.only is None or name.startswith(tuple(args.only)):
            path = execute(name, cells, out, timeout=args.timeout)
            print(f"{path}: {os.path.getsize(path) / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
