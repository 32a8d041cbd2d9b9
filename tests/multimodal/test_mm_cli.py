"""The multimodal command line: `lmstack chat --image FILE` (local engine and a server give the same greedy reply,
the picture encoded once for the whole chat), and bad pictures or a text-only model exit 2 with a clear message."""
import pytest
from PIL import Image

from lmstack.cli import main
from lmstack.errors import LmstackError
from lmstack.model.hf_io import save_model
from lmstack.serve.image_input import file_data_url
from lmstack.serve.terminal_chat import LocalBackend, RemoteBackend, run_chat

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
