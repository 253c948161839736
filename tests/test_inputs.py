"""data_pipeline/inputs.py: once per epoch, seeded order, host shards, resumable position."""
from __future__ import annotations

import json

import numpy as np
import pytest

from data_pipeline.inputs import TrainInput
from tests.lima_data_helpers import demo_build, lima_sample_build  # noqa: F401  (session fixtures)

B, MAX_LEN, SEED = 8, 256, 3


@pytest.fixture(scope="module")
def one_host(demo_build):
    data_dir, tok, _ = demo_build
    return TrainInput("lima_1k", data_dir, tok, B, MAX_LEN, SEED)


def take(it, n):
    out = []
    for _ in range(n):
        batch = next(it)
        out.append((it.epoch, it.step_in_epoch, it.example_ids.copy(), batch))
    return out


def test_each_example_exactly_once_per_epoch(one_host):
    it = one_host
    it.set_state({"epoch": 0, "step_in_epoch": 0})
    assert it.num_examples == 36 and it.steps_per_epoch == 5
    seen = []
    for epoch, step, ids, batch in take(it, it.steps_per_epoch):
        assert epoch == 0
        assert set(batch) == {"decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights",
                              "decoder_segment_ids", "decoder_positions"}
        assert all(v.shape == (B, MAX_LEN) and v.dtype == np.int32 for v in batch.values())
        for row, ex_id in enumerate(ids):
            if ex_id < 0:  # the last batch is filled with all-zero rows that carry no loss
                assert not any(batch[k][row].any() for k in batch)
                continue
            seen.append(int(ex_id))
            tokens = it.examples[ex_id]["targets"]
            n = len(tokens) - 1
            assert batch["decoder_segment_ids"][row].tolist() == [1] * n + [0] * (MAX_LEN - n)
            assert batch["decoder_positions"][row, :n].tolist() == list(range(n))
            assert batch["decoder_input_tokens"][row, :n].tolist() == tokens[:-1].tolist()
            assert batch["decoder_target_tokens"][row, :n].tolist() == tokens[1:].tolist()
            assert batch["decoder_loss_weights"][row, :n].tolist() == it.examples[ex_id]["loss_mask"][1:].tolist()
    assert sorted(seen) == list(range(36))
    assert it.get_state() == {"epoch": 1, "step_in_epoch": 0}
    assert all(it.examples[i]["source"] != "multi_turn" for i in seen)


def test_same_seed_reproduces_and_epochs_differ(one_host, demo_build):
    data_dir, tok, _ = demo_build
    again = TrainInput("lima_1k", data_dir, tok, B, MAX_LEN, SEED)
    for epoch in (0, 1):
        assert one_host.epoch_examples(epoch).tolist() == again.epoch_examples(epoch).tolist()
    assert one_host.epoch_examples(0).tolist() != one_host.epoch_examples(1).tolist()
    other_seed = TrainInput("lima_1k", data_dir, tok, B, MAX_LEN, SEED + 1)
    assert other_seed.epoch_examples(0).tolist() != one_host.epoch_examples(0).tolist()
    one_host.set_state({"epoch": 0, "step_in_epoch": 0})
    a = take(one_host, 6)
    b = take(again, 6)
    for (ea, sa, ia, ba), (eb, sb, ib, bb) in zip(a, b):
        assert (ea, sa, ia.tolist()) == (eb, sb, ib.tolist())
        assert all(np.array_equal(ba[k], bb[k]) for k in ba)
    assert a[-1][0] == 1  # the 6th batch is epoch 1, step 0


def test_dialogue_mixture_adds_the_multi_turn_examples(demo_build):
    data_dir, tok, _ = demo_build
    it = TrainInput("lima_1k_dialogue", data_dir, tok, B, MAX_LEN, SEED)
    assert it.num_examples == 40
    seen = np.concatenate([ids for _, _, ids, _ in take(it, it.steps_per_epoch)])
    assert sorted(seen[seen >= 0].tolist()) == list(range(40))
    assert sum(ex["source"] == "multi_turn" for ex in it.examples) == 4


def test_two_hosts_split_every_batch_without_overlap(one_host, demo_build):
    data_dir, tok, _ = demo_build
    hosts = [TrainInput("lima_1k", data_dir, tok, B, MAX_LEN, SEED, shard_index=h, num_shards=2) for h in (0, 1)]
    assert hosts[1].shard_info.index == 1 and hosts[1].shard_info.num_shards == 2
    one_host.set_state({"epoch": 0, "step_in_epoch": 0})
    everything = []
    for _ in range(one_host.steps_per_epoch + 1):  # a whole epoch and one step into the next
        full = next(one_host)
        parts = [next(h) for h in hosts]
        ids = [h.example_ids for h in hosts]
        assert all(p["decoder_input_tokens"].shape == (B // 2, MAX_LEN) for p in parts)
        for k in full:
            assert np.array_equal(np.concatenate([p[k] for p in parts]), full[k])
        real = [set(i[i >= 0].tolist()) for i in ids]
        assert not real[0] & real[1]
        if one_host.epoch == 0:
            everything += list(real[0] | real[1])
    assert sorted(everything) == list(range(36))


def test_restoring_mid_epoch_continues_with_the_next_examples(one_host, demo_build):
    data_dir, tok, _ = demo_build
    one_host.set_state({"epoch": 2, "step_in_epoch": 0})
    take(one_host, 3)
    state = json.loads(json.dumps(one_host.get_state()))  # what a checkpoint stores
    assert state == {"epoch": 2, "step_in_epoch": 3}
    expected = take(one_host, 4)  # crosses into epoch 3
    resumed = TrainInput("lima_1k", data_dir, tok, B, MAX_LEN, SEED)
    resumed.set_state(state)
    got = take(resumed, 4)
    for (ea, sa, ia, ba), (eb, sb, ib, bb) in zip(expected, got):
        assert (ea, sa, ia.tolist()) == (eb, sb, ib.tolist())
        assert all(np.array_equal(ba[k], bb[k]) for k in ba)
    assert [e for e, *_ in got] == [2, 2, 3, 3]


def test_bad_arguments(demo_build):
    data_dir, tok, _ = demo_build
    with pytest.raises(ValueError, match="not divisible by 3 hosts"):
        TrainInput("lima_1k", data_dir, tok, 8, MAX_LEN, 0, shard_index=0, num_shards=3)
    with pytest.raises(FileNotFoundError, match="no prepared TFDS"):
        TrainInput("lima_1k", data_dir + "_missing", tok, 8, MAX_LEN, 0)


# ---- packing ------------------------------------------------------------------------------------
def _segments(batch):
    """{(row, segment id): (input tokens, target tokens, weights, positions)} of a packed batch."""
    out = {}
    for r, row in enumerate(batch["decoder_segment_ids"]):
        for seg in sorted(set(row.tolist()) - {0}):
            cols = np.flatnonzero(row == seg)
            assert np.array_equal(cols, np.arange(cols[0], cols[-1] + 1)), "a segment is one contiguous run"
            out[(r, seg)] = tuple(batch[k][r, cols].tolist() for k in (
                "decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights", "decoder_positions"))
    return out


@pytest.mark.parametrize("mixture", ["lima_1k", "lima_1k_dialogue"])
def test_packed_steps_hold_exactly_the_padded_steps_examples(demo_build, mixture):
    """Every example of a padded step (multi-turn ones too: several weighted assistant turns) is in the
    packed step once, with the same tokens, targets, loss weights and positions."""
    data_dir, tok, _ = demo_build
    padded = TrainInput(mixture, data_dir, tok, B, MAX_LEN, SEED)
    packed = TrainInput(mixture, data_dir, tok, B, MAX_LEN, SEED, packing=True, row_multiple=2)
    multi_turn = {i for i, ex in enumerate(padded.examples) if ex["source"] == "multi_turn"}
    assert bool(multi_turn) == (mixture == "lima_1k_dialogue")
    seen = set()
    assert packed.buckets and all(b % 2 == 0 for b in packed.buckets)
    computed = 0
    for _ in range(2 * padded.steps_per_epoch):
        rows, pad = next(packed), next(padded)
        assert packed.get_state() == padded.get_state()
        assert rows["decoder_input_tokens"].shape[0] in packed.buckets + [B]
        computed += rows["decoder_input_tokens"].shape[0]
        want = []
        for r, ex_id in enumerate(padded.example_ids):
            if ex_id >= 0:
                n = int(padded.lengths[ex_id])
                want.append(tuple(pad[k][r, :n].tolist() for k in (
                    "decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights", "decoder_positions")))
        assert sorted(_segments(rows).values()) == sorted(want)
        assert rows["decoder_loss_weights"].sum() == pad["decoder_loss_weights"].sum()
        seen |= set(padded.example_ids[padded.example_ids >= 0].tolist())
    assert multi_turn <= seen
    assert computed < 2 * padded.steps_per_epoch * B  # the demo's short examples share rows


def test_two_hosts_take_blocks_of_the_same_packed_rows(demo_build):
    data_dir, tok, _ = demo_build
    one = TrainInput("lima_1k", data_dir, tok, B, MAX_LEN, SEED, packing=True, row_multiple=2)
    hosts = [TrainInput("lima_1k", data_dir, tok, B, MAX_LEN, SEED, shard_index=h, num_shards=2, packing=True,
                        row_multiple=2) for h in (0, 1)]
    assert hosts[0].buckets == one.buckets
    for _ in range(one.steps_per_epoch):
        full, parts = next(one), [next(h) for h in hosts]
        for k in full:
            assert np.array_equal(np.concatenate([p[k] for p in parts]), full[k])


def test_packing_helpers():
    from data_pipeline import packing

    assert packing.first_fit_decreasing([5, 3, 4, 2, 6], 8) == [[4, 3], [0, 1], [2]]
    # Buckets cover every need and are multiples; 3 buckets for 4 distinct needs waste the least rows.
    assert packing.choose_buckets([3, 5, 6, 9, 9, 12], 2) == [6, 10, 12]
    assert packing.choose_buckets([3, 3, 3], 4, max_buckets=3) == [4]
    assert packing.bucket_for(7, [4, 8], 32) == 8 and packing.bucket_for(9, [4, 8], 32) == 32
    with pytest.raises(ValueError, match="outside"):
        packing.first_fit_decreasing([9], 8)


def test_lima_sample_packs_to_within_a_quarter_of_its_tokens(lima_sample_build):
    """../shared's LIMA sample, LLaMA tokenizer, MAX_LEN 2048, batch 32: computed/real tokens over an
    epoch ≤ 1.25 packed (rows × MAX_LEN over the non-padding tokens), ≥ 2.5 padded."""
    data_dir, tok = lima_sample_build
    ratios = {}
    for packing in (False, True):
        it = TrainInput("lima_1k", data_dir, tok, 32, 2048, 0, packing=packing)
        computed = real = 0
        for _ in range(it.steps_per_epoch):
            batch = next(it)
            computed += batch["decoder_input_tokens"].size
            real += int((batch["decoder_segment_ids"] > 0).sum())
        ratios[packing] = computed / real
    assert ratios[True] <= 1.25 and ratios[False] >= 2.5, ratios
