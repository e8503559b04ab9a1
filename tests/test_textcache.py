"""The per-process cache of probing-text activations (polysae.evaluation.textcache): a hit returns
exactly what a fresh forward gives, and anything that could change the activations is a miss."""

import torch

from polysae.evaluation import probing, textcache


def _texts(seed: int, n: int = 7, vocab: int = 50):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g)
            for _ in range(n)]


def _counting(monkeypatch):
    calls = []
    real = probing.collect_text_acts

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(probing, "collect_text_acts", counted)
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
