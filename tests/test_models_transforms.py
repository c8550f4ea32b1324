"""Transforms over parameter dicts: math against dense matrices, purity (inputs bit-identical), filters, chains."""

import json
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rotfn
import rotfn.testing as rt
from rotfn import transforms as T
from rotfn.errors import SelectionError


def _snapshot(params):
    return {k: (v, rt.bits(v).clone()) for k, v in params.items()}


def _assert_unchanged(params, snap):
    assert list(params) == list(snap), "input dict keys changed"
    for k, (obj, b) in snap.items():
        assert params[k] is obj, f"input dict entry {k} replaced"
        rt.assert_bits_equal(rt.bits(params[k]), b, name=f"input {k}")


@st.composite
def linear_params(draw, n_in, n_out):
    seed = draw(rt.seeds())
    return {
        "lin.weight": rt.make_tensor("normal", (n_out, n_in), seed, dtype=torch.float64),
        "lin.bias": rt.make_tensor("normal", (n_out,), seed + 1, dtype=torch.float64),
        "other.weight": rt.make_tensor("normal", (3, 5), seed + 2, dtype=torch.float32),
    }


@settings(max_examples=15)
@given(st.data())
def test_rotate_input_and_output_match_dense_math_and_leave_inputs_alone(data):
    R = data.draw(rt.rotations(16, max_n=16))
    S = data.draw(rt.rotations(8, max_n=8))
    p = data.draw(linear_params(16, 8))
    snap = _snapshot(p)
    q = rotfn.chain(T.rotate_input(R, "lin.weight"), T.rotate_output(S, ("lin.weight", "lin.bias")))(p)
    _assert_unchanged(p, snap)
    assert q is not p and q["other.weight"] is p["other.weight"]
    m, s = R.matrix(), S.matrix()
    torch.testing.assert_close(q["lin.weight"], s.T @ p["lin.weight"] @ m, rtol=0, atol=1e-12)
    torch.testing.assert_close(q["lin.bias"], p["lin.bias"] @ s, rtol=0, atol=1e-12)
    # the layer reads x @ R and writes y @ S
    x = rt.make_tensor("normal", (4, 16), 7, dtype=torch.float64)
    y = x @ p["lin.weight"].T + p["lin.bias"]
    torch.testing.assert_close((x @ m) @ q["lin.weight"].T + q["lin.bias"], y @ s, rtol=0, atol=1e-11)


@settings(max_examples=10)
@given(rt.rotations(4, max_n=4), rt.seeds())
def test_per_head_and_span_rotate_each_head_only(R, seed):
    heads, hd, rows_q = 3, 4, 5
    w = rt.make_tensor("normal", (rows_q + heads * hd, 6), seed, dtype=torch.float64)
    p = {"qkv.weight": w}
    q = T.rotate_output(R, "qkv.weight", per_head=True, span=(rows_q, rows_q + heads * hd))(p)["qkv.weight"]
    rt.assert_bits_equal(q[:rows_q], w[:rows_q], name="rows outside the span")
    blocks = torch.block_diag(*[R.matrix()] * heads)
    torch.testing.assert_close(q[rows_q:], blocks.T @ w[rows_q:], rtol=0, atol=1e-12)
    v_t = w[rows_q:].T.contiguous()
    o = T.rotate_input(R, "o", per_head=True)({"o": v_t})["o"]
    torch.testing.assert_close(o, v_t @ blocks, rtol=0, atol=1e-12)


@settings(max_examples=10)
@given(rt.rotations(8, max_n=8), rt.rotations(8, max_n=8))
def test_chain_of_rotations_has_an_inverse(R, S):
    p = {"w": rt.make_tensor("normal", (8, 8), 3, dtype=torch.float64), "b": torch.ones(8, dtype=torch.float64)}
    t = rotfn.chain(T.rotate_input(R, "w"), T.rotate_output(S, ("w", "b")), T.rotate_input(S, "w"))
    back = t.inverse()(t(p))
    for k, v in p.items():
        torch.testing.assert_close(back[k], v, rtol=0, atol=1e-12)
    assert isinstance(t.inverse(), T.Chain) and len(t.transforms) == 3


def test_transforms_keep_dtype_and_compute_in_float64():
    R = rotfn.orthogonal(8, seed=0)
    w = torch.randn(4, 8, dtype=torch.bfloat16)
    out = T.rotate_input(R, "w")({"w": w})["w"]
    assert out.dtype == torch.bfloat16
    rt.assert_bits_equal(out, (w.double() @ R.matrix()).to(torch.bfloat16))


def test_fuse_norm_rms_and_layernorm_are_exact():
    torch.manual_seed(0)
    ln = torch.nn.LayerNorm(8, dtype=torch.float64)
    lin = torch.nn.Linear(8, 4, dtype=torch.float64)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.normal_()
    model = torch.nn.Sequential(ln, lin)
    p = rotfn.params(model)
    snap = _snapshot(p)
    q = T.fuse_norm("0.weight", "1.weight", bias="0.bias")(p)
    _assert_unchanged(p, snap)
    assert torch.equal(q["0.weight"], torch.ones(8, dtype=torch.float64)) and not q["0.bias"].any()
    x = torch.randn(5, 8, dtype=torch.float64)
    torch.testing.assert_close(rotfn.call(model, q, None, x), model(x), rtol=0, atol=1e-12)
    rms = {"n": torch.tensor([2.0, 0.5]), "a.weight": torch.ones(3, 2), "b.weight": torch.full((1, 2), 2.0)}
    r = T.fuse_norm("n", rotfn.where("a.weight", "b.weight"))(rms)
    assert r["a.weight"].tolist() == [[2.0, 0.5]] * 3 and r["b.weight"].tolist() == [[4.0, 1.0]]


@settings(max_examples=10)
@given(rt.formats(("mxfp4", "nvfp4", "intq")), rt.seeds())
def test_qdq_weights_is_qdq_on_the_last_dim(fmt, seed):
    w = rt.make_tensor("outliers", (4, 64), seed)
    q = T.qdq_weights(fmt, "w")({"w": w})["w"]
    rt.assert_bits_equal(q, rotfn.qdq(w.double(), fmt).float())


def test_where_selectors_glob_regex_predicate_tuple():
    p = {"a.q_proj.weight": torch.ones(2, 2), "a.k_proj.weight": torch.ones(2, 2), "a.q_proj.bias": torch.ones(2)}
    assert rotfn.where("*.q_proj.*").select(p) == ["a.q_proj.weight", "a.q_proj.bias"]
    assert rotfn.where(re.compile(r"a\.k_proj\.\w+")).select(p) == ["a.k_proj.weight"]
    assert rotfn.where(lambda name, t: t.ndim == 1).select(p) == ["a.q_proj.bias"]
    assert rotfn.where(("*.k_proj.weight", "*.bias")).select(p) == ["a.k_proj.weight", "a.q_proj.bias"]
    w = rotfn.where("*.weight") | rotfn.where(re.compile("x"))
    assert repr(w) == "where('*.weight', re.compile('x'))"
    assert hash(w) == hash(rotfn.where("*.weight", re.compile("x")))
    assert rotfn.Where.from_dict(json.loads(json.dumps(w.to_dict()))) == w


def test_where_matching_nothing_lists_close_keys():
    p = {"model.layers.0.self_attn.q_proj.weight": torch.ones(1), "model.layers.0.mlp.up_proj.weight": torch.ones(1)}
    with pytest.raises(SelectionError, match=r"rotate_input: argument 'where'.*close.*q_proj") as info:
        T.rotate_input(rotfn.hadamard(1), "model.layers.0.self_attn.q_proj.weigth")(p)
    assert isinstance(info.value, KeyError) and str(info.value).startswith("rotate_input")


def test_transform_values_print_and_compare():
    R = rotfn.hadamard(8, seed=1)
    t = T.rotate_output(R, "*.o_proj.weight", per_head=True)
    assert repr(t) == "rotate_output(Rotation(hadamard, n=8, seed=1), where('*.o_proj.weight'), per_head=True)"
    assert t == T.rotate_output(R, "*.o_proj.weight", per_head=True) and hash(t) == hash(t)
    assert repr(rotfn.chain(t, T.qdq_weights(rotfn.mxfp4(), "*"))).startswith("chain(rotate_output(")
