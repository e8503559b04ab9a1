"""Interop: checkpoints written by hand in each tool's layout load into models that follow that
tool's own equations (written out below, independently of polysae's code), and exports load back.

Shapes are tiny (D=12, F=40) so the whole file runs in a few seconds on CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import polysae
from polysae import SAE, SAEConfig
from polysae.__main__ import main as cli_main
from polysae.evaluation.saebench import LINEAR_DECODER_METRICS, SAEBenchSAE
from polysae.formats import detect_format, export, read_checkpoint

D, FL, K = 12, 40, 5
ATOL = 1e-5


def _rand(g, *shape, scale=1.0):
    return torch.randn(*shape, generator=g) * scale


def _orth(g, n, r):
    q, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))
    return q.float()


def _x(g, n=33):
    return _rand(g, n, D)


# -- each source's own equations ---------------------------------------------------------------
def topk_relu(pre, k):
    """SAELens TopK: top k of the pre-activations per row, ReLU on them, zeros elsewhere."""
    v, i = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, i, F.relu(v))


def saelens_encode(x, t, arch, k=None, apply_b_dec=True, thr=None):
    sae_in = x - t["b_dec"] if apply_b_dec else x
    pre = sae_in @ t["W_enc"] + t["b_enc"]
    if arch == "standard":
        return F.relu(pre)
    if arch == "topk":
        return topk_relu(pre, k)
    if arch == "jumprelu":
        return F.relu(pre) * (pre > thr)
    raise AssertionError(arch)


def saelens_decode(z, t):
    return z @ t["W_dec"] + t["b_dec"]


def reference_poly_decode(z, t, ranks, order, shared):
    """docs/method.md (the reference code's _poly_decode) with U_shared or U1/U2/U3."""
    r1, r2, r3 = ranks
    if shared:
        a = z @ t["U_shared"]
        out = t["b_dec"] + a @ t["C1"].T
        if order >= 2:
            out = out + t["lambda2"] * (a[:, :r2] * a[:, :r2]) @ t["C2"].T
        if order >= 3:
            out = out + t["lambda3"] * (a[:, :r3] ** 3) @ t["C3"].T
        return out
    a1 = z @ t["U1"]
    out = t["b_dec"] + a1 @ t["C1"].T
    if order >= 2:
        out = out + t["lambda2"] * ((a1[:, :r2] * (z @ t["U2"])) @ t["C2"].T)
    if order >= 3:
        y3 = a1[:, :r3] * (z @ t["U2"][:, :r3]) * (z @ t["U3"])
        out = out + t["lambda3"] * (y3 @ t["C3"].T)
    return out


# -- writing source checkpoints by hand --------------------------------------------------------
def _saelens_tensors(g):
    return {"W_enc": _rand(g, D, FL, scale=0.5), "b_enc": _rand(g, FL, scale=0.1),
            "W_dec": _rand(g, FL, D, scale=0.3), "b_dec": _rand(g, D, scale=0.2)}


def _write(folder: Path, cfg: dict, tensors: dict, weights: str = "sae_weights.safetensors",
           cfg_name: str = "cfg.json") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / weights))
    (folder / cfg_name).write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu"])
def test_saelens_matches_its_equations(tmp_path, gen, arch):
    t = _saelens_tensors(gen)
    cfg = {"architecture": arch, "d_in": D, "d_sae": FL, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": "none",
           "metadata": {"model_name": "gpt2", "hook_name": "blocks.3.hook_resid_pre"}}
    thr = None
    if arch == "topk":
        cfg["k"] = K
    if arch == "jumprelu":
        # some negative thresholds: SAELens' relu(pre)*(pre>t) must still hold there
        thr = _rand(gen, FL, scale=0.3)
        t["threshold"] = thr
    folder = _write(tmp_path / arch, cfg, t)
    assert detect_format(folder) == "saelens"
    out = read_checkpoint(folder)
    assert out.metadata["model"] == "gpt2" and out.metadata["hook"] == "blocks.3.hook_resid_pre"
    x = _x(gen)
    z = saelens_encode(x, t, arch, K, True, thr)
    assert (z != 0).any()
    torch.testing.assert_close(out.sae.encode(x), z, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.sae(x), saelens_decode(z, t), atol=ATOL, rtol=1e-5)
    # polysae.load on the folder gives the same model
    torch.testing.assert_close(polysae.load(folder)(x), saelens_decode(z, t), atol=ATOL,
                               rtol=1e-5)


def test_saelens_batchtopk_threshold_and_old_style_topk(tmp_path, gen):
    t = _saelens_tensors(gen)
    t["topk_threshold"] = torch.tensor(0.4, dtype=torch.float64)
    cfg = {"architecture": "batchtopk", "d_in": D, "d_sae": FL, "k": K,
           "apply_b_dec_to_input": False, "model_name": "m", "hook_name": "blocks.0.hook_x"}
    sae = read_checkpoint(_write(tmp_path / "b", cfg, t)).sae
    assert sae.cfg.sparsifier == "batchtopk"
    x = _x(gen)
    # SAELens' BatchTopK inference form: JumpReLU at the scalar EMA threshold, no b_dec on input
    z = saelens_encode(x, t, "jumprelu", apply_b_dec=False, thr=0.4)
    torch.testing.assert_close(sae.encode(x), z, atol=ATOL, rtol=0)
    torch.testing.assert_close(sae(x), saelens_decode(z, t), atol=ATOL, rtol=1e-5)

    # SAELens <6 stored TopK SAEs as 'standard' + activation_fn_str 'topk' (OpenAI's releases)
    t2 = _saelens_tensors(gen)
    old = {"d_in": D, "d_sae": FL, "activation_fn_str": "topk",
           "activation_fn_kwargs": {"k": 3}, "hook_name": "blocks.5.hook_resid_post"}
    out = read_checkpoint(_write(tmp_path / "old", old, t2))
    assert out.metadata["hook"] == "blocks.5.hook_resid_post"
    # SAELens <1: hook_point keys, no architecture, no d_in/d_sae (taken from W_enc)
    oldest = {"model_name": "gpt2-small", "hook_point": "blocks.8.hook_resid_pre",
              "hook_point_layer": 8, "hook_point_head_index": None, "dtype": "torch.float32"}
    out0 = read_checkpoint(_write(tmp_path / "oldest", oldest, t2))
    assert (out0.metadata["hook"], out0.sae.cfg.sparsifier) == ("blocks.8.hook_resid_pre", "relu")
    z0 = saelens_encode(x, t2, "standard")
    torch.testing.assert_close(out0.sae(x), saelens_decode(z0, t2), atol=ATOL, rtol=1e-5)
    z2 = saelens_encode(x, t2, "topk", 3)
    torch.testing.assert_close(out.sae(x), saelens_decode(z2, t2), atol=ATOL, rtol=1e-5)


def test_sparsify_matches_its_equations(tmp_path, gen):
    enc_w, enc_b = _rand(gen, FL, D, scale=0.5), _rand(gen, FL, scale=0.1)
    W_dec, b_dec = _rand(gen, FL, D, scale=0.3), _rand(gen, D, scale=0.2)
    folder = _write(tmp_path / "layers.3",
                    {"expansion_factor": 4, "normalize_decoder": True, "num_latents": FL, "k": K,
                     "multi_topk": False, "skip_connection": False, "d_in": D},
                    {"encoder.weight": enc_w, "encoder.bias": enc_b, "W_dec": W_dec,
                     "b_dec": b_dec}, weights="sae.safetensors")
    assert detect_format(folder) == "sparsify"
    # sparsify names the folder after the module: layers.3 is block 3's output
    assert read_checkpoint(folder).metadata["hook"] == "blocks.3.hook_resid_post"
    x = _x(gen)
    # sparsify: top-k of relu(encoder(x - b_dec)); decode = sum of top-k rows of W_dec + b_dec
    pre = F.relu((x - b_dec) @ enc_w.T + enc_b)
    v, i = pre.topk(K, dim=-1)
    want = (v[..., None] * W_dec[i]).sum(-2) + b_dec
    torch.testing.assert_close(polysae.load(folder)(x), want, atol=ATOL, rtol=1e-5)


def test_gemmascope_npz_matches_its_equations(tmp_path, gen):
    p = {"W_enc": _rand(gen, D, FL, scale=0.5), "W_dec": _rand(gen, FL, D, scale=0.3),
         "b_enc": _rand(gen, FL, scale=0.1), "b_dec": _rand(gen, D, scale=0.5),
         "threshold": _rand(gen, FL, scale=0.2).abs()}
    folder = tmp_path / "layer_12" / "width_16k" / "average_l0_82"
    folder.mkdir(parents=True)
    np.savez(folder / "params.npz", **{k: v.numpy() for k, v in p.items()})
    out = read_checkpoint(folder)
    assert out.format == "gemmascope" and out.metadata["hook"] is None  # "res" not in the path
    x = _x(gen)
    pre = x @ p["W_enc"] + p["b_enc"]  # Gemma Scope: no b_dec subtraction on the input
    z = F.relu(pre) * (pre > p["threshold"])
    torch.testing.assert_close(out.sae.encode(x), z, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.sae(x), z @ p["W_dec"] + p["b_dec"], atol=ATOL, rtol=1e-5)
    named = tmp_path / "gemma-scope-2b-pt-res" / "layer_12" / "width_16k" / "average_l0_82"
    named.mkdir(parents=True)
    (named / "params.npz").write_bytes((folder / "params.npz").read_bytes())
    assert read_checkpoint(named).metadata["hook"] == "blocks.12.hook_resid_post"


# -- reference PolySAE -------------------------------------------------------------------------
def _reference_folder(tmp: Path, g, *, shared, order, ranks, arch="poly_topk",
                      single_rank=False) -> tuple[Path, dict]:
    r1, r2, r3 = ranks
    t = {"W_enc": _rand(g, D, FL, scale=0.5), "b_enc": _rand(g, FL, scale=0.1),
         "b_dec": _rand(g, D, scale=0.2), "W_dec": _rand(g, FL, D),  # unused by the reference
         "C1": _rand(g, D, r1, scale=0.5)}
    zeros = torch.zeros
    if shared:
        t["U_shared"] = _orth(g, FL, r1)
        t.update(U1=zeros(FL, r1), U2=zeros(FL, r2), U3=zeros(FL, r3))  # placeholders
    else:
        q = _orth(g, FL, r1 + r2 + r3)
        t.update(U1=q[:, :r1], U2=q[:, r1:r1 + r2], U3=q[:, r1 + r2:])
    t["C2"] = _rand(g, D, r2, scale=0.5) if order >= 2 else zeros(D, r2)
    t["lambda2"] = torch.tensor(-0.7) if order >= 2 else torch.tensor(0.0)
    t["C3"] = _rand(g, D, r3, scale=0.5) if order >= 3 else zeros(D, r3)
    t["lambda3"] = torch.tensor(0.4) if order >= 3 else torch.tensor(0.0)
    cfg = {"architecture": arch, "d_in": D, "d_sae": FL, "k": K, "poly_order": order,
           "shared_u": shared, "apply_b_dec_to_input": True, "normalize_activations": "none",
           "metadata": {"model_name": "gpt2", "hook_name": "blocks.8.hook_resid_pre"}}
    if single_rank:
        cfg["poly_rank"] = r1
    else:
        cfg["poly_ranks"] = list(ranks)
    if arch == "poly_jumprelu":
        t["threshold"] = _rand(g, FL, scale=0.3)
    return _write(tmp, cfg, t), t


@pytest.mark.parametrize("shared,order,ranks,single", [
    (True, 3, (12, 4, 3), False),
    (False, 3, (8, 5, 3), False),
    (True, 2, (10, 6, 6), False),
    (False, 3, (6, 6, 6), True),
])
def test_reference_poly_matches_its_equations(tmp_path, gen, shared, order, ranks, single):
    folder, t = _reference_folder(tmp_path / "ref", gen, shared=shared, order=order,
                                  ranks=ranks, single_rank=single)
    assert detect_format(folder) == "polysae-ref"
    out = read_checkpoint(folder)
    c = out.sae.cfg
    assert (c.decoder, c.shared_u, c.order, c.ranks) == ("poly", shared, order, ranks)
    x = _x(gen)
    z = saelens_encode(x, t, "topk", K)
    torch.testing.assert_close(out.sae.encode(x), z, atol=ATOL, rtol=0)
    want = reference_poly_decode(z, t, ranks, order, shared)
    torch.testing.assert_close(out.sae(x), want, atol=1e-4, rtol=1e-4)
    # the dense and the sparse decode of arbitrary codes agree with the reference too
    codes = F.relu(_rand(gen, 7, FL)) * (torch.rand(7, FL, generator=gen) < 0.2)
    for path in ("dense", "sparse"):
        torch.testing.assert_close(out.sae.decode(codes, path=path),
                                   reference_poly_decode(codes, t, ranks, order, shared),
                                   atol=1e-4, rtol=1e-4)


def test_reference_poly_jumprelu(tmp_path, gen):
    folder, t = _reference_folder(tmp_path / "j", gen, shared=True, order=3, ranks=(12, 4, 4),
                                  arch="poly_jumprelu")
    sae = polysae.load(folder)
    x = _x(gen)
    z = saelens_encode(x, t, "jumprelu", thr=t["threshold"])
    torch.testing.assert_close(sae(x), reference_poly_decode(z, t, (12, 4, 4), 3, True),
                               atol=1e-4, rtol=1e-4)


# -- export and re-import ----------------------------------------------------------------------
def _trained_like(cfg: SAEConfig, g) -> SAE:
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
    sae = SAE(cfg)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.05)
        sae.b_dec.normal_(0, 0.2)
        if cfg.uses_threshold:
            sae.threshold.fill_(0.02)
    return sae.eval()


@pytest.mark.parametrize("sparsifier", ["topk", "relu", "jumprelu", "batchtopk"])
def test_export_saelens_follows_saelens_equations_and_round_trips(tmp_path, gen, sparsifier):
    cfg = SAEConfig(d_in=D, d_sae=FL, k=K, sparsifier=sparsifier, decoder="linear")
    sae = _trained_like(cfg, gen)
    out = tmp_path / "sl"
    export(sae, out, "saelens", metadata={"model": "gpt2", "hook": "blocks.2.hook_resid_pre"})
    doc = json.loads((out / "cfg.json").read_text())
    t = load_file(str(out / "sae_weights.safetensors"))
    x = _x(gen)
    arch = doc["architecture"]
    assert doc["metadata"]["hook_name"] == "blocks.2.hook_resid_pre"
    z = saelens_encode(x, t, arch, doc.get("k"), doc["apply_b_dec_to_input"], t.get("threshold"))
    with torch.no_grad():
        torch.testing.assert_close(sae(x), saelens_decode(z, t), atol=ATOL, rtol=1e-5)
        back = polysae.load(out)
        assert back.cfg.sparsifier == sparsifier
        torch.testing.assert_close(back(x), sae(x), atol=ATOL, rtol=0)


@pytest.mark.parametrize("sparsifier,shared,order", [("topk", True, 3), ("topk", False, 3),
                                                     ("batchtopk", True, 2),
                                                     ("matryoshka", True, 3)])
def test_export_reference_follows_its_equations_and_round_trips(tmp_path, gen, sparsifier,
                                                                shared, order):
    cfg = SAEConfig(d_in=D, d_sae=FL, k=K, sparsifier=sparsifier, decoder="poly",
                    ranks=(D, 4, 3), order=order, shared_u=shared)
    sae = _trained_like(cfg, gen)
    out = tmp_path / "ref"
    export(sae, out, "polysae-ref")
    doc = json.loads((out / "cfg.json").read_text())
    t = load_file(str(out / "sae_weights.safetensors"))
    ranks = tuple(doc["poly_ranks"])
    # every buffer the reference module registers is present (strict load_state_dict)
    need = {"W_enc", "b_enc", "b_dec", "W_dec", "C1", "C2", "C3", "lambda2", "lambda3", "U1",
            "U2", "U3"} | ({"U_shared"} if shared else set())
    assert need <= set(t)
    # W_dec: unit-norm linear atoms, computed here from the exported factors
    U = t["U_shared"] if shared else t["U1"]
    lin = U @ t["C1"].T
    torch.testing.assert_close(t["W_dec"], lin / lin.norm(dim=-1, keepdim=True), atol=1e-5,
                               rtol=1e-5)
    x = _x(gen)
    thr = t.get("threshold")
    z = saelens_encode(x, t, "jumprelu" if thr is not None else "topk", doc.get("k"), True, thr)
    with torch.no_grad():
        want = reference_poly_decode(z, t, ranks, doc["poly_order"], doc["shared_u"])
        torch.testing.assert_close(sae(x), want, atol=1e-4, rtol=1e-4)
        back = polysae.load(out)
        assert (back.cfg.sparsifier, back.cfg.shared_u, back.cfg.order, back.cfg.ranks) == \
            (sparsifier, shared, order, (D, 4, 3))
        for name, v in sae.tensors().items():
            # the float64 EMA threshold is exported in the weights' dtype; polysae compares it in
            # the pre-activations' dtype (float32) anyway, so outputs stay bit-identical
            got = back.tensors()[name]
            torch.testing.assert_close(got.to(v.dtype) if name != "threshold" else got.float(),
                                       v if name != "threshold" else v.float(), atol=0, rtol=0)
        torch.testing.assert_close(back(x), sae(x), atol=0, rtol=0)


def test_export_refusals_and_cli(tmp_path, gen):
    poly = _trained_like(SAEConfig(d_in=D, d_sae=FL, k=K, ranks=(D, 4, 4)), gen)
    lin = _trained_like(SAEConfig(d_in=D, d_sae=FL, k=K, decoder="linear"), gen)
    with pytest.raises(ValueError, match="polysae-ref"):
        export(poly, tmp_path / "a", "saelens")
    with pytest.raises(ValueError, match="saelens"):
        export(lin, tmp_path / "b", "polysae-ref")
    fresh = SAE(SAEConfig(d_in=D, d_sae=FL, k=K, sparsifier="batchtopk", decoder="linear")).eval()
    with pytest.raises(ValueError, match="threshold"):
        export(fresh, tmp_path / "c", "saelens")
    assert not (tmp_path / "a" / "cfg.json").exists()

    src = tmp_path / "poly"
    poly.save(src, metadata={"model": "tiny", "hook": "blocks.0.hook_resid_post"})
    assert cli_main(["export", str(src), str(tmp_path / "ref"), "--format", "polysae-ref"]) == 0
    doc = json.loads((tmp_path / "ref" / "cfg.json").read_text())
    assert doc["architecture"] == "poly_topk"
    assert doc["metadata"]["hook_name"] == "blocks.0.hook_resid_post"
    # and back into polysae's own format, which loads with its checksum
    assert cli_main(["export", str(tmp_path / "ref"), str(tmp_path / "own"),
                     "--format", "polysae"]) == 0
    x = _x(gen)
    with torch.no_grad():
        torch.testing.assert_close(polysae.load(tmp_path / "own")(x), poly(x), atol=0, rtol=0)
    assert cli_main(["export", str(src), str(tmp_path / "x"), "--format", "saelens"]) == 1
    assert cli_main(["export", str(tmp_path / "missing"), str(tmp_path / "y"),
                     "--format", "saelens"]) == 1


def test_bad_inputs_name_the_file(tmp_path, gen):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        detect_format(tmp_path / "empty")
    t = _saelens_tensors(gen)
    t["W_dec"] = t["W_dec"][:, :5]
    folder = _write(tmp_path / "shape", {"architecture": "topk", "d_in": D, "d_sae": FL, "k": 2},
                    t)
    with pytest.raises(ValueError, match=r"W_dec.*sae_weights.safetensors|sae_weights.*W_dec"):
        read_checkpoint(folder)
    t = _saelens_tensors(gen)
    folder = _write(tmp_path / "norm", {"architecture": "standard", "d_in": D, "d_sae": FL,
                                        "normalize_activations": "expected_average_only_in"}, t)
    with pytest.raises(ValueError, match="normalize_activations"):
        read_checkpoint(folder)
    folder = _write(tmp_path / "gated", {"architecture": "gated", "d_in": D, "d_sae": FL}, t)
    with pytest.raises(ValueError, match="gated"):
        read_checkpoint(folder)
    folder = _write(tmp_path / "skip", {"k": 2, "skip_connection": True, "d_in": D},
                    {"encoder.weight": torch.zeros(FL, D)}, weights="sae.safetensors")
    with pytest.raises(ValueError, match="skip_connection"):
        read_checkpoint(folder)
    run = tmp_path / "run"
    for name in ("poly", "vanilla"):
        _trained_like(SAEConfig(d_in=D, d_sae=FL, k=K, ranks=(D, 4, 4)), gen).save(run / name)
    with pytest.raises(ValueError, match="several checkpoints.*poly"):
        polysae.load(run)
    assert polysae.load(run / "vanilla").cfg.d_sae == FL
    with pytest.raises(FileNotFoundError, match="registry name"):
        polysae.load(tmp_path / "nothing-here")


def test_saebench_wrapper(tmp_path, gen):
    sae = _trained_like(SAEConfig(d_in=D, d_sae=FL, k=K, ranks=(D, 4, 4)), gen)
    sae.save(tmp_path / "p", metadata={"model": "gpt2", "hook": "blocks.7.hook_resid_pre"})
    with pytest.warns(UserWarning, match="not unit norm"):
        w = SAEBenchSAE.from_source(str(tmp_path / "p"))
    assert (w.cfg.d_in, w.cfg.d_sae, w.cfg.hook_layer, w.cfg.hook_name, w.cfg.model_name) == \
        (D, FL, 7, "blocks.7.hook_resid_pre", "gpt2")
    assert w.cfg.architecture == "poly_topk" and w.cfg.dtype == "float32"
    assert w.cfg.device == "cpu" and w.dtype == torch.float32
    # W_dec = the raw rows of U C1^T (what the SAE computes; issue #28), from the raw factors
    t = sae.tensors()
    torch.testing.assert_close(w.W_dec, t["U"] @ t["C1"].T, atol=1e-6, rtol=1e-5)
    assert not w.check_decoder_norms()
    assert w.W_dec.shape == (FL, D) and w.W_enc.shape == (D, FL)
    x = _x(gen)
    with torch.no_grad():
        z = saelens_encode(x, {k: v for k, v in t.items()}, "topk", K)
        torch.testing.assert_close(w.encode(x), z, atol=ATOL, rtol=0)
        a = z @ t["U"]
        want = t["b_dec"] + a @ t["C1"].T + t["lambda2"] * (a[:, :4] ** 2) @ t["C2"].T + \
            t["lambda3"] * (a[:, :4] ** 3) @ t["C3"].T
        torch.testing.assert_close(w(x), want, atol=1e-4, rtol=1e-4)
    w64 = w.to(dtype=torch.float64)
    assert w64.cfg.dtype == "float64" and w64.W_dec.dtype == torch.float64
    assert "absorption" in LINEAR_DECODER_METRICS
    with pytest.raises(ValueError, match="hook_layer"):
        SAEBenchSAE(sae, "gpt2", "embed.hook_x")
