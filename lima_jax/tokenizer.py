"""SentencePiece tokenizer plus LIMA's end-of-turn token.

The EOT id rule lives here and only here: EOT = the sentencepiece vocabulary size (32000 for
LLaMA), the row `lima-convert --add_eot` appends to the embedding.
"""
from __future__ import annotations

import os
from typing import Sequence

import sentencepiece as spm

EOT_PIECE = "<eot>"
TOKENIZER_FILE = "tokenizer.model"


def eot_id_for(sp_vocab_size: int) -> int:
    return sp_vocab_size


class Tokenizer:
    def __init__(self, model_path: str):
        if not os.path.exists(model_path):
            raise FileNotFoundError(f"{model_path}: no sentencepiece model")
        self.path = model_path
        self.sp = spm.SentencePieceProcessor(model_file=model_path)
        self.eot_id = eot_id_for(self.sp.get_piece_size())
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()

    @property
    def vocab_size(self) -> int:
        """Including EOT."""
        return self.eot_id + 1

    def encode(self, text: str) -> list[int]:
        """Pieces of `text`, without BOS/EOS."""
        return self.sp.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; EOT and ids outside the sentencepiece vocabulary are dropped."""
        return self.sp.decode([int(i) for i in ids if 0 <= int(i) < self.eot_id])


def find_tokenizer(directory: str) -> str | None:
    """The tokenizer.model stored next to a checkpoint, if any."""
    path = os.path.join(directory, TOKENIZER_FILE)
    return path if os.path.exists(path) else None
