"""vLLM's call shapes on LLM: generate(prompts, sampling_params=...), {"prompt_token_ids": [...]} and
{"prompt": text} prompts mixed with strings, chat(..., sampling_params=...)."""
import pytest

from lmstack.errors import LmstackError
from lmstack.infer import LLM, SamplingParams

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(model, tok):
    return LLM(model, tokenizer=tok, block_size=4, num_blocks=128)


def test_sampling_params_keyword_equals_positional(llm):
    positional = llm.generate(["The sky is"], GREEDY)
    keyword = llm.generate(["The sky is"], sampling_params=GREEDY)
    assert keyword[0].outputs[0].token_ids == positional[0].outputs[0].token_ids
    assert len(keyword[0].outputs[0].token_ids) == 6


def test_tokens_prompts_mixed_with_strings_equal_their_text(llm):
    text = "The sky is"
    ids = llm.generate(text, GREEDY)[0].prompt_token_ids  # what the engine makes of the text (BOS included)
    assert len(ids) > 2
    outs = llm.generate([text, {"prompt_token_ids": ids}, {"prompt": text}], sampling_params=GREEDY)
    assert [o.prompt_token_ids for o in outs] == [ids, ids, ids]
    assert outs[1].outputs[0].token_ids == outs[0].outputs[0].token_ids == outs[2].outputs[0].token_ids
    single = llm.generate({"prompt_token_ids": ids}, sampling_params=GREEDY)  # one dict, not in a list
    assert len(single) == 1 and single[0].outputs[0].token_ids == outs[0].outputs[0].token_ids


def test_chat_takes_sampling_params_keyword(llm):
    out = llm.chat([{"role": "user", "content": "hi"}], sampling_params=GREEDY)
    assert len(out) == 1 and len(out[0].outputs[0].token_ids) == 6


@pytest.mark.parametrize("prompt, message", [
    ({"prompt_token_ids": []}, "prompt 0: prompt_token_ids must be a non-empty list"),
    ({"prompt_token_ids": [1, "a"]}, "prompt 0: prompt_token_ids must be a non-empty list of token ids"),
    ({"prompt": 3}, "prompt 0: 'prompt' must be a string"),
    ({"prompt_token_ids": [1], "multi_modal_data": {}}, r"got keys \['multi_modal_data', 'prompt_token_ids'\]"),
])
def test_bad_prompt_dicts_are_named(llm, prompt, message):
    with pytest.raises(LmstackError, match=message):
        llm.generate(prompt, sampling_params=GREEDY)
    with pytest.raises(LmstackError, match=message.replace("prompt 0", "prompt 1")):
        llm.generate(["ok", prompt], sampling_params=GREEDY)
