"""lima-chat: an interactive terminal chat keeping the multi-turn history in LIMA's EOT format (§6).

Each reply is generated from encode_prompt(history) = [BOS] + (turn + EOT)* with the user's turn last;
when the history no longer fits the context, the oldest exchanges are dropped. Commands:
    /reset                 forget the conversation
    /settings              show the sampling settings
    /settings NAME VALUE   change one (temperature, top_p, top_k, repetition_penalty, max_new_tokens, seed, greedy)
    /quit                  leave (so does end of input)
"""
from __future__ import annotations

from typing import Callable

from lima_jax import decoding
from lima_jax.chat_format import encode_prompt
from lima_jax.tokenizer import Tokenizer

_TYPES = dict(temperature=float, top_p=float, top_k=int, repetition_penalty=float, max_new_tokens=int, seed=int,
              greedy=lambda v: {"true": True, "1": True, "false": False, "0": False}[v.lower()])


class ChatSession:
    def __init__(self, lm, tokenizer: Tokenizer, settings: dict):
        if tokenizer.eot_id >= lm.config.vocab_size:
            raise ValueError(f"the model's vocabulary ({lm.config.vocab_size}) lacks the EOT id {tokenizer.eot_id}")
        self.lm, self.tokenizer = lm, tokenizer
        self.settings = {k: settings[k] for k in _TYPES}
        self.history: list[str] = []
        self.turn = 0  # reply counter: each reply samples with its own seed

    def prompt_tokens(self) -> list[int]:
        """The history as a prompt, oldest exchanges dropped until it leaves room for a reply."""
        room = self.lm.config.max_position_embeddings - 1
        while True:
            tokens = encode_prompt(self.history, self.tokenizer)
            if len(tokens) <= room or len(self.history) == 1:
                return tokens
            self.history = self.history[2:]

    def reply(self, message: str) -> str:
        self.history.append(message)
        tokens = self.prompt_tokens()
        if len(tokens) >= self.lm.config.max_position_embeddings:
            self.history.pop()
            raise ValueError(f"the message is {len(tokens)} tokens; the context holds "
                             f"{self.lm.config.max_position_embeddings}")
        s = self.settings
        stop_ids = sorted({self.tokenizer.eot_id, self.tokenizer.eos_id} | set(decoding.default_stop_ids(self.lm.config)))
        gen = decoding.generate(self.lm, [tokens], s["max_new_tokens"], greedy=s["greedy"],
                                temperature=s["temperature"], top_p=s["top_p"], top_k=s["top_k"],
                                repetition_penalty=s["repetition_penalty"], seed=s["seed"] + self.turn,
                                stop_ids=[i for i in stop_ids if i < self.lm.config.vocab_size], batch_size=1)
        self.turn += 1
        response = self.tokenizer.decode(gen.tokens[0])
        self.history.append(response)
        return response

    def reset(self) -> None:
        self.history = []

    def set(self, name: str, value: str) -> None:
        if name not in _TYPES:
            raise ValueError(f"unknown setting {name!r}; one of {', '.join(_TYPES)}")
        try:
            self.settings[name] = _TYPES[name](value)
        except (ValueError, KeyError):
            raise ValueError(f"bad value {value!r} for {name}") from None

    def describe(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.settings.items())


def run(session: ChatSession, input_fn: Callable[[str], str] = input, print_fn: Callable[[str], None] = print) -> None:
    """The read-reply loop; returns on /quit or end of input."""
    print_fn("LIMA chat. /reset, /settings [NAME VALUE], /quit.")
    while True:
        try:
            line = input_fn("you> ")
        except (EOFError, KeyboardInterrupt):
            return
        text = line.strip()
        if not text:
            continue
        if text == "/quit":
            return
        if text == "/reset":
            session.reset()
            print_fn("(history cleared)")
            continue
        if text.startswith("/settings"):
            parts = text.split()
            try:
                if len(parts) == 3:
                    session.set(parts[1], parts[2])
                elif len(parts) != 1:
                    raise ValueError("usage: /settings [NAME VALUE]")
                print_fn(session.describe())
            except ValueError as e:
                print_fn(f"error: {e}")
            continue
        if text.startswith("/"):
            print_fn(f"error: unknown command {text.split()[0]}")
            continue
        try:
            print_fn(f"lima> {session.reply(line)}")
        except ValueError as e:
            print_fn(f"error: {e}")
