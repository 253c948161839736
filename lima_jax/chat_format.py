"""The one definition of LIMA's chat format (§3, §6) and its loss mask.

    tokens    = [BOS] + for each utterance u_i: sentencepiece(u_i) + [EOT]
    loss_mask = 1 on assistant utterances (odd i) and their EOT; 0 on BOS, user turns and their EOT.
Training truncates on the right at the context length. A decoding prompt is the same encoding of
the turns so far (ending with a user turn); the model then writes the assistant turn and its EOT.
"""
from __future__ import annotations

from typing import Optional, Sequence

from lima_jax.jsonl import parse_object
from lima_jax.tokenizer import EOT_PIECE, Tokenizer


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


# The same format as a Hugging Face chat template (tokenizer_config.json of an export with <eot>): BOS,
# then each turn's text and <eot>. HF's tokenizer gives each text after a special token the
# sentencepiece word prefix, so the ids equal encode_conversation's (tested). A generation prompt adds
# nothing: the model continues after the user's <eot>. Roles must alternate, starting with the user.
HF_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('LIMA conversations alternate user and assistant turns, starting with the user') }}"
    "{% endif %}{{ message['content'] }}" + EOT_PIECE + "{% endfor %}")


# ---- one line of a LIMA-format JSONL file: {"conversations": [user, assistant, ...], "source": ...} ----
SOURCES = ("stackexchange", "authors", "wikihow", "nlp", "writingprompts", "multi_turn")


class InvalidLimaLine(ValueError):
    """One bad line of a LIMA JSONL file; str() is `FILE:LINE: what is wrong`."""

    def __init__(self, path: str, lineno: int, problem: str):
        super().__init__(f"{path}:{lineno}: {problem}")
        self.path, self.lineno, self.problem = path, lineno, problem


def parse_lima_line(text: str, path: str, lineno: int, prompts_only: bool) -> dict:
    """The validated example on one line, or InvalidLimaLine saying what is wrong with it."""
    def bad(problem):
        return InvalidLimaLine(path, lineno, problem)
    try:
        row = parse_object(text)
    except ValueError as e:
        raise bad(str(e)) from None
    turns = row.get("conversations")
    if turns is None:
        raise bad('missing "conversations"')
    if not isinstance(turns, list):
        raise bad(f'"conversations" must be a list of strings, got {type(turns).__name__}')
    if not turns:
        raise bad('empty "conversations"')
    for i, turn in enumerate(turns):
        if not isinstance(turn, str):
            raise bad(f"turn {i} is not a string ({type(turn).__name__})")
        if not turn.strip():
            raise bad(f"turn {i} is empty")
    if prompts_only and len(turns) % 2 == 0:
        raise bad(f"a prompt needs an odd number of turns (ending with the user's), got {len(turns)}")
    source = row.get("source")
    if source is None and prompts_only:
        source = ""  # prompt files may leave the source out
    elif source not in SOURCES:
        raise bad(f"unknown source {source!r}; expected one of {', '.join(SOURCES)}")
    return {"conversations": turns, "source": source, "index": lineno}
