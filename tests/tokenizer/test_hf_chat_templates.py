"""A model's own Jinja chat template: ids and assistant masks equal transformers' apply_chat_template on the
published templates of five families (tests/fixtures/chat_templates), end-of-turn stop ids, template files
(chat_template.jinja / .json / named templates) and the clear errors of bad templates."""
import json

import pytest

import hf_tiny
from lmstack.errors import LmstackError
from lmstack.tokenizer import load_tokenizer

# the published templates and tokens of six families (hf_tiny.STYLES: template file, specials, bos, eos, end of turn)
FAMILIES = ["llama3", "qwen2", "mistral", "gemma", "phi3", "chatml_generation"]

U, A, S = "user", "assistant", "system"


def conv(*turns):
    return [{"role": r, "content": c} for r, c in turns]


CONVERSATIONS = [
    conv((U, "Hello!")),
    conv((U, "What is 2 + 2?"), (A, "It is 4.")),
    conv((S, "You are terse."), (U, "Name a colour."), (A, "Blue.")),
    conv((S, "Answer in French."), (U, "Good morning")),
    conv((U, "a"), (A, "b"), (U, "c"), (A, "d"), (U, "e")),
    conv((U, ""), (A, "")),
    conv((U, "   padded   "), (A, "  spaces  ")),
    conv((U, "Grüße aus Köln — ça va? 日本語もどうぞ 🙂"), (A, "Très bien, merci! 😊")),
    conv((U, "line one\nline two\n\nline four"), (A, "ok\n")),
    conv((S, ""), (U, "empty system prompt")),
    conv((U, "Quote: \"tojson\" <b>bold</b> & co"), (A, "{\"k\": [1, 2]}")),
    conv((U, "Count to three"), (A, "1, 2, 3"), (U, "Now backwards"), (A, "3, 2, 1")),
    conv((S, "System only then user"), (U, "x"), (A, "y"), (U, "z")),
    conv((U, "Tabs\tand\ttabs"), (A, "Yes\ttabs")),
    conv((U, "Ελληνικά και русский текст"), (A, "Да.")),
    conv((U, "What does <|im_start|> mean?"), (A, "A marker.")),
    conv((U, "long " * 40), (A, "short")),
    conv((U, "1"), (A, "2"), (U, "3"), (A, "4"), (U, "5"), (A, "6")),
    conv((S, "Be kind."), (U, "Hi"), (A, "Hello, friend."), (U, "Bye"), (A, "Goodbye!")),
    conv((U, "trailing newline\n")),
]
assert len(CONVERSATIONS) == 20

TEXT = [m["content"] for c in CONVERSATIONS for m in c] + [
    "The quick brown fox jumps over the lazy dog.", "assistant user system model", "You are a helpful assistant.",
] * 5


def _hf_tokenizer(family: str):
    return hf_tiny.hf_tokenizer(family, texts=TEXT)


def _hf_ids(hf, messages, gen, **kw):
    out = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen, **kw)
    return out if isinstance(out, list) else out["input_ids"]


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tmp_path_factory):
    hf = _hf_tokenizer(request.param)
    d = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(d)
    return request.param, hf, load_tokenizer(d)


def test_ids_equal_transformers_on_twenty_conversations(pair):
    family, hf, ours = pair
    checked = refused = 0
    for messages in CONVERSATIONS:
        for gen in (False, True):
            try:
                want = _hf_ids(hf, messages, gen)
            except Exception as e:  # noqa: BLE001 - the template's own raise_exception: we must raise too
                with pytest.raises(LmstackError, match="raised"):
                    ours.apply_chat_template(messages, add_generation_prompt=gen)
                refused += 1
                assert "roles" in str(e) or "System role" in str(e)
                continue
            ids, mask = ours.apply_chat_template(messages, add_generation_prompt=gen)
            assert ids == want, (family, messages, gen)
            assert len(mask) == len(ids)
            assert ours.render_chat(messages, gen) == hf.apply_chat_template(messages, tokenize=False,
                                                                             add_generation_prompt=gen)
            checked += 1
    assert checked >= 16 and checked + refused == 40  # mistral/gemma refuse system prompts and odd orders


def test_end_of_turn_is_the_templates_and_stops_generation(pair):
    family, hf, ours = pair
    eot = hf.convert_tokens_to_ids(hf_tiny.STYLES[family].end_of_turn)
    assert ours.end_of_turn_ids() == [eot]
    assert eot in ours.stop_ids() and hf.eos_token_id in ours.stop_ids()


def test_assistant_masks_equal_transformers_generation_blocks(tmp_path):
    hf = _hf_tokenizer("chatml_generation")
    hf.save_pretrained(tmp_path)
    ours = load_tokenizer(tmp_path)
    assert ours.chat_template.has_generation_blocks
    n_masked = 0
    for messages in CONVERSATIONS:
        out = hf.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ids, mask = ours.apply_chat_template(messages)
        assert ids == out["input_ids"] and mask == out["assistant_masks"], messages
        n_masked += sum(mask)
    assert n_masked > 50


def test_prefix_rendering_masks_cover_each_assistant_turn(tmp_path):
    # Qwen2's template has no generation blocks: the mask comes from rendering growing prefixes
    hf = _hf_tokenizer("qwen2")
    hf.save_pretrained(tmp_path)
    ours = load_tokenizer(tmp_path)
    messages = conv((U, "Count to three"), (A, "1, 2, 3"), (U, "Now backwards"), (A, "3, 2, 1"))
    r = ours.render_messages(messages)
    learned = [ours.decode([i]) for i, m in zip(r.ids, r.mask) if m]
    assert "".join(learned) == "1, 2, 3<|im_end|>\n3, 2, 1<|im_end|>\n"


def _hf_dir(tmp_path, template=None, **config):
    hf = _hf_tokenizer("qwen2")
    hf.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    if template is not None:
        cfg["chat_template"] = template
    cfg.update(config)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return tmp_path


def test_template_sources_and_named_templates(tmp_path):
    plain = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    d = _hf_dir(tmp_path / "a", [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": plain}])
    assert load_tokenizer(d).render_chat(conv((U, "hi")), False) == "[user]hi"
    d = _hf_dir(tmp_path / "b", {"default": plain, "rag": "x"})
    assert load_tokenizer(d).render_chat(conv((U, "hi")), False) == "[user]hi"
    d = _hf_dir(tmp_path / "c")
    (d / "chat_template.json").write_text(json.dumps({"chat_template": "J{{ messages|length }}"}))
    assert load_tokenizer(d).render_chat(conv((U, "hi")), False) == "J1"
    (d / "chat_template.jinja").write_text("F{{ messages[0].content }}")  # the .jinja file wins
    assert load_tokenizer(d).render_chat(conv((U, "hi")), False) == "Fhi"


def test_template_globals_match_transformers(tmp_path):
    from transformers import PreTrainedTokenizerFast

    tpl = ("{{ bos_token }}|{{ eos_token }}|{{ messages[0] | tojson }}|{{ tools | tojson(indent=1, sort_keys=True) }}"
           "|{{ documents[0].title }}|{{ strftime_now('%Y') | length }}|{{ custom }}|{{ missing }}|"
           "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}"
           "{% if add_generation_prompt %}GEN{% endif %}")
    d = _hf_dir(tmp_path, tpl)
    hf = PreTrainedTokenizerFast.from_pretrained(d)
    msgs = [{"role": "user", "content": "naïve <b>"}]
    kw = dict(tools=[{"type": "function", "function": {"name": "f", "b": 1, "a": 2}}],
              documents=[{"title": "T", "text": "x"}], custom="C")
    want = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, **kw)
    got = load_tokenizer(d).render_chat(msgs, True, **kw)
    assert got == want and "naïve <b>" in got and got.endswith("GEN")


@pytest.mark.parametrize("template, field, message", [
    ("{{ raise_exception('only user turns, please') }}", "chat_template", "raised: only user turns, please"),
    ("{{ system_prompt.strip() }}", "chat_template", "undefined value: 'system_prompt' is undefined"),
    ({"rag": "x", "tool_use": "y"}, "chat_template", "none is called 'default'"),
    ("{% for m in messages %}", "chat_template", "does not parse"),
])
def test_bad_templates_name_the_file_and_the_problem(tmp_path, template, field, message):
    d = _hf_dir(tmp_path, template)
    tok = load_tokenizer(d)  # loading works; the template fails where it is used
    with pytest.raises(LmstackError) as e:
        tok.apply_chat_template(conv((U, "hi")), add_generation_prompt=True)
    assert f"{d / 'tokenizer_config.json'}:{field}" in str(e.value) and message in str(e.value)


def test_saving_keeps_the_template_file(tmp_path):
    hf = _hf_tokenizer("llama3")
    hf.save_pretrained(tmp_path / "hf")
    assert (tmp_path / "hf" / "chat_template.jinja").is_file()  # transformers 5 writes the template there
    load_tokenizer(tmp_path / "hf").save(tmp_path / "copy")
    again = load_tokenizer(tmp_path / "copy")
    messages = conv((S, "Be brief."), (U, "hi"), (A, "hello"))
    assert again.apply_chat_template(messages, True)[0] == _hf_ids(hf, messages, True)
    assert again.end_of_turn_ids() == [hf.convert_tokens_to_ids("<|eot_id|>")]


def test_ids_need_no_mask_so_rewriting_templates_still_serve(tmp_path):
    # a template that rewrites earlier turns (drops all but the last assistant reply, as reasoning templates
    # drop old thoughts) cannot give prefix masks, but prompts for serving need only ids
    tpl = ("{% for m in messages %}{% if m.role != 'assistant' or loop.last %}<|im_start|>{{ m.role }}\n"
           "{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
           "{% endif %}")
    tok = load_tokenizer(_hf_dir(tmp_path, tpl))
    messages = conv((U, "a"), (A, "b"), (U, "c"), (A, "d"))
    r = tok.render_messages(messages)
    assert r.text.count("<|im_start|>assistant") == 1 and len(r.ids) > 5
    with pytest.raises(LmstackError, match="cannot find assistant turn #1 by rendering prefixes"):
        r.mask


def test_masks_without_the_rust_runtime_match_too(tmp_path):
    hf = _hf_tokenizer("chatml_generation")
    hf.save_pretrained(tmp_path)
    ours = load_tokenizer(tmp_path)
    ours.chat_template._fast = False  # the pure-Python path: offsets from decoding growing id prefixes
    for messages in CONVERSATIONS:
        out = hf.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        r = ours.render_messages(messages)
        assert r.ids == out["input_ids"] and r.mask == out["assistant_masks"], messages
