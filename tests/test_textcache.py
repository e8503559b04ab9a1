"""The per-process cache of probing-text activations (polysae.evaluation.textcache): a hit returns
exactly what a fresh forward gives, and anything that could change the activations is a miss."""

import torch

from polysae.evaluation import probing, textcache


def _texts(seed: int, n: int = 7, vocab: int = 50):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g)
            for _ in range(n)]


def _counting(monkeypatch, module=probing, name="collect_text_acts"):
    """Replace ``module.name`` by a wrapper that records each call; returns (calls, original)."""
    calls = []
    real = getattr(module, name)

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(module, name, counted)
    return calls, real


def _same(a, b):
    assert a.n_tokens == b.n_tokens and len(a.acts) == len(b.acts)
    for x, y in zip(a.acts, b.acts):
        assert torch.equal(x, y)


def test_hit_equals_a_fresh_forward(make_tiny_hooked, monkeypatch):
    textcache.clear()
    model = make_tiny_hooked()
    calls, real = _counting(monkeypatch)
    toks = _texts(0)
    first = textcache.cached_text_acts(model, "blocks.0.hook_resid_post", toks, [0], batch_size=3)
    seen = []
    second = textcache.cached_text_acts(model, "blocks.0.hook_resid_post", toks, [0],
                                        batch_size=3, progress=seen.append)
    assert len(calls) == 1 and seen == [len(toks)]
    fresh = real(model, "blocks.0.hook_resid_post", toks, [0], batch_size=3)
    _same(second, fresh)
    _same(first, fresh)


def test_every_input_that_changes_the_activations_misses(make_tiny_hooked, monkeypatch):
    textcache.clear()
    model = make_tiny_hooked()
    calls, real = _counting(monkeypatch)
    hook = "blocks.0.hook_resid_post"
    toks = _texts(1)
    textcache.cached_text_acts(model, hook, toks, [0], batch_size=3)
    textcache.cached_text_acts(model, "blocks.1.hook_resid_post", toks, [0], batch_size=3)
    textcache.cached_text_acts(model, hook, _texts(2), [0], batch_size=3)
    textcache.cached_text_acts(model, hook, toks, [0, 5], batch_size=3)
    textcache.cached_text_acts(model, hook, toks, [0], batch_size=4)
    textcache.cached_text_acts(make_tiny_hooked(seed=1), hook, toks, [0], batch_size=3)
    assert len(calls) == 6
    # one token changed in one text
    edited = [t.clone() for t in toks]
    edited[3][0] = (edited[3][0] % 40) + 1 if edited[3][0] != 1 else 2
    textcache.cached_text_acts(model, hook, edited, [0], batch_size=3)
    assert len(calls) == 7
    # the model's weights edited in place: a miss, and the new result is the edited model's
    with torch.no_grad():
        model.blocks[0].attn.W_Q.mul_(2.0)
    after = textcache.cached_text_acts(model, hook, toks, [0], batch_size=3)
    assert len(calls) == 8
    _same(after, real(model, hook, toks, [0], batch_size=3))


def test_least_recently_used_entries_are_dropped(make_tiny_hooked, monkeypatch):
    textcache.clear()
    model = make_tiny_hooked()
    calls, _ = _counting(monkeypatch)
    hook = "blocks.0.hook_resid_post"
    for s in range(textcache.MAX_ENTRIES + 1):
        textcache.cached_text_acts(model, hook, _texts(10 + s), [0], batch_size=3)
    textcache.cached_text_acts(model, hook, _texts(10 + textcache.MAX_ENTRIES), [0], batch_size=3)
    assert len(calls) == textcache.MAX_ENTRIES + 1  # the newest is still there
    textcache.cached_text_acts(model, hook, _texts(10), [0], batch_size=3)
    assert len(calls) == textcache.MAX_ENTRIES + 2  # the oldest was dropped


def test_absorption_word_prompts_are_cached_exactly(make_tiny_hooked, monkeypatch):
    """The absorption task's word forwards go through the same cache: a hit returns the fresh
    forward's activations, and other prompts (another example draw), another hook or weights
    edited in place miss."""
    from wordtok import WordTok

    from polysae.evaluation import absorption as ab

    textcache.clear()
    words = [f" {c}{s}" for c in "abcdef" for s in ("at", "og", "un", "ip")]
    tok = WordTok(words, answers="ABCDEF")
    model = make_tiny_hooked(n_layers=2, d_model=16, d_vocab=len(tok.tokens), n_ctx=128)
    w = ab.task_words(tok, 16, 8, seed=0)
    calls, _ = _counting(monkeypatch, ab, "_last_token_acts")
    hook = "blocks.0.hook_resid_post"

    def acts(seed=0, h=hook):
        return ab.word_acts(model, tok, h, w.train, w.train_pool, w.token_ids, 3, seed=seed,
                            batch_size=4)

    first, kept = acts()
    second, kept2 = acts()
    assert len(calls) == 1 and kept == kept2 and len(kept) == len(w.train)
    textcache.clear()
    fresh, _ = acts()
    assert len(calls) == 2
    assert torch.equal(first, fresh) and torch.equal(second, fresh)
    acts(seed=1)                              # other in-context examples: other prompts
    acts(h="blocks.1.hook_resid_post")
    assert len(calls) == 4
    with torch.no_grad():
        model.blocks[0].attn.W_Q.mul_(2.0)
    after, _ = acts()
    assert len(calls) == 5 and not torch.equal(after, fresh)
