"""Tiny Hugging Face model directories, as a user brings them: a random transformers model saved by
save_pretrained, a `tokenizers` BPE tokenizer.json trained on a few hundred lines, tokenizer_config.json with a
published chat template and BOS/EOS, and generation_config.json with a list of EOS ids.

Built with transformers and tokenizers only -- never lmstack code -- so that what lmstack reads from these
directories is checked against an independent witness. Tests and benchmarks share this one builder.

    import hf_tiny          # tests/ is on sys.path under pytest (tests/conftest.py); a benchmark inserts it
    model, tok = hf_tiny.build_dir(tmp_path, "qwen2", style="qwen2")       # a whole directory
    tok = hf_tiny.hf_tokenizer("gemma")                                     # a tokenizer alone
    raw = hf_tiny.bpe(texts, ["<s>", "</s>"], vocab_size=300)               # a bare tokenizers.Tokenizer
    model = hf_tiny.random_model("mistral", vocab_size=300, tie_word_embeddings=True)
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

TEMPLATES = Path(__file__).resolve().parent / "fixtures" / "chat_templates"

# A few hundred short lines for the BPE trainer: words a chat uses, punctuation, and some non-ASCII text.
WORDS = ("the cat sat on mat dog ran to park hello there how are you today system user assistant be brief "
         "yes no maybe please thank good morning night answer question what why when where who").split()
LINES = [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(4 + i % 6)) + ("?" if i % 3 else ".")
         for i in range(300)] + ["Grüße aus Köln", "日本語のテキスト", "naïve café 🙂"] * 10



def random_lines(n_lines: int = 400, seed: int = 0) -> list[str]:
    """Lines of 4-14 random words from a small vocabulary, each with a final punctuation mark (a tokenizer's
    training text, and the items of made-up tasks)."""
    words = ("the cat sat on a mat and dog ran to park while birds sang in old trees near green hills under blue "
             "sky where people walk each day with friends who talk about time work life water sun moon").split()
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(4, 14))) + rng.choice(".?!:,")
            for _ in range(n_lines)]


CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@dataclass(frozen=True)
class Style:
    """A family's tokens and chat template, as its published tokenizer files have them."""
    template: str | None          # a file in tests/fixtures/chat_templates, or None (no template)
    specials: tuple[str, ...]     # special tokens in vocabulary order (the first ids)
    bos: str | None
    eos: str
    end_of_turn: str              # the token that ends an assistant turn
    eos_list: tuple[str, ...]     # generation_config.json's eos_token_id list ((): the model's single eos)
    pad: str | None = None
    config_bos: str | None = None  # config.json's bos_token_id when the tokenizer has no BOS (Qwen2 names one)


STYLES = {
    "llama3": Style("llama3.jinja", ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                     "<|end_header_id|>", "<|eot_id|>"), "<|begin_of_text|>", "<|end_of_text|>",
                    "<|eot_id|>", ("<|end_of_text|>", "<|eot_id|>")),
    "qwen2": Style("qwen2.jinja", ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), None, "<|im_end|>",
                   "<|im_end|>", ("<|im_end|>", "<|endoftext|>"), pad="<|endoftext|>", config_bos="<|endoftext|>"),
    "mistral": Style("mistral.jinja", ("<s>", "</s>"), "<s>", "</s>", "</s>", ()),
    "gemma": Style("gemma.jinja", ("<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"), "<bos>", "<eos>",
                   "<end_of_turn>", ("<eos>", "<end_of_turn>")),
    "phi3": Style("phi3.jinja", ("<s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
                  "<s>", "<|endoftext|>", "<|end|>", ("<|endoftext|>", "<|end|>")),
    "chatml_generation": Style("chatml_generation.jinja", ("<|im_end|>", "<|endoftext|>", "<|im_start|>"), None,
                               "<|im_end|>", "<|im_end|>", ()),
    "plain": Style(None, ("<s>", "</s>"), "<s>", "</s>", "</s>", ()),  # a base model: no chat template
}

FAMILIES = {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral"}


def bpe(texts=LINES, specials=(), vocab_size: int = 400, byte_alphabet: bool = True) -> Tokenizer:
    """A byte-level BPE trained on `texts`; `specials` take the first ids, in order."""
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet() if byte_alphabet else []
    tk.train_from_iterator(list(texts), trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials),
                                                            initial_alphabet=alphabet, show_progress=False))
    return tk


def prepend_bos(tk: Tokenizer, bos: str) -> Tokenizer:
    """Plain text gets `bos` in front, as Llama-3's tokenizer.json post-processor does."""
    tk.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                      special_tokens=[(bos, tk.token_to_id(bos))])
    return tk


def hf_tokenizer(style: str = "llama3", *, texts=LINES, vocab_size: int = 400, template: str | None = None,
                 bos_in_text: bool = False, **kwargs) -> transformers.PreTrainedTokenizerFast:
    """A transformers fast tokenizer in `style`; `template` (a Jinja string) replaces the style's fixture,
    `bos_in_text` makes plain text start with BOS, `kwargs` go to PreTrainedTokenizerFast (model_max_length, ...)."""
    s = STYLES[style]
    tk = bpe(texts, s.specials, vocab_size)
    if bos_in_text:
        prepend_bos(tk, s.bos)
    if template is None and s.template is not None:
        template = (TEMPLATES / s.template).read_text()
    extra = {"bos_token": s.bos} if s.bos else {}
    if s.pad:
        extra["pad_token"] = s.pad
    if template is not None:
        extra["chat_template"] = template
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=s.eos, **extra, **kwargs)


def random_model(family: str, vocab_size: int, *, seed: int = 0, hidden_size: int = 32,
                 intermediate_size: int = 64, num_hidden_layers: int = 2, num_attention_heads: int = 4,
                 num_key_value_heads: int = 2, max_position_embeddings: int = 256, **config):
    """A randomly initialised transformers causal LM of `family` (llama, qwen2, mistral), in eval mode."""
    if family not in FAMILIES:
        raise ValueError(f"family {family!r} is not one of {sorted(FAMILIES)}")
    name = FAMILIES[family]
    cfg = getattr(transformers, f"{name}Config")(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads, max_position_embeddings=max_position_embeddings, **config)
    torch.manual_seed(seed)
    return getattr(transformers, f"{name}ForCausalLM")(cfg).eval()


def build_dir(path, family: str = "llama", style: str = "llama3", *, seed: int = 0, texts=LINES,
              vocab_size: int = 400, template: str | None = None, bos_in_text: bool = False,
              tokenizer_kwargs: dict | None = None, **config):
    """Write a whole model directory to `path`: the model (`config` goes to the family's Config), the tokenizer
    files and generation_config.json with the style's eos list. Returns (model, tokenizer)."""
    path = Path(path)
    s = STYLES[style]
    tok = hf_tokenizer(style, texts=texts, vocab_size=vocab_size, template=template, bos_in_text=bos_in_text,
                       **(tokenizer_kwargs or {}))
    bos = s.bos or s.config_bos
    ids = {"bos_token_id": tok.convert_tokens_to_ids(bos) if bos else None, "eos_token_id": tok.eos_token_id}
    model = random_model(family, len(tok), seed=seed, **{**ids, **config})
    model.save_pretrained(path)
    tok.save_pretrained(path)
    if s.eos_list:
        gen_file = path / "generation_config.json"
        gen = json.loads(gen_file.read_text())
        gen["eos_token_id"] = [tok.convert_tokens_to_ids(t) for t in s.eos_list]
        gen_file.write_text(json.dumps(gen))
    return model, tok


def eos_ids(tok, style: str) -> list[int]:
    """The ids of the style's generation_config.json eos list."""
    return [tok.convert_tokens_to_ids(t) for t in STYLES[style].eos_list]
