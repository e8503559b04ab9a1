"""Cross-device hand-offs, checked on a CPU-only machine.

An SAE on the ``meta`` device stands in for one on a GPU: it computes shapes without data, and any
attempt to mix it with CPU tensors in one op raises, as a CUDA SAE would. So an entry point that
forgot to move its input to the SAE's device fails with a device-mismatch ``RuntimeError``, while
one that computes on the SAE's device and returns the result on the input's device (the documented
contract) reaches the final copy back to the CPU, which is the one thing ``meta`` cannot do
("Cannot copy out of meta tensor"). Spies record the devices that reach the decoder.
"""

from __future__ import annotations

import pytest
import torch

from polysae import SAE, SAEConfig
from polysae.evaluation.probing import PooledText, pool_texts, sae_encoder

CASES = [dict(decoder="linear"), dict(decoder="poly", ranks=(12, 4, 4)),
         dict(decoder="poly", ranks=(12, 4, 4), sparsifier="batchtopk")]


def _meta_sae(monkeypatch, **kw) -> tuple[SAE, list]:
    sae = SAE(SAEConfig(d_in=12, d_sae=40, k=4, **kw), device="meta")
    seen = []
    for name in ("decode_sparse", "decode_dense"):
        orig = getattr(sae.decoder, name)

        def spy(*args, _orig=orig):
            seen.append({a.device.type for a in args if isinstance(a, torch.Tensor)})
            return _orig(*args)
        monkeypatch.setattr(sae.decoder, name, spy)
    return sae, seen


@pytest.mark.parametrize("kw", CASES, ids=lambda k: "-".join(map(str, k.values())))
def test_entry_points_compute_on_the_sae_device_and_return_on_the_inputs(monkeypatch, kw):
    sae, seen = _meta_sae(monkeypatch, **kw)
    x = torch.randn(2, 3, 12)  # CPU, any leading dims
    calls = {"forward": lambda: sae(x), "encode": lambda: sae.encode(x),
             "encode_sparse": lambda: sae.encode_sparse(x),
             "decode": lambda: sae.decode(torch.rand(2, 3, 40), path="dense"),
             "decode_sparse": lambda: sae.decode_sparse(torch.rand(6, 4),
                                                        torch.randint(0, 40, (6, 4)))}
    for name, call in calls.items():
        with pytest.raises(NotImplementedError, match="meta"):
            call()  # computed on meta, then copied back to the input's device (cpu)
    assert seen and all(devs == {"meta"} for devs in seen), seen


def test_same_device_input_stays_put():
    sae = SAE(SAEConfig(d_in=12, d_sae=40, k=4, decoder="poly", ranks=(12, 4, 4)))
    x = torch.randn(5, 12)
    z = sae.encode(x)
    assert z.device == x.device and sae.decode(z).device == x.device
    torch.testing.assert_close(sae(x), sae.decode(z), rtol=1e-5, atol=1e-5)


def test_probing_pools_on_the_sae_device(monkeypatch):
    """The probing hand-off: pooled activations are collected on the CPU; the encoder handed to
    pool_texts moves each chunk to the SAE's device and the codes stay there for pooling."""
    sae, seen = _meta_sae(monkeypatch)
    enc = sae_encoder(sae)
    z = enc(torch.randn(7, 12))
    assert z.device.type == "meta" and tuple(z.shape) == (7, 40)
    pooled = PooledText([torch.randn(3, 12), torch.randn(4, 12)], 7)
    with pytest.raises(NotImplementedError, match="meta"):
        pool_texts(pooled, enc)  # pooled on meta, copied to the CPU only at the end
    # the same path on a CPU SAE equals encoding each text and averaging, done by hand
    cpu = SAE(SAEConfig(d_in=12, d_sae=40, k=4))
    got = pool_texts(pooled, sae_encoder(cpu))
    want = torch.stack([cpu.encode(a).mean(0) for a in pooled.acts])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
