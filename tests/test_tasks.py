"""data_pipeline/tasks.py: EOT vocabulary, per-source tasks, mixtures, exact chat-format encoding, converter."""
from __future__ import annotations

import collections
import json

import numpy as np
import pytest
import seqio
import sentencepiece as spm

from data_pipeline import tasks
from data_pipeline.export import export_jsonl
from tests.conftest import LIMA_SAMPLE
from tests.lima_data_helpers import demo_build, lima_sample_build  # noqa: F401  (session fixtures)


def reference_encoding(turns, sp, eot):
    """[BOS] + (sentencepiece(turn) + [EOT]) per turn, loss on assistant turns and their EOT: straight from
    sentencepiece, independent of lima_jax.chat_format."""
    ids, mask = [sp.bos_id()], [0]
    for i, turn in enumerate(turns):
        piece = sp.encode(turn) + [eot]
        ids += piece
        mask += [i % 2] * len(piece)
    return ids, mask


def test_vocabulary_knows_eot(demo_build):
    _, tok, _ = demo_build
    vocab = tasks.LimaVocabulary(tok)
    sp = spm.SentencePieceProcessor(model_file=tok)
    assert vocab.eot_id == sp.get_piece_size() == 500
    assert vocab.vocab_size == 501
    ids = sp.encode("Boil fresh water")
    assert vocab.decode(ids + [vocab.eot_id]) == "Boil fresh water"
    assert vocab.decode_tf(np.array(ids + [vocab.eot_id], np.int32)).numpy().decode() == "Boil fresh water"


def test_tasks_and_mixtures_registered_idempotently(demo_build):
    data_dir, tok, _ = demo_build
    names = tasks.register(data_dir, tok)
    assert tasks.register(data_dir, tok) == names
    for source in tasks.SOURCES:
        assert seqio.TaskRegistry.get(f"lima_{source}") is not None
    assert set(tasks.mixture_task_names("lima_1k")) == {f"lima_{s}" for s in tasks.SINGLE_TURN_SOURCES}
    assert set(tasks.mixture_task_names("lima_1k_dialogue")) == {f"lima_{s}" for s in tasks.SOURCES}
    rates = dict((t.name, seqio.get_mixture_or_task("lima_1k").get_rate(t))
                 for t in seqio.get_mixture_or_task("lima_1k").tasks)
    assert rates["lima_stackexchange"] == 8 and rates["lima_writingprompts"] == 4  # rates by count


def test_lima_1k_single_turn_and_dialogue_adds_multi_turn(demo_build):
    data_dir, tok, _ = demo_build
    tasks.register(data_dir, tok)
    single = tasks.load_examples("lima_1k")
    dialogue = tasks.load_examples("lima_1k_dialogue")
    assert len(single) == 36 and all(ex["source"] != "multi_turn" for ex in single)
    extra = [ex for ex in dialogue if ex["source"] == "multi_turn"]
    assert len(extra) == 4 and len(dialogue) == 40
    key = lambda ex: ex["index"]  # noqa: E731
    assert sorted(map(key, single)) == sorted(key(ex) for ex in dialogue if ex["source"] != "multi_turn")


def test_demo_encoding_is_exactly_the_chat_format_with_truncation(demo_build):
    data_dir, tok, manual = demo_build
    tasks.register(data_dir, tok)
    sp = spm.SentencePieceProcessor(model_file=tok)
    with open(f"{manual}/train.jsonl") as f:
        rows = [json.loads(line) for line in f]
    for max_len in (None, 128):
        for ex in tasks.load_examples("lima_1k_dialogue", max_len=max_len):
            ids, mask = reference_encoding(rows[ex["index"] - 1]["conversations"], sp, 500)
            n = len(ids) if max_len is None else max_len
            assert ex["targets"].tolist() == ids[:n]
            assert ex["loss_mask"].tolist() == mask[:n]


def test_feature_converter_shifts_within_the_sequence():
    tokens = np.array([1, 10, 11, 500, 20, 21, 22, 500], np.int32)
    mask = np.array([0, 0, 0, 0, 1, 1, 1, 1], np.int32)
    out = tasks.to_model_features([{"targets": tokens, "loss_mask": mask}], max_len=10)
    assert out["decoder_input_tokens"][0].tolist() == [1, 10, 11, 500, 20, 21, 22, 0, 0, 0]
    assert out["decoder_target_tokens"][0].tolist() == [10, 11, 500, 20, 21, 22, 500, 0, 0, 0]
    assert out["decoder_loss_weights"][0].tolist() == [0, 0, 0, 1, 1, 1, 1, 0, 0, 0]
    packed = tasks.to_model_features([{"targets": tokens, "loss_mask": mask}] * 2, max_len=16, pack=True)
    assert packed["decoder_input_tokens"].shape == (1, 16)
    assert packed["decoder_segment_ids"][0].tolist() == [1] * 7 + [2] * 7 + [0] * 2
    assert packed["decoder_positions"][0].tolist() == list(range(7)) * 2 + [0, 0]
    assert packed["decoder_loss_weights"][0].tolist() == [0, 0, 0, 1, 1, 1, 1] * 2 + [0, 0]


def test_ablation_subsets_drawn_with_a_seed(demo_build):
    data_dir, tok, _ = demo_build
    picks = {}
    for seed in (0, 1):
        name = tasks.subset_mixture_name("stackexchange", 3, seed)
        assert name in tasks.register(data_dir, tok, mixture=name)
        picks[seed] = [ex["index"] for ex in tasks.load_examples(name)]
        assert all(ex["source"] == "stackexchange" for ex in tasks.load_examples(name))
        assert picks[seed] == tasks.subset_lines(data_dir, "stackexchange", 3, seed)
    assert len(picks[0]) == 3 and picks[0] != picks[1]
    assert len(tasks.load_examples("lima_only_wikihow")) == 8
    with pytest.raises(ValueError, match="fewer than n=99"):
        tasks.register(data_dir, tok, mixture="lima_wikihow_n99_seed0")
    with pytest.raises(ValueError, match="unknown mixture"):
        tasks.register(data_dir, tok, mixture="lima_2k")


def test_lima_sample_export_is_exact_and_keeps_source_counts(lima_sample_build, tmp_path):
    """Acceptance: every exported example of ../shared's LIMA sample is [BOS] + (sp(turn) + [EOT]) per turn,
    loss on exactly the assistant turns and their EOT (multi-turn included); per-source counts preserved."""
    data_dir, tok = lima_sample_build
    sp = spm.SentencePieceProcessor(model_file=tok)
    with open(LIMA_SAMPLE) as f:
        rows = [json.loads(line) for line in f]
    out = tmp_path / "export.jsonl"
    n = export_jsonl(data_dir, "lima_1k_dialogue", "train", tok, 2048, str(out))
    assert n == len(rows)
    with open(out) as f:
        exported = [json.loads(line) for line in f]
    assert collections.Counter(e["source"] for e in exported) == collections.Counter(r["source"] for r in rows)
    expected = {}
    for r in rows:
        ids, mask = reference_encoding(r["conversations"], sp, 32000)
        expected.setdefault(tuple(ids[:2048]), []).append((r["source"], mask[:2048]))
    multi = 0
    for e in exported:
        assert (e["source"], e["loss_mask"]) in expected[tuple(e["input_ids"])]
        assert set(e) == {"source", "input_ids", "loss_mask"}
        multi += e["source"] == "multi_turn"
    assert multi == 6
    single = export_jsonl(data_dir, "lima_1k", "train", tok, 2048, str(tmp_path / "single.jsonl"))
    assert single == sum(r["source"] != "multi_turn" for r in rows)
