"""transformers' Trainer and TRL's SFTTrainer / DPOTrainer drive our model (issue 17 §4), through HFTrainerAdapter."""
import copy
import math

import pytest
import torch
import transformers as T

import hf_tiny
import lmstack
from lmstack.errors import LmstackError
from lmstack.model import Transformer, preset
from lmstack.model.hf_trainer import HFTrainerAdapter
from lmstack.model.trainer_save import CONFIG_KEY, decode_config

try:
    from datasets import Dataset
    import trl
    from trl.trainer.utils import add_fused_lm_head
except ImportError:  # the dev extra installs it; a bare checkout skips the TRL tests only
    trl = None

needs_trl = pytest.mark.skipif(trl is None, reason="TRL is not installed: pip install 'trl>=1.16'")
pytestmark = pytest.mark.usefixtures("one_thread")
QUIET = dict(report_to=[], use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True)


def _losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _same_logits(a: Transformer, b: Transformer, vocab: int) -> float:
    ids = torch.randint(0, vocab, (2, 11))
    with torch.no_grad():
        return (a.eval()(ids) - b.eval()(ids)).abs().max().item()


def _hf_dir(tmp_path):
    """A transformers-built Qwen2 directory (ChatML template) loaded into lmstack, and its HF tokenizer."""
    _, tok = hf_tiny.build_dir(tmp_path / "qwen2", "qwen2", style="qwen2")
    return lmstack.load_model(tmp_path / "qwen2", lazy=False).train(), tok


def _chat(user: str, reply: str) -> list[dict]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]


def test_trainer_trains_and_save_model_loads_back_with_equal_logits(tmp_path):
    model = HFTrainerAdapter(Transformer(preset("llama-tiny", vocab_size=64)))
    rows = torch.randint(0, 64, (4, 12))
    data = [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r.clone()} for r in rows.repeat(4, 1)]
    args = T.TrainingArguments(output_dir=str(tmp_path), max_steps=10, per_device_train_batch_size=4,
                               learning_rate=1e-2, gradient_checkpointing=True, **QUIET)
    trainer = T.Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    losses = _losses(trainer)
    assert len(losses) == 10 and losses[-1] < losses[0] - 0.5, losses
    assert model.is_gradient_checkpointing and model.model.checkpoint_blocks
    trainer.save_model(str(tmp_path / "out"))
    assert (tmp_path / "out" / "model.safetensors").exists() and not (tmp_path / "out" / "config.json").exists()
    back = lmstack.load_model(tmp_path / "out")  # Trainer wrote only the adapter's state dict, config included
    assert back.config == model.model.config
    assert _same_logits(back, model.model, 64) == 0.0
    model.save_pretrained(tmp_path / "hf_layout")  # the usual directory, for transformers too
    assert _same_logits(lmstack.load_model(tmp_path / "hf_layout"), model.model, 64) < 1e-6


def test_a_plain_transformer_saved_by_trainer_gets_an_error_that_says_what_to_do(tmp_path):
    model = Transformer(preset("llama-tiny", vocab_size=64))
    args = T.TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, **QUIET)
    ids = torch.randint(0, 64, (2, 8))
    trainer = T.Trainer(model=model, args=args, train_dataset=[{"input_ids": r, "labels": r} for r in ids])
    trainer.save_model(str(tmp_path / "out"))  # a state dict alone: nothing says which architecture it is
    with pytest.raises(LmstackError, match="has no config.json.*train HFTrainerAdapter"):
        lmstack.load_model(tmp_path / "out")


@needs_trl
@pytest.mark.parametrize("packing", [False, True])  # True: padding-free rows of several documents
def test_sft_trainer_trains_on_messages_and_saves_what_lmstack_loads(tmp_path, packing):
    model, tok = _hf_dir(tmp_path)
    adapter = HFTrainerAdapter(model)
    rows = [{"messages": _chat("how are you", "good thank you")},
            {"messages": _chat("what dog", "the dog ran to park")}] * 4
    args = trl.SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=10, per_device_train_batch_size=4,
                         learning_rate=1e-2, max_length=128, packing=packing, **QUIET)
    trainer = trl.SFTTrainer(model=adapter, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    if packing:  # a ~40-token conversation (Qwen2's template adds a system turn): three share a row
        assert max(len(r) for r in trainer.train_dataset["seq_lengths"]) > 1
    trainer.train()
    losses = _losses(trainer)
    assert len(losses) == 10 and losses[-1] < losses[0] - 1.0, losses
    assert model.checkpoint_blocks  # SFTConfig turns activation checkpointing on by default
    assert model.config.pad_token_id == tok.pad_token_id  # TRL's pad id reached our config through the view
    assert "sft" in adapter.model_tags and "trl" in adapter.model_tags
    trainer.save_model(str(tmp_path / "out"))
    back = lmstack.load_model(tmp_path / "out")
    assert _same_logits(back, model, len(tok)) == 0.0
    ours = lmstack.load_tokenizer(tmp_path / "out")  # the tokenizer TRL saved beside it
    assert ours.encode("the dog ran") == tok.encode("the dog ran")


@needs_trl
def test_trl_fused_head_loss_equals_our_forward_loss_with_padded_vocab_and_softcap():
    # TRL scores labels from base_model hidden states x get_output_embeddings().weight, never our head():
    # the padded rows and the soft-cap must come out the same as our own loss.
    model = Transformer(preset("llama-tiny", vocab_size=72, real_vocab_size=60, final_logit_softcap=5.0))
    adapter = HFTrainerAdapter(model)
    add_fused_lm_head(adapter)
    ids = torch.randint(0, 60, (3, 14))
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :4] = -100
    fused = adapter(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    ours = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert abs(fused.loss.item() - ours.loss.item()) < 1e-5
    plain = adapter(input_ids=ids, attention_mask=mask, labels=labels)  # without the flag: our forward
    assert torch.equal(plain.loss, ours.loss)
    grads = torch.autograd.grad(fused.loss, model.tok_emb.weight)[0]
    assert grads[60:].abs().max() == 0  # padded rows get no gradient, as in our head


def _dpo(tmp_path, precompute: bool):
    """3 DPO steps on 3 conversational preference rows; (log history, policy before, policy, reference)."""
    model, tok = _hf_dir(tmp_path)
    ref = None if precompute else copy.deepcopy(model).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def turn(role, text):
        return [{"role": role, "content": text}]
    rows = [{"prompt": turn("user", p), "chosen": turn("assistant", c), "rejected": turn("assistant", r)}
            for p, c, r in [("how are you", "good thank you", "the cat sat"), ("what dog", "the dog ran", "no"),
                            ("hello", "hello there", "maybe why")]]
    args = trl.DPOConfig(output_dir=str(tmp_path / "dpo"), max_steps=3, per_device_train_batch_size=3,
                         learning_rate=1e-2, max_length=64, precompute_ref_log_probs=precompute, **QUIET)
    ref_model = None if ref is None else HFTrainerAdapter(ref)
    trainer = trl.DPOTrainer(model=HFTrainerAdapter(model), ref_model=ref_model, args=args,
                             train_dataset=Dataset.from_list(rows), processing_class=tok)
    trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h], before, model, ref


@needs_trl
def test_dpo_trainer_trains_against_a_frozen_reference(tmp_path):
    logs, before, model, ref = _dpo(tmp_path / "copy", precompute=False)
    assert len(logs) == 3
    assert abs(logs[0]["loss"] - math.log(2)) < 1e-4  # policy == reference at step 0: the loss is ln 2
    assert logs[-1]["loss"] < logs[0]["loss"] - 0.05 and logs[-1]["rewards/margins"] > 0, logs
    assert all(torch.equal(v, before[k]) for k, v in ref.state_dict().items())  # the reference never moved
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # TRL's other reference: log-probs precomputed from the policy before training, no copy kept; same run
    precomputed, *_ = _dpo(tmp_path / "pre", precompute=True)
    assert [round(h["loss"], 4) for h in precomputed] == [round(h["loss"], 4) for h in logs]


def test_packed_rows_give_each_document_its_own_logits():
    # TRL's padding-free packing: one row, position_ids restarting at 0 where a document starts.
    model = Transformer(preset("llama-tiny", vocab_size=64)).eval()
    adapter = HFTrainerAdapter(model)
    a, b = torch.randint(0, 64, (1, 5)), torch.randint(0, 64, (1, 7))
    packed = torch.cat([a, b], 1)
    positions = torch.cat([torch.arange(5), torch.arange(7)])[None]
    with torch.no_grad():
        out = adapter(input_ids=packed, position_ids=positions, cu_seq_lens_q=torch.tensor([0, 5, 12]))
        hidden = adapter.base_model(packed, position_ids=positions).last_hidden_state
        alone = torch.cat([model(a), model(b)], 1)
        assert (out.logits - alone).abs().max() < 1e-5
        assert (model.head(hidden) - alone).abs().max() < 1e-5
        assert (model(packed)[:, 5:] - model(b)).abs().max() > 1e-3  # without doc ids, b would see a


def test_adapter_refuses_what_it_cannot_do_by_name():
    model = Transformer(preset("llama-tiny", vocab_size=64))
    adapter = HFTrainerAdapter(model)
    ids = torch.randint(0, 64, (2, 6))
    with pytest.raises(LmstackError, match="count 0, 1, 2, ... from the start of each packed document"):
        adapter(input_ids=ids, position_ids=torch.tensor([[0, 1, 3, 0, 1, 2]] * 2))
    with pytest.raises(LmstackError, match="unexpected argument 'past_key_values'"):
        adapter(input_ids=ids, past_key_values=None)
    gpt2 = HFTrainerAdapter(Transformer(preset("gpt2-tiny", vocab_size=64)))
    with pytest.raises(LmstackError, match="position='learned' would count on across documents"):
        gpt2(input_ids=ids, position_ids=torch.tensor([[0, 1, 2, 0, 1, 2]] * 2))
    assert gpt2(input_ids=ids, position_ids=torch.arange(6).expand(2, 6)).logits.shape == (2, 6, 64)
    with pytest.raises(LmstackError, match="every_n_layers=2"):
        adapter.activation_checkpointing_enable(every_n_layers=2)
    with pytest.raises(LmstackError, match="needs a causal LM head"):
        HFTrainerAdapter(Transformer(preset("bert-tiny")))
    other = HFTrainerAdapter(Transformer(preset("llama-tiny", vocab_size=64, n_layers=3)))
    with pytest.raises(LmstackError, match="another config"):
        adapter.load_state_dict(other.state_dict(), strict=False)
    with pytest.raises(LmstackError, match="not an lmstack config"):
        decode_config(torch.zeros(3), "f.safetensors")
    assert adapter.state_dict()[CONFIG_KEY].dtype == torch.uint8
