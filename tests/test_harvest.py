"""Harvest on tiny random models: stored rows vs run_with_cache, crash-resume byte identity,
BOS policy, storage dtypes, and every refused input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from polysae.data import chunking, models
from polysae.data.harvesting import HarvestConfig, HarvestError, harvest
from polysae.data.store import ActivationStore

HOOKS = ["blocks.0.hook_resid_pre", "blocks.1.attn.hook_z", "blocks.1.hook_mlp_out",
         "blocks.1.hook_resid_post"]


def tiny_model():
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.manual_seed(0)
    cfg = HookedTransformerConfig(n_layers=2, d_model=64, n_ctx=64, d_head=16, n_heads=4,
                                  d_vocab=1000, act_fn="gelu", seed=0)
    return HookedTransformer(cfg).eval()


def word_tokenizer():
    """A real fast tokenizer over a tiny word vocabulary, built in memory (no hub)."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    words = "the cat sat on a mat dog ran far away big red sun".split()
    vocab = {"<bos>": 0, "<eos>": 1, "<pad>": 2, "<unk>": 3,
             **{w: i + 4 for i, w in enumerate(words)}}
    tk = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>")


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def npy(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("tok") / "tokens.npy"
    np.save(p, np.random.default_rng(0).integers(0, 1000, size=(40, 16)))
    return p


def cfg_for(npy: Path, out: Path, **kw) -> HarvestConfig:
    base = dict(model="tiny", hooks=list(HOOKS), dataset=str(npy), tokens=40 * 16, ctx=16,
                out=str(out), batch_size=4, shard_size=100, dtype="float32", progress=False)
    base.update(kw)
    return HarvestConfig(**base)


def test_rows_equal_run_with_cache_for_every_hook(model, npy, tmp_path):
    r = harvest(cfg_for(npy, tmp_path / "a"), model=model)
    toks = torch.from_numpy(np.load(npy))
    assert r.n_rows == toks.numel() and r.n_shards == -(-toks.numel() // 100)
    with torch.inference_mode():
        _, cache = model.run_with_cache(toks)  # full forward, whole dataset in one batch
    for hook in HOOKS:
        ref = cache[hook].reshape(toks.numel(), -1)
        store = ActivationStore(tmp_path / "a", hook, split="all", batch_size=64)
        assert store.d_in == ref.shape[1] == r.d_in[hook]
        torch.testing.assert_close(store.read_rows(0, store.n_rows), ref, atol=1e-5, rtol=1e-5)
    info = ActivationStore(tmp_path / "a", HOOKS[0], split="all").tokens()
    assert torch.equal(info.token_ids, toks.reshape(-1))
    assert torch.equal(info.positions, torch.arange(16).repeat(40))
    assert torch.equal(info.doc_ids, torch.arange(40).repeat_interleave(16))
    man = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert man["complete"] and man["hooks"] == HOOKS and man["d_in"][HOOKS[1]] == 64


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_storage_dtype_round_trip(model, npy, tmp_path, dtype):
    harvest(cfg_for(npy, tmp_path, hooks=[HOOKS[3]], dtype=dtype, tokens=160), model=model)
    toks = torch.from_numpy(np.load(npy))[:10]
    with torch.inference_mode():
        _, cache = model.run_with_cache(toks)
    ref = cache[HOOKS[3]].reshape(160, -1)
    got = ActivationStore(tmp_path, split="all", dtype=torch.float32).read_rows(0, 160)
    # Rounding float32 -> storage dtype is the only loss: compare after the same rounding.
    torch.testing.assert_close(got, ref.to(getattr(torch, dtype)).float(), atol=2e-3, rtol=1e-2)


def test_float16_overflow_is_an_error(npy, tmp_path):
    m = tiny_model()
    with torch.no_grad():
        m.embed.W_E.mul_(1e6)
    with pytest.raises(HarvestError, match="overflow float16.*bfloat16"):
        harvest(cfg_for(npy, tmp_path, hooks=["hook_embed"], dtype="float16"), model=m)


def test_bos_policies_and_exclude_special(tmp_path):
    tok = word_tokenizer()
    txt = tmp_path / "docs.txt"
    txt.write_text("the cat sat\nthe dog ran far away\nbig red sun\n")
    words = "the cat sat dog ran far away big red sun".split()
    ids = {w: tok.convert_tokens_to_ids(w) for w in words}
    B, E = 0, 1
    stream = [ids["the"], ids["cat"], ids["sat"], E, ids["the"], ids["dog"], ids["ran"], ids["far"],
              ids["away"], E, ids["big"], ids["red"], ids["sun"], E]
    c = chunking.build_chunks(str(txt), tok, 4, 100, bos="chunk")
    # chunk: BOS + 3 stream tokens per context; the trailing partial context is dropped.
    assert c.tokens.tolist() == [[B] + stream[i:i + 3] for i in range(0, 12, 3)]
    # BOS takes the document id of the token after it (contexts 2 and 4 start with an EOS).
    assert c.doc_ids[:, 0].tolist() == [0, 0, 1, 1]
    d = chunking.build_chunks(str(txt), tok, 4, 100, bos="doc")
    doc_stream = [B] + stream[:4] + [B] + stream[4:10] + [B] + stream[10:]
    assert d.tokens.reshape(-1).tolist() == doc_stream[:16]
    n = chunking.build_chunks(str(txt), tok, 4, 2, bos="none")
    assert n.tokens.reshape(-1).tolist() == stream[:8]

    m = tiny_model()
    out = tmp_path / "out"
    r = harvest(HarvestConfig(model="tiny-words", hooks=[HOOKS[3]], dataset=str(txt), tokens=16,
                              ctx=4, out=str(out), exclude_special=True, dtype="float32",
                              progress=False),
                model=models.LoadedModel(m, tok, "tiny-words", "decoder"))
    store = ActivationStore(out, split="all")
    info = store.tokens()
    keep = ~torch.isin(c.tokens, torch.tensor([B, E, 2])).reshape(-1)
    assert r.n_rows == int(keep.sum()) == 16 - 4 - 2  # 4 BOS, 2 EOS in the 4 contexts
    assert torch.equal(info.token_ids, c.tokens.reshape(-1)[keep])
    assert torch.equal(info.positions, torch.arange(4).repeat(4)[keep])
    with torch.inference_mode():
        _, cache = m.run_with_cache(c.tokens)
    torch.testing.assert_close(store.read_rows(0, 10), cache[HOOKS[3]].reshape(16, -1)[keep],
                               atol=1e-5, rtol=1e-5)


KILL_SCRIPT = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    from test_harvest import tiny_model, cfg_for
    from polysae.data.harvesting import harvest
    from pathlib import Path
    harvest(cfg_for(Path({npy!r}), Path({out!r})), model=tiny_model())
""")


@pytest.mark.parametrize("stage", ["2:mid_shard", "3:after_manifest"])
def test_kill9_then_rerun_gives_byte_identical_shards(npy, tmp_path, stage):
    ref_dir, crash_dir = tmp_path / "ref", tmp_path / "crash"
    harvest(cfg_for(npy, ref_dir), model=tiny_model())
    env = dict(os.environ, POLYSAE_HARVEST_TEST_KILL=stage)
    script = KILL_SCRIPT.format(tests=str(Path(__file__).parent), npy=str(npy), out=str(crash_dir))
    p = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == -9, p.stderr[-2000:]
    man = json.loads((crash_dir / "manifest.json").read_text())
    shard = int(stage.split(":")[0])
    # The manifest lists only complete shards: the killed one only if it was fully recorded.
    assert len(man["shards"]) == shard + (stage.endswith("after_manifest")) and not man["complete"]
    harvest(cfg_for(npy, crash_dir), model=tiny_model())  # same command again: resumes
    ref_files = sorted(p.relative_to(ref_dir) for p in ref_dir.rglob("*.safetensors"))
    crash_files = sorted(p.relative_to(crash_dir) for p in crash_dir.rglob("*.safetensors"))
    assert ref_files == crash_files and len(ref_files) == 7 * (len(HOOKS) + 1)
    for rel in ref_files:
        assert (ref_dir / rel).read_bytes() == (crash_dir / rel).read_bytes(), rel
    assert not [p for p in crash_dir.rglob("*") if ".tmp" in p.name]
    man = json.loads((crash_dir / "manifest.json").read_text())
    ref = json.loads((ref_dir / "manifest.json").read_text())
    assert man["shards"] == ref["shards"] and man["complete"]


def test_rerun_complete_and_incompatible_folders(model, npy, tmp_path):
    out = tmp_path / "h"
    harvest(cfg_for(npy, out, tokens=160), model=model)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    again = harvest(cfg_for(npy, out, tokens=160), model=model)
    assert again.seconds == 0.0 and again.n_rows == 160
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    with pytest.raises(HarvestError, match=r"incompatible harvest \(ctx: folder has 16, asked 8"):
        harvest(cfg_for(npy, out, tokens=160, ctx=8), model=model)
    # Same flags, but the dataset file changed under an unfinished harvest: refuse to splice.
    own = tmp_path / "own.npy"
    np.save(own, np.load(npy))
    partial = tmp_path / "partial"
    harvest(cfg_for(own, partial, tokens=160), model=model)
    man = json.loads((partial / "manifest.json").read_text())
    man["complete"] = False
    (partial / "manifest.json").write_text(json.dumps(man))
    np.save(own, np.load(npy)[::-1].copy())
    with pytest.raises(HarvestError, match="harvested from different tokens"):
        harvest(cfg_for(own, partial, tokens=160), model=model)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(HarvestError, match="not empty and holds no polysae harvest"):
        harvest(cfg_for(npy, foreign), model=model)


def test_bad_inputs_name_the_problem(model, npy, tmp_path):
    with pytest.raises(ValueError, match=r"unknown hook\(s\) \['blocks.1.hook_resid_psot'\].*"
                                         r"blocks.0.hook_resid_post"):
        harvest(cfg_for(npy, tmp_path / "a", hooks=["blocks.1.hook_resid_psot"]), model=model)
    with pytest.raises(HarvestError, match="--ctx 65 is longer than the model's context \\(64"):
        harvest(cfg_for(npy, tmp_path / "b", ctx=65), model=model)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="empty.txt.*gave no complete context"):
        harvest(cfg_for(npy, tmp_path / "c", dataset=str(empty)),
                model=models.LoadedModel(model, word_tokenizer(), "tiny-words", "decoder"))
    with pytest.raises(ValueError, match="rows are 16 tokens long but --ctx is 8"):
        harvest(cfg_for(npy, tmp_path / "d", ctx=8), model=model)
    with pytest.raises(ValueError,
                       match=r"'blocks.0.attn.hook_pattern' gives \(1, 4, 8, 8\), not \[batch"):
        harvest(cfg_for(npy, tmp_path / "e", hooks=["blocks.0.attn.hook_pattern"]), model=model)
    assert not (tmp_path / "a" / "manifest.json").exists()


def test_short_disk_stops_before_writing(model, npy, tmp_path, monkeypatch, capsys):
    import shutil

    from polysae.data import harvesting as hv

    monkeypatch.setattr(hv.shutil, "disk_usage",
                        lambda p: shutil._ntuple_diskusage(10**12, 10**12 - 1000, 1000))
    with pytest.raises(HarvestError, match="not enough disk space"):
        harvest(cfg_for(npy, tmp_path / "x"), model=model)
    assert "still to write" in capsys.readouterr().err
    assert not (tmp_path / "x" / "manifest.json").exists()


def test_cli_errors_exit_nonzero(tmp_path, capsys):
    from polysae.__main__ import main

    rc = main(["harvest", "--model", "no-such-model-xyz", "--out", str(tmp_path / "o")])
    assert rc == 1 and "unknown model 'no-such-model-xyz'" in capsys.readouterr().err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    rc = main(["harvest", "--out", str(tmp_path / "busy"), "--dtype", "float16"])
    assert rc == 2 and "holds no polysae harvest" in capsys.readouterr().err


def _tiny_hf(tmp_path: Path, kind: str) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if kind == "llama":
        hf = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128,
                                          num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, max_position_embeddings=64))
    else:
        hf = GPT2LMHeadModel(GPT2Config(vocab_size=300, n_embd=64, n_layer=2, n_head=4,
                                        n_positions=64))
    path = tmp_path / kind
    hf.save_pretrained(path)
    return path


def test_local_hf_folders_llama_converts_gpt2_plain_hooks(tmp_path):
    from transformers import AutoModelForCausalLM

    toks = torch.randint(0, 300, (3, 12), generator=torch.Generator().manual_seed(1))
    np.save(tmp_path / "t.npy", toks.numpy())
    for kind, hook, layer in [("llama", "blocks.0.hook_resid_post", 1),
                              ("gpt2", "transformer.h.0", 1)]:
        path = _tiny_hf(tmp_path, kind)
        lm = models.load_model(str(path))
        # Llama converts to TransformerLens; GPT-2 is served by the hf backend under the default
        assert lm.kind == "decoder"
        assert lm.backend == ("transformer_lens" if kind == "llama" else "hf")
        assert hook in models.list_hooks(lm)
        out = tmp_path / f"out_{kind}"
        harvest(HarvestConfig(model=str(path), hooks=[hook], dataset=str(tmp_path / "t.npy"),
                              tokens=36, ctx=12, out=str(out), dtype="float32", progress=False),
                model=lm)
        hf = AutoModelForCausalLM.from_pretrained(path).eval()
        with torch.no_grad():
            ref = hf(toks, output_hidden_states=True).hidden_states[layer]
        got = ActivationStore(out, split="all").read_rows(0, 36)
        torch.testing.assert_close(got, ref.reshape(36, -1), atol=1e-4, rtol=1e-4)


def test_hooks_cli_lists_names(tmp_path, capsys):
    from polysae.__main__ import main

    path = _tiny_hf(tmp_path, "llama")
    assert main(["hooks", "--model", str(path), "--filter", "resid_post"]) == 0
    assert capsys.readouterr().out.split() == ["blocks.0.hook_resid_post",
                                               "blocks.1.hook_resid_post"]
    assert main(["hooks", "--model", str(path), "--filter", "nothing-like-this"]) == 2


def test_error_mid_harvest_leaves_resumable_incomplete_folder(model, npy, tmp_path, monkeypatch):
    from polysae.data import harvesting as hv

    real, calls = models.capture, {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 1 + 6:  # the probe, then 6 batches (2 full shards), then a failure
            raise RuntimeError("simulated failure")
        return real(*a, **k)

    monkeypatch.setattr(models, "capture", flaky)
    out = tmp_path / "flaky"
    with pytest.raises(RuntimeError, match="simulated failure"):
        hv.harvest(cfg_for(npy, out), model=model)
    man = json.loads((out / "manifest.json").read_text())
    assert not man["complete"] and len(man["shards"]) == 3  # 6 batches x 64 rows = 3.84 shards
    monkeypatch.setattr(models, "capture", real)
    hv.harvest(cfg_for(npy, out), model=model)
    ref = tmp_path / "ref"
    hv.harvest(cfg_for(npy, ref), model=model)
    for f in ref.rglob("*.safetensors"):
        assert f.read_bytes() == (out / f.relative_to(ref)).read_bytes()


def test_forward_stops_after_deepest_hook(npy, tmp_path):
    m = tiny_model()
    fired = []
    m.add_hook("blocks.1.hook_resid_pre", lambda act, hook: fired.append(1), is_permanent=True)
    m.add_hook("ln_final.hook_normalized", lambda act, hook: fired.append(2), is_permanent=True)
    harvest(cfg_for(npy, tmp_path / "a", hooks=["blocks.0.attn.hook_z"], tokens=64), model=m)
    assert fired == []  # nothing after block 0's attention ran, the LM head least of all
    harvest(cfg_for(npy, tmp_path / "b", hooks=["blocks.1.hook_resid_pre"], tokens=64), model=m)
    assert 1 in fired and 2 not in fired
    fired.clear()
    with torch.inference_mode():
        models.capture(m, torch.zeros(1, 4, dtype=torch.long), ["blocks.0.hook_resid_post"],
                       stop_early=False)
    assert fired == [1, 2]  # stop_early=False runs the whole model
