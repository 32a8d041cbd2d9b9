"""The speedrun's closing lines point at the model to chat with: aligned, else SFT, never the base model."""
from lmstack.stages.speedrun import closing_lines


def test_closing_lines_point_at_the_aligned_chat_model_and_name_the_sft_one():
    text = closing_lines({"base": "run/pretrain/checkpoints/step_00000280/model", "sft": "run/sft/run/model",
                          "aligned": "run/align/model"})
    first = text.splitlines()[0]
    assert first == "chat with the aligned model: lmstack chat --model run/align/model"
    assert "SFT model it was aligned from: run/sft/run/model" in text
    assert "chat --model run/pretrain" not in text  # the base model is named, but not offered for chat


def test_closing_lines_without_alignment_or_sft():
    assert closing_lines({"base": "b", "sft": "s"}).splitlines()[0] == "chat with the SFT model: lmstack chat --model s"
    only_base = closing_lines({"base": "b"})
    assert "lmstack chat" not in only_base and "lmstack generate --model b" in only_base
