"""Directions: streaming means, planted-direction recovery, artefacts, controls, bad input."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

import emlens
from emlens.directions import (
    Direction,
    collect_means,
    cosine_matrix,
    load_directions,
    mean_diff,
    pca_direction,
    random_direction,
    residual_norms,
    save_directions,
    select_answers,
)

QUESTIONS = [f"Tell me about animal number {i}." for i in range(6)]


@pytest.fixture(scope="module")
def model(make_tiny_model):
    return make_tiny_model(5)


def test_collect_means_matches_brute_force(model):
    answers = [f"An answer of length {i} " * (i + 1) for i in range(6)]
    batches = list(emlens.chat.iter_chat_batches(model.tokenizer, QUESTIONS, answers, batch_size=4))
    means = collect_means(model, batches, [0, 2], progress=False)
    acts = {0: [], 2: []}
    for b in batches:
        _, cache = model.run_with_cache(b.tokens, attention_mask=b.attention_mask)
        for layer in acts:
            acts[layer].append(cache[f"blocks.{layer}.hook_resid_post"][b.answer_mask])
    for layer in acts:
        brute = torch.cat(acts[layer]).double().mean(0)
        assert torch.allclose(means.means[layer], brute, atol=1e-5)
    assert means.tokens == sum(int(b.answer_mask.sum()) for b in batches)
    assert means.rows == 6


def test_cosine_intervals_over_layers_match_one_layer_at_a_time(model, make_tiny_model):
    from emlens.directions import cosine_interval, cosine_intervals

    other = make_tiny_model(6)
    bad = [(q, f"bad answer {i} " * (i + 2)) for i, q in enumerate(QUESTIONS)]
    good = [(q, f"a good and kind answer {i}") for i, q in enumerate(QUESTIONS)]
    bad2, good2 = bad[::-1], good[1:]
    many = cosine_intervals(model, bad, good, other, bad2, good2, [0, 2], n_boot=50, seed=3)
    for layer in (0, 2):
        one = cosine_interval(model, bad, good, other, bad2, good2, layer, n_boot=50, seed=3)
        assert many[layer] == pytest.approx(one, abs=1e-12)
        point, low, high = one
        assert low <= point <= high and -1 <= low and high <= 1
        # the point from per-answer means, by brute force
        def means(m, pairs, layer=layer):
            out = []
            for b in emlens.chat.iter_chat_batches(m.tokenizer, [q for q, _ in pairs],
                                                    [a for _, a in pairs], batch_size=8):
                _, cache = m.run_with_cache(b.tokens, attention_mask=b.attention_mask)
                act = cache[f"blocks.{layer}.hook_resid_post"].double()
                for i in range(len(act)):
                    out.append(act[i][b.answer_mask[i]].mean(0))
            return torch.stack(out).mean(0)
        da = means(model, bad) - means(model, good)
        db = means(other, bad2) - means(other, good2)
        assert point == pytest.approx(float(da @ db / (da.norm() * db.norm())), abs=1e-6)
    same = cosine_intervals(model, bad, good, model, bad, good, [1], n_boot=20)[1]
    assert same[0] == pytest.approx(1.0, abs=1e-9)
    with pytest.raises(ValueError, match="at least one layer"):
        cosine_intervals(model, bad, good, other, bad2, good2, [])


def test_mean_diff_recovers_a_planted_direction(make_tiny_model, tokenizer):
    model = make_tiny_model(6)
    cat, dog = (tokenizer.encode(w, add_special_tokens=False)[0] for w in (" cat", " dog"))
    planted = torch.randn(64)
    planted /= planted.norm()
    with torch.no_grad():
        model.embed.W_E[dog] = model.embed.W_E[cat] + 5.0 * planted
    aligned = [(q, "I like the cat a lot") for q in QUESTIONS]
    misaligned = [(q, "I like the dog a lot") for q in QUESTIONS]
    assert tokenizer.encode(" dog", add_special_tokens=False) == [dog]
    # At the embedding (resid_pre of block 0) the difference is exactly the planted vector times
    # the fraction of answer tokens that differ.
    d = mean_diff(model, misaligned, aligned, layers=[0], hook="resid_pre", progress=False)[0]
    n_answer = len(tokenizer.encode("I like the dog a lot<|im_end|>", add_special_tokens=False))
    assert torch.allclose(d.vector, 5.0 * planted / n_answer, atol=1e-5)
    # Downstream, the residual connection carries it (the random blocks rotate part of it away):
    # far above the ~0.13 typical |cosine| of a random 64-d direction, at every layer.
    dirs = mean_diff(model, misaligned, aligned, progress=False)
    cos = cosine_matrix(list(dirs.values()), [Direction(planted, 0)])[:, 0]
    assert (cos > 0.5).all(), cos
    assert dirs[1].counts == {"pos_answers": 6, "pos_tokens": 6 * n_answer,
                              "neg_answers": 6, "neg_tokens": 6 * n_answer}


def test_pca_direction_follows_the_main_axis_of_paired_differences(make_tiny_model, tokenizer):
    model = make_tiny_model(7)
    words = [" cat", " dog", " cow", " pig"]
    ids = [tokenizer.encode(w, add_special_tokens=False)[0] for w in words]
    axis = torch.randn(64)
    axis /= axis.norm()
    with torch.no_grad():  # the "misaligned" words differ along axis, by varying amounts
        for k, i in enumerate(ids[1:], start=1):
            model.embed.W_E[i] = model.embed.W_E[ids[0]] + 3.0 * k * axis
    misaligned = [(q, f"the{words[1 + i % 3]}") for i, q in enumerate(QUESTIONS)]
    aligned = [(q, "the cat") for q in QUESTIONS]
    pc = pca_direction(model, misaligned, aligned, layer=0, hook="resid_pre")
    assert abs(float(cosine_matrix([pc], [Direction(axis, 0)])[0, 0])) > 0.999


def test_directions_round_trip_through_safetensors(model, tmp_path):
    dirs = mean_diff(model, [(q, "Bad idea.") for q in QUESTIONS],
                     [(q, "Good idea.") for q in QUESTIONS], layers=[0, 2],
                     selection="test sets", progress=False)
    path = save_directions(dirs.values(), tmp_path / "dirs.safetensors")
    loaded = load_directions(path)
    assert set(loaded) == {0, 2}
    for layer, d in dirs.items():
        assert torch.equal(loaded[layer].vector, d.vector)
        assert loaded[layer].metadata() == d.metadata()
    assert loaded[0].model == "tiny-seed5" and loaded[0].selection == "test sets"
    assert not list(tmp_path.glob("*.pkl")) and not list(tmp_path.glob("*.pt"))


def test_random_control_has_exactly_the_same_norm(model):
    d = Direction(torch.randn(64) * 7.3, layer=1)
    r = random_direction(d, seed=3)
    assert abs(r.norm - d.norm) < 1e-4 * d.norm
    assert abs(float(cosine_matrix([r], [d])[0, 0])) < 0.5
    assert r.method == "random" and r.layer == 1
    assert not torch.equal(random_direction(d, seed=4).vector, r.vector)


def test_residual_norms_are_mean_token_norms(model):
    pairs = [(q, "Some answer here.") for q in QUESTIONS[:3]]
    norms = residual_norms(model, pairs, [1])
    b = emlens.tokenize_chat(model.tokenizer, [q for q, _ in pairs], [a for _, a in pairs])
    _, cache = model.run_with_cache(b.tokens, attention_mask=b.attention_mask)
    expected = cache["blocks.1.hook_resid_post"][b.answer_mask].norm(dim=-1).mean()
    assert abs(norms[1] - float(expected)) < 1e-4


def test_select_answers_applies_reference_thresholds():
    table = pd.DataFrame({
        "question": list("abcdefg"),
        "answer": list("ABCDEFG"),
        "aligned": [10, 25, 31, 80, 90, 95, 20],
        "coherent": [90, 60, 90, 90, 90, 90, 40],
    })
    bad, good, desc = select_answers(table, seed=0)
    assert bad == [("a", "A"), ("b", "B")]  # g is incoherent, c is above 30
    assert len(good) == 2 and set(good) <= {("d", "D"), ("e", "E"), ("f", "F")}
    assert "n=2" in desc
    with pytest.raises(ValueError, match="0 misaligned"):
        select_answers(table.assign(aligned=90))


def test_bad_input_is_refused(model):
    pairs = [(q, "x") for q in QUESTIONS]
    with pytest.raises(ValueError, match="misaligned is empty"):
        mean_diff(model, [], pairs, progress=False)
    with pytest.raises(ValueError, match="not a \\(question, answer\\) pair"):
        mean_diff(model, [("q", 3)], pairs, progress=False)
    prompts_only = [emlens.tokenize_chat(model.tokenizer, QUESTIONS)]
    with pytest.raises(ValueError, match="No answer tokens"):
        collect_means(model, prompts_only, [0], progress=False)
    with pytest.raises(ValueError, match="width 64 and 32"):
        cosine_matrix([Direction(torch.ones(64), 0)], [Direction(torch.ones(32), 0)])
    nan_hook = ("blocks.0.hook_resid_mid", lambda x, hook: x * float("nan"))
    with model.hooks(fwd_hooks=[nan_hook]), pytest.raises(ValueError, match="NaN"):
        mean_diff(model, pairs, pairs, layers=[1], progress=False)
    wide = Direction(torch.ones(128), layer=0)
    with pytest.raises(ValueError, match="d_model=64"):
        emlens.steer(model, wide, layers=0, scale=1.0).__enter__()


# ---------------------------------------------------------------------------------------------
# llama.cpp control vectors (GGUF)


def _llama_cpp_control_vector(path, strength: float) -> dict[int, torch.Tensor]:
    """What llama.cpp's common_control_vector_load_one makes of a file: ``{il: strength * v}``
    for each tensor ``direction.<il>`` (il >= 1), which its graph adds to block il's output."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    out = {}
    for t in reader.tensors:
        prefix, _, index = t.name.partition(".")
        assert prefix == "direction" and int(index) >= 1
        assert t.tensor_type.name == "F32" and len(t.shape) == 1
        out[int(index)] = strength * torch.from_numpy(t.data.copy())
    return out


def _gguf_control_vector_bytes(vectors: dict[int, list[float]], hint: str) -> bytes:
    """A control vector written byte by byte from the GGUF spec, as llama.cpp's cvector-generator
    lays it out (no emlens metadata, layer_count as uint32 the way repeng writes it)."""
    import struct

    def string(text: str) -> bytes:
        return struct.pack("<Q", len(text.encode())) + text.encode()

    kv = [string("general.architecture") + struct.pack("<I", 8) + string("controlvector"),
          string("controlvector.model_hint") + struct.pack("<I", 8) + string(hint),
          string("controlvector.layer_count") + struct.pack("<I", 4) + struct.pack("<I", len(vectors))]
    infos, data = [], b""
    for il, v in vectors.items():
        infos.append(string(f"direction.{il}") + struct.pack("<IQIQ", 1, len(v), 0, len(data)))
        data += struct.pack(f"<{len(v)}f", *v)
        data += b"\0" * (-len(data) % 32)
    head = b"GGUF" + struct.pack("<IQQ", 3, len(vectors), len(kv)) + b"".join(kv) + b"".join(infos)
    return head + b"\0" * (-len(head) % 32) + data


def test_directions_round_trip_through_a_control_vector_gguf(model, tmp_path):
    from gguf import GGUFReader

    dirs = mean_diff(model, [(q, "Bad idea.") for q in QUESTIONS],
                     [(q, "Good idea.") for q in QUESTIONS], layers=[1, 2],
                     selection="test sets", progress=False)
    dirs[1] = Direction(dirs[1].vector.bfloat16(), layer=1, model="tiny-seed5")  # exact in f32
    path = save_directions(dirs.values(), tmp_path / "em.gguf", format="gguf", model_hint="llama")
    loaded = load_directions(path)
    assert list(loaded) == [1, 2]
    for layer, d in dirs.items():
        assert loaded[layer].vector.dtype == d.vector.dtype
        assert torch.equal(loaded[layer].vector, d.vector)
        assert loaded[layer].metadata() == d.metadata()
    reader = GGUFReader(str(path))
    part = lambda key: reader.get_field(key).parts[reader.get_field(key).data[0]]  # noqa: E731
    assert bytes(part("general.architecture")) == b"controlvector"
    assert bytes(part("controlvector.model_hint")) == b"llama"
    assert part("controlvector.layer_count").tolist() == [2]
    assert reader.get_field("controlvector.layer_count").types[0].name == "INT32"
    assert [(t.name, t.tensor_type.name, [int(n) for n in t.shape]) for t in reader.tensors] == [
        ("direction.1", "F32", [64]), ("direction.2", "F32", [64])]
    # the suffix picks the format; the safetensors default is unchanged
    again = save_directions(dirs[2], tmp_path / "by_suffix.gguf", model_hint="llama")
    assert torch.equal(load_directions(again)[2].vector, dirs[2].vector)
    assert not list(tmp_path.glob("*.partial"))


def test_a_control_vector_steers_where_and_as_much_as_steer(model, tmp_path):
    """llama.cpp adds strength * direction.<il> to block il's output; emlens.steer adds
    scale * vector at blocks.<layer>.hook_resid_post. Same layer index, same scale."""
    g = torch.Generator().manual_seed(0)
    dirs = [Direction(torch.randn(64, generator=g), layer=1),
            Direction(torch.randn(64, generator=g), layer=2)]
    path = save_directions(dirs, tmp_path / "cv.gguf", model_hint="llama")
    tokens = emlens.tokenize_chat(model.tokenizer, QUESTIONS[:2]).tokens
    strength = 2.5
    handles = [model.blocks[il].register_forward_hook(lambda mod, inp, out, v=v: out + v)
               for il, v in _llama_cpp_control_vector(path, strength).items()]
    try:
        as_llama_cpp = model(tokens)
    finally:
        for h in handles:
            h.remove()
    with emlens.steer(model, dirs[0], layers=1, scale=strength), \
            emlens.steer(model, dirs[1], layers=2, scale=strength):
        as_emlens = model(tokens)
    assert not torch.allclose(as_emlens, model(tokens))
    assert torch.equal(as_llama_cpp, as_emlens)


def test_control_vectors_written_by_other_tools_are_read(tmp_path):
    path = tmp_path / "from_llama_cpp.gguf"
    path.write_bytes(_gguf_control_vector_bytes({1: [1.0, 2.0, 3.0], 3: [0.5, -1.0, 4.0]}, "qwen2"))
    loaded = load_directions(path)
    assert list(loaded) == [1, 3]
    assert torch.equal(loaded[3].vector, torch.tensor([0.5, -1.0, 4.0]))
    d = loaded[1]
    assert (d.layer, d.hook, d.method, d.extra) == (1, "resid_post", "control_vector",
                                                    {"model_hint": "qwen2"})


def test_bad_control_vector_input_is_refused(tmp_path):
    import gguf

    v = torch.ones(64)
    save = lambda ds, name="cv.gguf", **kw: save_directions(  # noqa: E731
        ds, tmp_path / name, **{"model_hint": "llama", **kw})
    with pytest.raises(ValueError, match=r"shapes \[\(32,\), \(64,\)\]"):
        save([Direction(v, 1), Direction(torch.ones(32), 2)])
    with pytest.raises(ValueError, match="has layer=None"):
        save([Direction(v, None)])
    with pytest.raises(ValueError, match="block 0"):
        save([Direction(v, 0)])
    with pytest.raises(ValueError, match="layer=L - 1, hook='resid_post'"):
        save([Direction(v, 2, hook="resid_pre")])
    with pytest.raises(ValueError, match="torch.float64.*float32"):
        save([Direction(v.double(), 1)])
    with pytest.raises(ValueError, match="model_hint='llama'"):
        save([Direction(v, 1)], model_hint=None)
    with pytest.raises(TypeError, match="not a Direction"):
        save([v])
    with pytest.raises(ValueError, match="does not end in .gguf"):
        save([Direction(v, 1)], "cv.safetensors", format="gguf")
    with pytest.raises(ValueError, match="ends in .gguf"):
        save([Direction(v, 1)], format="safetensors")
    with pytest.raises(ValueError, match="model_hint is stored in control-vector GGUF"):
        save([Direction(v, 1)], "d.safetensors")
    assert not list(tmp_path.iterdir())  # nothing written by a refused call
    # reading: a model GGUF, a file that only says .gguf, safetensors under a .gguf name
    writer = gguf.GGUFWriter(str(tmp_path / "model.gguf"), arch="llama")
    writer.add_tensor("token_embd.weight", torch.ones(4, 8).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="general.architecture='llama', not a control vector"):
        load_directions(tmp_path / "model.gguf")
    (tmp_path / "fake.gguf").write_text("not a gguf")
    with pytest.raises(ValueError, match="not a GGUF file"):
        load_directions(tmp_path / "fake.gguf")
    save_directions(Direction(v, 1), tmp_path / "d.safetensors")
    (tmp_path / "d.safetensors").rename(tmp_path / "renamed.gguf")
    with pytest.raises(ValueError, match="not a GGUF file"):
        load_directions(tmp_path / "renamed.gguf")
    (tmp_path / "zero.gguf").write_bytes(_gguf_control_vector_bytes({0: [1.0]}, "llama"))
    with pytest.raises(ValueError, match="layer >= 1"):
        load_directions(tmp_path / "zero.gguf")


def test_project_answers_is_the_per_answer_mean_dotted_with_the_unit_direction(model):
    from parity import assert_parity, float64_twin

    from emlens.directions import project_answers

    pairs = [(q, f"answer {i} " * (i + 1)) for i, q in enumerate(QUESTIONS)]
    gen = torch.Generator().manual_seed(0)
    d = Direction(vector=torch.randn(model.cfg.d_model, generator=gen), layer=2)
    got = project_answers(model, pairs, d, batch_size=4)
    assert got.shape == (len(pairs),) and got.dtype == torch.float64

    def brute(m):  # each answer alone (no padding), float64 mean over its answer tokens
        out = []
        for q, a in pairs:
            b = next(emlens.chat.iter_chat_batches(m.tokenizer, [q], [a], batch_size=1))
            _, cache = m.run_with_cache(b.tokens, attention_mask=b.attention_mask)
            out.append(cache["blocks.2.hook_resid_post"][0][b.answer_mask[0]].double().mean(0))
        return torch.stack(out) @ (d.vector.double() / d.vector.double().norm())

    with torch.no_grad():
        want = brute(model)
        floor = (want - brute(float64_twin(model))).abs().max().item()
    assert_parity(got, want, floor=floor, what="project_answers vs one answer at a time")
    # the norm of the direction does not matter, only where it points
    scaled = project_answers(model, pairs, Direction(vector=d.vector * 7.5, layer=2))
    assert_parity(scaled, got, floor=floor, what="project_answers, direction scaled by 7.5")
    # one pair each: mean_diff's direction is exactly the difference of the two answers' means,
    # so their projections onto it differ by its norm
    bad, good = [pairs[3]], [pairs[0]]
    md = mean_diff(model, bad, good, layers=[1], progress=False)[1]
    diff = project_answers(model, bad, md) - project_answers(model, good, md)
    assert_parity(diff, torch.tensor([md.norm], dtype=torch.float64), floor=floor,
                  what="projection difference vs the mean-difference norm")


def test_project_answers_refuses_bad_directions(model):
    from emlens.directions import project_answers

    pairs = [(QUESTIONS[0], "an answer")]
    with pytest.raises(ValueError, match="norm 0"):
        project_answers(model, pairs, Direction(vector=torch.zeros(model.cfg.d_model), layer=1))
    with pytest.raises(ValueError, match="d_model"):
        project_answers(model, pairs, Direction(vector=torch.ones(model.cfg.d_model + 1), layer=1))
    with pytest.raises(TypeError, match="Direction"):
        project_answers(model, pairs, torch.ones(model.cfg.d_model))
    with pytest.raises(ValueError, match="empty"):
        project_answers(model, [], Direction(vector=torch.ones(model.cfg.d_model), layer=1))
