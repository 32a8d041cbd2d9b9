"""load_guard.read_json_file: the one guarded JSON reader (model configs, tokenizer files, side files); and
load_state_checked, the one name-and-shape check before a module loads saved weights; check_model_dir, the one
"is this a saved model directory" check."""
import os

import pytest
import torch

from lmstack.errors import LmstackError
from lmstack.model import load_guard
from lmstack.model.load_guard import check_model_dir, load_state_checked, read_json, read_json_file


def test_reads_json_and_checks_object_only_when_asked(tmp_path):
    f = tmp_path / "a.json"
    f.write_text('{"x": [1, 2]}', encoding="utf-8")
    assert read_json_file(f, "model config", want_object=True) == {"x": [1, 2]}
    f.write_text("[1, 2]")
    assert read_json_file(str(f), "model config") == [1, 2]
    with pytest.raises(LmstackError, match=r"^model config .*a\.json must hold a JSON object, got list$"):
        read_json_file(f, "model config", want_object=True)
    with pytest.raises(LmstackError, match=r"must hold a JSON object, got list"):
        read_json(tmp_path, "a.json", "model config", want_object=True)


@pytest.mark.parametrize("content,needle", [
    (b'{"a": 1,', r"tokenizer file .*bad\.json is not valid JSON \(line 1, column 9\)"),
    (b'\xff{"a": 1}', r"tokenizer file .*bad\.json is not valid UTF-8 \(byte offset 0\)"),
    (b"[" * 100_000 + b"]" * 100_000, r"bad\.json is nested too deeply to be a tokenizer file"),
    (b"1" * 10_000, r"bad\.json holds a number too large to parse"),
])
def test_errors_name_the_file_and_never_quote_it(tmp_path, content, needle):
    f = tmp_path / "bad.json"
    f.write_bytes(content)
    with pytest.raises(LmstackError, match=needle) as info:
        read_json_file(f, "tokenizer file")
    assert "\\xff" not in str(info.value) and "aaaa" not in str(info.value)


def test_size_cap_and_non_regular_files_are_refused(tmp_path, monkeypatch):
    f = tmp_path / "big.json"
    f.write_text('{"pad": "' + "x" * 200 + '"}')
    monkeypatch.setitem(load_guard.JSON_MAX_BYTES, "model config", 100)
    with pytest.raises(LmstackError, match=r"model config .*big\.json is 2\d\d bytes, more than the 100"):
        read_json_file(f, "model config")
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    with pytest.raises(LmstackError, match="not a regular file"):
        read_json_file(fifo, "model config")  # refused before opening: a FIFO would hang the reader
    with pytest.raises(LmstackError, match="cannot be read"):
        read_json_file(tmp_path / "missing.json", "model config")


def test_load_state_checked_names_the_first_mismatch_and_loads_only_an_exact_fit():
    module = torch.nn.Linear(3, 2)
    good = {k: torch.full_like(v, 0.5) for k, v in module.state_dict().items()}
    with pytest.raises(LmstackError, match=r"w.safetensors does not match its config .*missing \['x.bias'\]"):
        load_state_checked(module, {"weight": good["weight"]}, "w.safetensors", prefix="x.")
    with pytest.raises(LmstackError, match=r"unexpected \['extra'\]"):
        load_state_checked(module, {**good, "extra": good["bias"]}, "w.safetensors")
    with pytest.raises(LmstackError, match=r"weight has shape \(2, 4\), the config wants \(2, 3\)"):
        load_state_checked(module, {**good, "weight": torch.zeros(2, 4)}, "w.safetensors")
    assert module.weight.abs().max() != 0.5  # nothing was loaded by a refused call
    load_state_checked(module, good, "w.safetensors")
    assert torch.equal(module.weight, good["weight"]) and torch.equal(module.bias, good["bias"])


def test_check_model_dir_names_the_missing_piece(tmp_path):
    with pytest.raises(LmstackError, match=r"nope is not an ASR model directory: no such directory$"):
        check_model_dir(tmp_path / "nope", "an ASR model")
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(LmstackError, match=r"is not a CLIP directory: tokenizer\.json is missing$"):
        check_model_dir(tmp_path, "a CLIP")
    assert check_model_dir(str(tmp_path), "a codec", files=("config.json", "model.safetensors")) == tmp_path
