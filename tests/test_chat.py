"""lima_jax/chat.py and lima-chat: multi-turn history in the EOT format, /reset, /settings, /quit."""
from __future__ import annotations

import io

import pytest

from lima_jax import chat, decoding, eval_decoder
from lima_jax.chat_format import encode_prompt
from lima_jax.cli import chat as chat_cli
from tests.test_eval_decoder import checkpoint  # noqa: F401  (the tiny model + tokenizer fixture)


@pytest.fixture
def session(checkpoint):  # noqa: F811
    from lima_jax import load_pretrained

    settings = eval_decoder.load_settings([], [], {"max_new_tokens": 6})
    return chat.ChatSession(load_pretrained(checkpoint), eval_decoder.resolve_tokenizer(checkpoint, None), settings)


def _feed(session, lines):
    printed, pending = [], iter(lines)

    def read(prompt):
        for line in pending:
            return line
        raise EOFError  # like input() at the end of stdin

    chat.run(session, input_fn=read, print_fn=printed.append)
    return printed


def test_history_is_sent_in_the_eot_format(session, monkeypatch):
    seen_prompts = []
    real = decoding.generate

    def spy(lm, prompts, *args, **kwargs):
        seen_prompts.append(list(prompts[0]))
        return real(lm, prompts, *args, **kwargs)

    monkeypatch.setattr(decoding, "generate", spy)
    printed = _feed(session, ["the cat sat", "why is the sky blue", "/quit", "never read"])
    assert len(seen_prompts) == 2 and len(session.history) == 4
    tok = session.tokenizer
    first_reply = session.history[1]
    assert seen_prompts[0] == encode_prompt(["the cat sat"], tok)
    assert seen_prompts[1] == encode_prompt(["the cat sat", first_reply, "why is the sky blue"], tok)
    assert seen_prompts[1][0] == tok.bos_id and seen_prompts[1].count(tok.eot_id) == 3
    assert sum(p.startswith("lima> ") for p in printed) == 2


def test_reset_and_settings(session):
    printed = _feed(session, ["hello", "/reset", "/settings", "/settings temperature 0.5", "/settings top_p x",
                              "/settings greedy true", "/bogus"])
    assert session.history == []
    assert "(history cleared)" in printed
    assert any("temperature=0.7" in p and "top_p=0.9" in p and "repetition_penalty=1.2" in p for p in printed)
    assert session.settings["temperature"] == 0.5 and session.settings["greedy"] is True
    assert any(p.startswith("error: bad value 'x' for top_p") for p in printed)
    assert any(p.startswith("error: unknown command /bogus") for p in printed)


def test_old_exchanges_are_dropped_when_the_context_is_full(session):
    session.history = ["the cat sat on the mat " * 6, "a dog ran " * 6] * 3
    session.history.append("why")
    tokens = session.prompt_tokens()
    assert len(tokens) < session.lm.config.max_position_embeddings
    assert session.history[-1] == "why" and len(session.history) % 2 == 1 and len(session.history) < 7


def test_cli_reads_stdin(checkpoint, monkeypatch, capsys):  # noqa: F811
    monkeypatch.setattr("sys.stdin", io.StringIO("tell me a story\n/settings\n/quit\n"))
    assert chat_cli.main(["--checkpoint", checkpoint, "--max_new_tokens", "5", "--greedy"]) == 0
    out = capsys.readouterr().out
    assert "lima> " in out and "greedy=True" in out and "max_new_tokens=5" in out
