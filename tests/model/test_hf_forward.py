"""The HF-style forward: model(input_ids=, attention_mask=, labels=) -> .loss/.logits, as Trainer and TRL need."""
import pytest
import torch

import lmstack
from lmstack.errors import LmstackError
from lmstack.model import Transformer
from lmstack.model.outputs import CausalLMOutput
from lmstack.model.presets import preset

transformers = pytest.importorskip("transformers")
T = transformers


def test_plain_call_still_returns_logits_and_keyword_call_returns_output():
    torch.manual_seed(0)
    model = Transformer(preset("llama-tiny", vocab_size=64)).eval()
    ids = torch.randint(0, 64, (2, 9))
    logits = model(ids)
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, 9, 64)
    out = model(input_ids=ids)
    assert isinstance(out, CausalLMOutput) and out.loss is None
    assert torch.equal(out.logits, logits) and torch.equal(out[0], logits)
    with_loss = model(ids, labels=ids)  # labels alone switch to the output form too
    assert with_loss[0] is with_loss.loss and with_loss["logits"].shape == (2, 9, 64)
    with pytest.raises(LmstackError, match="once"):
        model(ids, input_ids=ids)
    with pytest.raises(LmstackError, match="labels need logits from the LM head"):
        model(input_ids=ids, labels=ids, return_hidden=True)


def test_loss_equals_transformers_llama_loss_on_the_same_weights(tmp_path):
    torch.manual_seed(0)
    hf = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2)).eval()
    hf.save_pretrained(tmp_path)
    ours = lmstack.load_model(tmp_path).eval()
    ids = torch.randint(0, 128, (3, 17))
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0  # right padding: those positions carry no target
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :5] = -100  # a prompt part without loss
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, labels=labels)
        out = ours(input_ids=ids, attention_mask=mask, labels=labels)
    assert abs(out.loss.item() - ref.loss.item()) < 1e-5
    real = mask.bool()
    assert (out.logits[real] - ref.logits[real]).abs().max() < 1e-4


def test_padded_vocab_rows_never_count_and_a_label_there_is_refused():
    torch.manual_seed(0)
    model = Transformer(preset("llama-tiny", vocab_size=64, real_vocab_size=50)).eval()
    ids = torch.randint(0, 50, (2, 8))
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
        logits = model(ids)[..., :50]  # the loss over the real rows only
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    assert abs(out.loss.item() - ref.item()) < 1e-5
    bad = ids.clone()
    bad[0, 3] = 55
    with pytest.raises(LmstackError, match="label id 55 is outside the model's vocabulary of 50"):
        model(input_ids=ids, labels=bad)


@pytest.mark.parametrize("name", ["llama-tiny", "gpt2-tiny", "mistral-tiny"])
def test_left_and_right_padding_give_the_unpadded_logits(name):
    torch.manual_seed(0)
    model = Transformer(preset(name)).eval()
    ids = torch.randint(1, 500, (1, 7))
    pad = torch.zeros(1, 3, dtype=torch.long)
    with torch.no_grad():
        ref = model(ids)
        left = model(input_ids=torch.cat([pad, ids], 1),
                     attention_mask=torch.cat([torch.zeros(1, 3), torch.ones(1, 7)], 1).long()).logits
        right = model(input_ids=torch.cat([ids, pad], 1),
                      attention_mask=torch.cat([torch.ones(1, 7), torch.zeros(1, 3)], 1).long()).logits
    assert not torch.isnan(left).any()
    assert (left[:, 3:] - ref).abs().max() < 1e-5  # learned positions (gpt2) count real tokens only
    assert (right[:, :7] - ref).abs().max() < 1e-5


def test_transformers_trainer_drives_our_model(tmp_path):
    torch.manual_seed(0)
    model = Transformer(preset("llama-tiny", vocab_size=64))
    rows = torch.randint(0, 64, (4, 12))
    data = [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r.clone()} for r in rows.repeat(4, 1)]
    args = T.TrainingArguments(output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=4,
                               learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no",
                               logging_steps=1, disable_tqdm=True)
    trainer = T.Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 12
    assert losses[-1] < losses[0] - 0.5, losses  # four sequences repeated: the loss must fall fast


def test_moe_loss_adds_the_weighted_router_loss_our_trainer_adds():
    torch.manual_seed(0)
    model = Transformer(preset("mixtral-tiny", vocab_size=64)).train()
    ids = torch.randint(0, 64, (2, 10))
    out = model(input_ids=ids, labels=ids)
    ce = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    assert out.aux_loss.item() > 0 and torch.allclose(out.loss, ce + out.aux_loss)
    assert "aux_loss" not in Transformer(preset("llama-tiny", vocab_size=64))(input_ids=ids, labels=ids)
