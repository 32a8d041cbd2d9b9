"""Issue 15 §3: hostile model directories are refused fast, with a clear message that leaks no file bytes.

Each case crafts a directory from a tiny saved llama, breaks one thing, and asserts the refusal
(LmstackError naming the field or file) comes within a wall-time bound.
"""
import json
import os
import shutil
import struct
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmstack.errors import LmstackError
from lmstack.model import ModelConfig
from lmstack.model.hf_io import load_model, read_config, save_model
from lmstack.model.load_guard import estimate_memory, limit_gib, set_max_model_gib
from lmstack.model.positions import INITIAL_TABLE_LENGTH, RotaryEmbedding, SinusoidalPositions
from lmstack.model.transformer import Transformer

FAST = 2.0  # seconds: every refusal must come well within this
SECRET = b"TOPSECRET-7f3a9c-the-target-file-must-never-appear"


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("base") / "model"
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=128, hf_model_type="llama")
    save_model(Transformer(cfg), d)
    (d / "lmstack_config.json").unlink()  # a plain HF directory: config.json is the one config
    return d


@pytest.fixture
def model_dir(base_dir, tmp_path):
    d = tmp_path / "model"
    shutil.copytree(base_dir, d)
    return d


@pytest.fixture
def secret_file(tmp_path):
    f = tmp_path / "outside" / "secret.txt"
    f.parent.mkdir()
    f.write_bytes(SECRET + b"\n" * 64)
    return f


def edit_config(d: Path, **changes) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def refused(fn, *match: str) -> str:
    """Run fn, expect LmstackError within FAST seconds whose message holds every `match`; return it."""
    start = time.perf_counter()
    with pytest.raises(LmstackError) as err:
        fn()
    elapsed = time.perf_counter() - start
    msg = str(err.value)
    assert elapsed < FAST, f"refusal took {elapsed:.2f}s: {msg}"
    for m in match:
        assert m in msg, msg
    return msg


def assert_no_leak(msg: str, content: bytes) -> None:
    for chunk in (content[:8], content[8:16]):
        assert chunk.decode("latin-1") not in msg, msg
    # the first 8 bytes read as the safetensors header length must not be printed either
    assert str(struct.unpack("<Q", content[:8])[0]) not in msg, msg


# ---------------------------------------------------------------- absurd shapes and memory
@pytest.mark.parametrize("field,value", [("num_hidden_layers", 10**6), ("max_position_embeddings", 2**31),
                                         ("hidden_size", 2**40), ("vocab_size", 10**12),
                                         ("num_attention_heads", 10**9), ("intermediate_size", 2**62)])
def test_absurd_shapes_are_refused_instantly_naming_the_field(model_dir, field, value):
    edit_config(model_dir, **{field: value})
    refused(lambda: load_model(model_dir), f"{field}={value}", "shape limit")
    refused(lambda: read_config(model_dir), field)  # `lmstack model info` reads configs the same way


def test_absurd_shapes_in_our_own_config_format_are_refused_too(model_dir):
    cfg = json.loads((model_dir / "config.json").read_text())
    ours = read_config(model_dir)[0].to_dict()
    ours["n_layers"] = 10**6
    (model_dir / "config.json").write_text(json.dumps({"model_type": "lmstack", "lmstack": ours}))
    assert cfg["model_type"] == "llama"
    refused(lambda: load_model(model_dir), "n_layers=1000000")


@pytest.mark.parametrize("field,value,needle", [("num_hidden_layers", "12", "must be an integer"),
                                                ("hidden_size", 32.0, "must be an integer"),
                                                ("num_attention_heads", True, "must be an integer"),
                                                ("layer_types", "x" * 10, "layer_types"),
                                                ("rms_norm_eps", "tiny", "wrong type")])
def test_wrongly_typed_fields_get_a_clear_error(model_dir, field, value, needle):
    if field == "layer_types":
        edit_config(model_dir, model_type="qwen2", **{field: value})
    else:
        edit_config(model_dir, **{field: value})
    refused(lambda: load_model(model_dir), needle)


def test_missing_fields_and_non_object_configs_are_named(model_dir):
    cfg = json.loads((model_dir / "config.json").read_text())
    del cfg["vocab_size"]
    (model_dir / "config.json").write_text(json.dumps(cfg))
    refused(lambda: load_model(model_dir), "lacks the field 'vocab_size'")
    (model_dir / "config.json").write_text("[1, 2, 3]")
    refused(lambda: load_model(model_dir), "must hold a JSON object")


@pytest.mark.parametrize("content,needle", [(b"\xff\xfe not utf-8", "not valid UTF-8"),
                                            (b"[" * 200_000 + b"]" * 200_000, "nested too deeply"),
                                            (b'{"vocab_size": ' + b"9" * 5000 + b"}", "too large"),
                                            (b'{"model_type": "llama", ', "not valid JSON")])
def test_hostile_json_in_config_is_refused_without_echoing_it(model_dir, content, needle):
    (model_dir / "config.json").write_bytes(content)
    msg = refused(lambda: load_model(model_dir), needle)
    assert "\\xff" not in msg and "999999" not in msg


def test_memory_estimate_refuses_over_the_limit_naming_fields_and_the_flag_raises_it(model_dir):
    # 2**22 x 2**14 embedding (and as large a head) = 2**37 parameters: ~512 GiB in fp32
    edit_config(model_dir, vocab_size=2**22, hidden_size=2**14, intermediate_size=2**14, num_attention_heads=128)
    msg = refused(lambda: load_model(model_dir), "vocab_size=4194304", "hidden_size=16384", "GiB",
                  f"over the {limit_gib():g} GiB limit", "--max_model_gib")
    assert "embeddings and head" in msg
    # raising the limit lets the load go on, to the next (real) problem: these weights do not fit
    # (not timed: this path builds the model on the meta device, whose first use in a process is slow)
    with pytest.raises(LmstackError, match="does not fit the weights"):
        load_model(model_dir, max_model_gib=10_000)
    try:
        set_max_model_gib(10_000)  # what --max_model_gib does for the whole process
        with pytest.raises(LmstackError, match="does not fit the weights"):
            load_model(model_dir)
    finally:
        set_max_model_gib(None)  # back to the default
    with pytest.raises(LmstackError, match="positive"):
        set_max_model_gib(0)


def test_the_default_limit_is_64_gib_or_the_machines_ram_whichever_is_smaller():
    from lmstack.model.load_guard import machine_gib

    ram = machine_gib()
    assert limit_gib() == (min(64.0, ram) if ram else 64.0)
    try:
        set_max_model_gib(1000)
        assert limit_gib() == 1000
    finally:
        set_max_model_gib(None)
    assert limit_gib() <= 64


def test_a_small_model_loads_under_the_default_limit_and_is_refused_under_a_tiny_one(model_dir):
    model = load_model(model_dir)
    assert model(torch.tensor([[1, 2, 3]])).shape == (1, 3, 64)
    refused(lambda: load_model(model_dir, max_model_gib=1e-6), "over the 1e-06 GiB limit", "blocks")


@pytest.mark.parametrize("cfg", [
    ModelConfig.from_preset("llama-tiny"), ModelConfig.from_preset("mixtral-tiny"),
    ModelConfig.from_preset("gpt2-tiny"), ModelConfig.from_preset("bert-tiny"),
    ModelConfig(vocab_size=100, d_model=32, n_heads=4, attention="linformer", causal=False, max_seq_len=256),
    ModelConfig(vocab_size=100, d_model=32, n_heads=4, attention="performer"),
    ModelConfig(vocab_size=100, d_model=32, n_heads=4, position="sinusoidal", n_experts=4, moe_layers=[1]),
], ids=["llama", "mixtral", "gpt2", "bert", "linformer", "performer", "sinusoidal-hybrid-moe"])
def test_the_estimate_equals_the_bytes_a_built_model_holds(cfg):
    with torch.device("meta"):
        model = Transformer(cfg)
    actual = (sum(p.numel() for p in model.parameters()) * 4
              + sum(b.numel() * b.element_size() for b in model.buffers()))
    est = estimate_memory(cfg, torch.float32)
    # exact but for the few-byte scalars (inv_freq, aux_loss) that the estimate leaves out
    assert 0 <= actual - est.total_bytes <= 4 * cfg.head_dim + 64, (actual, est)
    assert estimate_memory(cfg, torch.bfloat16).parts["blocks"] < est.parts["blocks"]


# ---------------------------------------------------------------- files outside the directory
def _index_pointing_at(d: Path, target: str) -> None:
    names = list(load_file(str(d / "model.safetensors")))
    weight_map = {n: "model.safetensors" for n in names}
    weight_map[names[0]] = target
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "etc_passwd"])
def test_weight_map_entries_outside_the_directory_are_refused_without_leaking_bytes(model_dir, secret_file, kind):
    if kind == "dotdot":
        target = os.path.relpath(secret_file, model_dir)
        assert target.startswith("..")
    elif kind == "absolute":
        target = str(secret_file)
    elif kind == "symlink":  # an innocent-looking shard name that is a symlink out of the directory
        os.symlink(secret_file, model_dir / "model-00002-of-00002.safetensors")
        target = "model-00002-of-00002.safetensors"
    else:
        target = "../../../../../../../../etc/passwd"
    _index_pointing_at(model_dir, target)
    for lazy in (True, False):
        msg = refused(lambda: load_model(model_dir, lazy=lazy), "refused")
        assert_no_leak(msg, SECRET)
        if Path("/etc/passwd").is_file():
            assert_no_leak(msg, Path("/etc/passwd").read_bytes()[:16].ljust(16, b"\0"))


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "lmstack_config.json"])
def test_fixed_names_that_are_symlinks_out_of_the_directory_are_refused(model_dir, secret_file, name):
    (model_dir / name).unlink(missing_ok=True)
    os.symlink(secret_file, model_dir / name)
    msg = refused(lambda: load_model(model_dir), "outside the model directory")
    assert_no_leak(msg, SECRET)


def test_symlinks_that_stay_inside_the_directory_and_the_hf_cache_layout_still_load(base_dir, tmp_path):
    # HF hub cache: snapshots/<rev>/model.safetensors -> ../../blobs/<hash>
    repo = tmp_path / "models--x--tiny"
    snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in base_dir.iterdir():
        shutil.copy(f, blobs / f"blob-{f.name}")
        os.symlink(Path("../../blobs") / f"blob-{f.name}", snap / f.name)
    ref = load_model(base_dir)(torch.tensor([[1, 2, 3]]))
    assert torch.equal(load_model(snap)(torch.tensor([[1, 2, 3]])), ref)
    # a link to a sibling file inside the directory is fine too
    inner = tmp_path / "inner"
    shutil.copytree(base_dir, inner)
    (inner / "weights.safetensors").write_bytes((inner / "model.safetensors").read_bytes())
    (inner / "model.safetensors").unlink()
    os.symlink("weights.safetensors", inner / "model.safetensors")
    assert torch.equal(load_model(inner)(torch.tensor([[1, 2, 3]])), ref)


def test_a_fifo_or_device_is_refused_instead_of_hanging(model_dir):
    if not hasattr(os, "mkfifo"):
        pytest.skip("os.mkfifo is not available on this platform")
    (model_dir / "config.json").unlink()
    os.mkfifo(model_dir / "config.json")  # reading it would block forever
    refused(lambda: load_model(model_dir), "not a regular file")
    (model_dir / "config.json").unlink()
    shutil.copy(model_dir / "generation_config.json", model_dir / "config.json")
    os.mkfifo(model_dir / "tokenizer.json")
    from lmstack.tokenizer import load_tokenizer

    refused(lambda: load_tokenizer(model_dir), "not a regular file")


def test_tokenizer_json_symlinked_out_of_the_directory_is_refused(model_dir, secret_file):
    from lmstack.tokenizer import load_tokenizer

    os.symlink(secret_file, model_dir / "tokenizer.json")
    msg = refused(lambda: load_tokenizer(model_dir), "outside the model directory")
    assert_no_leak(msg, SECRET)


def test_shard_names_must_be_safetensors(model_dir):
    shutil.copy(model_dir / "model.safetensors", model_dir / "pytorch_model.bin")
    _index_pointing_at(model_dir, "pytorch_model.bin")
    refused(lambda: load_model(model_dir), "not a .safetensors file")


# ---------------------------------------------------------------- corrupt safetensors headers
def _raw(header: dict, data: bytes, header_len: int | None = None, text: bytes | None = None) -> bytes:
    h = text if text is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(h) if header_len is None else header_len) + h + data


def _corruptions() -> dict[str, tuple[bytes, str]]:
    a = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    b = {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}
    data = bytes(16)
    return {
        "overlap": (_raw({"a": a, "b": {**b, "data_offsets": [4, 12]}}, data[:12]), "overlaps"),
        "offsets_past_eof": (_raw({"a": a, "b": b}, data[:12]), "truncated"),
        "header_length_past_eof": (_raw({"a": a}, data[:8], header_len=10**6), "past the end of the file"),
        "byte_count_mismatch": (_raw({"a": {**a, "shape": [3]}, "b": {**b, "data_offsets": [8, 16]}}, data),
                                "data_offsets span"),
        "dtype_unknown": (_raw({"a": {**a, "dtype": "Q7"}}, data[:8]), "dtype"),
        "non_json_header": (_raw({}, data[:8], text=b"\x00not json at all"), "not JSON"),
        "header_not_object": (_raw({}, b"", text=b"[1, 2]"), "not a JSON object"),
        "gap": (_raw({"a": a, "b": {**b, "data_offsets": [12, 20]}}, bytes(20)), "gap"),
        "trailing_bytes": (_raw({"a": a}, data), "belong to no tensor"),
        "shorter_than_8_bytes": (b"\x01\x02", "shorter than the 8-byte header"),
    }


@pytest.mark.parametrize("case", list(_corruptions()))
def test_each_corrupt_header_is_refused_by_us_and_by_the_safetensors_library(model_dir, tmp_path, case):
    blob, needle = _corruptions()[case]
    (model_dir / "model.safetensors").write_bytes(blob)
    for lazy in (True, False):
        msg = refused(lambda: load_model(model_dir, lazy=lazy), "not a valid safetensors file", needle)
        assert_no_leak(msg, blob.ljust(16, b"\0")) if case == "header_length_past_eof" else None
    # the library's own checks catch the same files (the eager path loads through it after our checks)
    lone = tmp_path / f"{case}.safetensors"
    lone.write_bytes(blob)
    with pytest.raises(Exception):
        load_file(str(lone))


def test_a_valid_file_with_unaligned_tensors_still_loads_correctly(tmp_path):
    from lmstack.model.lazy_safetensors import SafetensorsFile

    # an int8 tensor of 3 bytes first pushes the float32 tensor off a 4-byte boundary
    header = {"i": {"dtype": "I8", "shape": [3], "data_offsets": [0, 3]},
              "f": {"dtype": "F32", "shape": [2], "data_offsets": [3, 11]}}
    text = json.dumps(header).encode()
    text += b" " * (-(8 + len(text)) % 8)
    data = bytes([1, 2, 3]) + struct.pack("<2f", 1.5, -2.0)
    (tmp_path / "x.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + data)
    f = SafetensorsFile(tmp_path / "x.safetensors")
    assert f.get("f").tolist() == [1.5, -2.0] and f.get("i").tolist() == [1, 2, 3]
    assert load_file(str(tmp_path / "x.safetensors"))["f"].tolist() == [1.5, -2.0]


def test_our_writer_and_the_library_agree_on_what_is_valid(tmp_path):
    from lmstack.model.lazy_safetensors import SafetensorsFile

    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64), "c": torch.zeros(0, 4),
                "d": torch.ones(2, dtype=torch.bool), "e": torch.randn(4).to(torch.bfloat16)}
    save_file(tensors, str(tmp_path / "ok.safetensors"))
    f = SafetensorsFile(tmp_path / "ok.safetensors")
    for k, t in tensors.items():
        assert torch.equal(f.get(k), t), k


# ---------------------------------------------------------------- lazy position tables
def test_rope_tables_are_lazy_and_bit_identical_to_a_full_table():
    cfg = ModelConfig(d_model=64, n_heads=2, max_seq_len=2**31 - 1)
    start = time.perf_counter()
    rope = RotaryEmbedding(cfg)
    assert time.perf_counter() - start < FAST
    assert rope.cos_table.shape[0] == INITIAL_TABLE_LENGTH  # not 2**31 rows (8+ GiB)
    full = RotaryEmbedding(ModelConfig(d_model=64, n_heads=2, max_seq_len=3 * INITIAL_TABLE_LENGTH))
    full(torch.tensor([3 * INITIAL_TABLE_LENGTH - 1]))  # built in one go at its max_seq_len
    positions = torch.tensor([0, 1, 255, 4095, 4096, 5000, 3 * INITIAL_TABLE_LENGTH - 1])
    cos, sin = rope(positions)  # grows on demand
    assert rope.cos_table.shape[0] == 3 * INITIAL_TABLE_LENGTH  # just what the positions need, not 2**31
    rope(torch.tensor([3 * INITIAL_TABLE_LENGTH]))
    assert rope.cos_table.shape[0] == 6 * INITIAL_TABLE_LENGTH  # one past the table: doubled
    fcos, fsin = full(positions)
    assert torch.equal(cos, fcos) and torch.equal(sin, fsin)


def test_rope_growth_stops_at_max_seq_len_but_extrapolation_still_works():
    rope = RotaryEmbedding(ModelConfig(d_model=64, n_heads=2, max_seq_len=5000))
    assert rope.cos_table.shape[0] == INITIAL_TABLE_LENGTH
    rope(torch.tensor([4500]))
    assert rope.cos_table.shape[0] == 5000  # not 8192: doubling is capped at max_seq_len
    rope(torch.tensor([6000]))  # past max_seq_len (e.g. RoPE scaling experiments): still served
    assert rope.cos_table.shape[0] == 6001


def test_sinusoidal_table_is_lazy_and_bit_identical():
    lazy, full = SinusoidalPositions(32, 2**31 - 1), SinusoidalPositions(32, 3 * INITIAL_TABLE_LENGTH)
    assert lazy.table.shape[0] == INITIAL_TABLE_LENGTH and full.table.shape[0] == INITIAL_TABLE_LENGTH
    full(torch.tensor([3 * INITIAL_TABLE_LENGTH - 1]))
    pos = torch.tensor([0, 7, 4095, 4096, 9000])
    assert torch.equal(lazy(pos), full(pos))


def test_a_model_with_2_to_the_31_positions_builds_small_and_matches_a_normal_one():
    torch.manual_seed(0)
    small = Transformer(ModelConfig(vocab_size=64, d_model=32, n_heads=4, max_seq_len=256))
    huge = Transformer(ModelConfig(vocab_size=64, d_model=32, n_heads=4, max_seq_len=2**31 - 1))
    huge.load_state_dict(small.state_dict())
    assert sum(b.numel() for b in huge.buffers()) < 10 * INITIAL_TABLE_LENGTH * 8
    x = torch.randint(0, 64, (1, 256))
    assert torch.equal(huge(x), small(x))


# ---------------------------------------------------------------- the CLI flag
@pytest.mark.parametrize("argv", [["model", "convert", "--src", "{m}", "--out", "{o}"],
                                  ["model", "generate", "--model", "{m}", "--prompt_ids", "[1, 2]"],
                                  ["generate", "--model", "{m}", "--prompt_ids", "[1, 2]", "--max_tokens", "2"]])
def test_max_model_gib_flag_refuses_in_one_line_and_raises_the_limit(model_dir, tmp_path, capsys, argv):
    from lmstack.cli import main

    argv = [a.format(m=model_dir, o=tmp_path / "out") for a in argv]
    try:
        assert main(argv + ["--max_model_gib", "1e-6"]) == 2
        err = capsys.readouterr().err.strip()
        assert "over the 1e-06 GiB limit" in err and "--max_model_gib" in err and "\n" not in err
        assert "Traceback" not in err
        assert main(argv + ["--max-model-gib", "1"]) == 0  # both spellings; a 1 GiB limit fits the tiny model
    finally:
        set_max_model_gib(None)


# ---------------------------------------------------------------- side files load through the same checks
def test_adapter_and_reward_head_files_outside_the_directory_are_refused(model_dir, secret_file, tmp_path):
    from lmstack.adapt.peft_format import read_adapter
    from lmstack.align.reward_model import load_reward_model

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    os.symlink(secret_file, adapter / "adapter_config.json")
    assert_no_leak(refused(lambda: read_adapter(adapter), "outside the model directory"), SECRET)
    (adapter / "adapter_config.json").unlink()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    blob, _ = _corruptions()["overlap"]
    (adapter / "adapter_model.safetensors").write_bytes(blob)
    refused(lambda: read_adapter(adapter), "not a readable safetensors file", "overlaps")

    (model_dir / "reward_model.json").write_text(json.dumps({"format": "x"}))
    os.symlink(secret_file, model_dir / "reward_head.safetensors")
    assert_no_leak(refused(lambda: load_reward_model(model_dir), "outside the model directory"), SECRET)


def test_special_ids_ignore_config_files_that_escape_the_directory(model_dir, tmp_path):
    from lmstack.eval.lm import model_special_ids

    outside = tmp_path / "outside.json"
    outside.write_text(json.dumps({"bos_token_id": 7, "eos_token_id": 8}))
    for name in ("generation_config.json", "config.json"):
        (model_dir / name).unlink()
    (model_dir / "generation_config.json").write_text(json.dumps({"bos_token_id": 3}))
    os.symlink(outside, model_dir / "config.json")
    assert model_special_ids(model_dir) == (3, None)  # the escaping config.json offers nothing


def test_the_engine_refuses_a_kv_pool_sized_by_an_absurd_context_before_allocating(model_dir):
    from lmstack.infer.engine import LLMEngine

    # 2**26 positions passes the shape limit, but one full-context sequence of this tiny model needs a
    # 32 GiB KV pool (2 x 2 layers x 4 heads x 8 dims x 4 bytes per token), and the pool is sized to hold one
    edit_config(model_dir, max_position_embeddings=2**26)
    try:
        set_max_model_gib(16)  # the same on every machine (the default depends on its RAM)
        msg = refused(lambda: LLMEngine(str(model_dir)), "KV cache pool needs 32.0 GiB",
                      "max_model_len=67,108,864", "--max_model_len", "over the 16 GiB limit")
    finally:
        set_max_model_gib(None)
    assert "max_position_embeddings" in msg
    engine = LLMEngine(str(model_dir), max_model_len=256)  # an honest context: a small pool, and it runs
    assert engine.num_blocks * engine.block_size >= 256


# ---------------------------------------------------------------- fuzzed headers
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_SIZES = {"F32": 4, "I8": 1, "BF16": 2, "BOOL": 1, "F64": 8, "I64": 8}
_tensor = st.tuples(st.sampled_from(sorted(_SIZES)), st.lists(st.integers(0, 4), max_size=3))
_mutation = st.one_of(
    st.none(),  # a valid file
    st.tuples(st.just("offset"), st.integers(0, 3), st.integers(0, 1), st.integers(-9, 9)),
    st.tuples(st.just("shape"), st.integers(0, 3), st.integers(1, 5)),
    st.tuples(st.just("header_len"), st.integers(-12, 12).filter(bool)),
    st.tuples(st.just("data"), st.integers(-9, 9).filter(bool)),
    st.tuples(st.just("value"), st.integers(0, 3), st.sampled_from(["F32x", -1, True, 2.5, None, [1], 2**64])),
)


@settings(max_examples=400, deadline=None)
@given(tensors=st.lists(_tensor, min_size=1, max_size=4), mutation=_mutation)
def test_fuzzed_headers_are_refused_cleanly_or_read_exactly_what_the_library_reads(tensors, mutation):
    """Valid files mutated once (an offset, a shape, the header length, the data length, a field's type):
    ours either refuses with LmstackError (never another exception) or reads what the library reads; an
    unmutated file is always accepted."""
    import tempfile

    from lmstack.model.lazy_safetensors import SafetensorsFile

    header, pos = {}, 0
    for i, (dtype, shape) in enumerate(tensors):
        n = _SIZES[dtype]
        for d in shape:
            n *= d
        header[f"t{i}"] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + n]}
        pos += n
    data_len, extra = pos, 0
    if mutation is not None:
        kind, *arg = mutation
        entry = header[f"t{arg[0] % len(tensors)}"] if kind in ("offset", "shape", "value") else None
        if kind == "offset":
            entry["data_offsets"][arg[1]] = max(0, entry["data_offsets"][arg[1]] + arg[2])
        elif kind == "shape":
            entry["shape"] = entry["shape"] + [arg[1]]
        elif kind == "header_len":
            extra = arg[0]
        elif kind == "data":
            data_len = max(0, data_len + arg[0])
        else:
            entry["dtype" if isinstance(arg[1], str) else "data_offsets"] = arg[1]
    text = json.dumps(header).encode()
    blob = struct.pack("<Q", max(0, len(text) + extra)) + text + bytes(i % 251 for i in range(data_len))
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "fuzz.safetensors"
        f.write_bytes(blob)
        try:
            ours = SafetensorsFile(f)
            got = {k: ours.get(k).clone() for k in ours.header}
        except LmstackError:
            # refused with our error type (anything else fails the test); a valid file never is
            assert mutation is not None or not header, "a valid file was refused"
            return
        theirs = load_file(str(f))  # what we accept, the library accepts, with the same values
    assert set(theirs) == set(got)
    for k in got:
        assert torch.equal(theirs[k], got[k]), k
