"""Multi-agent self-play dialogue: an asker and an answerer (the same weights in two roles) talk about a
synthetic-world task, and the task's verifier rewards the answerer.

A dialogue on one task record (an arithmetic problem, or a person and an attribute):
    asker:    the question                          (user turn)
    answerer: a reply, sampled from the policy       (assistant turn; the only tokens that are trained)
    -> the verifier scores the reply (math: the `#### n` is right; qa: the world fact appears in it).
       Right: the dialogue ends, solved. Wrong: the asker follows up ("That is not right. ..." + the
       question again) and the answerer tries again, with the whole conversation in its context
       (the chat template's multi-turn form, as in the world's multi_turn records),
    ... until max_turns answerer turns or the context is full.
The dialogue's reward is the verifier's score of the answerer's last turn (1 = solved). Several dialogues
per task form a group and get GRPO's group-normalised advantages (rl_math.group_advantages); every
answerer token of a dialogue shares its advantage, asker tokens have none (they are context). Solving in
fewer turns also ends the dialogue sooner, so dialogue length is a second readout of learning.

Askers (ASKERS): "template" asks the record's own question and templated follow-ups -- at the 4M-parameter
scale of this project a model-written question is mostly noise, so this is the honest default and the
"self-play" is then one trained agent against a fixed scripted partner. "policy" lets the policy itself
write the opening question from a role prompt ("Ask a question about the birth city of Ada Quill."),
sampled and never trained; follow-ups stay templated. The verifier always checks against the task record,
so a bad question makes the task harder, never easier.

Two learning agents (MultiAgentTrainer): the asker is a second model with its own weights and optimizer (a copy
of the starting policy unless given). It writes each opening question from the role prompt, and both agents
learn from the same dialogues with their own rewards:
    answerer  r = 1 when the dialogue is solved (as above)
    asker     r = solved · faithful, faithful = the question carries exactly the problem's numbers (as a
              multiset): a question that drops or changes a number, or leaks the answer, earns nothing even
              if the answerer happens to be right -- the asker is paid for posing the task, not for solving it
Each agent's tokens get GRPO advantages of its own reward over the group_size dialogues of a task (a
cooperative game with distinct payoffs; no critic).

Usage:
    from lmstack.align.self_play import SelfPlayTrainer, play, answer_in_reply
    dialogues = play(policy, tok, records, reward, n=1, max_turns=3, temperature=0.0)   # greedy
    cfg = AlignConfig(method="grpo", group_size=8, prompts_per_step=4, train={"steps": 20}, optim={"lr": 1e-4})
    summary = SelfPlayTrainer(policy, tok, cfg, build_reward("math")).fit(train, val)
    summary["eval_before"]["mean_turns"], summary["eval_after"]["mean"]     # dialogue length, accuracy
    summary = MultiAgentTrainer(policy, tok, cfg, build_reward("math")).fit(train, val)     # both agents learn
    summary["eval_after"]["mean"], summary["eval_after"]["asker_mean"]                      # each agent's reward
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
import math
import re
from typing import Callable, Sequence

import torch

from lmstack.align.logprobs import token_logprobs
from lmstack.align.online import OnlineTrainer
from lmstack.align.rl_math import group_advantages, group_stats, kl_k3, masked_mean, ppo_policy_loss
from lmstack.align.rollout import mean_stderr, prompt_text, stop_ids
from lmstack.align.steps import Stepper
from lmstack.errors import LmstackError
from lmstack.infer.llm import LLM
from lmstack.infer.sampling_params import SamplingParams

Reward = Callable[[str, str, dict], float]


def answer_in_reply(prompt: str, completion: str, record: dict) -> float:
    """qa verifier: 1 when the record's fact (`answer` text) appears in the reply (case and spacing ignored)."""
    answer = record.get("answer")
    if not isinstance(answer, str) or not answer.strip():
        return float("nan")
    squash = lambda s: " ".join(s.lower().split())  # noqa: E731
    return float(squash(answer) in squash(completion))


@dataclass
class Dialogue:
    """One conversation. ids/mask are the answerer's view of it in the chat template; mask marks the
    tokens the answerer sampled (its replies and their end tokens)."""

    record: dict
    questions: list[str] = field(default_factory=list)
    replies: list[str] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    answer_tokens: int = 0
    solved: bool = False
    done: bool = False
    stop: str = ""
    """Why it ended: solved, max_turns, context (no room for another turn)."""
    asker_ids: list[int] = field(default_factory=list)
    """A model asker's view: its role prompt and the question it sampled (empty for the template asker)."""
    asker_mask: list[int] = field(default_factory=list)
    """1 on the tokens the asker sampled."""

    @property
    def turns(self) -> int:
        return len(self.replies)

    @property
    def reward(self) -> float:
        return self.rewards[-1] if self.rewards else float("nan")

    def messages(self) -> list[dict]:
        out = []
        for q, a in zip(self.questions, self.replies + [None]):
            out.append({"role": "user", "content": q})
            if a is not None:
                out.append({"role": "assistant", "content": a})
        return out


# ---- askers ---------------------------------------------------------------------------------------------
FOLLOW_UP = "That is not right. Please try again: {question}"


def template_opening(policy, tok, dialogues: list[Dialogue], seed: int, temperature: float) -> list[str]:
    return [prompt_text(d.record) for d in dialogues]


def role_prompt(record: dict) -> str:
    """What the policy asker is told to ask about."""
    if record.get("person") and record.get("attribute"):
        return f"Ask a question about the {str(record['attribute']).replace('_', ' ')} of {record['person']}."
    return f"Ask me this question: {prompt_text(record)}"


def policy_opening(policy, tok, dialogues: list[Dialogue], seed: int, temperature: float) -> list[str]:
    """The policy writes each opening question from a role prompt (sampled, never trained)."""
    contexts = [tok.apply_chat_template([{"role": "user", "content": role_prompt(d.record)}],
                                        add_generation_prompt=True)[0] for d in dialogues]
    outs = sample_replies(policy, tok, contexts, 48, temperature, seed)
    for d, ctx, (ids, _, _) in zip(dialogues, contexts, outs):
        d.asker_ids, d.asker_mask = list(ctx) + list(ids), [0] * len(ctx) + [1] * len(ids)
    # An empty question would be an empty user turn; fall back to the role prompt's text (and say so in docs).
    return [text.strip() or role_prompt(d.record) for (_, text, _), d in zip(outs, dialogues)]


ASKERS: dict[str, Callable[..., list[str]]] = {"template": template_opening, "policy": policy_opening}
"""asker name -> f(policy, tok, dialogues, seed, temperature) -> opening questions."""


# ---- playing --------------------------------------------------------------------------------------------
@torch.no_grad()
def sample_replies(policy: torch.nn.Module, tok, contexts: list[list[int]], max_new_tokens: int,
                   temperature: float, seed: int) -> list[tuple[list[int], str, bool]]:
    """One reply per context with the engine: (ids incl. the end token when it stopped, text, finished)."""

    limit = policy.config.max_seq_len
    stops = stop_ids(tok, "chat")
    # A reply never writes the template's markup (a turn opener mid-reply would break the dialogue's layout,
    # which the next turn is appended to): every special token but the ones that end the reply is banned.
    markup = {t: -100.0 for t in tok.special_ids if t not in stops and t < policy.config.vocab_size}
    params = [SamplingParams(n=1, temperature=temperature, max_tokens=max(1, min(max_new_tokens, limit - len(c))),
                             stop_token_ids=stops, skip_special_tokens=True, logit_bias=markup or None)
              for c in contexts]
    was_training, p0 = policy.training, next(policy.parameters())
    try:
        llm = LLM(policy, tokenizer=tok, max_num_seqs=min(64, len(contexts)), dtype=p0.dtype, device=str(p0.device),
                  seed=seed, max_batched_tokens=max(2048, limit))
        outs = llm.generate(contexts, params)
    finally:
        policy.train(was_training)
    return [(list(o.outputs[0].token_ids), o.outputs[0].text, o.outputs[0].finish_reason == "stop") for o in outs]


def play(policy: torch.nn.Module, tok, records: Sequence[dict], reward: Reward, n: int = 1, max_turns: int = 3,
         temperature: float = 1.0, max_new_tokens: int = 96, seed: int = 0, asker: str = "template",
         solved_at: float = 1.0, asker_policy: torch.nn.Module | None = None) -> list[Dialogue]:
    """n dialogues per record (consecutive), each up to max_turns answerer turns. temperature 0 = greedy.
    asker_policy: the model that writes opening questions for asker='policy' (default: the policy itself)."""
    if asker not in ASKERS:
        raise LmstackError(f"asker={asker!r} is not allowed; choose one of {', '.join(ASKERS)}")
    if max_turns < 1 or n < 1:
        raise LmstackError(f"max_turns and n must be >= 1, got {max_turns} and {n}")
    if temperature == 0 and n > 1:
        raise LmstackError("greedy dialogues (temperature=0) are identical; use n=1 or temperature > 0")
    if tok.chat_template is None or not tok.end_of_turn_ids():
        raise LmstackError("self-play needs a tokenizer with a chat template that ends turns with a token")
    end_of_turn = tok.end_of_turn_ids()[0]
    dialogues = [Dialogue(r) for r in records for _ in range(n)]
    limit = policy.config.max_seq_len
    openings = ASKERS[asker](asker_policy if asker_policy is not None else policy, tok, dialogues, seed, temperature)
    for turn in range(max_turns):
        active = []
        for i, d in enumerate(dialogues):
            if d.done:
                continue
            q = openings[i] if turn == 0 else FOLLOW_UP.format(question=d.questions[0])
            if turn == 0:
                new = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)[0]
            else:  # the new user turn (and the assistant opener) is appended to the ids as the template renders it
                history = [m for qa in zip(d.questions, d.replies) for m in (
                    {"role": "user", "content": qa[0]}, {"role": "assistant", "content": qa[1]})]
                new = tok.append_turn_ids(history, [{"role": "user", "content": q}])
            if len(d.ids) + len(new) + 1 > limit:
                d.done, d.stop = True, "context"
                continue
            d.questions.append(q)
            d.ids += new
            d.mask += [0] * len(new)
            active.append(d)
        if not active:
            break
        outs = sample_replies(policy, tok, [d.ids for d in active], max_new_tokens, temperature, seed * 1009 + turn)
        for d, (ids, text, finished) in zip(active, outs):
            d.ids += ids
            d.mask += [1] * len(ids)
            d.answer_tokens += len(ids)
            if not finished:  # a cut reply is closed for the next turn; the closing token was not sampled
                d.ids.append(end_of_turn)
                d.mask.append(0)
            d.replies.append(text)
            score = float(reward(d.questions[-1], text, d.record))
            d.rewards.append(score)
            if math.isfinite(score) and score >= solved_at:
                d.done, d.solved, d.stop = True, True, "solved"
            elif turn + 1 == max_turns:
                d.done, d.stop = True, "max_turns"
    return dialogues


def dialogue_stats(dialogues: Sequence[Dialogue]) -> dict[str, float]:
    """Answerer accuracy (solved within the turns, with stderr), first-turn accuracy, and dialogue length."""
    solved = torch.tensor([float(d.solved) for d in dialogues if math.isfinite(d.reward)])
    mean, se, count = mean_stderr(solved)
    first = [float(d.rewards[0] >= 1.0) for d in dialogues if d.rewards and math.isfinite(d.rewards[0])]
    k = max(1, len(dialogues))
    return {"mean": mean, "stderr": se, "n": count, "first_turn_accuracy": sum(first) / max(1, len(first)),
            "mean_turns": sum(d.turns for d in dialogues) / k,
            "mean_answer_tokens": sum(d.answer_tokens for d in dialogues) / k,
            "mean_dialogue_tokens": sum(len(d.ids) for d in dialogues) / k}


def dialogue_batch(dialogues: Sequence[Dialogue], pad_id: int | None, device) -> dict[str, torch.Tensor]:
    """Right-padded input_ids/attention_mask/completion_mask (= the answerer's tokens), logprobs.py layout."""
    t = max(len(d.ids) for d in dialogues)
    ids = torch.full((len(dialogues), t), 0 if pad_id is None else pad_id, dtype=torch.long)
    att = torch.zeros((len(dialogues), t), dtype=torch.long)
    comp = torch.zeros((len(dialogues), t), dtype=torch.long)
    for i, d in enumerate(dialogues):
        ids[i, :len(d.ids)] = torch.tensor(d.ids)
        att[i, :len(d.ids)] = 1
        comp[i, :len(d.ids)] = torch.tensor(d.mask)
    return {"input_ids": ids.to(device), "attention_mask": att.to(device), "completion_mask": comp.to(device)}


class SelfPlayTrainer(OnlineTrainer):
    """Policy gradient on the answerer's turns of self-play dialogues (GRPO advantages over group_size
    dialogues per task). Extra settings read from the config when present: max_turns (3), asker ('template')."""

    method = "self_play"

    @property
    def max_turns(self) -> int:
        return int(getattr(self.cfg, "max_turns", 3))

    @property
    def asker(self) -> str:
        return str(getattr(self.cfg, "asker", "template"))

    def train_step(self, records: list[dict], step: int) -> dict[str, float]:
        cfg = self.cfg
        dialogues = play(self.policy, self.tok, records, self.reward, cfg.group_size, self.max_turns,
                         cfg.temperature, cfg.max_tokens, cfg.train.seed * 1_000_003 + step, self.asker)
        rewards = torch.tensor([d.reward for d in dialogues])
        adv, valid = group_advantages(rewards, cfg.group_size)
        stats = {**group_stats(rewards, cfg.group_size), **{f"train_{k}": v for k, v in
                                                            dialogue_stats(dialogues).items() if k != "n"}}
        informative = valid & (adv != 0)
        stats["informative_fraction"] = float(informative.float().mean())
        if not bool(informative.any()) and not cfg.kl_coef:
            stats["skipped"] = 1.0  # no group with both solved and unsolved dialogues: nothing to learn
            return stats
        batch = dialogue_batch(dialogues, self.tok.pad_id, self.device)
        mask = batch["completion_mask"][:, 1:].float() * valid.to(self.device, torch.float32)[:, None]
        logps = self.logps(batch)
        loss, st = ppo_policy_loss(logps, logps.detach(), adv.to(self.device)[:, None].expand_as(logps), mask,
                                   cfg.clip)  # on-policy: ratio 1, so this is REINFORCE with the group baseline
        if cfg.kl_coef:
            kl = masked_mean(kl_k3(logps, self.ref_logps(batch)), mask)
            loss = loss + cfg.kl_coef * kl
            st["kl"] = float(kl.detach())
        st.update(self.stepper.step(loss, self.opt_steps))
        self.opt_steps += 1
        stats.update(st, loss=float(loss.detach()))
        return stats

    def optimizer_steps_per_rl_step(self) -> int:
        return 1

    def evaluate(self, records: Sequence[dict]) -> dict[str, float]:
        """Greedy dialogues on the first eval_prompts records: accuracy (mean, stderr, n) and dialogue length."""
        if not records or not self.cfg.eval_prompts:
            return {}
        dialogues = play(self.policy, self.tok, list(records)[:self.cfg.eval_prompts], self.reward, 1,
                         self.max_turns, 0.0, self.cfg.max_tokens, self.cfg.train.seed, self.asker)
        return dialogue_stats(dialogues)


NUMBER = re.compile(r"\d+")


def faithful(question: str, record: dict) -> float:
    """1 when the question carries exactly the numbers of the record's own question (as a multiset), else 0."""
    return float(sorted(NUMBER.findall(question)) == sorted(NUMBER.findall(prompt_text(record))))


def asker_rewards(dialogues: Sequence[Dialogue]) -> torch.Tensor:
    """The asker's payoff per dialogue: solved · faithful (NaN where the dialogue has no score)."""
    out = []
    for d in dialogues:
        if not d.questions or not math.isfinite(d.reward):
            out.append(float("nan"))  # the dialogue never got a scored reply
        else:
            out.append(float(d.solved) * faithful(d.questions[0], d.record))
    return torch.tensor(out)


def asker_batch(dialogues: Sequence[Dialogue], pad_id: int | None, device) -> dict[str, torch.Tensor]:
    """The askers' role prompts and sampled questions in logprobs.py's layout (completion_mask = question)."""
    views = [Dialogue(d.record, ids=d.asker_ids, mask=d.asker_mask) for d in dialogues]
    return dialogue_batch(views, pad_id, device)


class MultiAgentTrainer(SelfPlayTrainer):
    """Self-play with two learning agents: the answerer (self.policy) and the asker (self.asker, its own weights
    and optimizer at the same lr). See the module docstring for the payoffs."""

    method = "multi_agent"

    def __init__(self, policy, tokenizer, cfg, reward, reference=None, asker: torch.nn.Module | None = None,
                 log=print):
        super().__init__(policy, tokenizer, cfg, reward, reference, log)
        self.asker_model = (copy.deepcopy(policy) if asker is None else asker).to(self.device)
        self.asker_stepper = None

    @property
    def asker(self) -> str:
        return "policy"  # the asker model writes every opening question

    def _play(self, records, n, temperature, seed) -> list[Dialogue]:
        return play(self.policy, self.tok, records, self.reward, n, self.max_turns, temperature,
                    self.cfg.max_tokens, seed, "policy", asker_policy=self.asker_model)

    def train_step(self, records: list[dict], step: int) -> dict[str, float]:
        cfg = self.cfg
        if self.asker_stepper is None:
            self.asker_stepper = Stepper.from_config(self.asker_model, cfg)
        dialogues = self._play(records, cfg.group_size, cfg.temperature, cfg.train.seed * 1_000_003 + step)
        stats = {f"train_{k}": v for k, v in dialogue_stats(dialogues).items() if k != "n"}
        for role, rewards, model, batch_fn, stepper in (
                ("answerer", torch.tensor([d.reward for d in dialogues]), self.policy, dialogue_batch, self.stepper),
                ("asker", asker_rewards(dialogues), self.asker_model, asker_batch, self.asker_stepper)):
            adv, valid = group_advantages(rewards, cfg.group_size)
            finite = torch.isfinite(rewards)
            stats[f"{role}_reward"] = float(rewards[finite].mean()) if bool(finite.any()) else float("nan")
            informative = valid & (adv != 0)
            stats[f"{role}_informative_fraction"] = float(informative.float().mean())
            if not bool(informative.any()):
                continue  # no group with both outcomes: nothing for this agent to learn this step
            batch = batch_fn(dialogues, self.tok.pad_id, self.device)
            mask = batch["completion_mask"][:, 1:].float() * valid.to(self.device, torch.float32)[:, None]
            logps = token_logprobs(model, batch, cfg.temperature)
            loss, st = ppo_policy_loss(logps, logps.detach(), adv.to(self.device)[:, None].expand_as(logps), mask,
                                       cfg.clip)  # on-policy REINFORCE with the group baseline
            if role == "answerer" and cfg.kl_coef:
                kl = masked_mean(kl_k3(logps, self.ref_logps(batch)), mask)
                loss = loss + cfg.kl_coef * kl
                st["kl"] = float(kl.detach())
            st.update(stepper.step(loss, self.opt_steps))
            stats.update({f"{role}_{k}": v for k, v in st.items()}, **{f"{role}_loss": float(loss.detach())})
        stats["reward_mean"] = stats["answerer_reward"]
        self.opt_steps += 1
        return stats

    def evaluate(self, records: Sequence[dict]) -> dict[str, float]:
        """Greedy dialogues (greedy asker too): the answerer's accuracy (mean, stderr, n), the asker's reward
        (asker_mean, asker_stderr) and how often its question was faithful."""
        if not records or not self.cfg.eval_prompts:
            return {}
        dialogues = self._play(list(records)[:self.cfg.eval_prompts], 1, 0.0, self.cfg.train.seed)
        out = dialogue_stats(dialogues)
        mean, se, n = mean_stderr(asker_rewards(dialogues))
        out.update(asker_mean=mean, asker_stderr=se, asker_n=n,
                   faithful=sum(faithful(d.questions[0], d.record) for d in dialogues if d.questions) / len(dialogues))
        return out
