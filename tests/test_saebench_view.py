"""What SAEBench sees (issue #28): one definition (``saebench_view``) behind the SAEBench wrapper
and the SAELens export, the export's ``cfg.json`` as SAELens >= 6 reads it, and the same checks
against the real sae-lens 6.x / sae-bench in their peer venv (tests/peers.py; skipped, with the
reason, where that venv is not built)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import polysae
from polysae import SAE, SAEConfig
from polysae.evaluation.report import render_markdown
from polysae.evaluation.saebench import SAEBenchSAE, decoder_norm_warnings, decoder_norms
from polysae.formats import export
from polysae.formats.saelens import SAELENS_LAYOUT_VERSION, saebench_view
from polysae.loader import load_with_metadata

D, FL, K = 12, 40, 5
META = {"model": "gpt2", "hook": "blocks.3.hook_resid_post", "context_size": 96,
        "prepend_bos": True, "dataset": "Skylion007/openwebtext"}


def trained_like(cfg: SAEConfig, seed: int = 0, spread: bool = True) -> SAE:
    """An SAE with nonzero biases, a learned threshold and (``spread``) decoder rows of norms far
    from 1, as training leaves them (1.78-7.39 in the issue)."""
    torch.manual_seed(seed)
    sae = SAE(cfg)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.05)
        sae.b_dec.normal_(0, 0.2)
        if cfg.uses_threshold:
            sae.threshold.fill_(0.02)
        if spread and cfg.decoder == "linear":
            W = sae.decoder.W_dec
            W.mul_(torch.linspace(1.78, 7.39, cfg.d_sae)[:, None] / W.norm(dim=-1, keepdim=True))
    return sae.eval()


def linear(sparsifier: str = "topk", **kw) -> SAE:
    return trained_like(SAEConfig(d_in=D, d_sae=FL, k=K, sparsifier=sparsifier,
                                  decoder="linear", **kw))


def unit_norm_sae() -> SAE:
    return trained_like(SAEConfig(d_in=D, d_sae=FL, k=K, decoder="linear",
                                  unit_norm_decoder=True), spread=False)


def inputs(n: int = 33, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed))


# -- one definition -----------------------------------------------------------------------------
def test_view_is_the_model_as_it_computes():
    sae = linear()
    v = saebench_view(sae, META)
    assert v.W_dec.data_ptr() == sae.decoder.W_dec.data_ptr()  # the raw rows, not a copy
    assert torch.equal(v.W_enc, sae.W_enc) and torch.equal(v.b_dec, sae.b_dec)
    assert (v.architecture, v.k, v.threshold) == ("topk", K, None)
    assert not v.unit_norm and "not unit norm" in v.norm_note and "--unit-norm-decoder" in \
        v.norm_note
    torch.testing.assert_close(v.row_norms, torch.linspace(1.78, 7.39, FL))
    assert v.metadata == {"model_name": "gpt2", "hook_name": "blocks.3.hook_resid_post",
                          "hook_layer": 3, "hook_head_index": None, "context_size": 96,
                          "prepend_bos": True, "dataset_path": "Skylion007/openwebtext",
                          "sae_lens_training_version": None}
    # the view's tensors define the SAE's own encode/decode for a linear decoder
    x = inputs()
    pre = (x - v.b_dec) @ v.W_enc + v.b_enc
    val, idx = pre.topk(K, dim=-1)
    z = torch.zeros_like(pre).scatter(-1, idx, val.relu())
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), z, atol=1e-5, rtol=0)
        torch.testing.assert_close(sae.decode(z), z @ v.W_dec + v.b_dec, atol=1e-5, rtol=1e-5)
    # BatchTopK with a learned threshold is a JumpReLU; batch-level top-k has no per-token form
    bt = linear("batchtopk")
    vb = saebench_view(bt)
    assert vb.architecture == "jumprelu" and torch.equal(vb.threshold, torch.full((FL,), 0.02))
    with torch.no_grad():
        bt.threshold.zero_()
    assert saebench_view(bt).architecture == "batchtopk"


def test_poly_view_holds_only_the_linear_term():
    sae = trained_like(SAEConfig(d_in=D, d_sae=FL, k=K, ranks=(D, 4, 4)))
    v = saebench_view(sae, META)
    t = sae.tensors()
    torch.testing.assert_close(v.W_dec, t["U"] @ t["C1"].T)
    assert v.architecture == "poly_topk" and not v.unit_norm
    assert "linear term" in v.norm_note and "--unit-norm-decoder" not in v.norm_note


def test_wrapper_and_export_share_the_view(tmp_path):
    sae = linear()
    with pytest.warns(UserWarning, match="not unit norm"):
        w = SAEBenchSAE(sae, metadata=META)
    assert (w.cfg.model_name, w.cfg.hook_name, w.cfg.hook_layer, w.cfg.context_size,
            w.cfg.architecture, w.cfg.dataset_path) == ("gpt2", "blocks.3.hook_resid_post", 3, 96,
                                                        "topk", "Skylion007/openwebtext")
    assert not w.check_decoder_norms()
    export(sae, tmp_path / "sl", "saelens", metadata=META)
    t = load_file(str(tmp_path / "sl" / "sae_weights.safetensors"))
    assert torch.equal(t["W_dec"], w.W_dec) and torch.equal(t["W_dec"], sae.decoder.W_dec)
    assert torch.equal(t["W_enc"], w.W_enc) and torch.equal(t["b_enc"], w.b_enc)
    x = inputs()
    with torch.no_grad():
        assert torch.equal(w.encode(x), sae.encode(x))
        torch.testing.assert_close(w(x), sae(x), atol=1e-5, rtol=1e-5)
    # explicit arguments win over the metadata; a unit-norm SAE wraps without a warning
    unit = unit_norm_sae()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wu = SAEBenchSAE(unit, "pythia-70m", "blocks.1.hook_resid_post", metadata=META)
    assert wu.check_decoder_norms() and wu.cfg.model_name == "pythia-70m"
    assert wu.cfg.hook_layer == 1 and wu.cfg.context_size == 96


def test_export_cfg_is_a_current_saelens_config(tmp_path):
    sae = linear()
    export(sae, tmp_path / "sl", "saelens", metadata=META)
    doc = json.loads((tmp_path / "sl" / "cfg.json").read_text())
    assert sorted(doc) == ["apply_b_dec_to_input", "architecture", "d_in", "d_sae", "device",
                           "dtype", "k", "metadata", "normalize_activations", "polysae_config",
                           "polysae_version", "rescale_acts_by_decoder_norm",
                           "reshape_activations"]
    assert "sae_lens_version" not in doc  # SAELens' save_model keeps it in the metadata block
    assert doc["metadata"] == {**saebench_view(sae, META).metadata,
                               "sae_lens_version": SAELENS_LAYOUT_VERSION}
    assert int(SAELENS_LAYOUT_VERSION.split(".")[0]) >= 6
    back = load_with_metadata(str(tmp_path / "sl"))
    assert (back.metadata["model"], back.metadata["hook"], back.metadata["context_size"]) == \
        ("gpt2", "blocks.3.hook_resid_post", 96)
    assert back.sae.cfg.k == K and back.sae.cfg.dtype == "float32"


# -- polysae eval's warning ---------------------------------------------------------------------
def test_eval_warns_when_wdec_metrics_run_on_non_unit_rows():
    raw, unit = linear(), unit_norm_sae()
    st = decoder_norms(raw)
    assert not st["unit_norm"] and st["min"] == pytest.approx(1.78) and st["warning"]
    assert decoder_norms(unit)["unit_norm"] and decoder_norms(unit)["warning"] is None

    def result(**blocks):
        return {"saes": {n: dict(b) for n, b in blocks.items()}}

    # no W_dec-reading metric ran: norms recorded, no warning
    r = result(raw={}, unit={})
    assert decoder_norm_warnings(r, {"raw": raw, "unit": unit}) == []
    assert "warnings" not in r and r["saes"]["raw"]["decoder_norms"]["max"] == \
        pytest.approx(7.39)
    # absorption / TPP on raw rows: one warning, for the non-unit SAE only
    r = result(raw={"absorption": {"linear": 0.1}, "tpp": {"full": 0.2},
                    "scr": {"skipped": "no two-attribute corpus"}}, unit={"absorption": {}})
    (w,) = decoder_norm_warnings(r, {"raw": raw, "unit": unit})
    assert w.startswith("raw: absorption, tpp ran on W_dec rows that are not unit norm")
    assert r["warnings"] == [w]
    json.dumps(r)  # metrics.json stays plain JSON
    m = {"saes": {n: {"info": {"params": {"total": 1}}, "decoder_norms": b["decoder_norms"]}
                  for n, b in r["saes"].items()},
         "warnings": r["warnings"], "model": "m", "hook": "h", "date": "d",
         "polysae_version": "v", "torch_version": "t", "device": "cpu",
         "held_out": {"source": "s", "n_tokens": 1}}
    md = render_markdown(m)
    assert "## Warnings" in md and w in md
    assert "| W_dec row norms (min-max) | 1.780-7.390 | 1.000-1.000 (unit) |" in md


# -- the real sae-lens 6.x and sae-bench (peer venv) ----------------------------------------------
PEER_SNIPPET = r'''
import json, sys, warnings
from pathlib import Path
import torch
from safetensors.torch import load_file, save_file
import sae_lens
from sae_lens import SAE
from sae_lens.saes.sae import SAEMetadata
from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig
from sae_bench.sae_bench_utils.general_utils import check_decoder_norms, load_and_format_sae

work = Path(sys.argv[1])
x = load_file(str(work / "x.safetensors"))["x"]
report = {"sae_lens": sae_lens.__version__}
# 1. our exports, loaded as SAELens loads them, then handed to SAEBench as a custom SAE
for name in sys.argv[2:]:
    sae = SAE.load_from_disk(str(work / name))
    m = sae.cfg.metadata
    with torch.no_grad():
        z = sae.encode(x)
        x_hat = sae.decode(z)
    save_file({"z": z.contiguous(), "x_hat": x_hat.contiguous(),
               "W_dec": sae.W_dec.detach().contiguous(), "W_enc": sae.W_enc.detach().contiguous(),
               "b_enc": sae.b_enc.detach().contiguous(), "b_dec": sae.b_dec.detach().contiguous()},
              str(work / f"{name}.out.safetensors"))
    rec = {"architecture": sae.cfg.architecture(), "dtype": sae.cfg.dtype,
           "k": getattr(sae.cfg, "k", None), "model_name": m.model_name,
           "hook_name": m.hook_name, "context_size": m.context_size,
           "prepend_bos": m.prepend_bos, "dataset_path": m.dataset_path,
           "sae_lens_version": m.sae_lens_version, "param_dtype": str(sae.W_enc.dtype)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rec["unit_norm"] = check_decoder_norms(sae.W_dec.data)
        _, sb, _ = load_and_format_sae("custom", sae, "cpu")
    rec["saebench_warnings"] = [str(w.message) for w in caught]
    rec["saebench"] = {f: getattr(sb.cfg, f) for f in ("hook_name", "hook_layer", "model_name",
                                                        "context_size", "prepend_bos")}
    report[name] = rec
# 2. a TopK SAE written by sae-lens itself (save_model), for polysae.load
torch.manual_seed(0)
D, F, K = (int(v) for v in (x.shape[1], 40, 5))
meta = SAEMetadata(model_name="pythia-70m-deduped", hook_name="blocks.2.hook_resid_post",
                   context_size=64, prepend_bos=False, dataset_path="monology/pile-uncopyrighted")
cfg = TopKSAEConfig(d_in=D, d_sae=F, k=K, dtype="float32", metadata=meta)
own = TopKSAE(cfg)
with torch.no_grad():
    for p in own.parameters():
        p.normal_(0, 0.3)
    z = own.encode(x)
    x_hat = own.decode(z)
own.save_model(str(work / "by_saelens"))
save_file({"z": z.contiguous(), "x_hat": x_hat.contiguous()},
          str(work / "by_saelens.out.safetensors"))
print(json.dumps(report))
'''


@pytest.fixture(scope="module")
def peer(tmp_path_factory):
    """Our exports (TopK, and BatchTopK saved as JumpReLU) loaded by the real sae-lens and
    handed to sae-bench, plus a TopK SAE sae-lens wrote itself: one peer process."""
    from peers import run_peer

    work = tmp_path_factory.mktemp("peer")
    x = inputs(37, seed=5)
    save_file({"x": x}, str(work / "x.safetensors"))
    saes = {"topk": linear(), "jumprelu": linear("batchtopk")}
    for name, sae in saes.items():
        export(sae, work / name, "saelens", metadata=META)
    r = run_peer("sae-lens", PEER_SNIPPET, work, *saes)
    return work, x, saes, json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", ["topk", "jumprelu"])
def test_real_saelens_keeps_metadata_and_outputs(peer, name):
    work, x, saes, report = peer
    assert int(report["sae_lens"].split(".")[0]) >= 6
    rec, sae = report[name], saes[name]
    assert (rec["model_name"], rec["hook_name"], rec["context_size"], rec["prepend_bos"],
            rec["dataset_path"]) == ("gpt2", "blocks.3.hook_resid_post", 96, True,
                                     "Skylion007/openwebtext")
    assert rec["sae_lens_version"] == SAELENS_LAYOUT_VERSION
    assert rec["architecture"] == name and rec["dtype"] == "float32"
    assert rec["param_dtype"] == "torch.float32"
    assert rec["k"] == (K if name == "topk" else None)
    out = load_file(str(work / f"{name}.out.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(out["z"], sae.encode(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out["x_hat"], sae(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out["x_hat"], sae.decode(out["z"]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["topk", "jumprelu"])
def test_saebench_sees_the_same_sae_through_wrapper_and_export(peer, name):
    """SAEBench's latent-selection inputs (encode, decode, W_dec) through ``SAEBenchSAE(sae)``
    equal those of the exported folder loaded by the real sae-lens; SAEBench accepts the latter's
    config (the "Could not determine Hook name" of the issue) and flags its raw rows itself."""
    work, x, saes, report = peer
    with pytest.warns(UserWarning, match="not unit norm"):
        w = SAEBenchSAE(saes[name], metadata=META)
    out = load_file(str(work / f"{name}.out.safetensors"))
    assert torch.equal(out["W_dec"], w.W_dec)  # bit for bit: the same raw rows
    for t in ("W_enc", "b_enc", "b_dec"):
        assert torch.equal(out[t], getattr(w, t).detach()), t
    with torch.no_grad():
        z = w.encode(x)
        assert torch.equal(out["z"] != 0, z != 0)  # the same latents selected on every row
        torch.testing.assert_close(out["z"], z, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out["x_hat"], w.decode(z), atol=1e-5, rtol=1e-5)
    rec = report[name]
    assert rec["saebench"] == {"hook_name": w.cfg.hook_name, "hook_layer": w.cfg.hook_layer,
                               "model_name": w.cfg.model_name,
                               "context_size": w.cfg.context_size,
                               "prepend_bos": w.cfg.prepend_bos}
    assert rec["unit_norm"] is False == w.check_decoder_norms()
    assert any("not normalized" in m for m in rec["saebench_warnings"])


def test_polysae_loads_a_folder_written_by_real_saelens(peer):
    work, x, _, _ = peer
    doc = json.loads((work / "by_saelens" / "cfg.json").read_text())
    assert doc["metadata"]["sae_lens_version"].startswith("6.")  # what 6.x writes
    out = load_with_metadata(str(work / "by_saelens"))
    sae, meta = out.sae, out.metadata
    assert out.format == "saelens"
    assert (meta["model"], meta["hook"], meta["context_size"], meta["prepend_bos"],
            meta["dataset"]) == ("pythia-70m-deduped", "blocks.2.hook_resid_post", 64, False,
                                 "monology/pile-uncopyrighted")
    assert (sae.cfg.sparsifier, sae.cfg.k, sae.cfg.dtype, sae.cfg.decoder) == \
        ("topk", K, "float32", "linear")
    want = load_file(str(work / "by_saelens.out.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), want["z"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sae(x), want["x_hat"], atol=1e-5, rtol=1e-5)
    assert polysae.load(work / "by_saelens").cfg.k == K
