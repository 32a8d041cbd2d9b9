"""Distillation (lmstack.compress.distill and `lmstack distill`): the KD loss against a hand computation, its zero
and top-k limits, gradients reaching only the student, training lowering it, sequence-KD targets being the teacher's
own tokens, the vocabulary check, and the command end to end on a tiny model."""
from __future__ import annotations

import json
import math
from functools import lru_cache

import pytest
import torch

import lmstack
from lmstack.adapt.sft import encode_rows, pack_examples
from lmstack.cli import main, run
from lmstack.compress.distill import (LOG_ZERO, LogitKD, TeacherTargets, kd_loss, teacher_examples, teacher_targets,
                                      train_student)
from lmstack.compress.distill_cli import build_student, check_same_vocab
from lmstack.errors import LmstackError
from lmstack.model.config import ModelConfig
from lmstack.model.hf_io import load_model, save_model
from lmstack.model.reference_decode import reference_decode
from lmstack.model.transformer import Transformer
from lmstack.tokenizer import load_tokenizer, train_tokenizer
from lmstack.train.config import TrainConfig
from lmstack.train.optim import OptimizerConfig, ScheduleConfig
from lmstack.world import World

pytestmark = pytest.mark.usefixtures("one_thread")


@lru_cache(maxsize=None)
def chat_rows() -> tuple[dict, ...]:
    rows = World(seed=0, n_people=8).corpus("chat", split="train")
    return tuple(r for r in rows if r.get("kind") in ("qa", "arithmetic", "instruction"))[:48]


@lru_cache(maxsize=None)
def tokenizer():
    return train_tokenizer(texts=[r["text"] for r in chat_rows()], type="bpe", vocab_size=400, show_progress=False,
                           special_tokens="chat")


def tiny(seed: int, d_model: int = 48, n_layers: int = 2, vocab: int | None = None, **kw) -> Transformer:
    tok = tokenizer()
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=vocab or tok.vocab_size, d_model=d_model, n_layers=n_layers, n_heads=4,
                                   n_kv_heads=2, max_seq_len=256, hf_model_type="llama", bos_token_id=tok.bos_id,
                                   eos_token_id=tok.eos_id, pad_token_id=tok.pad_id, **kw))


def batch_of(rows, n: int = 4) -> dict[str, torch.Tensor]:
    tok = tokenizer()
    examples, _ = encode_rows(tok, list(rows)[:n], max_len=129)
    return pack_examples(examples, 128, tok.pad_id, strategy="none")


# ---- the loss
def test_kd_loss_equals_a_hand_computation():
    t = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    s = torch.tensor([[0.0, 1.0, 0.0], [1.0, -2.0, 0.0]])
    T = 2.0
    want = 0.0
    for tr, sr in zip(t.tolist(), s.tolist()):
        zt = sum(math.exp(v / T) for v in tr)
        zs = sum(math.exp(v / T) for v in sr)
        p = [math.exp(v / T) / zt for v in tr]
        q = [math.exp(v / T) / zs for v in sr]
        want += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    want = want / 2 * T * T
    got = kd_loss(s, teacher_targets(t, temperature=T), temperature=T)
    assert got.item() == pytest.approx(want, rel=1e-5)
    # top-1 plus "the rest": a two-outcome KL, by hand for the first row
    p = math.exp(2.0 / T) / sum(math.exp(v / T) for v in (2.0, 0.0, -1.0))
    q = math.exp(0.0 / T) / sum(math.exp(v / T) for v in (0.0, 1.0, 0.0))
    two = (p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))) * T * T
    got1 = kd_loss(s[:1], teacher_targets(t[:1], temperature=T, topk=1), temperature=T)
    assert got1.item() == pytest.approx(two, rel=1e-5)
    assert got1.item() < got.item() * 2  # sanity: the coarse KL of row 0 is below the full KL sum


def test_kd_loss_is_zero_when_student_is_teacher():
    z = torch.randn(10, 50) * 3
    for k in (0, 5, 50):
        assert kd_loss(z, teacher_targets(z, 2.0, topk=k), 2.0).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_loss(z + 1.0, teacher_targets(z, 1.0), 1.0).item() == pytest.approx(0.0, abs=1e-6)  # shift-invariant
    assert kd_loss(z.flip(-1), teacher_targets(z, 1.0), 1.0).item() > 0.1


def test_topk_with_k_equal_vocab_is_full_kd_and_smaller_k_is_a_lower_bound():
    t, s = torch.randn(12, 30) * 2, torch.randn(12, 30) * 2
    s_full, s_topk = s.clone().requires_grad_(), s.clone().requires_grad_()
    full = kd_loss(s_full, teacher_targets(t, 2.0), 2.0)
    top = kd_loss(s_topk, teacher_targets(t, 2.0, topk=30), 2.0)
    full.backward()
    top.backward()
    assert top.item() == pytest.approx(full.item(), rel=1e-5)
    assert torch.allclose(s_full.grad, s_topk.grad, atol=1e-6)
    targets = teacher_targets(t, 2.0, topk=30)
    assert torch.all(targets.rest_logp <= LOG_ZERO / 2)  # nothing left outside the top-k
    for k in (1, 4, 16):  # coarser outcomes can only lose information (data-processing inequality)
        assert kd_loss(s, teacher_targets(t, 2.0, topk=k), 2.0).item() <= full.item() + 1e-6
    # the kept probabilities are the teacher's exact ones, and with the rest they sum to 1
    tk = teacher_targets(t, 2.0, topk=4)
    assert torch.allclose(tk.logp.exp().sum(-1) + tk.rest_logp.exp(), torch.ones(12), atol=1e-5)
    assert torch.allclose(tk.logp, (t / 2.0).log_softmax(-1).gather(-1, tk.index))


def test_padded_vocabulary_rows_give_finite_losses_and_gradients():
    model = tiny(0, real_vocab_size=tokenizer().vocab_size - 20)
    z = model(torch.tensor([[1, 5, 9, 12]]))[0]
    s = (z * 0.5).detach().requires_grad_()
    for k in (0, 8, z.shape[-1]):
        loss = kd_loss(s, teacher_targets(z, 2.0, topk=k), 2.0)
        loss.backward()
        assert math.isfinite(loss.item()) and torch.isfinite(s.grad).all()
        s.grad = None


def test_bad_arguments_are_named():
    with pytest.raises(LmstackError, match="temperature"):
        teacher_targets(torch.zeros(2, 3), 0.0)
    with pytest.raises(LmstackError, match="vocabulary"):
        kd_loss(torch.zeros(2, 4), TeacherTargets(torch.zeros(2, 3)))
    with pytest.raises(LmstackError, match="alpha"):
        LogitKD(tiny(0), alpha=1.5)


# ---- the objective and the loop
def test_gradient_reaches_only_the_student_and_alpha_mixes_ce():
    teacher, student = tiny(0, d_model=64), tiny(1, d_model=32)
    batch = batch_of(chat_rows())
    loss, m = LogitKD(teacher, temperature=2.0, alpha=0.7, topk=16).loss(student, batch)
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())
    assert sum(float(p.grad.abs().sum()) for p in student.parameters()) > 0
    assert loss.item() == pytest.approx(0.7 * m["kd"] + 0.3 * m["ce"], rel=1e-5)
    pure, m1 = LogitKD(teacher, temperature=2.0, alpha=1.0).loss(student, batch)
    assert pure.item() == pytest.approx(m1["kd"], rel=1e-6) and m1["n_tokens"] == int(batch["loss_mask"].sum())


def test_a_few_steps_lower_the_kd_loss(tmp_path):
    teacher, student = tiny(0, d_model=64), tiny(1, d_model=32)
    rows = chat_rows()
    examples, _ = encode_rows(tokenizer(), rows, max_len=129)
    probe = batch_of(rows, 8)
    objective = LogitKD(teacher, temperature=2.0, alpha=1.0)
    with torch.no_grad():
        before = objective.loss(student, probe)[1]["kd"]
    summary = train_student(student, objective, examples, [], tmp_path / "run",
                            TrainConfig(steps=25, eval_every=0, log_every=5, progress=False, keep_checkpoints=1),
                            OptimizerConfig(name="adamw", lr=3e-3, weight_decay=0.0),
                            ScheduleConfig(name="constant", warmup_steps=0), batch_size=4, seq_len=128,
                            pad_id=tokenizer().pad_id)
    with torch.no_grad():
        after = objective.loss(student, probe)[1]["kd"]
    assert summary["steps"] == 25
    assert after < 0.7 * before, (before, after)


# ---- sequence-level KD
def test_sequence_kd_targets_are_the_teachers_tokens():
    tok = tokenizer()
    teacher = tiny(0, d_model=64)
    rows = list(chat_rows()[:10]) + [{"text": "plain text has no prompt"}]
    examples, readable, stats = teacher_examples(teacher, tok, rows, max_new_tokens=12, batch_size=3)
    assert stats.rows == 11 and stats.skipped_no_prompt == 1 and stats.answered == 10 == len(examples)
    eot = tok.end_of_turn_ids()[0]
    for row, ex, read in zip(rows, examples, readable):
        user = row["messages"][:-1]  # every turn before the (last) assistant turn, the system prompt included
        assert row["messages"][-1]["role"] == "assistant"
        prompt = tok.apply_chat_template(user, add_generation_prompt=True)[0]
        alone = reference_decode(teacher, torch.tensor([prompt]), 12, eos_id=eot)[0, len(prompt):].tolist()
        if eot in alone:
            alone = alone[:alone.index(eot) + 1]
        assert ex.ids[:len(prompt)] == prompt and ex.ids[len(prompt):] == alone  # one by one == batched
        assert ex.mask == [0] * len(prompt) + [1] * len(alone)
        assert read["messages"][-1]["role"] == "assistant" and read["messages"][:-1] == user
    # sampling (seeded) gives other answers than greedy decoding
    sampled, _, _ = teacher_examples(teacher, tok, rows[:4], max_new_tokens=12, temperature=1.5, seed=3)
    assert [e.ids for e in sampled] != [e.ids for e in examples[:4]]


# ---- vocabularies
def test_a_vocabulary_mismatch_is_refused(tmp_path):
    tok = tokenizer()
    teacher = tiny(0)
    with pytest.raises(LmstackError, match="one shared tokenizer and vocabulary"):
        check_same_vocab(teacher, tiny(1, vocab=tok.vocab_size + 8), tok)
    # as many tokens, other merges: trained on another world's text
    other_text = [r["text"] for r in World(seed=5, n_people=8).corpus("chat", split="train")[:48]]
    other = train_tokenizer(texts=other_text, type="bpe", vocab_size=tok.vocab_size, show_progress=False,
                            special_tokens="chat")
    assert other.vocab_size == tok.vocab_size and other.get_vocab() != tok.get_vocab()
    with pytest.raises(LmstackError, match="token -> id maps differ"):
        check_same_vocab(teacher, tiny(1), tok, other)
    check_same_vocab(teacher, tiny(1, d_model=32), tok, tok)  # the same vocabulary passes
    with pytest.raises(LmstackError, match="teacher's vocab_size"):
        build_student(teacher, "llama-tiny", {"vocab_size": "512"})
    # through the command: a student directory with another vocabulary
    t_dir = save_model(teacher, tmp_path / "teacher", tokenizer=tok)
    s_dir = save_model(tiny(1, vocab=tok.vocab_size + 8), tmp_path / "student")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in chat_rows()[:4]))
    with pytest.raises(LmstackError, match="shared tokenizer"):
        run(["distill", "--teacher", str(t_dir), "--student", str(s_dir), "--data", str(data), "--out",
             str(tmp_path / "o"), "--train.steps", "1"])
    assert not (tmp_path / "o" / "model").exists()


# ---- the command end to end
@pytest.mark.parametrize("method", ["logits", "sequence"])
def test_distill_command_end_to_end(tmp_path, method, capsys):
    tok = tokenizer()
    t_dir = save_model(tiny(0, d_model=64), tmp_path / "teacher", tokenizer=tok)
    before = {p.name: p.read_bytes() for p in t_dir.iterdir()}
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in chat_rows()[:24]))
    out = tmp_path / "student"
    argv = ["distill", "--teacher", str(t_dir), "--student-preset", "llama-tiny", "--student_overrides", "d_model=32",
            "--student_overrides", "n_layers=1", "--data", str(data), "--method", method, "--out", str(out),
            "--temperature", "2", "--alpha", "0.5", "--topk", "8", "--max_tokens", "8", "--train.steps", "4",
            "--train.progress", "false", "--batch_size", "2", "--seq_len", "128"]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["student_params"] < summary["teacher_params"]
    assert summary["flops_ratio"] > 1 and summary["teacher_flops"] > 0
    model = load_model(out / "model")
    assert model.config.n_layers == 1 and model.config.d_model == 32 and model.config.vocab_size == tok.vocab_size
    assert load_tokenizer(out / "model").get_vocab() == tok.get_vocab()
    assert (out / "model" / "generation_config.json").is_file()
    llm = lmstack.LLM(str(out / "model"))
    gen = llm.generate(["Hello"], lmstack.SamplingParams(max_tokens=3, temperature=0.0))
    assert len(gen[0].outputs[0].token_ids) >= 1
    assert {p.name: p.read_bytes() for p in t_dir.iterdir()} == before  # the teacher is only read
    if method == "sequence":
        answers = [json.loads(line) for line in (out / "teacher_answers.jsonl").read_text().splitlines()]
        assert len(answers) == summary["report"]["teacher"]["answered"] > 0
    else:
        assert summary["report"]["data"]["kept"] > 0


def test_bad_command_lines_are_named(tmp_path):
    tok = tokenizer()
    t_dir = save_model(tiny(0), tmp_path / "teacher", tokenizer=tok)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in chat_rows()[:4]))
    base = ["distill", "--teacher", str(t_dir), "--data", str(data), "--train.steps", "1"]
    with pytest.raises(LmstackError, match="exactly one of --student"):
        run(base + ["--out", str(tmp_path / "o")])
    with pytest.raises(LmstackError, match="exactly one of --student"):
        run(base + ["--student", str(t_dir), "--student_preset", "llama-tiny", "--out", str(tmp_path / "o")])
    with pytest.raises(LmstackError, match="inside the teacher directory"):
        run(base + ["--student_preset", "llama-tiny", "--out", str(t_dir / "student")])
    with pytest.raises(LmstackError, match="--teacher directory not found"):
        run(["distill", "--teacher", str(tmp_path / "nope"), "--data", str(data), "--student_preset", "llama-tiny"])
    with pytest.raises(LmstackError, match="alpha"):
        run(base + ["--student_preset", "llama-tiny", "--alpha", "2", "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists() and not (t_dir / "student").exists()
