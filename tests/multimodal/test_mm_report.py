"""multimodal/report.py: the caption grid PNG (written, under 200 KB, one cell per picture with its caption drawn),
greedy captions equal to the VLM's own generate, and the report card's vision-language section for a run with a VLM."""
import json

import pytest
from PIL import Image

from lmstack.errors import LmstackError
from lmstack.eval.report import build_report
from lmstack.multimodal.images import to_pixels
from lmstack.multimodal.report import (CELL, caption_grid, caption_images, find_vlm, section_vlm)
from lmstack.multimodal.vlm import save_vlm
from lmstack.multimodal.vlm_train import answer_all

from test_serve_images import make_vlm, picture, tok  # noqa: F401 (fixture)


def test_caption_grid_png(tmp_path):
    images = [picture(c) for c in ("red", "blue", "green", "yellow", "purple")]
    captions = ["a red circle", "", "a green circle " * 12, "x", "a purple circle"]
    path = caption_grid(images, captions, tmp_path / "plots" / "grid.png", cols=2)
    assert path.is_file() and path.stat().st_size < 200_000
    grid = Image.open(path).convert("RGB")
    assert grid.width == 2 * (CELL + 12) and grid.height > 3 * CELL  # 5 pictures in 2 columns: 3 rows
    # the caption area under the first picture holds dark text pixels; the empty caption's does not
    w, cell_h = CELL + 12, grid.height // 3

    def dark(x0, y0):
        box = grid.crop((x0, y0 + CELL + 8, x0 + CELL, y0 + cell_h)).convert("L")
        return sum(1 for v in box.getdata() if v < 100)

    assert dark(0, 0) > 20 and dark(w, 0) == 0
    assert Image.open(path).getpixel((6 + CELL // 2, 6 + CELL // 2)) != Image.open(path).getpixel((2, 2))
    with pytest.raises(LmstackError, match="2 images but 1 captions"):
        caption_grid(images[:2], ["a"], tmp_path / "bad.png")


def test_captions_equal_the_training_path(tok):  # noqa: F811
    vlm = make_vlm(tok)
    recs = [{"scene": None}]
    img = picture("orange", "square")
    got = caption_images(vlm, tok, [img, picture("red")], max_new_tokens=6)
    want = answer_all(vlm, tok, recs, [(0, "")], pixels=to_pixels([img], 32), max_new_tokens=6)
    assert got[0] == want[0] and len(got) == 2


def test_report_section_appears_for_a_run_with_a_vlm(tok, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    run.mkdir()
    assert section_vlm(run) == [] and find_vlm(run) is None
    assert "Vision-language" not in build_report(run).read_text()
    save_vlm(make_vlm(tok), tok, run / "vlm")
    (run / "summary.json").write_text(json.dumps({"sections": ["other.md"]}))
    lines = section_vlm(run, n_images=4)
    assert lines[0] == "## Vision-language model" and "![generated captions](plots/vlm_captions.png)" in lines
    assert sum(1 for line in lines if line.startswith("| ") and "test" in line) >= 1  # held-out/test first
    assert (run / "plots" / "vlm_captions.png").stat().st_size < 200_000
    report = build_report(run).read_text()  # the report card holds the section once, with no summary hook
    assert report.count("## Vision-language model") == 1 and "vlm_captions.png" in report
