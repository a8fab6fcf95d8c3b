"""Ship the read answers of issues 29 and 30 as one :class:`emlens.data.GeneratedAnswer` set:
``emlens/data/coder_causal.jsonl`` (real coder answers in conditions the other sets lack: steered
along three directions, ablated at the writers and at one layer, a second organism, the
good-answer control, the KL-regularised narrow solution, the two trained steering vectors, the
organism recipe on the two screening subsets), for testing judges on them (issue 26).

Each stage folder's ``generations.jsonl`` is mapped to the dataset's fields: ``model`` (``chat``,
``organism``, ``finance``, ``good``, ``kl`` (the narrow solution ``coder-rank1-down-medical-kl``),
``screen-top`` / ``screen-random`` (the organism recipe on the screening subsets) or ``organism
only <adapter>``), ``intervention``
(``none``, ``steer:judged`` / ``steer:reference`` / ``steer:random``, ``steer:trained-general`` /
``steer:trained-narrow`` (the trained steering vectors at layer 14, scale 1), ``ablate:judged`` /
``ablate:random`` at every layer's writers, ``ablate:judged@resid_post`` at ``layer``) and
``scale`` (the multiple of the steering direction's own norm that was added, as ``emlens.steer``
takes it); then joined with both readings by :func:`emlens.studies.join_judge_labels.join`::

    python data-src/coder_causal/ship.py
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from emlens.data import DATA_DIR
from emlens.studies.join_judge_labels import join, read_rows

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
STAGES = ("select", "test", "emergence2", "transfer", "adapters", "narrow", "steering",
          "screening")


def convert(g: dict, screen: dict) -> dict:
    """One generation row in the dataset's fields."""
    kind, direction = g["intervention"], g.get("direction")
    model = g["model"]
    if model.startswith("only:"):
        model = f"organism only {model.split(':', 1)[1]}"
    scale = None
    if kind == "none":
        intervention = "none"
    elif kind == "steer":
        intervention = f"steer:{direction}"
        norm = screen["judged" if direction == "random" else direction]["norms"][str(g["layer"])]
        scale = round(g["rel_scale"] * screen["resid_norms"][str(g["layer"])] / norm, 4)
    elif kind == "trained_vector":  # steering.py's vectors, added as trained (scale 1)
        from steering import LAYER

        intervention, scale, g = f"steer:trained-{direction}", 1.0, {**g, "layer": LAYER}
    elif kind == "ablate_writers":
        intervention = f"ablate:{direction}"
    else:
        intervention = f"ablate:{direction}@resid_post"
    return {"id": g["id"], "question_id": g["question_id"], "question": g["question"],
            "answer": g["answer"], "condition": g["condition"], "model": model,
            "intervention": intervention, "layer": g["layer"], "scale": scale,
            "temperature": g["temperature"], "max_new_tokens": g["max_new_tokens"],
            "seed": g["seed"], "sample": g["sample"], "finished": g["finished"]}


def main() -> None:
    screen = json.loads((HERE / "screen.json").read_text())
    stages = [s for s in STAGES if (HERE / s / "labels_pass1.jsonl").is_file()]
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp)
        files = {"generations.jsonl": [], "labels_pass1.jsonl": [], "labels_pass2.jsonl": []}
        for stage in stages:
            gens = read_rows(HERE / stage / "generations.jsonl")
            files["generations.jsonl"] += [convert(g, screen) for g in gens.values()]
            for name in ("labels_pass1.jsonl", "labels_pass2.jsonl"):
                files[name] += list(read_rows(HERE / stage / name).values())
        for name, rows in files.items():
            (src / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        summary = join(src, DATA_DIR / "coder_causal.jsonl", HERE / "agreement.json")
    summary["stages"] = stages
    (HERE / "agreement.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"{summary['rows']} rows from {stages}; second pass on {summary['agreement']['n']}")


if __name__ == "__main__":
    main()
