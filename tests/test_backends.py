"""The three model backends (transformer_lens, hf, nnsight) on tiny random models: the same
activations at every TransformerLens hook kind, the same logits under an edit, the early stop,
the hook listings, and the errors (unknown hook, missing package, encoder asked for CE/KL, a model
name found nowhere)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from polysae.data import models
from polysae.data.backend import BACKENDS, BackendError

ROOT = Path(__file__).resolve().parents[1]
TOKS = torch.randint(0, 60, (3, 11), generator=torch.Generator().manual_seed(3))
HOOK_KINDS = ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out",
              "hook_resid_post", "attn.hook_z", "mlp.hook_post")


def tiny_llama(path: Path, seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    ).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("llama") / "llama")


@pytest.fixture(scope="module")
def trio(llama_dir):
    """The tiny Llama loaded through every backend (TransformerLens converts it)."""
    return {b: models.load_model(str(llama_dir), backend=b) for b in BACKENDS}


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    a, b = a.detach(), b.detach()
    err = float((a - b).abs().max() / a.abs().max().clamp_min(1e-12))
    assert err < 1e-5, f"{what}: relative error {err:.2e}"


def test_llama_every_hook_kind_agrees_across_backends(trio):
    assert [lm.backend for lm in trio.values()] == list(BACKENDS)
    assert all(lm.kind == "decoder" for lm in trio.values())
    hooks = ["hook_embed", *(f"blocks.{L}.{k}" for L in range(3) for k in HOOK_KINDS)]
    with torch.inference_mode():
        ref = models.capture(trio["transformer_lens"], TOKS, hooks)
        for b in ("hf", "nnsight"):
            got = models.capture(trio[b], TOKS, hooks)
            for h in hooks:
                assert got[h].shape == ref[h].shape
                _close(ref[h], got[h], f"{b} {h}")


def test_logits_with_an_edit_agree_across_backends(trio):
    bes = {b: models.as_backend(lm) for b, lm in trio.items()}
    with torch.inference_mode():
        for hook in ("blocks.1.hook_resid_pre", "blocks.1.hook_attn_out", "blocks.1.hook_mlp_out",
                     "blocks.2.hook_resid_post", "blocks.0.attn.hook_z"):
            def edit(a):
                return a * 0.5 + 0.1
            ref = bes["transformer_lens"].logits(TOKS, {hook: edit})
            clean = bes["transformer_lens"].logits(TOKS)
            assert (ref - clean).abs().max() > 1e-3  # the edit changes something
            for b in ("hf", "nnsight"):
                _close(ref, bes[b].logits(TOKS, {hook: edit}), f"{b} edit {hook}")
                _close(clean, bes[b].logits(TOKS), f"{b} clean")
        # two edits in one forward
        two = {"blocks.0.hook_resid_post": lambda a: -a, "blocks.2.hook_mlp_out": torch.zeros_like}
        ref = bes["transformer_lens"].logits(TOKS, two)
        for b in ("hf", "nnsight"):
            _close(ref, bes[b].logits(TOKS, dict(reversed(list(two.items())))), f"{b} two")


def test_resid_mid_edits_reach_the_residual_branch(trio):
    """hf/nnsight read hook_resid_mid at the second norm's input, which the residual branch
    bypasses; an edit there goes through the attention output and matches TransformerLens."""
    edits = {"blocks.1.hook_resid_mid": lambda a: 0.3 * a,
             "blocks.1.hook_resid_pre": lambda a: a + 0.05,  # applied first, on the same block
             "blocks.2.hook_resid_mid": torch.zeros_like}
    with torch.inference_mode():
        ref = models.as_backend(trio["transformer_lens"]).logits(TOKS, edits)
        for b in ("hf", "nnsight"):
            _close(ref, models.as_backend(trio[b]).logits(TOKS, edits), f"{b} resid_mid")


@pytest.mark.parametrize("backend", ["hf", "nnsight"])
def test_capture_stops_after_the_deepest_hook(trio, backend):
    be = models.as_backend(trio[backend])
    fired = []
    handles = [be.hf.model.layers[2].register_forward_hook(lambda *a: fired.append("L2")),
               be.hf.lm_head.register_forward_hook(lambda *a: fired.append("head"))]
    try:
        with torch.inference_mode():
            out = be.capture(TOKS, ["blocks.1.hook_resid_post", "blocks.0.hook_mlp_out"])
            assert fired == [] and set(out) == {"blocks.1.hook_resid_post",
                                                "blocks.0.hook_mlp_out"}
            be.capture(TOKS, ["blocks.1.hook_resid_post"], stop_early=False)
        assert fired == ["L2", "head"]
    finally:
        for h in handles:
            h.remove()


def test_raw_module_names_and_hook_listing(trio, llama_dir, capsys):
    from polysae.__main__ import main

    hf = trio["hf"]
    names = models.list_hooks(hf)
    assert names[:2] == ["hook_embed", "blocks.0.hook_resid_pre"]
    assert "model.layers.1.mlp.act_fn" in names and "model.layers.1" in names
    with torch.inference_mode():
        a = models.capture(hf, TOKS, ["model.layers.1", "blocks.1.hook_resid_post"])
        b = models.capture(trio["nnsight"], TOKS, ["model.layers.1.mlp.act_fn"])
        c = models.capture(hf, TOKS, ["model.layers.1.mlp.act_fn"])
    assert torch.equal(a["model.layers.1"], a["blocks.1.hook_resid_post"])
    _close(c["model.layers.1.mlp.act_fn"], b["model.layers.1.mlp.act_fn"], "raw name")
    assert main(["hooks", "--model", str(llama_dir), "--backend", "nnsight", "--filter",
                 "resid_post"]) == 0
    assert capsys.readouterr().out.split() == [f"blocks.{i}.hook_resid_post" for i in range(3)]
    assert main(["hooks", "--model", str(llama_dir), "--backend", "hf", "--filter",
                 "down_proj"]) == 0
    assert "model.layers.2.mlp.down_proj" in capsys.readouterr().out.split()


def test_unknown_hook_lists_the_valid_names(trio):
    for b, lm in trio.items():
        with pytest.raises(ValueError, match=rf"unknown hook.*{b} backend.*blocks\.0\."
                                             r"hook_resid_post.*--backend"):
            models.check_hooks(lm, ["blocks.0.hook_resid_psot"])


def test_gpt2_matches_an_unprocessed_transformer_lens_model(tmp_path):
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4,
                                    n_positions=64)).eval()
    hf.save_pretrained(tmp_path / "gpt2")
    cfg = HookedTransformerConfig(d_model=32, d_head=8, n_heads=4, d_mlp=128, n_layers=2,
                                  n_ctx=64, d_vocab=64, act_fn="gelu_new", eps=1e-5,
                                  normalization_type="LN", original_architecture="GPT2LMHeadModel")
    tl = HookedTransformer(cfg)
    tl.load_and_process_state_dict(convert_gpt2_weights(hf, cfg), fold_ln=False,
                                   center_writing_weights=False, center_unembed=False,
                                   fold_value_biases=False)
    tl.eval()
    hooks = ["hook_embed", "hook_pos_embed",
             *(f"blocks.{L}.{k}" for L in range(2) for k in HOOK_KINDS)]
    edit = {"blocks.0.hook_mlp_out": lambda a: 2 * a}
    with torch.inference_mode():
        ref = models.capture(tl, TOKS, hooks)
        ref_logits = models.as_backend(tl).logits(TOKS, edit)
        for b in ("hf", "nnsight"):
            lm = models.load_model(str(tmp_path / "gpt2"), backend=b)
            got = models.capture(lm, TOKS, hooks)
            for h in hooks:
                _close(ref[h], got[h], f"gpt2 {b} {h}")
            _close(ref_logits, models.as_backend(lm).logits(TOKS, edit), f"gpt2 {b} logits")
    assert models.as_backend(lm).W_U.shape == (32, 64)
    _close(tl.W_U, models.as_backend(lm).W_U, "W_U")


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    from transformers import BertConfig, BertForPreTraining

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("bert") / "bert"
    BertForPreTraining(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=64,
                                  max_position_embeddings=64)).save_pretrained(path)
    return path


def test_bert_encoder_matches_hooked_encoder_with_a_mask(bert_dir):
    tl = models.load_model(str(bert_dir))  # converted to a HookedEncoder
    assert (tl.backend, tl.kind) == ("transformer_lens", "encoder")
    hooks = [f"blocks.{L}.{k}" for L in range(2) for k in (
        "hook_resid_pre", "hook_attn_out", "hook_resid_mid", "mlp.hook_post", "hook_mlp_out",
        "hook_resid_post", "hook_normalized_resid_post")]
    mask = torch.ones_like(TOKS)
    mask[1, 6:] = 0
    with torch.inference_mode():
        ref = models.capture(tl, TOKS, hooks, attention_mask=mask)
        for b in ("hf", "nnsight"):
            lm = models.load_model(str(bert_dir), backend=b)
            assert lm.kind == "encoder" and models.as_backend(lm).W_U is None
            got = models.capture(lm, TOKS, hooks, attention_mask=mask)
            for h in hooks:
                _close(ref[h][mask.bool()], got[h][mask.bool()], f"bert {b} {h}")


def test_encoder_asked_for_ce_kl_is_a_clear_error(bert_dir):
    from polysae import SAE, SAEConfig
    from polysae.evaluation import EvalConfig, evaluate

    sae = SAE(SAEConfig(d_in=32, d_sae=16, k=2))
    for b in BACKENDS:
        lm = models.load_model(str(bert_dir), backend=b)
        with pytest.raises(BackendError, match="CE/KL.*encoder-only.*--ce-contexts 0"):
            evaluate(sae, model=lm, hook="blocks.0.hook_resid_post",
                     config=EvalConfig(datasets=(), progress=False))
        with pytest.raises(BackendError, match="encoder-only"):
            models.as_backend(lm).require_causal("CE/KL loss recovered", "x")


def test_missing_nnsight_names_the_extra(llama_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "nnsight", None)  # `import nnsight` raises ImportError
    with pytest.raises(BackendError, match=r"pip install 'polysae\[nnsight\]'"):
        models.load_model(str(llama_dir), backend="nnsight")
    from polysae.data.harvesting import HarvestConfig, HarvestError

    with pytest.raises(HarvestError, match="backend 'nope'"):
        HarvestConfig(backend="nope")


def test_model_by_name_from_the_hugging_face_cache_or_a_clear_error(llama_dir, tmp_path,
                                                                     monkeypatch, capsys):
    """A hub id loads from the Hugging Face cache offline, through every backend; one found
    nowhere is an error naming the folder it looked for and the cache."""
    from huggingface_hub import constants

    from polysae.__main__ import main

    cache = tmp_path / "hub"
    repo = cache / "models--someone--tiny-llama"
    (repo / "snapshots" / "0123abcd").mkdir(parents=True)
    for f in llama_dir.iterdir():
        (repo / "snapshots" / "0123abcd" / f.name).symlink_to(f)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    for backend in BACKENDS:
        assert main(["hooks", "--model", "someone/tiny-llama", "--backend", backend,
                     "--filter", "resid_post"]) == 0
        assert capsys.readouterr().out.split() == [f"blocks.{i}.hook_resid_post"
                                                   for i in range(3)]
    for backend in ("transformer_lens", "nnsight"):
        assert main(["hooks", "--model", "nobody/nothing", "--backend", backend]) == 1
        err = capsys.readouterr().err
        assert "no local folder" in err and str(tmp_path / "nobody" / "nothing") in err, err
        assert str(cache) in err and "offline" in err


def test_harvest_through_each_backend_gives_the_same_store(llama_dir, tmp_path, capsys):
    from polysae.__main__ import main
    from polysae.data.store import ActivationStore

    np.save(tmp_path / "t.npy", torch.randint(0, 60, (8, 16)).numpy())
    hooks = ["blocks.1.hook_resid_post", "blocks.0.hook_mlp_out"]
    rows = {}
    for b in BACKENDS:
        out = tmp_path / f"acts_{b}"
        assert main(["harvest", "--model", str(llama_dir), "--backend", b, "--hooks", *hooks,
                     "--dataset", str(tmp_path / "t.npy"), "--tokens", "128", "--ctx", "16",
                     "--dtype", "float32", "--out", str(out), "--no-progress"]) == 0
        m = ActivationStore(out, hooks[0], split="all").manifest
        assert m["config"]["backend"] == b and m["model_backend"] == b
        rows[b] = {h: ActivationStore(out, h, split="all").read_rows(0, 128) for h in hooks}
    for b in ("hf", "nnsight"):
        for h in hooks:
            _close(rows["transformer_lens"][h], rows[b][h], f"store {b} {h}")
    # resuming a folder through another backend is refused (the bytes would differ)
    rc = main(["harvest", "--model", str(llama_dir), "--backend", "hf", "--hooks", *hooks,
               "--dataset", str(tmp_path / "t.npy"), "--tokens", "128", "--ctx", "16",
               "--dtype", "float32", "--out", str(tmp_path / "acts_nnsight"), "--no-progress"])
    assert rc == 2 and "backend: folder has 'nnsight', asked 'hf'" in capsys.readouterr().err


def test_sae_from_one_backend_evaluates_the_same_through_the_others(llama_dir, tmp_path):
    """An SAE trained on activations harvested through ``hf`` gets the same held-out
    reconstruction, CE/KL recovered, probing and steering through every backend."""
    from chartok import CharTok

    from polysae import SAEConfig
    from polysae.data.harvesting import HarvestConfig, harvest
    from polysae.data.store import ActivationStore
    from polysae.evaluation import EvalConfig, evaluate
    from polysae.training import TrainConfig, train

    tok = CharTok()
    text = tmp_path / "text.txt"
    text.write_text("\n".join(f"line {i}: the quick brown fox {i % 7} jumps over dogs"
                              for i in range(300)))
    ids = np.array([[1, *tok(line)["input_ids"][:15]] for line in
                    text.read_text().splitlines()[:64]], dtype=np.int64)
    np.save(tmp_path / "t.npy", ids)
    hook = "blocks.1.hook_resid_post"
    acts = tmp_path / "acts"
    harvest(HarvestConfig(model=str(llama_dir), backend="hf", hooks=[hook], tokens=1024, ctx=16,
                          dataset=str(tmp_path / "t.npy"), out=str(acts), dtype="float32",
                          progress=False))
    sae = train(SAEConfig(d_in=32, d_sae=64, k=4), ActivationStore(acts, hook, batch_size=64),
                TrainConfig(steps=40, lr=3e-3, progress=False)).saes["sae"]
    csv = tmp_path / "lab.csv"
    csv.write_text("text,label\n" + "".join(f"{'abc' * (3 + i % 4)},x\n{'xyz' * (3 + i % 4)},y\n"
                                            for i in range(16)))
    concepts = tmp_path / "concepts.jsonl"
    concepts.write_text(
        '{"name": "a", "word_i": " fox", "word_j": " dog", "target": " q", "prompt": "the f"}\n'
        '{"name": "b", "word_i": " line", "word_j": " over", "target": " j", "prompt": "line"}\n')
    cfg = EvalConfig(datasets=(str(csv),), probe_train_per_class=8, probe_test_per_class=4,
                     probe_ctx=16, ks=(1, 2), recon_tokens=256, live_dataset=str(text),
                     live_ctx=16, ce_contexts=4, n_pairs=2, alpha_scales=(1.0, 4.0),
                     concepts=str(concepts), progress=False)
    m = {}
    for b in BACKENDS:
        lm = models.load_model(str(llama_dir), backend=b)
        m[b] = evaluate(sae, model=lm, hook=hook, tokenizer=tok, config=cfg)
        assert m[b]["backend"] == b
    ref = m["transformer_lens"]["saes"]["sae"]
    for b in ("hf", "nnsight"):
        got = m[b]["saes"]["sae"]
        for key in ("fvu", "l0", "mse_per_token"):
            assert got["reconstruction"][key] == pytest.approx(ref["reconstruction"][key],
                                                               rel=1e-4), (b, key)
        for key in ("ce_clean", "ce_sae", "ce_zero", "ce_loss_recovered", "kl_sae"):
            assert got["reconstruction"]["ce"][key] == pytest.approx(
                ref["reconstruction"]["ce"][key], rel=1e-4, abs=1e-6), (b, key)
        assert got["probing"]["f1"] == pytest.approx(ref["probing"]["f1"], abs=1e-6)
        s_ref, s_got = m["transformer_lens"]["steering"], m[b]["steering"]
        assert s_got["hook_norm"] == pytest.approx(s_ref["hook_norm"], rel=1e-5)
        for c_ref, c_got in zip(s_ref["concepts"], s_got["concepts"]):
            assert c_got["rank_none"] == c_ref["rank_none"]
            assert c_got["saes"]["sae"]["latents"] == c_ref["saes"]["sae"]["latents"]
            assert c_got["saes"]["sae"]["ranks"] == c_ref["saes"]["sae"]["ranks"]


def _word_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, models as tk_models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ("the of and to a in is that for it on was with as by he said at from his be are "
             "has have an will not but this they which were their been had would who more its "
             "year after we can all new one there than also").split()[:vocab_size - 3]
    vocab = {"<bos>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tk = Tokenizer(tk_models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>")


def test_run_eval_and_browse_commands_take_a_backend(tmp_path, capsys):
    """`polysae run --backend nnsight` end to end on a tiny Llama with a tokenizer; `polysae eval
    --backend hf` of its SAEs gives the run's CE/KL numbers; `polysae browse --backend hf`."""
    import json

    from polysae.__main__ import main

    folder = tiny_llama(tmp_path / "tiny")
    _word_tokenizer(64).save_pretrained(folder)
    out = tmp_path / "run"
    small = ["--eval.recon-tokens", "256", "--eval.probe-train-per-class", "4",
             "--eval.probe-test-per-class", "2", "--eval.ce-contexts", "2", "--eval.live-ctx",
             "32", "--eval.datasets", "bbc", "--eval.alpha-scales", "1", "--no-eval.absorption",
             "--no-eval.tpp"]
    assert main(["run", "--out", str(out), "--backend", "nnsight", "--harvest.model",
                 str(folder), "--harvest.hooks", "blocks.1.hook_resid_post", "--harvest.tokens",
                 "2048", "--harvest.ctx", "32", "--harvest.shard-size", "512", "--sae.d-sae",
                 "64", "--sae.k", "4", "--epochs", "1", "--batch-size", "128", "--no-progress",
                 *small]) == 0
    run_m = json.loads((out / "report" / "metrics.json").read_text())
    assert run_m["backend"] == "nnsight" and run_m["config"]["backend"] == "nnsight"
    assert json.loads((out / "acts" / "manifest.json").read_text())["model_backend"] == "nnsight"
    assert (out / "browser" / "index.html").exists()
    assert main(["eval", "--sae", str(out / "train"), "--out", str(tmp_path / "ev"),
                 "--acts", str(out / "acts"), "--backend", "hf", "--no-progress",
                 *(a.replace("eval.", "") for a in small)]) == 0
    ev = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert ev["backend"] == "hf"
    for n in ("vanilla", "poly"):
        a, b = run_m["saes"][n]["reconstruction"], ev["saes"][n]["reconstruction"]
        assert b["fvu"] == pytest.approx(a["fvu"], rel=1e-6)
        for key in ("ce_clean", "ce_sae", "ce_zero", "kl_sae"):
            assert b["ce"][key] == pytest.approx(a["ce"][key], rel=1e-4), (n, key)
    assert main(["browse", "--sae", str(out / "train" / "poly"), "--acts", str(out / "acts"),
                 "--out", str(tmp_path / "site"), "--backend", "hf"]) == 0
    assert (tmp_path / "site" / "index.html").exists()
    capsys.readouterr()
