"""The bundled SmolLM2-135M through all three backends: the same activations as TransformerLens's
unprocessed residual stream at every hook kind (within float32 noise), the same CE/KL splice and
the same tokens for the steering prompts (slow: loads the real model three times)."""

from __future__ import annotations

import pytest
import torch

from polysae.data import chunking, models
from polysae.data.backend import BACKENDS

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("smollm2")]

KINDS = ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post",
         "attn.hook_z", "mlp.hook_post")


@pytest.fixture(scope="module")
def trio():
    return {b: models.load_model("smollm2-135m", backend=b) for b in BACKENDS}


@pytest.fixture(scope="module")
def tokens(trio):
    return chunking.build_chunks("bbc", trio["transformer_lens"].tokenizer, 64, 4).tokens


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


@pytest.mark.parametrize("kind", KINDS)
def test_every_hook_kind_matches_transformer_lens(trio, tokens, kind):
    hooks = [f"blocks.{L}.{kind}" for L in (0, 14, 29)]
    with torch.inference_mode():
        ref = models.capture(trio["transformer_lens"], tokens, hooks)
        for b in ("hf", "nnsight"):
            got = models.capture(trio[b], tokens, hooks)
            for h in hooks:
                assert got[h].shape == ref[h].shape == (4, 64, ref[h].shape[-1])
                # float32 noise: different kernels (SDPA vs TransformerLens's einsums) round
                # differently; measured ~1e-6 relative to the largest entry, 1e-5 at layer 29
                assert _rel(ref[h], got[h]) < 1e-4, (b, h)


def test_ce_kl_splice_and_steering_tokens_match(trio, tokens):
    from polysae import SAE, SAEConfig
    from polysae.evaluation.reconstruction import ce_recovered_many
    from polysae.evaluation.steering import DEFAULT_CONCEPTS, NEUTRAL_PROMPTS

    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=576, d_sae=1024, k=32)).eval()
    hook = "blocks.9.hook_resid_post"
    tok = trio["transformer_lens"].tokenizer
    specials = chunking.special_tokens(tok, "decoder").all_ids
    ce = {b: ce_recovered_many(lm, hook, tokens[:2], {"sae": sae}, specials)["sae"]
          for b, lm in trio.items()}
    for b in ("hf", "nnsight"):
        for key in ("ce_clean", "ce_sae", "ce_zero", "kl_sae", "kl_zero"):
            assert getattr(ce[b], key) == pytest.approx(getattr(ce["transformer_lens"], key),
                                                        rel=1e-4), (b, key)
    texts = [t for c in DEFAULT_CONCEPTS for t in (c.prompt, c.word_i, c.word_j, c.target)]
    texts += list(NEUTRAL_PROMPTS)
    bes = {b: models.as_backend(lm) for b, lm in trio.items()}
    for t in texts:
        for bos in (True, False):
            ref = bes["transformer_lens"].to_tokens(t, bos).tolist()  # TransformerLens's own
            assert bes["hf"].to_tokens(t, bos).tolist() == ref
            assert bes["nnsight"].to_tokens(t, bos).tolist() == ref
    with torch.inference_mode():
        ids = bes["hf"].to_tokens("The capital of France is")[None]
        for b, be in bes.items():
            assert tok.decode(be.logits(ids)[0, -1].argmax()).strip() == "Paris", b
    assert torch.equal(bes["hf"].W_U, bes["transformer_lens"].W_U)


def test_minilm_encoder_through_every_backend():
    tl = models.load_model("minilm-l6")
    chunks = chunking.build_chunks("tweets", tl.tokenizer, 32, 4, kind="encoder")
    hooks = ["blocks.2.hook_normalized_resid_post", "blocks.5.hook_resid_post",
             "blocks.1.hook_mlp_out", "blocks.3.hook_attn_out"]
    with torch.inference_mode():
        ref = models.capture(tl, chunks.tokens, hooks)
        for b in ("hf", "nnsight"):
            lm = models.load_model("minilm-l6", backend=b)
            assert lm.kind == "encoder"
            got = models.capture(lm, chunks.tokens, hooks)
            for h in hooks:
                assert _rel(ref[h], got[h]) < 1e-4, (b, h)
