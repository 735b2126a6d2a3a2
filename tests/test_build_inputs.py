"""Every input the build reads is read strictly before the export starts, and every bad one is one line:
config.json's fields typed, bounded and checked against the weights, one JSON reader with Python's own
limits caught, item index keys in ASCII digits, regular files only (a FIFO is never opened), finite
weights. The CLI turns each into 'nezha build: error: ...' and exit 2 (docs/build.md)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny_catalog, tiny_model, write_index
from nezha.export.build import main
from nezha.model.checkpoint import load_catalog, load_checkpoint, save_checkpoint
from nezha.runtime.catalog import Catalog
from nezha.runtime.data import read_interactions
from nezha.runtime.errors import ArtifactError, InputError

CLI = ["--precision", "fp32", "--exporter", "torchscript", "--max-batch", "2", "--max-beam", "4"]
TOKENS = '["<a_1>", "<b_1>", "<c_1>"]'


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    root = tmp_path_factory.mktemp("good")
    return save_checkpoint(tiny_model(), root / "ckpt", tiny_catalog()), write_index(tiny_catalog(), root / "i.index.json")


@pytest.fixture
def checkpoint(tmp_path):
    """A fresh good checkpoint to break."""
    return save_checkpoint(tiny_model(), tmp_path / "ckpt", tiny_catalog())


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is ...:
            cfg.pop(key)
        else:
            cfg[key] = value
    (path / "config.json").write_text(json.dumps(cfg))


def _one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message and "Traceback" not in message
    return message


@pytest.mark.parametrize("changes, message", [
    ({"num_hidden_layers": 3}, r"num_hidden_layers = 3 but model.safetensors holds 2 layer\(s\)"),
    ({"num_hidden_layers": 3, "layer_types": ...}, r"num_hidden_layers = 3 but model.safetensors holds 2 layer\(s\)"),
    ({"num_hidden_layers": 1, "layer_types": ...}, r"num_hidden_layers = 1 but model.safetensors holds 2 layer\(s\)"),
    ({"intermediate_size": 1e13}, r"intermediate_size = 10000000000000.0; expected an integer in 1..2147483647"),
    ({"intermediate_size": 10 ** 13}, "intermediate_size = 10000000000000; expected an integer"),
    ({"intermediate_size": 64}, r"'model.layers.0.mlp.gate_proj.weight' has shape \(128, 32\), expected \(64, 32\)"),
    ({"intermediate_size": 2 ** 31 - 1}, r"'model.layers.0.mlp.gate_proj.weight' has shape \(128, 32\), expected \(2147483647, 32\)"),
    ({"hidden_size": -32}, "hidden_size = -32; expected an integer in 1.."),
    ({"hidden_size": 32.5}, "hidden_size = 32.5; expected an integer"),
    ({"hidden_size": "32"}, "hidden_size = '32'; expected an integer"),
    ({"hidden_size": True}, "hidden_size = True; expected an integer"),
    ({"num_attention_heads": 0}, "num_attention_heads = 0; expected an integer in 1.."),
    ({"num_key_value_heads": 3}, r"num_key_value_heads = 3; expected a divisor of num_attention_heads \(4\)"),
    ({"head_dim": 0}, "head_dim = 0; expected an integer in 1.."),
    ({"model_type": ["qwen3"]}, r"model_type \['qwen3'\] is not supported"),
    ({"offset": None}, "offset = None; expected a non-empty list of integers"),
    ({"offset": ["2", "10", "16"]}, "offset = .*; expected a non-empty list of integers"),
    ({"docid_num": [8.0, 6, 5]}, "docid_num = .*; expected an integer in 1..2147483647 or a list of 3"),
    ({"max_sid": 2 ** 40}, "max_sid = 1099511627776; expected an integer in 0..2147483647"),
    ({"vocab_size": 2 ** 40}, "vocab_size = 1099511627776; expected an integer"),
    ({"pad_token_id": 10 ** 30}, "pad_token_id = 1000000000000000000000000000000; expected an integer in 0..23"),
    ({"use_mtp": "no"}, "use_mtp = 'no'; expected true or false"),
    ({"rms_norm_eps": -1}, "rms_norm_eps = -1; expected a finite number > 0"),
    ({"max_position_embeddings": 0}, "max_position_embeddings = 0; expected an integer"),
    ({"hidden_act": "nope"}, "hidden_act = 'nope'; expected one of .*silu"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}},
     r"not a valid qwen3 config: Missing required keys in `rope_parameters` for 'rope_type'='yarn': \{'factor'\}$"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": -1.0}},
     r"rope_parameters.rope_theta = -1.0; expected a finite number > 0"),
])
def test_config_fields_are_typed_bounded_and_checked_against_the_weights(checkpoint, changes, message):
    _edit_config(checkpoint, **changes)
    with pytest.raises(ArtifactError) as e:
        load_checkpoint(checkpoint)
    assert re.search(message, _one_line(e)) and str(checkpoint) in str(e.value)


def test_a_layer_count_the_weights_refute_is_refused_before_any_model_is_built(checkpoint, monkeypatch):
    """2**31-1 layers once took ever more memory (the config and the meta model are built layer by layer);
    now the safetensors header refutes the count before transformers sees the config."""
    import nezha.model.checkpoint as module

    def built(*args):
        raise AssertionError("the config was turned into a model before its sizes were checked")
    monkeypatch.setattr(module, "_config_from_raw", built)
    _edit_config(checkpoint, num_hidden_layers=2 ** 31 - 1, layer_types=...)
    with pytest.raises(ArtifactError) as e:
        load_checkpoint(checkpoint)
    assert "num_hidden_layers = 2147483647 but model.safetensors holds 2 layer(s) (model.layers.N.*)" in _one_line(e)


DEEP = "[" * 100_000 + "]" * 100_000
BIG = "1" + "0" * 5000


@pytest.mark.parametrize("text, message", [
    ('{"x": %s}' % BIG, r"is not valid JSON: an integer has more digits than Python reads \(4300\)"),
    ('{"x": %s}' % DEEP, "is not valid JSON: nested deeper than this reader allows"),
    ('{"x": [1], "x": [2]}', "key 'x' appears twice in one object"),
    ('{"x": [NaN]}', "is not valid JSON: NaN is not a JSON value"),
    ('{"x": [Infinity]}', "is not valid JSON: Infinity is not a JSON value"),
    (b'{"x": "\xff"}', "is not UTF-8 text"),
    ("", "is not valid JSON: Expecting value"),
])
@pytest.mark.parametrize("reader", ["config", "index", "interactions"])
def test_the_json_reader_reports_every_refusal_in_one_line(checkpoint, tmp_path, text, message, reader):
    path = checkpoint / "config.json" if reader == "config" else tmp_path / f"x.{reader}.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    read = {"config": lambda: load_checkpoint(checkpoint), "index": lambda: Catalog.from_index_json(path),
            "interactions": lambda: read_interactions(path)}[reader]
    with pytest.raises((ArtifactError, InputError)) as e:
        read()
    assert re.search(message, _one_line(e)) and str(path) in str(e.value)


@pytest.mark.parametrize("text, message", [
    ('{"\u0661\u0660\u0660": %s}' % TOKENS, "item id '١٠٠' is not an integer 0..9223372036854775807 written in ASCII digits"),
    ('{" 1_00 ": %s}' % TOKENS, "item id ' 1_00 ' is not an integer"),
    ('{"+100": %s}' % TOKENS, r"item id '\+100' is not an integer"),
    ('{"100": %s, "0100": %s}' % (TOKENS, TOKENS), "item id '0100' is not an integer"),
    ('{"9223372036854775808": %s}' % TOKENS, "item id '9223372036854775808' is not an integer 0..9223372036854775807"),
    ('{"100": %s, "100": %s}' % (TOKENS, TOKENS), "key '100' appears twice"),
    ('{"100": ["<a_\u0661>", "<b_1>", "<c_1>"]}', "level 0 token '<a_١>'; expected '<a_N>' with N in ASCII digits"),
    ('{"100": ["<a_%d>", "<b_1>", "<c_1>"]}' % 2 ** 64, "level 0 token '<a_18446744073709551616>'"),
    ('{"100": [1, "<b_1>", "<c_1>"]}', "level 0 token 1; expected '<a_N>'"),
])
def test_item_index_keys_and_codes_are_ascii_digits_in_int64_and_unique(tmp_path, text, message):
    path = tmp_path / "x.index.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ArtifactError) as e:
        Catalog.from_index_json(path)
    assert re.search(message, _one_line(e))


def test_the_largest_int64_item_id_is_read(tmp_path):
    path = tmp_path / "x.index.json"
    path.write_text('{"9223372036854775807": %s, "0": %s}' % (TOKENS, TOKENS))
    assert Catalog.from_index_json(path).item_ids.tolist() == [0, 2 ** 63 - 1]


@pytest.mark.parametrize("kind", ["folder", "FIFO"])
@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "ava_sid3.pt"])
def test_a_folder_or_fifo_input_is_refused_without_being_opened(checkpoint, watch_fifo, kind, name):
    path = checkpoint / name
    path.unlink()
    path.mkdir() if kind == "folder" else os.mkfifo(path)
    opened = watch_fifo(path) if kind == "FIFO" else lambda: 0
    with pytest.raises(ArtifactError) as e:
        load_catalog(None, checkpoint, load_checkpoint(checkpoint).layout)
    assert _one_line(e).endswith(f"{path} is a {kind}, not a regular file") and opened() == 0


WATCHER = """
import os, sys, time
fifo, log = sys.argv[1], sys.argv[2]
while True:
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))   # ENXIO while no reader waits
        with open(log, "a") as f:
            f.write("opened\\n")
    except OSError:
        time.sleep(0.01)
"""


@pytest.fixture
def watch_fifo(tmp_path):
    """watch_fifo(path) -> a function that returns how often anyone opened the FIFO ``path`` for reading.
    A separate process opens it for writing whenever a reader waits, which unblocks that reader (a
    thread could not: a native reader may hold the GIL), so a regression fails the test instead of
    hanging it. The watcher stops with the test."""
    procs = []

    def watch(path):
        log = tmp_path / f"{path.name}.opened"
        procs.append(subprocess.Popen([sys.executable, "-c", WATCHER, str(path), str(log)]))
        return lambda: log.read_text().count("opened") if log.exists() else 0
    yield watch
    for proc in procs:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("key, value", [
    ("model.embed_tokens.weight", float("inf")),
    ("mtp_head.logit_head_list.0.weight", float("nan")),
    ("model.layers.1.mlp.down_proj.weight", -float("inf")),
])
def test_a_non_finite_weight_is_refused_by_name(checkpoint, key, value):
    weights = load_file(str(checkpoint / "model.safetensors"))
    weights[key][3, 0] = value
    save_file(weights, str(checkpoint / "model.safetensors"))
    with pytest.raises(ArtifactError) as e:
        load_checkpoint(checkpoint)
    assert f"weight {key!r} holds 1 non-finite value(s) (Inf or NaN)" in _one_line(e)


def test_a_weight_finite_in_f64_but_not_in_float32_is_refused_by_name(checkpoint):
    weights = load_file(str(checkpoint / "model.safetensors"))
    weights["model.norm.weight"] = weights["model.norm.weight"].double() * 1e300
    save_file(weights, str(checkpoint / "model.safetensors"))
    with pytest.raises(ArtifactError) as e:
        load_checkpoint(checkpoint)
    assert "weight 'model.norm.weight' holds 32 non-finite value(s) (Inf or NaN) in float32" in _one_line(e)


def test_integer_weights_are_refused(checkpoint):
    weights = load_file(str(checkpoint / "model.safetensors"))
    weights["model.norm.weight"] = torch.ones(32, dtype=torch.int64)
    save_file(weights, str(checkpoint / "model.safetensors"))
    with pytest.raises(ArtifactError, match="'model.norm.weight' is I64; weights are floating point"):
        load_checkpoint(checkpoint)


@pytest.mark.parametrize("case", ["config hidden_size '32'", "config model_type list", "weights FIFO",
                                  "weights Inf", "index duplicate key"])
def test_the_cli_says_one_line_and_exits_2(good, checkpoint, watch_fifo, tmp_path, capsys, case):
    index = good[1]
    if case == "config hidden_size '32'":
        _edit_config(checkpoint, hidden_size="32")
    elif case == "config model_type list":
        _edit_config(checkpoint, model_type=["qwen3"])
    elif case == "weights FIFO":
        (checkpoint / "model.safetensors").unlink()
        os.mkfifo(checkpoint / "model.safetensors")
        opened = watch_fifo(checkpoint / "model.safetensors")
    elif case == "weights Inf":
        weights = load_file(str(checkpoint / "model.safetensors"))
        weights["model.embed_tokens.weight"][0, 0] = float("inf")
        save_file(weights, str(checkpoint / "model.safetensors"))
    else:
        index = tmp_path / "dup.index.json"
        index.write_text('{"100": %s, "100": %s}' % (TOKENS, TOKENS))
    assert main(["--checkpoint", str(checkpoint), "--index", str(index), "--out", str(tmp_path / "art"), *CLI]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nezha build: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "art").exists() and not list(tmp_path.glob(".art.*"))
    if case == "weights FIFO":
        assert opened() == 0

