"""The one definition of LIMA's chat format (§3, §6) and its loss mask.

    tokens    = [BOS] + for each utterance u_i: sentencepiece(u_i) + [EOT]
    loss_mask = 1 on assistant utterances (odd i) and their EOT; 0 on BOS, user turns and their EOT.
Training truncates on the right at the context length. A decoding prompt is the same encoding of
the turns so far (ending with a user turn); the model then writes the assistant turn and its EOT.
"""
from __future__ import annotations

from typing import Optional, Sequence

from lima_jax.tokenizer import Tokenizer


def encode_conversation(turns: Sequence[str], tokenizer: Tokenizer, max_len: Optional[int] = None,
                        ) -> tuple[list[int], list[int]]:
    """(tokens, loss_mask) for a conversation [user, assistant, user, ...]."""
    tokens, mask = [tokenizer.bos_id], [0]
    for i, turn in enumerate(turns):
        ids = tokenizer.encode(turn) + [tokenizer.eot_id]
        is_assistant = i % 2 == 1
        tokens += ids
        mask += [int(is_assistant)] * len(ids)
    if max_len is not None:
        tokens, mask = tokens[:max_len], mask[:max_len]
    return tokens, mask


def encode_prompt(turns: Sequence[str], tokenizer: Tokenizer) -> list[int]:
    """Tokens the model continues with an assistant turn; `turns` must end with a user turn."""
    if len(turns) % 2 != 1:
        raise ValueError(f"a prompt needs an odd number of turns (ending with the user's), got {len(turns)}")
    return encode_conversation(turns, tokenizer)[0]
