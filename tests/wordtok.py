"""A tiny word-level tokenizer with a vocabulary, for the first-letter absorption task on tiny random
models (no hub, no files): every word of ``words`` is one token (``" word"`` with its leading
space), and the prompt pieces ``\\n``, `` has``, `` the``, `` first``, `` letter``, ``:`` and
`` A`` .. `` Z`` (or the ``answers`` given) are tokens too."""

from __future__ import annotations

import re
import string

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]
PIECES = ["\n", " has", " the", " first", " letter", ":"]


class WordTok:
    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2
    all_special_ids = [0, 1, 2, 3]

    def __init__(self, words: list[str], answers: str = string.ascii_uppercase):
        pieces = PIECES + [" " + c for c in answers]
        self.tokens = SPECIAL + pieces + [w for w in words if w not in pieces]
        self.ids = {t: i for i, t in enumerate(self.tokens)}

    def get_vocab(self) -> dict[str, int]:
        return dict(self.ids)

    def convert_tokens_to_string(self, toks: list[str]) -> str:
        return "".join(toks)

    def _enc(self, text: str) -> list[int]:
        return [self.ids.get(t, 3) for t in re.findall(r"\n| ?[A-Za-z]+|:|.", text)]

    def __call__(self, text, add_special_tokens=False):
        if isinstance(text, str):
            return {"input_ids": self._enc(text)}
        return {"input_ids": [self._enc(t) for t in text]}

    def decode(self, ids) -> str:
        return "".join(self.tokens[int(i)] for i in ids)
