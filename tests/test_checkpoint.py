"""polysae's own checkpoint format: exact round trip, documented tensor names, atomicity and
clear errors for missing or corrupt files. CPU only."""

from __future__ import annotations

import itertools
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import polysae
from polysae import SAE, SAEConfig
from polysae.config import DECODERS, SPARSIFIERS


def _trained_like(cfg: SAEConfig) -> SAE:
    torch.manual_seed(0)
    sae = SAE(cfg)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.01 * torch.randn_like(p))
        if cfg.uses_threshold and cfg.sparsifier != "jumprelu":
            sae.threshold.fill_(0.0123456789012345)  # float64 EMA survives exactly
    sae.retract_()  # as after a training step: U on the manifold (load warns otherwise)
    return sae


@pytest.mark.parametrize("dec,sp", list(itertools.product(DECODERS, SPARSIFIERS)))
def test_round_trip_is_bit_exact(tmp_path, dec, sp):
    cfg = SAEConfig(d_in=12, d_sae=48, k=4, sparsifier=sp, decoder=dec, ranks=(12, 5, 3))
    sae = _trained_like(cfg)
    sae.save(tmp_path / "ck", metadata={"hook": "blocks.0.hook_resid_post"})
    back = polysae.load(tmp_path / "ck")
    assert back.cfg == cfg
    a, b = sae.tensors(), back.tensors()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    sae.eval()
    x = torch.randn(7, 12)
    with torch.no_grad():
        assert torch.equal(sae(x), back(x))


@pytest.mark.parametrize("shared,sp,dec,names", [
    (True, "topk", "poly", {"W_enc", "b_enc", "b_dec", "U", "C1", "C2", "C3", "lambda2",
                            "lambda3"}),
    (False, "jumprelu", "poly", {"W_enc", "b_enc", "b_dec", "U", "U2", "U3", "C1", "C2", "C3",
                                 "lambda2", "lambda3", "threshold"}),
    (True, "batchtopk", "linear", {"W_enc", "b_enc", "b_dec", "W_dec", "threshold"}),
])
def test_documented_tensor_names_and_shapes(tmp_path, shared, sp, dec, names):
    cfg = SAEConfig(d_in=12, d_sae=48, k=4, sparsifier=sp, decoder=dec, ranks=(12, 5, 3),
                    shared_u=shared)
    SAE(cfg).save(tmp_path)
    t = load_file(str(tmp_path / "sae.safetensors"))
    assert set(t) == names
    shapes = {"W_enc": (12, 48), "b_enc": (48,), "b_dec": (12,), "W_dec": (48, 12), "U": (48, 12),
              "C1": (12, 12), "C2": (12, 5), "C3": (12, 3), "lambda2": (), "lambda3": (),
              "U2": (48, 5), "U3": (48, 3), "threshold": (48,)}
    for n in names:
        assert tuple(t[n].shape) == shapes[n], n
    doc = json.loads((tmp_path / "config.json").read_text())
    assert doc["format_version"] == 1 and doc["config"]["d_sae"] == 48
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]  # no temp files left behind


def test_missing_and_corrupt_files_are_named(tmp_path):
    cfg = SAEConfig(d_in=8, d_sae=16, k=2, ranks=(8, 2, 2))
    d = tmp_path / "ck"
    SAE(cfg).save(d)
    w = d / "sae.safetensors"
    blob = w.read_bytes()
    # a flipped byte in the tensor data: caught by the sha256 in config.json
    w.write_bytes(blob[:-5] + bytes([blob[-5] ^ 0xFF]) + blob[-4:])
    with pytest.raises(ValueError, match=r"sae\.safetensors is corrupt"):
        polysae.load(d)
    # a truncated file without the recorded hash: safetensors' own header check, file named
    doc = json.loads((d / "config.json").read_text())
    doc.pop("weights_sha256")
    (d / "config.json").write_text(json.dumps(doc))
    w.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match=r"cannot read .*sae\.safetensors"):
        polysae.load(d)
    (d / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json is not a valid"):
        polysae.load(d)
    (d / "config.json").unlink()
    with pytest.raises((FileNotFoundError, ValueError),
                       match=r"found \['sae\.safetensors'\].*config\.json"):
        polysae.load(d)  # format detection names what is there and what is missing
    with pytest.raises(FileNotFoundError, match=r"missing file .*config\.json"):
        polysae.sae.load_checkpoint(d)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        polysae.load(tmp_path / "nowhere")


def test_config_mismatching_weights_is_an_error(tmp_path):
    SAE(SAEConfig(d_in=8, d_sae=16, k=2, ranks=(8, 2, 2))).save(tmp_path / "a")
    SAE(SAEConfig(d_in=8, d_sae=24, k=2, ranks=(8, 2, 2))).save(tmp_path / "b")
    (tmp_path / "a" / "config.json").write_bytes((tmp_path / "b" / "config.json").read_bytes())
    with pytest.raises(ValueError, match=r"sae\.safetensors"):
        polysae.sae.load_checkpoint(tmp_path / "a", verify=False)
