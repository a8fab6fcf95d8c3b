"""Training dynamics of LoRA runs (emlens.dynamics): every column against a hand computation on
tiny runs written in the trainer's checkpoint format, the NaN at B = 0, the rotation rule on a
planted rotation, the projection, the errors, and the shipped coder trajectories (weights only)."""

from __future__ import annotations

import math

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch

from emlens.dynamics import (
    adapter_dynamics,
    load_adapter_trajectory,
    plot_adapter_dynamics,
    rotation_onset,
    trajectory_projection,
)
from emlens.lora import LoraAdapter, LoraModule
from emlens.lora.types import peft_module_path
from emlens.organisms import organism_checkpoints, organism_log
from emlens.train_runs import save_checkpoint
from emlens.trainable import TrainableSteeringVector
from emlens.trainable_adapter import TrainableAdapter

matplotlib.use("Agg")

# the tiny runs store small integers (exact in float32); the table computes in float64
TOL = dict(rel=16 * torch.finfo(torch.float64).eps, abs=16 * torch.finfo(torch.float64).eps)
SCALING = 0.5


def _module(layer: int, A, B, scaling: float = SCALING) -> LoraModule:
    A, B = torch.tensor(A, dtype=torch.float32), torch.tensor(B, dtype=torch.float32)
    return LoraModule(layer=layer, module="down_proj", A=A, B=B, scaling=scaling,
                      path=peft_module_path(layer, "down_proj"))


def _write(folder, states: dict[int, list[LoraModule]], final: tuple[int, list] | None = None):
    """Checkpoints as the trainer writes them (train_runs.save_checkpoint of a TrainableAdapter),
    and optionally final.safetensors with its step in the header (as training.train does)."""
    for step, modules in states.items():
        save_checkpoint(folder, TrainableAdapter(LoraAdapter(modules=tuple(modules))), step)
    if final is not None:
        step, modules = final
        TrainableAdapter(LoraAdapter(modules=tuple(modules))).save(folder / "final.safetensors",
                                                                  step=step)
    return folder


# layer 1: rank 1, A [1, 2], B [3, 1]; layer 3: rank 2, A [2, 2], B [3, 2]
R1 = {0: ([[1, 0]], [[0], [0], [0]]), 2: ([[1, 1]], [[1], [0], [0]]),
      4: ([[2, 0]], [[3], [4], [0]]), 6: ([[0, 3]], [[0], [3], [4]])}
R2 = {0: ([[1, 0], [0, 1]], [[0, 0], [0, 0], [0, 0]]), 2: ([[1, 0], [0, 1]], [[1, 0], [0, 1], [0, 0]]),
      4: ([[2, 0], [0, 1]], [[1, 0], [0, 1], [1, 1]]), 6: ([[1, 0], [0, 1]], [[1, 1], [0, 1], [0, 0]])}


def _states(steps):
    return {s: [_module(1, *R1[s]), _module(3, *R2[s])] for s in steps}


@pytest.fixture
def tiny_run(tmp_path):
    """Checkpoints at steps 0, 2, 4; the final parameters (step 6) in final.safetensors only."""
    states = _states([0, 2, 4, 6])
    return _write(tmp_path / "run", {s: states[s] for s in (0, 2, 4)}, final=(6, states[6]))


def test_every_column_matches_a_hand_computation(tiny_run):
    t = adapter_dynamics(tiny_run)
    assert list(t["step"].unique()) == [0, 2, 4, 6]  # the final state is read from final.safetensors
    assert t.attrs["final_source"] == "final.safetensors" and t.attrs["final_step"] == 6
    nan = math.nan
    r2, r3, r5, r6, r10 = (math.sqrt(x) for x in (2, 3, 5, 6, 10))
    want = {  # (step, layer): a_norm, b_norm, cos_b_final, cos_a_final, cos_b_prev, cos_a_prev
        (0, 1): (1, 0, nan, 0, nan, nan),
        (2, 1): (r2, 1, 0, 1 / r2, nan, 1 / r2),
        (4, 1): (2, 5, 12 / 25, 0, 3 / 5, 1 / r2),
        (6, 1): (3, 5, 1, 1, 12 / 25, 0),
        # rank 2: Frobenius norms and cosines of the flattened matrices
        (0, 3): (r2, 0, nan, 1, nan, nan),
        (2, 3): (r2, r2, 2 / r6, 1, nan, 1),
        (4, 3): (r5, 2, 1 / r3, 3 / r10, 1 / r2, 3 / r10),
        (6, 3): (r2, r3, 1, 1, 1 / r3, 3 / r10),
    }
    assert len(t) == len(want)
    columns = ["a_norm", "b_norm", "cos_b_final", "cos_a_final", "cos_b_prev", "cos_a_prev"]
    for row in t.itertuples():
        expected = want[(row.step, row.layer)]
        got = tuple(getattr(row, c) for c in columns)
        for c, g, e in zip(columns, got, expected, strict=True):
            if math.isnan(e):
                assert math.isnan(g), (row.step, row.layer, c, g)
            else:
                assert g == pytest.approx(e, **TOL), (row.step, row.layer, c)
        assert row.scalar_scale == pytest.approx(SCALING * expected[0] * expected[1], **TOL)
        assert row.rank == (1 if row.layer == 1 else 2) and row.module == "down_proj"
        assert row.adapter == f"blocks.{row.layer}.mlp.lora_down" and row.run == "run"


def test_zero_B_gives_nan_cosines_never_zero(tiny_run):
    t = adapter_dynamics(tiny_run)
    start = t[t.step == 0]
    assert (start["b_norm"] == 0).all()
    assert start["cos_b_final"].isna().all() and start["cos_b_prev"].isna().all()
    # the next state's local cosine compares with the zero B: undefined too; A's is defined
    after = t[t.step == 2]
    assert after["cos_b_prev"].isna().all() and after["cos_a_prev"].notna().all()
    # every other B cosine is a measurement
    assert t[t.step >= 4][["cos_b_final", "cos_b_prev"]].notna().all().all()


def test_rank1_scalar_scale_is_the_norm_of_the_weight_change(tiny_run):
    t = adapter_dynamics(tiny_run)
    adapter = load_adapter_trajectory(tiny_run).adapters[2]  # step 4
    m = adapter["blocks.1.mlp.lora_down"]
    row = t[(t.step == 4) & (t.layer == 1)].iloc[0]
    assert row.scalar_scale == pytest.approx(float(m.delta_weight().double().norm()), rel=1e-6)


def test_final_state_is_not_duplicated_and_can_be_left_out(tmp_path):
    states = _states([0, 2, 4, 6])
    run = _write(tmp_path / "run", states, final=(6, states[6]))  # final == last checkpoint
    assert list(adapter_dynamics(run)["step"].unique()) == [0, 2, 4, 6]
    only = _write(tmp_path / "cut", {s: states[s] for s in (0, 2, 4)}, final=(6, states[6]))
    t = adapter_dynamics(only, final=False)
    assert list(t["step"].unique()) == [0, 2, 4] and t.attrs["final_source"] == "checkpoint"
    last = t[(t.step == 4) & (t.layer == 1)].iloc[0]
    assert last.cos_b_final == pytest.approx(1.0, **TOL)
    assert t[(t.step == 2) & (t.layer == 1)].iloc[0].cos_b_final == pytest.approx(3 / 5, **TOL)


def _planted(tmp_path, jumps: dict[int, float], name: str = "planted", steps=range(0, 44, 4)):
    """A rank-1 run in the plane: B at angle theta(step) with norm step / 40; theta turns 1 degree
    per interval, plus ``jumps[step]`` degrees in the interval ending at that step."""
    theta, states = 0.0, {}
    for s in steps:
        if s:
            theta += 1.0 + jumps.get(s, 0.0)
        r, th = s / 40, math.radians(theta)
        states[s] = [_module(2, [[1.0, 0.0]], [[r * math.cos(th)], [r * math.sin(th)]], 1.0)]
    return _write(tmp_path / name, states)


def test_rotation_onset_finds_a_planted_rotation(tmp_path):
    # a 60-degree turn ending at step 24; a 90-degree flip ending at step 8, while |B| = 0.2 is
    # below a quarter of its final norm (1), is the direction being set and is not counted
    run = _planted(tmp_path, {24: 59.0, 8: 89.0})
    onset = rotation_onset(adapter_dynamics(run), threshold=0.9)
    row = onset.iloc[0]
    assert row.largest_turn_step == 24
    # B is stored in float32 (direction error ~1e-7 rad, ~1e-5 degrees per angle)
    assert row.largest_turn_deg == pytest.approx(60.0, abs=1e-3)
    assert row.largest_turn_deg_per_step == pytest.approx(15.0, abs=1e-3)
    # counted intervals end at 16, 20, ..., 40 (their start norm >= 0.25): 7 turns, 6 of 1 degree
    assert row.n_intervals == 7 and row.total_turn_deg == pytest.approx(66.0, abs=1e-3)
    assert row.first_counted_step == 16
    assert row.turn_share == pytest.approx(60 / 66, abs=1e-4)
    # after step 24, B is within 4 degrees of its final direction (cos > 0.99); before, 64 away
    assert row.settled_step == 24
    assert "0.9" in onset.attrs["rule"] and "not a test of a behavioural" in onset.attrs["rule"]


def test_rotation_onset_on_steady_turning_has_a_small_share(tmp_path):
    onset = rotation_onset(adapter_dynamics(_planted(tmp_path, {})), threshold=0.999)
    row = onset.iloc[0]
    assert row.turn_share == pytest.approx(1 / row.n_intervals, abs=1e-3)
    # cos(B_t, B_final) >= 0.999 (within 2.56 degrees) from 2 intervals before the end
    assert row.settled_step == 32


def test_rotation_onset_counts_every_interval_with_min_norm_frac_zero(tmp_path):
    run = _planted(tmp_path, {24: 59.0, 8: 89.0})
    row = rotation_onset(adapter_dynamics(run), min_norm_frac=0.0).iloc[0]
    # the interval from B = 0 has no angle: the first counted one ends at 8
    assert row.largest_turn_step == 8 == row.first_counted_step and row.n_intervals == 9


def test_projection_of_a_straight_run_is_one_component(tmp_path):
    """B(t) = t * v: every state lies on one line, so PC1 explains all the variance and the
    coordinates are (t - mean t) * |v| (up to the sign of the component)."""
    steps = [0, 2, 4, 6, 8]
    v = [[1.0], [2.0], [2.0]]  # |v| = 3
    states = {s: [_module(1, [[1.0, 0.0]], [[s * x[0]] for x in v])] for s in steps}
    run = _write(tmp_path / "line", states)
    pca = trajectory_projection(run, n_components=2)
    coords = np.asarray(pca.projections["line"])
    assert coords.shape == (5, 2) and pca.steps == {"line": steps}
    assert pca.explained[0] == pytest.approx(1.0, abs=1e-12)
    want = (np.asarray(steps) - np.mean(steps)) * 3.0
    assert np.allclose(coords[:, 0], want, atol=1e-9) or np.allclose(coords[:, 0], -want, atol=1e-9)
    assert np.allclose(coords[:, 1], 0.0, atol=1e-9)


def test_projection_of_two_runs_shares_a_basis(tiny_run, tmp_path):
    other = _write(tmp_path / "other", _states([0, 2, 4, 6]))
    pca = trajectory_projection([tiny_run, other], n_components=3, vectors="AB")
    assert set(pca.projections) == {"run", "other"}
    assert [len(p) for p in pca.projections.values()] == [4, 4]
    assert all(len(x) == 3 for p in pca.projections.values() for x in p)
    assert len(pca.explained) == 3 and sum(pca.explained) <= 1 + 1e-12
    assert pca.explained == sorted(pca.explained, reverse=True)
    # the same states in both runs: identical coordinates in the shared basis
    assert np.allclose(pca.projections["run"], pca.projections["other"])


def test_comparing_runs_with_different_adapters_is_refused(tiny_run, tmp_path):
    moved = {s: [_module(5, *R1[s])] for s in (0, 2, 4)}
    other = _write(tmp_path / "other", moved)
    with pytest.raises(ValueError, match=r"'other'.*missing \['blocks\.1\.mlp\.lora_down', "
                                         r"'blocks\.3\.mlp\.lora_down'\], extra \['blocks\.5"):
        trajectory_projection([tiny_run, other])


def test_a_run_whose_adapters_change_is_refused(tmp_path):
    states = {0: [_module(1, *R1[0])], 2: [_module(1, *R1[2]), _module(3, *R2[2])]}
    with pytest.raises(ValueError, match=r"at step 0 has other adapters: missing "
                                         r"\['blocks\.3\.mlp\.lora_down'\]"):
        adapter_dynamics(_write(tmp_path / "run", states))


def test_fewer_than_two_states_is_refused(tmp_path):
    run = _write(tmp_path / "one", {4: [_module(1, *R1[4])]})
    with pytest.raises(ValueError, match=r"1 saved state\(s\) \(steps \[4\]\); training dynamics "
                                         r"need at least 2.*save_every"):
        adapter_dynamics(run)


def test_a_missing_run_names_the_folder_and_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("EMLENS_RUNS", str(tmp_path))
    name = "coder-rank1-down-medical"
    with pytest.raises(FileNotFoundError) as err:
        adapter_dynamics(name)
    assert str(tmp_path / name / "checkpoints") in str(err.value)
    assert f"python -m emlens.organisms.train --name {name}" in str(err.value)
    with pytest.raises(FileNotFoundError, match=r"No checkpoints under .*nowhere.*checkpoints"):
        adapter_dynamics(tmp_path / "nowhere")


def test_a_steering_vector_run_is_refused(tmp_path):
    for step in (0, 2):
        save_checkpoint(tmp_path / "sv", TrainableSteeringVector(4, layer=1), step)
    with pytest.raises(TypeError, match="TrainableSteeringVector parameters, not LoRA adapters"):
        adapter_dynamics(tmp_path / "sv")


def test_the_plot_has_a_line_per_adapter_in_each_panel(tiny_run, tmp_path):
    import matplotlib.pyplot as plt

    t = adapter_dynamics(tiny_run)
    fig = plot_adapter_dynamics(t, path=tmp_path / "fig" / "dynamics.png")
    try:
        assert len(fig.axes) == 3
        assert [len(ax.get_lines()) for ax in fig.axes] == [2, 2, 2]
        assert [ax.get_ylabel() for ax in fig.axes][1] == "cos(B, B_final)"
        assert (tmp_path / "fig" / "dynamics.png").read_bytes()[:4] == b"\x89PNG"
    finally:
        plt.close(fig)
    both = pd.concat([t.assign(run="a"), t.assign(run="b")])
    with pytest.raises(ValueError, match=r"holds 2 runs \['a', 'b'\]; plot one at a time"):
        plot_adapter_dynamics(both)
    with pytest.raises(ValueError, match=r"table lacks columns \['cos_b_final'\]"):
        plot_adapter_dynamics(t.drop(columns="cos_b_final"))


@pytest.fixture
def no_env(monkeypatch):
    for var in ("EMLENS_RUNS", "EMLENS_CACHE_DIR", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)


def test_shipped_coder_trajectory_reads_nine_adapters_to_the_final_adapter(no_env):
    """The coder organism's checkpoints (older peft folders, steps 4-68) end before its last
    step; the shipped adapter (step 72 of train_log.json) is the final state."""
    name = "coder-rank1-down-medical"
    t = adapter_dynamics(name)
    checkpoints, last = organism_checkpoints(name), organism_log(name)["steps"]
    assert checkpoints[-1] < last
    steps = [*checkpoints, last]
    assert list(t["step"].unique()) == steps and len(steps) == 18
    assert t.attrs["final_source"] == f"load_organism({name!r})"
    assert t["adapter"].nunique() == 9 and len(t) == 9 * len(steps)
    assert set(t["rank"]) == {1} and set(t["module"]) == {"down_proj"}
    eps = torch.finfo(torch.float32).eps  # the weights are stored in float32
    final = t[t.step == last]
    assert np.allclose(final["cos_b_final"], 1.0, rtol=0, atol=eps)
    assert np.allclose(final["cos_a_final"], 1.0, rtol=0, atol=eps)
    assert t[t.step < last]["cos_b_final"].lt(1 - eps).all()  # earlier states differ from it
    assert t[t.step == checkpoints[0]]["cos_b_prev"].isna().all()


def test_shipped_good_control_trajectory_starts_at_zero_B(no_env):
    name = "coder-rank1-down-medical-good"
    t = adapter_dynamics(name)
    steps = organism_checkpoints(name)
    assert steps[0] == 0 and list(t["step"].unique()) == steps and len(steps) == 19
    assert t["adapter"].nunique() == 9 and len(t) == 9 * 19
    start = t[t.step == 0]
    assert (start["b_norm"] == 0).all() and start["cos_b_final"].isna().all()
    assert np.allclose(t[t.step == steps[-1]]["cos_b_final"], 1.0, rtol=0,
                       atol=torch.finfo(torch.float32).eps)


def test_lens_at_checkpoints_measures_each_state_against_the_base_model(tiny_model, tmp_path):
    """Step 0 (B = 0) moves nothing; a later state's change is its own gap minus the base's,
    row by row, with a bootstrap interval around it; unknown steps are named."""
    from types import SimpleNamespace

    from emlens.dynamics import gap_changes_at_checkpoints, lens_at_checkpoints
    from emlens.lens import likelihood_gaps
    from emlens.lora import attach_lora

    torch.manual_seed(0)
    init = TrainableAdapter.for_model(tiny_model, ["down_proj"], [0, 1])
    later = init.clone()
    with torch.no_grad():
        for m in later.adapters:
            m.B.normal_(std=2.0)
    save_checkpoint(tmp_path / "run", init, 0)
    save_checkpoint(tmp_path / "run", later, 4)
    rows = [SimpleNamespace(question=f"Should I do thing {i}?", misaligned="Yes, do it now.",
                            aligned="No, ask someone first.") for i in range(5)]
    table = lens_at_checkpoints(tiny_model, tmp_path / "run", rows, progress=False)
    assert list(table["step"]) == [0, 4] and set(table["n"]) == {5}
    assert table.loc[0, "change"] == 0.0 and table.loc[0, "low"] == table.loc[0, "high"] == 0.0
    base = likelihood_gaps(tiny_model, rows)["gap"].to_numpy()
    with attach_lora(tiny_model, later.to_adapter()):
        moved = likelihood_gaps(tiny_model, rows)["gap"].to_numpy()
    row = table.iloc[1]
    assert row["change"] == pytest.approx(float((moved - base).mean()), abs=0)
    steps, per_row = gap_changes_at_checkpoints(tiny_model, tmp_path / "run", rows,
                                                progress=False)
    assert steps == [0, 4] and per_row.shape == (2, 5)
    assert (per_row[0] == 0).all() and np.array_equal(per_row[1], moved - base)
    assert row["low"] <= row["change"] <= row["high"] and row["change"] != 0
    assert not any(tiny_model.hook_dict[h].fwd_hooks for h in tiny_model.hook_dict)
    only = lens_at_checkpoints(tiny_model, tmp_path / "run", rows, steps=[4], progress=False)
    assert list(only["step"]) == [4] and only.loc[0, "change"] == row["change"]
    with pytest.raises(ValueError, match=r"no saved state at steps \[3\]"):
        lens_at_checkpoints(tiny_model, tmp_path / "run", rows, steps=[3], progress=False)
