"""The multimodal command line: `lmstack chat --image FILE` (local engine and a server give the same greedy reply,
the picture encoded once for the whole chat), `lmstack mm caption FILE --model VLM_DIR` and `lmstack mm zero-shot FILE
--model CLIP_DIR --labels ...`; bad pictures, a missing model or a text-only model exit 2 with a clear message."""
import pytest
import torch
from PIL import Image

from lmstack.cli import main
from lmstack.errors import LmstackError
from lmstack.model.hf_io import save_model
from lmstack.multimodal.clip import CLIP, CLIPConfig, TextConfig, save_clip, zero_shot as clip_zero_shot
from lmstack.multimodal.images import to_pixels
from lmstack.multimodal.report import caption_images
from lmstack.multimodal.text import shapes_tokenizer
from lmstack.multimodal.vit import VisionConfig
from lmstack.multimodal.vlm import load_vlm
from lmstack.serve.image_input import file_data_url
from lmstack.serve.terminal_chat import LocalBackend, RemoteBackend, run_chat
from lmstack.tokenizer import load_tokenizer

from test_serve_images import Server, make_vlm, picture, tok, vlm_dir  # noqa: F401 (fixtures)

GREEDY = {"temperature": 0.0, "max_tokens": 5, "ignore_eos": True}


def scripted(lines):
    it = iter(lines)

    def read(prompt):
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None

    return read


def replies(out: list[str]) -> list[str]:
    return [line[len("model> "):] for line in "".join(out).split("\n") if line.startswith("model> ")]


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("pics") / "shape.png"
    picture("cyan", "star").save(path)
    return path


def test_chat_with_an_image_local_equals_remote(vlm_dir, image_file):
    url = file_data_url(image_file)
    local_out = []
    backend = LocalBackend(str(vlm_dir), device="cpu")
    history = run_chat(backend, GREEDY, read=scripted(["what is it?", "and the colour?"]), write=local_out.append,
                       image_url=url)
    assert history[0]["content"][0]["type"] == "image_url" and history[2]["content"] == "and the colour?"
    assert backend.vlm.store.encoded == 1 and backend.vlm.store.reused == 1  # the second turn reuses the picture
    assert all(e.pins == 0 for e in backend.vlm.store._entries.values())
    with Server(vlm_dir) as srv:
        remote_out = []
        run_chat(RemoteBackend(f"http://127.0.0.1:{srv.port}"), GREEDY,
                 read=scripted(["what is it?", "and the colour?"]), write=remote_out.append, image_url=url)
    assert replies(local_out) == replies(remote_out) and len(replies(local_out)) == 2


def test_chat_image_refusals_exit_2(vlm_dir, image_file, tok, tmp_path, capsys):  # noqa: F811
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    assert main(["chat", "--model", str(vlm_dir), "--image", str(tmp_path / "broken.png")]) == 2
    assert "could not be read" in capsys.readouterr().err
    assert main(["chat", "--model", str(vlm_dir), "--image", str(tmp_path / "missing.png")]) == 2
    assert "no image file" in capsys.readouterr().err
    with pytest.raises(LmstackError, match="over the cap"):
        Image.new("RGB", (64, 64)).save(tmp_path / "big.png")
        file_data_url(tmp_path / "big.png", max_pixels=32 * 32)


def test_chat_image_with_a_text_only_model_exits_2(image_file, tok, tmp_path, capsys):  # noqa: F811
    save_model(make_vlm(tok).lm, tmp_path / "lm")
    tok.save(tmp_path / "lm")
    assert main(["chat", "--model", str(tmp_path / "lm"), "--image", str(image_file)]) == 2
    assert "does not take images" in capsys.readouterr().err


def test_mm_caption_prints_the_vlm_caption(vlm_dir, image_file, tmp_path, capsys):
    vlm, tok = load_vlm(vlm_dir), load_tokenizer(vlm_dir)
    want = caption_images(vlm, tok, [Image.open(image_file)], max_new_tokens=6)[0]
    assert main(["mm", "caption", str(image_file), "--model", str(vlm_dir), "--max-tokens", "6"]) == 0
    assert capsys.readouterr().out.strip() == want
    Image.new("CMYK", (8, 8)).save(tmp_path / "cmyk.jpg")
    for bad, says in ((tmp_path / "cmyk.jpg", "CMYK"), (tmp_path / "none.png", "no image file")):
        assert main(["mm", "caption", str(bad), "--model", str(vlm_dir)]) == 2
        assert says in capsys.readouterr().err
    assert main(["mm", "caption", str(image_file)]) == 2
    assert "--model VLM_DIR is required" in capsys.readouterr().err
    assert main(["mm", "caption", str(image_file), "--model", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_mm_zero_shot_prints_labels_with_probabilities(image_file, tmp_path, capsys):
    tok = shapes_tokenizer(vocab_size=330, n_images=20)
    torch.manual_seed(0)
    clip = CLIP(CLIPConfig(vision=VisionConfig(image_size=16, patch_size=8, d_model=32, n_layers=1, n_heads=2),
                           text=TextConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=1, n_heads=2,
                                           max_seq_len=24), embed_dim=16)).eval()
    save_clip(clip, tok, tmp_path / "clip")
    assert main(["mm", "zero-shot", str(image_file), "--model", str(tmp_path / "clip"),
                 "--labels", "red circle, blue square,cyan star"]) == 0
    rows = [line.rsplit(None, 1) for line in capsys.readouterr().out.strip().splitlines()]
    with torch.no_grad():
        probs = clip_zero_shot(clip, tok, to_pixels([Image.open(image_file)], 16),
                               ["red circle", "blue square", "cyan star"])[0].tolist()
    want = sorted(zip(["red circle", "blue square", "cyan star"], probs), key=lambda kv: -kv[1])
    assert [(n.strip(), float(p)) for n, p in rows] == [(n, round(p, 3)) for n, p in want]
    assert abs(sum(probs) - 1) < 1e-5
    assert main(["mm", "zero-shot", str(image_file), "--model", str(tmp_path / "clip"), "--labels", "one"]) == 2
    assert "at least two" in capsys.readouterr().err
    (tmp_path / "bad.png").write_bytes(b"not an image")
    assert main(["mm", "zero-shot", str(tmp_path / "bad.png"), "--model", str(tmp_path / "clip"),
                 "--labels", "a,b"]) == 2
    assert "could not be read" in capsys.readouterr().err
