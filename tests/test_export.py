"""``polysae export --format sparsify``: the folder loads with the real EleutherAI ``sparsify``
package (``Sae.load_from_disk``, the test extra; skipped with the reason when it is not
installed) and its encode/decode equal ours; refusals name why; the CLI; nothing half-written
looks valid."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

import polysae
from polysae import SAE, SAEConfig
from polysae.__main__ import main as cli_main
from polysae.formats import SPARSIFY_CFG_KEYS, detect_format, export, sparsify_hookpoint

if not torch.cuda.is_available():
    # sparsify decodes through a Triton kernel that needs a GPU unless told to use torch
    os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")

D, FL, K = 12, 40, 5


def _sae(seed=0, **kw) -> SAE:
    torch.manual_seed(seed)
    cfg = dict(d_in=D, d_sae=FL, k=K, decoder="linear")
    cfg.update(kw)
    sae = SAE(SAEConfig(**cfg)).eval()
    with torch.no_grad():  # non-trivial biases so the b_dec handling is exercised
        sae.b_dec.normal_(0, 0.5)
        sae.b_enc.normal_(0, 0.1)
    return sae


def _sparsify():
    return pytest.importorskip("sparsify", reason="eai-sparsify (the test extra) is not installed")


def _dense(acts, idx, F):
    return torch.zeros(acts.shape[0], F, dtype=acts.dtype).scatter_add(1, idx, acts)


@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_sparsify_export_loads_in_sparsify_and_round_trips(tmp_path, apply_b_dec):
    sparsify = _sparsify()
    sae = _sae(apply_b_dec_to_input=apply_b_dec)
    out = tmp_path / "layers.3"
    export(sae, out, "sparsify", metadata={"model": "tiny", "hook": "blocks.3.hook_resid_post"})
    # the exact layout: cfg.json keys, four tensors with sparsify's names and shapes
    doc = json.loads((out / "cfg.json").read_text())
    assert set(SPARSIFY_CFG_KEYS) <= set(doc)
    assert {k for k in doc if not k.startswith("polysae")} == set(SPARSIFY_CFG_KEYS)
    assert (doc["d_in"], doc["num_latents"], doc["k"], doc["activation"]) == (D, FL, K, "topk")
    t = load_file(str(out / "sae.safetensors"))
    assert {k: tuple(v.shape) for k, v in t.items()} == {
        "encoder.weight": (FL, D), "encoder.bias": (FL,), "W_dec": (FL, D), "b_dec": (D,)}
    s = sparsify.Sae.load_from_disk(out)  # strict load_model: every key must match
    x = torch.randn(64, D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        enc = s.encode(x)
        theirs = s.decode(enc.top_acts, enc.top_indices)
        z_ours = sae.encode(x)
        z_theirs = _dense(enc.top_acts, enc.top_indices, FL)
        torch.testing.assert_close(z_theirs, z_ours, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(theirs, sae(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(s(x).sae_out, sae(x), atol=1e-5, rtol=1e-5)
        # independently of both codes: sparsify's documented equations on the raw tensors
        pre = torch.relu((x - t["b_dec"]) @ t["encoder.weight"].T + t["encoder.bias"])
        v, i = pre.topk(K, dim=-1)
        want = (v[..., None] * t["W_dec"][i]).sum(-2) + t["b_dec"]
        torch.testing.assert_close(sae(x), want, atol=1e-5, rtol=1e-5)
    # and back into polysae: same outputs, provenance restored from cfg.json
    back = polysae.formats.read_checkpoint(out)
    assert back.format == "sparsify" and back.metadata["model"] == "tiny"
    assert back.metadata["hook"] == "blocks.3.hook_resid_post"
    with torch.no_grad():
        torch.testing.assert_close(polysae.load(out)(x), sae(x), atol=1e-5, rtol=1e-5)


def test_sparsify_normalize_decoder_flag_follows_the_weights(tmp_path):
    sae = _sae()
    export(sae, tmp_path / "a", "sparsify")
    assert json.loads((tmp_path / "a" / "cfg.json").read_text())["normalize_decoder"] is False
    with torch.no_grad():
        sae.decoder.W_dec /= sae.decoder.W_dec.norm(dim=1, keepdim=True)
    export(sae, tmp_path / "b", "sparsify")
    assert json.loads((tmp_path / "b" / "cfg.json").read_text())["normalize_decoder"] is True


@pytest.mark.parametrize("sparsifier", ["relu", "jumprelu", "batchtopk"])
def test_sparsify_refuses_non_topk(tmp_path, sparsifier):
    sae = _sae(sparsifier=sparsifier)
    with pytest.raises(ValueError, match=f"{sparsifier} SAE as sparsify.*only runs TopK"):
        export(sae, tmp_path / "o", "sparsify")
    assert not (tmp_path / "o" / "cfg.json").exists()


def test_sparsify_poly_refused_or_linearised(tmp_path):
    sparsify = _sparsify()
    sae = _sae(decoder="poly", ranks=(D, 4, 4))
    with pytest.raises(ValueError, match="poly-decoder.*no place for PolySAE's pairwise"):
        export(sae, tmp_path / "p", "sparsify")
    assert not (tmp_path / "p").exists() or not any((tmp_path / "p").iterdir())
    export(sae, tmp_path / "lin", "sparsify", linearise=True)
    doc = json.loads((tmp_path / "lin" / "cfg.json").read_text())
    assert doc["polysae_linearised"] is True
    s = sparsify.Sae.load_from_disk(tmp_path / "lin")
    x = torch.randn(20, D, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        enc = s.encode(x)
        z = sae.encode(x)  # same encoder, so the same codes ...
        torch.testing.assert_close(_dense(enc.top_acts, enc.top_indices, FL), z, atol=1e-5,
                                   rtol=1e-5)
        # ... decoded by the linear part alone: z @ (U C1^T) + b_dec, with U, C1 read directly
        U, C1 = sae.decoder.U, sae.decoder.C1
        torch.testing.assert_close(s.decode(enc.top_acts, enc.top_indices),
                                   z @ (U @ C1.T) + sae.b_dec, atol=1e-5, rtol=1e-5)
    assert polysae.formats.read_checkpoint(tmp_path / "lin").metadata["linearised_from"] == "poly"
    with pytest.raises(ValueError, match="sparsify format only"):
        export(sae, tmp_path / "x", "saelens", linearise=True)


def test_sparsify_hookpoint_inverts_the_reader():
    from polysae.formats import sparsify_hook

    for hook in ("blocks.0.hook_resid_post", "blocks.11.hook_mlp_out",
                 "blocks.4.hook_attn_out"):
        assert sparsify_hook(sparsify_hookpoint(hook)) == hook
    assert sparsify_hookpoint("blocks.2.hook_resid_pre") is None
    assert sparsify_hookpoint(None) is None


def test_export_refuses_a_folder_of_another_layout(tmp_path):
    sae = _sae()
    export(sae, tmp_path / "o", "saelens")
    with pytest.raises(ValueError, match="already holds a saelens checkpoint"):
        export(sae, tmp_path / "o", "sparsify")
    export(sae, tmp_path / "o", "saelens")  # the same layout is replaced in place
    assert detect_format(tmp_path / "o") == "saelens"


def test_interrupted_sparsify_export_leaves_no_valid_looking_folder(tmp_path, monkeypatch):
    import polysae.formats.sparsify as fm  # the module that writes sparsify's cfg.json

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(fm, "atomic_write_text", boom)
    with pytest.raises(OSError):
        export(_sae(), tmp_path / "o", "sparsify")
    names = {p.name for p in (tmp_path / "o").iterdir()}
    assert "cfg.json" not in names  # written last: without it no tool takes the folder for one
    with pytest.raises(ValueError, match="not a checkpoint folder"):
        detect_format(tmp_path / "o")


def test_cli_export_sparsify(tmp_path, capsys):
    src = tmp_path / "src"
    sae = _sae()
    sae.save(src, metadata={"model": "tiny", "hook": "blocks.1.hook_resid_post"})
    out = tmp_path / "exp"
    assert cli_main(["export", str(src), str(out), "--format", "sparsify"]) == 0
    said = capsys.readouterr().out
    assert "sparsify" in said and "name it layers.1" in said
    x = torch.randn(9, D)
    with torch.no_grad():
        torch.testing.assert_close(polysae.load(out)(x), sae(x), atol=1e-5, rtol=1e-5)
    poly = tmp_path / "poly"
    _sae(decoder="poly", ranks=(D, 4, 4)).save(poly)
    assert cli_main(["export", str(poly), str(tmp_path / "e2"), "--format", "sparsify"]) == 1
    assert "no place for PolySAE's pairwise" in capsys.readouterr().err
    assert cli_main(["export", str(poly), str(tmp_path / "e3"), "--format", "sparsify",
                     "--linearise"]) == 0
    assert "LINEARISED" in capsys.readouterr().out
    assert cli_main(["export", str(src), str(tmp_path / "e4"), "--format", "saelens",
                     "--linearise"]) == 2
    assert cli_main(["export", str(src), str(tmp_path / "e5"), "--format", "saelens",
                     "--acts", str(tmp_path)]) == 2
    assert cli_main(["export", str(src), str(out), "--format", "saelens"]) == 1
    assert "already holds a sparsify checkpoint" in capsys.readouterr().err
