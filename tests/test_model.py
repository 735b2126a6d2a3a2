"""The PyTorch side: checkpoint format, reference decoding (the oracle), the AR baseline, training packing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import BEAUTY_INDEX, tiny_catalog, tiny_histories, tiny_layout, tiny_model
from nezha.model.ar import ArDecoder
from nezha.model.checkpoint import catalog_from_reference_sids, load_catalog, load_checkpoint, save_checkpoint
from nezha.model.evaluate import ranking_metrics
from nezha.model.reference import Reference
from nezha.model.train import nezha_batch, windows
from nezha.runtime.catalog import Catalog
from nezha.runtime.encoding import encode_histories
from nezha.runtime.errors import ArtifactError


# ---------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip_keeps_format_and_weights(make_checkpoint, architecture, tmp_path):
    path = make_checkpoint(architecture)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == architecture
    assert cfg["docid_num"] == list(tiny_layout().codes) and cfg["offset"] == list(tiny_layout().offsets)
    assert cfg["max_sid"] == tiny_layout().placeholder_start and cfg["use_mtp"] is True
    original = load_file(str(path / "model.safetensors"))
    assert {f"mtp_head.transition.{i}.{w}" for i in range(3) for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")} <= set(original)
    assert {f"mtp_head.token_emb_list.{i}.weight" for i in range(3)} <= set(original)
    assert {f"mtp_head.logit_head_list.{i}.weight" for i in range(3)} <= set(original)
    model = load_checkpoint(path)
    again = load_file(str(save_checkpoint(model, tmp_path / "again") / "model.safetensors"))
    assert set(again) == set(original)
    for k in original:
        assert torch.equal(original[k], again[k]), k


def test_reference_sid_file_round_trip(make_checkpoint):
    path = make_checkpoint()
    packed = torch.load(path / "ava_sid3.pt", weights_only=True)
    codes = tiny_catalog().item_codes
    assert packed[5].item() == codes[5, 0] + codes[5, 1] * 512 + codes[5, 2] * 512 ** 2
    cat = catalog_from_reference_sids(path / "ava_sid3.pt", tiny_layout())
    assert np.array_equal(cat.item_codes, codes)
    assert np.array_equal(load_catalog(None, path, tiny_layout()).item_codes, codes)


def _corrupt(path, key=None, shape=None, config=None):
    if key is not None:
        w = load_file(str(path / "model.safetensors"))
        if shape is None:
            del w[key]
        else:
            w[key] = torch.zeros(shape)
        save_file(w, str(path / "model.safetensors"))
    if config is not None:
        cfg = json.loads((path / "config.json").read_text())
        cfg.update(config)
        (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("change, message", [
    (dict(key="mtp_head.logit_head_list.1.weight"), "missing draft-head weight 'mtp_head.logit_head_list.1.weight'"),
    (dict(key="mtp_head.transition.0.weight_ih", shape=(7, 7)), "'mtp_head.transition.0.weight_ih' has shape (7, 7), expected (32, 32)"),
    (dict(key="model.norm.weight"), "missing backbone weight 'model.norm.weight'"),
    (dict(config={"offset": [2, 9, 16]}), "offset[1] = 9 but offset[0] + codes[0] = 10"),
    (dict(config={"model_type": "gpt2"}), "model_type 'gpt2' is not supported"),
    (dict(config={"max_sid": None}), "max_sid"),
    (dict(config={"vocab_size": 10}), "vocab_size = 10"),
])
def test_malformed_checkpoint_names_file_key_and_expectation(make_checkpoint, change, message):
    path = make_checkpoint()
    if change.get("config", {}).get("max_sid", 0) is None:
        cfg = json.loads((path / "config.json").read_text())
        del cfg["max_sid"]
        (path / "config.json").write_text(json.dumps(cfg))
    else:
        _corrupt(path, **change)
    with pytest.raises(ArtifactError) as e:
        load_checkpoint(path)
    assert message in str(e.value)
    assert str(path) in str(e.value)


def test_missing_checkpoint_folder(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")


# ---------------------------------------------------------------- catalog
def test_beauty_index_keeps_every_item_of_shared_sids():
    from nezha.runtime.encoding import SidLayout
    cat = Catalog.from_index_json(BEAUTY_INDEX)
    layout = SidLayout((256,) * 4, tuple(2 + 256 * i for i in range(4)), 2 + 1024)
    keys, offsets, items = cat.sid_table(layout)
    assert len(cat.item_ids) == 12101 and len(keys) == 12088
    assert sorted(items.tolist()) == cat.item_ids.tolist()          # no item lost
    shared = np.flatnonzero(np.diff(offsets) > 1)
    assert len(shared) > 0
    for s in shared:                                                  # every item of a shared SID maps back to it
        for item in items[offsets[s]:offsets[s + 1]]:
            assert layout.sid_keys(cat.codes_of(np.array([item]))[0])[0] == keys[s]


@pytest.mark.parametrize("text, message", [
    ('{"1": ["<a_1>", "<c_2>"]}', "expected '<b_N>'"),
    ('{"x": ["<a_1>"]}', "is not an integer"),
    ('[1, 2]', "non-empty JSON object"),
    ('{"1": ["<a_1>", "<b_1>"], "2": ["<a_1>"]}', "expected a list of 2 tokens"),
])
def test_malformed_index(tmp_path, text, message):
    p = tmp_path / "bad.index.json"
    p.write_text(text)
    with pytest.raises(ArtifactError, match=message):
        Catalog.from_index_json(p)


# ---------------------------------------------------------------- reference decoding
def exhaustive_nezha(model, catalog, history, k):
    """Score every real SID by teacher forcing: the oracle beam search must match when beam covers all."""
    layout = model.layout
    feed = encode_histories([history], catalog, layout, 20)
    with torch.no_grad():
        hidden = model.nezha_hidden(torch.from_numpy(feed["input_ids"]), torch.from_numpy(feed["attention_mask"]))
        sids = np.unique(catalog.item_codes, axis=0)
        n = len(sids)
        state, code, total = hidden[:, 0].expand(n, -1), None, torch.zeros(n)
        for level in range(layout.levels):
            state, logp = model.mtp_head.step(level, state, code, hidden[:, level + 1].expand(n, -1))
            code = torch.from_numpy(sids[:, level])
            total += logp[torch.arange(n), code]
    order = torch.argsort(total, descending=True, stable=True)[:k]
    return [layout.sid_keys(sids[i]) for i in order.tolist()], total[order].numpy()


def test_reference_beam_search_equals_exhaustive_search(catalog):
    model = tiny_model()
    ref = Reference(model, catalog)
    n_sids = len(np.unique(catalog.item_codes, axis=0))
    for history in tiny_histories(catalog, 4):
        keys, scores = ref.decode([history], beam=n_sids)
        best_keys, best_scores = exhaustive_nezha(model, catalog, history, 10)
        assert keys[0, :10].tolist() == [int(k) for k in best_keys]
        np.testing.assert_allclose(scores[0, :10], best_scores, rtol=1e-5, atol=1e-5)


def test_reference_returns_only_real_items_and_batched_equals_single(catalog):
    ref = Reference(tiny_model(seed=3), catalog)
    histories = tiny_histories(catalog, 6)
    batched = ref.recommend(histories, k=5, beam=8)
    real = set(catalog.item_ids.tolist())
    for h, recs in zip(histories, batched):
        assert 0 < len(recs) <= 5 and all(item in real for item, _ in recs)
        assert [s for _, s in recs] == sorted((s for _, s in recs), reverse=True)
        single = ref.recommend([h], k=5, beam=8)[0]
        assert [i for i, _ in single] == [i for i, _ in recs]
        np.testing.assert_allclose([s for _, s in single], [s for _, s in recs], atol=1e-5)


def test_left_padding_does_not_change_results(catalog):
    from nezha.runtime.decode import beam_search
    ref = Reference(tiny_model(seed=4), catalog)
    history = tiny_histories(catalog, 1, seed=7)[0]
    plain = encode_histories([history], catalog, ref.layout, 20)
    padded = encode_histories([history], catalog, ref.layout, 20, pad_to=plain["input_ids"].shape[1] + 13)
    k1, s1 = beam_search(ref.steps, plain, ref.layout, ref.verifier, 6)
    k2, s2 = beam_search(ref.steps, padded, ref.layout, ref.verifier, 6)
    assert k1.tolist() == k2.tolist()
    np.testing.assert_allclose(s1, s2, atol=1e-5)


def test_shared_sid_returns_all_its_items():
    catalog = tiny_catalog()
    ref = Reference(tiny_model(seed=5), catalog)
    keys, scores = ref.decode([[100, 102]], beam=60)
    shared_key = ref.layout.sid_keys(catalog.item_codes[:1])[0]
    recs = ref.recommend([[100, 102]], k=60, beam=60)[0]
    items = [i for i, _ in recs]
    assert 100 in items and 101 in items                           # both items of the shared SID
    assert abs(items.index(100) - items.index(101)) == 1
    assert shared_key in keys[0]


def test_k_and_beam_are_checked(catalog):
    ref = Reference(tiny_model(), catalog)
    with pytest.raises(ValueError, match="1 <= k <= beam"):
        ref.recommend([[100]], k=10, beam=5)


# ---------------------------------------------------------------- AR baseline
def exhaustive_ar(model, catalog, history, k):
    layout = model.layout
    feed = encode_histories([history], catalog, layout, 20)
    ids = torch.from_numpy(feed["input_ids"][:, :-layout.levels])
    sids = np.unique(catalog.item_codes, axis=0)
    full = torch.cat([ids.expand(len(sids), -1), torch.from_numpy(layout.code_tokens(sids))], dim=1)
    with torch.no_grad():
        hidden = model.last_hidden(full, torch.ones_like(full))
        logp = torch.log_softmax(model.lm_head(hidden).float(), -1)
    T = ids.shape[1]
    total = sum(logp[torch.arange(len(sids)), T - 1 + i, full[:, T + i]] for i in range(layout.levels))
    order = torch.argsort(total, descending=True, stable=True)[:k]
    return [layout.sid_keys(sids[i]) for i in order.tolist()], total[order].numpy()


def test_ar_beam_search_with_kv_cache_equals_exhaustive_scoring(catalog):
    model = tiny_model(seed=2, use_mtp=False)
    ar = ArDecoder(model, catalog)
    n_sids = len(np.unique(catalog.item_codes, axis=0))
    histories = tiny_histories(catalog, 3, seed=5)
    keys, scores = ar.decode(histories, beam=n_sids)             # batched, mixed lengths (left padded)
    for b, history in enumerate(histories):
        best_keys, best_scores = exhaustive_ar(model, catalog, history, 10)
        assert keys[b, :10].tolist() == [int(x) for x in best_keys]
        np.testing.assert_allclose(scores[b, :10], best_scores, rtol=1e-4, atol=1e-4)


def test_ar_small_beam_returns_valid_items(catalog):
    ar = ArDecoder(tiny_model(seed=2, use_mtp=False), catalog)
    real = set(catalog.item_ids.tolist())
    for recs in ar.recommend(tiny_histories(catalog, 4), k=4, beam=4):
        assert len(recs) == 4 and all(i in real for i, _ in recs)


# ---------------------------------------------------------------- training
def test_packed_training_layout_matches_single_target_layout(catalog):
    """Each placeholder group of a packed sequence sees exactly what the single-target prompt sees."""
    model = tiny_model(seed=6)
    layout = model.layout
    window = catalog.item_ids[[3, 9, 14, 20, 33]].tolist()
    ids, mask, pos, roots, groups, targets = nezha_batch([window], catalog, layout)
    with torch.no_grad():
        packed = model.last_hidden(ids, mask, pos).reshape(-1, 32)
        for j in range(1, len(window)):
            single = model.nezha_hidden(*map(torch.from_numpy, encode_histories([window[:j]], catalog, layout, 20).values()))[0]
            torch.testing.assert_close(packed[roots[j - 1]], single[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(packed[groups[j - 1]], single[1:], atol=1e-5, rtol=1e-5)
            assert targets[j - 1].tolist() == catalog.codes_of(np.array([window[j]]))[0][0].tolist()


def test_windows_make_every_item_after_the_first_a_target_once():
    seqs = [list(range(10)), [1, 2], [5]]
    ws = windows(seqs, 4)
    targets = [t for w in ws for t in w[1:]]
    assert sorted(targets) == sorted(list(range(1, 10)) + [2])
    assert all(2 <= len(w) <= 4 for w in ws)


def test_ranking_metrics():
    m = ranking_metrics([[1, 2, 3], [4, 5, 6], [7, 8, 9]], np.array([1, 6, 0]), ks=(1, 3))
    assert m["recall@1"] == pytest.approx(1 / 3) and m["recall@3"] == pytest.approx(2 / 3)
    assert m["ndcg@3"] == pytest.approx((1 + 1 / np.log2(4)) / 3)


@pytest.fixture
def tiny_dataset(tmp_path):
    """A LETTER dataset folder of the tiny catalog: 30 users of 6..10 items."""
    from conftest import write_index
    catalog, rng = tiny_catalog(), np.random.default_rng(1)
    folder = tmp_path / "tiny"
    folder.mkdir()
    write_index(catalog, folder / "tiny.index.json")
    users = {f"u{u}": rng.choice(catalog.item_ids, size=int(rng.integers(6, 11))).tolist() for u in range(30)}
    (folder / "tiny.inter.json").write_text(json.dumps(users))
    return folder


def test_training_stops_on_steps_and_a_time_cap_is_said_and_recorded(tiny_dataset, tmp_path):
    from nezha.model.evaluate import training_line, training_record
    from nezha.model.train import train

    kw = dict(steps=3, batch_size=4, hidden_size=16, num_layers=1, num_heads=2, max_history=5, eval_every=2,
              eval_users=5)
    full = train("nezha", tiny_dataset, tmp_path / "full", **kw, log=None)
    assert full["steps"] == 3 and full["completed"] and full["stopped_by"] is None
    assert [h["step"] for h in full["history"]] == [2, 3]
    lines = []
    capped = train("nezha", tiny_dataset, tmp_path / "capped", minutes=0, **kw, log=lines.append)
    assert capped["steps"] == 0 and not capped["completed"] and "time cap of 0 min at step 0 of 3" in capped["stopped_by"]
    assert lines and lines[0].startswith("WARNING: nezha stopped early by the time cap")
    record = training_record(tmp_path / "capped")
    assert record["completed"] is False and "STOPPED EARLY (time cap" in training_line(record)
    assert "3 of 3 steps" in training_line(training_record(tmp_path / "full"))


def test_positions_follow_the_left_padded_mask():
    from nezha.model.nezha import positions_from_mask
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert positions_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
