"""SAEConfig validation: every bad combination raises ValueError naming the field. CPU only."""

from __future__ import annotations

import dataclasses
import json

import pytest

from polysae import SAEConfig


@pytest.mark.parametrize("kw,field", [
    (dict(k=65), "k"),
    (dict(k=0), "k"),
    (dict(d_in=0), "d_in"),
    (dict(d_sae=-3), "d_sae"),
    (dict(sparsifier="gated"), "sparsifier"),
    (dict(decoder="mlp"), "decoder"),
    (dict(order=4), "order"),
    (dict(order=0), "order"),
    (dict(ranks=(8, 9, 2)), "ranks"),             # R1 < R2
    (dict(ranks=(8, 2, 9)), "ranks"),             # R1 < R3
    (dict(ranks=(65, 4, 4), d_in=80), "ranks"),   # R1 > d_sae: U cannot be orthonormal
    (dict(ranks=(40, 4, 4)), "ranks"),            # R1 > d_in
    (dict(ranks=(8, 0, 2)), "ranks"),
    (dict(ranks=(8, 2)), "ranks"),
    (dict(ranks=(30, 20, 20), shared_u=False), "ranks"),  # R1+R2+R3 > d_sae in separate mode
    (dict(ranks=(8, 2, 4), shared_u=False), "ranks"),     # R2 < R3 in separate mode
    (dict(dtype="int8"), "dtype"),
    (dict(sparsifier="matryoshka", matryoshka_widths=(8, 4, 64)), "matryoshka_widths"),
    (dict(sparsifier="matryoshka", matryoshka_widths=(8, 32)), "matryoshka_widths"),
    (dict(jumprelu_bandwidth=0.0), "jumprelu_bandwidth"),
    (dict(l1_coefficient=-1.0), "l1_coefficient"),
    (dict(aux_k=0), "aux_k"),
    (dict(batchtopk_threshold_momentum=0.0), "batchtopk_threshold_momentum"),
    (dict(batchtopk_inference="median"), "batchtopk_inference"),
])
def test_bad_config_names_field(kw, field):
    base = dict(d_in=32, d_sae=64, k=8)
    base.update(kw)
    with pytest.raises(ValueError, match=rf"SAEConfig\.{field}\b"):
        SAEConfig(**base)


def test_defaults_follow_the_paper():
    c = SAEConfig(d_in=768, d_sae=16384)
    assert c.ranks == (768, 64, 64) and c.order == 3 and c.shared_u
    assert (c.lambda2_init, c.lambda3_init) == (-0.5, 0.5)
    assert c.apply_b_dec_to_input and c.dtype == "float32" and c.k == 64
    assert c.effective_aux_k == 384
    m = SAEConfig(d_in=768, d_sae=16384, sparsifier="matryoshka")
    assert m.matryoshka_widths == (512, 2048, 16384)
    # a linear decoder ignores the rank constraints
    SAEConfig(d_in=8, d_sae=16, k=4, decoder="linear", ranks=(100, 100, 100))


def test_every_field_has_a_docstring():
    import ast
    import inspect

    import polysae.config as mod

    tree = ast.parse(inspect.getsource(mod))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "SAEConfig")
    documented = set()
    for a, b in zip(cls.body, cls.body[1:]):
        if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value,
                                                                                   ast.Constant):
            documented.add(a.target.id)
    assert documented == {f.name for f in dataclasses.fields(SAEConfig)}


def test_dict_round_trip_drops_unknown_keys():
    c = SAEConfig(d_in=32, d_sae=64, k=8, sparsifier="matryoshka", ranks=(16, 4, 2))
    d = json.loads(json.dumps(c.to_dict()))
    d["a_future_field"] = 1
    assert SAEConfig.from_dict(d) == c
