"""INT8 calibration's reader: it encodes exactly as the runtime (tiny and Beauty histories), its samples are
seeded and sized, and bad calibration input fails with InputError."""

from __future__ import annotations


import numpy as np
import pytest

from conftest import BEAUTY_INDEX, tiny_catalog, tiny_layout
from nezha.calibration import MIN_SAMPLES, CalibrationReader, FeedList, sample_histories
from nezha.runtime.catalog import Catalog
from nezha.runtime.encoding import encode_histories
from nezha.runtime.encoding import SidLayout
from nezha.runtime.errors import InputError
from calibration_helpers import MAX_HISTORY, write_interactions


# ---------------------------------------------------------------- the reader

def test_reader_matches_the_runtime_encoder_byte_for_byte(tmp_path):
    catalog, layout = tiny_catalog(), tiny_layout()
    rng = np.random.default_rng(7)
    users = {f"u{u}": rng.choice(catalog.item_ids, size=int(rng.integers(3, 25))).tolist() for u in range(60)}
    users["u0"][1] = 99999                                # an unknown item: dropped, as the runtime's 'skip'
    path = write_interactions(tmp_path / "x.inter.json", users)
    reader = CalibrationReader.from_file(path, catalog, layout, MAX_HISTORY, size=40, seed=5, batch_size=16,
                                         progress=False)
    histories = sample_histories(path, size=40, seed=5)
    assert reader.samples == 40 and len(reader) == 3
    for b, feed in enumerate(reader):
        expected = encode_histories(histories[16 * b:16 * (b + 1)], catalog, layout, MAX_HISTORY, unknown="skip")
        assert sorted(feed) == ["attention_mask", "input_ids"]
        for name in feed:
            assert feed[name].dtype == expected[name].dtype == np.int64
            assert feed[name].shape == expected[name].shape
            assert feed[name].tobytes() == expected[name].tobytes()
    # the ORT reader protocol walks the same feeds, and rewinds
    first = [reader.get_next() for _ in range(4)]
    assert first[3] is None and first[0] is reader.feeds()[0]
    reader.rewind()
    assert reader.get_next() is first[0]
    # training split only: a history never reaches a user's last three items (train/valid/test targets)
    train_histories = {tuple(items[:-3]) for items in users.values()}
    assert all(tuple(h) in train_histories for h in histories)


def test_reader_samples_are_seeded_and_sized(tmp_path):
    catalog = tiny_catalog()
    users = {f"u{u}": catalog.item_ids[u % 70: u % 70 + 6].tolist() for u in range(50)}
    path = write_interactions(tmp_path / "x.inter.json", users)
    assert sample_histories(path, 20, seed=1) == sample_histories(path, 20, seed=1)
    assert sample_histories(path, 20, seed=1) != sample_histories(path, 20, seed=2)
    assert len(sample_histories(path, 32, seed=1)) == 32


def test_reader_on_beauty_matches_the_runtime_encoder():
    catalog = Catalog.from_index_json(BEAUTY_INDEX)
    layout = SidLayout((256,) * 4, tuple(2 + 256 * i for i in range(4)), 2 + 256 * 4)
    reader = CalibrationReader.from_file(None, catalog, layout, 20, size=64, seed=0, batch_size=32, progress=False)
    histories = sample_histories(None, size=64, seed=0)
    for b, feed in enumerate(reader):
        expected = encode_histories(histories[32 * b:32 * (b + 1)], catalog, layout, 20)
        assert all(feed[n].tobytes() == expected[n].tobytes() for n in expected)


def test_bad_calibration_input_fails_clearly(tmp_path):
    catalog, layout = tiny_catalog(), tiny_layout()
    empty = tmp_path / "empty.inter.json"
    empty.write_text("")
    with pytest.raises(InputError, match="not valid JSON"):
        CalibrationReader.from_file(empty, catalog, layout, MAX_HISTORY, size=MIN_SAMPLES)
    with pytest.raises(InputError, match="non-empty"):
        CalibrationReader.from_file(write_interactions(tmp_path / "o.json", {}), catalog, layout, MAX_HISTORY)
    with pytest.raises(InputError, match="does not exist"):
        CalibrationReader.from_file(tmp_path / "missing.json", catalog, layout, MAX_HISTORY)
    unknown = write_interactions(tmp_path / "u.json", {f"u{u}": [5000 + u, 6000 + u, 7000, 8000] for u in range(40)})
    with pytest.raises(InputError, match="none of the 20 calibration histories has an item of the catalog"):
        CalibrationReader.from_file(unknown, catalog, layout, MAX_HISTORY, size=20, progress=False)
    few = write_interactions(tmp_path / "f.json", {f"u{u}": [100, 101, 102, 103] for u in range(5)})
    with pytest.raises(InputError, match="5 usable histories .* 16 requested"):
        CalibrationReader.from_file(few, catalog, layout, MAX_HISTORY, size=16)
    with pytest.raises(InputError, match="too small"):
        CalibrationReader.from_file(few, catalog, layout, MAX_HISTORY, size=4)
    with pytest.raises(InputError, match="empty"):
        FeedList([])
