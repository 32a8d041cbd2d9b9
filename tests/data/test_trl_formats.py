"""TRL's dataset formats: one reader per family (SFT rows, preference rows), errors that name the field."""
import pytest

from lmstack.data.trl_formats import preference_row, sft_row, to_messages, unpaired_row
from lmstack.errors import LmstackError

U = {"role": "user", "content": "2+2?"}
A4 = {"role": "assistant", "content": "4"}
A5 = {"role": "assistant", "content": "5"}
SYS = {"role": "system", "content": "Be brief."}


def test_sft_formats():
    assert sft_row({"messages": [U, A4]}) == ("messages", [U, A4], None)
    assert sft_row({"text": "The sky is blue."}) == ("text", "The sky is blue.", None)
    assert sft_row({"prompt": "2+2=", "completion": "4"}) == ("prompt_completion", "2+2=", "4")
    assert sft_row({"prompt": [SYS, U], "completion": [A4]}) == ("chat_prompt_completion", [SYS, U], [A4])


@pytest.mark.parametrize("row, message", [
    ({"body": "plain"}, r"no 'text', 'messages' or 'prompt'/'completion' fields \(keys: \['body'\]\)"),
    ({"text": ""}, "field 'text' must be non-empty text, got str"),
    ({"prompt": "2+2="}, "field 'completion' is missing"),
    ({"prompt": "2+2=", "completion": ""}, "field 'completion' is empty"),
    ({"prompt": [U], "completion": "4"}, "field 'completion' must be a non-empty list of messages, got str"),
    ({"prompt": [U], "completion": [U]}, "field 'completion' holds no assistant message"),
    ({"messages": [U, {"role": "assistant"}]}, r"field 'messages': message 1 \(assistant\) has no string 'content'"),
    ({"messages": [U, "hi"]}, "field 'messages': message 1 must be an object"),
    ([U], "a row must be a JSON object, got list"),
])
def test_sft_errors_name_the_field(row, message):
    with pytest.raises(LmstackError, match=message):
        sft_row(row)


def test_preference_formats_explicit_and_implicit_prompt():
    assert preference_row({"prompt": "2+2?", "chosen": "4", "rejected": "5"}) == ("2+2?", "4", "5")
    # TRL's standard implicit prompt: the shared start, the space before the difference going to the replies
    assert preference_row({"chosen": "The sky is blue.", "rejected": "The sky is green."}) == \
        ("The sky is", " blue.", " green.")
    explicit = preference_row({"prompt": [SYS, U], "chosen": [A4], "rejected": [A5]})
    implicit = preference_row({"chosen": [SYS, U, A4], "rejected": [SYS, U, A5]})
    assert explicit == implicit == ((("system", "Be brief."), ("user", "2+2?")), "4", "5")
    assert to_messages(implicit[0]) == [SYS, U]
    hash(implicit)  # log-prob caches key on (prompt, completion)


@pytest.mark.parametrize("row, message", [
    ({"chosen": [A4], "rejected": [A5]}, "share no first message, so there is no implicit prompt"),
    ({"chosen": "blue", "rejected": "green"}, "share no start, so there is no implicit prompt"),
    ({"chosen": [U, A4, U, A4], "rejected": [U, A5]}, "field 'chosen': after the prompt it must hold one assistant "
                                                       "message, got assistant, user, assistant"),
    ({"chosen": [U, A4], "rejected": [U, A4]}, "field 'chosen': after the prompt .* got nothing"),
    ({"prompt": "2+2?", "chosen": "4"}, "field 'rejected' is missing"),
    ({"prompt": 3, "chosen": "4", "rejected": "5"}, "field 'prompt' must be text like the others, got int"),
    ({"prompt": [U], "chosen": [A4], "rejected": "5"}, "field 'rejected' must be a non-empty list of messages"),
])
def test_preference_errors_name_the_field(row, message):
    with pytest.raises(LmstackError, match=message):
        preference_row(row)


def test_unpaired_rows_text_and_conversational():
    assert unpaired_row({"prompt": "2+2?", "completion": "4", "label": True}) == ("2+2?", "4", True)
    assert unpaired_row({"prompt": [U], "completion": [A5], "label": False}) == ((("user", "2+2?"),), "5", False)
    with pytest.raises(LmstackError, match="field 'label' must be true or false, got str"):
        unpaired_row({"prompt": [U], "completion": [A5], "label": "yes"})
    with pytest.raises(LmstackError, match="field 'completion': after the prompt it must hold one assistant message"):
        unpaired_row({"prompt": [U], "completion": [U], "label": True})
