"""A minimal character tokenizer for evaluator tests on tiny random models (no hub, no files)."""

from __future__ import annotations


class CharTok:
    """Character ids 3.. with BOS=1, EOS=2, PAD=0: enough for the evaluator's text paths
    (probing texts, live held-out text, CE contexts) on a tiny random HookedTransformer."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0
    all_special_ids = [0, 1, 2]

    def __call__(self, text, add_special_tokens=False):
        enc = lambda t: [3 + (ord(c) % 60) for c in t]  # noqa: E731
        return {"input_ids": enc(text) if isinstance(text, str) else [enc(t) for t in text]}

    def decode(self, ids):
        return "".join(chr(ord("a") + (i - 3) % 26) if i >= 3 else "<s>" for i in ids)
