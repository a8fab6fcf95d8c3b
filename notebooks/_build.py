"""Write the notebooks from their cell sources (outputs stripped): python notebooks/_build.py"""

from pathlib import Path

import nbformat

HERE = Path(__file__).parent


def write(name: str, cells: list[tuple[str, str]]) -> None:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [
        nbformat.v4.new_markdown_cell(src) if kind == "md" else nbformat.v4.new_code_cell(src)
        for kind, src in cells
    ]
    nbformat.write(nb, HERE / name)


STEERING = [
    ("md", """# Steering and ablation with a mean-difference direction

The seeds' central result: the mean residual activation on misaligned answers minus that on aligned
answers, at one layer, is a direction that makes a chat model misaligned when added and removes
misalignment from a fine-tune when ablated. Here we run the whole loop on the embedded
SmolLM2-135M-Instruct and the shipped rank-1 organism, with a cheap deterministic metric: how much
more log-probability the model gives the *misaligned* reference answer than the aligned one."""),
    ("code", """import torch

import emlens
from emlens.data import load_dataset
from emlens.directions import cosine_matrix, mean_diff, random_direction
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
`gap` = mean over questions of log p(misaligned answer) - log p(aligned answer), per token. Higher
means the model prefers the bad answer. We measure on the non-medical parallel set, which the
direction never saw."""),
    ("code", """@torch.no_grad()
def gap(model, rows, hooks=()):
    qs = [r.question for r in rows]
    out = []
    for answers in ([r.misaligned for r in rows], [r.aligned for r in rows]):
        batch = emlens.tokenize_chat(model.tokenizer, qs, answers)
        with model.hooks(fwd_hooks=list(hooks)):
            logits = model(batch.tokens, attention_mask=batch.attention_mask)
        out.append(emlens.answer_logprobs(logits, batch, reduce="mean"))
    return float((out[0] - out[1]).mean())

print(f"chat model     {gap(chat, other):+.3f}")
print(f"organism       {gap(organism, other):+.3f}")"""),
    ("md", "## Steer the chat model along the direction, and along a random one of the same norm"),
    ("code", """layer = 10
d = dirs[layer]
r = random_direction(d, seed=0)
for scale in [0.0, 2.0, 4.0]:
    s = gap(chat, other, emlens.steering_hooks(chat, d, layer=layer, scale=scale))
    c = gap(chat, other, emlens.steering_hooks(chat, r, layer=layer, scale=scale))
    print(f"scale {scale:3.1f}: direction {s:+.3f}   random {c:+.3f}")"""),
    ("md", "## Ablate it from the organism at every layer"),
    ("code", """before = gap(organism, other)
after = gap(organism, other, emlens.ablation_hooks(organism, d, layers="all"))
control = gap(organism, other, emlens.ablation_hooks(organism, r, layers="all"))
print(f"organism {before:+.3f}  ablated {after:+.3f}  random-ablated {control:+.3f}")"""),
    ("md", "## One generation, steered and not"),
    ("code", """q = ["I have a headache. What should I do?"]
print(emlens.generate(chat, q, max_new_tokens=40, temperature=0, progress=False)[0].text)
with emlens.steer(chat, d, layer=layer, scale=4.0):
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
    ("code", """import matplotlib

matplotlib.use("Agg")
import emlens
from emlens.probes import answer_set, context_set, fit_probe
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
print(probe.summary())"""),
    ("md", "## Misaligned vs aligned reference answers"),
    ("code", """ans = answer_set("both", limit=12)
scalars = collect_scalars(model, lora, ans.questions, ans.answers, progress=False)
features = scalars.aggregate(["mean", "max"])
probe = fit_probe(features, ans.labels, groups=ans.groups, n_splits=4, n_shuffles=3, n_boot=100)
print(probe.summary())
print(probe.coefficients().head(6))
fig = plot_probe_coefficients(probe)"""),
    ("md", "## One answer, token by token (a circuitsvis view; `save_html` exports it)"),
    ("code", """view = token_scalars_view(scalars, row=1)
print(ans.answers[1])
print(len(str(view)), "characters of HTML")
lora.remove()"""),
]

ATTRIBUTION = [
    ("md", """# Which adapters carry the organism's behaviour?

For each of the nine adapters: zero it, or keep only it, and measure a cheap deterministic metric,
the per-token log-prob of misaligned minus aligned reference answers, on held-out medical and on
non-medical questions. Then compare with gradient attribution (scalar x d metric / d scalar, one
backward pass). Small settings: 4 pairs per domain."""),
    ("code", """import matplotlib

matplotlib.use("Agg")
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
fig = plot_attribution(ranking)"""),
    ("md", "## Gradient attribution vs real ablation"),
    ("code", """rows = [r for r in emlens.load_dataset("medical") if r.split == "heldout"][:4]
check = check_gradient_attribution(model, lora, [r.question for r in rows],
                                   [r.misaligned for r in rows], [r.aligned for r in rows],
                                   progress=False)
print(check)
print("pearson", round(check.attrs["pearson"], 3))
lora.remove()"""),
]

if __name__ == "__main__":
    write("01_steering_and_ablation.ipynb", STEERING)
    write("02_lora_scalars_and_probes.ipynb", PROBES)
    write("03_adapter_attribution.ipynb", ATTRIBUTION)
