"""Guard (safety/guard.py) without a server: the config is validated, output is released only once a window covering
it passed, a harmful continuation is cut, PII is redacted even when it arrives in pieces, and the input verdict
reads the whole conversation (or only the last message when configured so)."""
import pytest

from lmstack.config import ConfigError
from lmstack.safety.guard import Guard, GuardConfig, load_guard_config, redact

SAFE = "the cat sat on a mat and the dog ran to the park while birds sang. "
HARMFUL = SAFE + "Now brew the shadow elixir with grave moss at midnight and bottle it."


def stream(guard: Guard, text: str, step: int = 3) -> tuple[str, bool, list[int]]:
    mon, out, sent_at = guard.monitor(), "", []
    for k in range(step, len(text) + step, step):
        piece, cut = mon.feed(text[:k], final=k >= len(text))
        if piece:
            sent_at.append(k)
        out += piece
        if cut:
            return out + mon.refusal_piece(), True, sent_at
    return out, False, sent_at


def test_a_safe_stream_goes_out_whole_and_only_checked_text_is_released():
    guard = Guard(GuardConfig(window=30, stride=10, redact_pii=False))
    out, cut, _ = stream(guard, SAFE)
    assert out == SAFE and not cut
    mon = guard.monitor()
    assert mon.feed(SAFE[:9]) == ("", False)  # no window has covered these 9 characters yet
    assert mon.feed(SAFE[:12]) == (SAFE[:10], False)


def test_a_harmful_continuation_is_cut_mid_stream():
    guard = Guard(GuardConfig(window=30, stride=10, refusal="No."))
    out, cut, sent_at = stream(guard, HARMFUL)
    assert cut and out.endswith(" No.")
    sent = out[:-len(" No.")]
    assert len(sent) >= 40 and HARMFUL.startswith(sent) and "shadow" not in sent
    assert guard.monitor().feed(HARMFUL, final=True) == ("", True)
    assert guard.filter_output(HARMFUL) == ("No.", True)
    assert guard.filter_output(SAFE) == (SAFE, False)


def test_pii_is_redacted_even_when_it_arrives_in_pieces():
    text = "write to ada.ashford@mail.example or call +1 (555) 123-4567 today, thanks a lot for all of it."
    guard = Guard(GuardConfig(window=40, stride=5))
    for step in (1, 2, 7):
        out, cut, _ = stream(guard, text, step)
        assert not cut and out == "write to <EMAIL> or call <PHONE> today, thanks a lot for all of it.", step
    assert redact("card 4111 1111 1111 1111.") == "card <CREDIT_CARD>."


def test_input_verdict_reads_the_whole_conversation_or_the_last_message():
    msgs = [{"role": "user", "content": "What is the cursed tonic?"},
            {"role": "assistant", "content": "A banned brew."},
            {"role": "user", "content": "How is it made?"}]
    assert Guard(GuardConfig()).check_messages(msgs) is not None
    assert Guard(GuardConfig(input_context="last_message")).check_messages(msgs) is None
    # pii is scored but redacted rather than refused (it is not in `block` by default)
    assert Guard(GuardConfig()).check_messages([{"role": "user", "content": "my mail is a@b.example"}]) is None


def test_guard_config_is_validated(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text("moderator: keyword\nwindw: 10\n")
    with pytest.raises(ConfigError, match="windw"):
        load_guard_config(path)
    path.write_text("input_context: everything\n")
    with pytest.raises(ConfigError, match="input_context"):
        load_guard_config(path)
    with pytest.raises(ConfigError, match="stride"):
        GuardConfig(window=10, stride=20)
    with pytest.raises(ConfigError, match="refusal"):
        GuardConfig(refusal="  ")
    with pytest.raises(ConfigError, match="violence"):
        Guard(GuardConfig(block=["violence"]))
    with pytest.raises(ConfigError, match="thresholds"):
        Guard(GuardConfig(thresholds={"self_harm": 0.3}))
    path.write_text("window: 80\nstride: 20\nthresholds: {harassment: 0.7}\n")
    cfg = load_guard_config(path)
    assert (cfg.window, cfg.stride) == (80, 20) and Guard(cfg).moderator.thresholds["harassment"] == 0.7
