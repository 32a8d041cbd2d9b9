"""lmstack.align: reward models, offline preference optimisation (DPO, cDPO, IPO, KTO), rule-based rewards,
online RL (PPO, GRPO, RLOO, rejection-sampling fine-tuning) with engine rollouts. The speedrun's alignment
stage, which chains them, lives in lmstack.stages.align.

Modules (one idea each):
    logprobs.py         completion log-probs of a policy; prompt/completion encoding; tokenizer check
    preference_data.py  paired and unpaired (KTO) JSONL with counted, reported skips
    losses.py           DPO / cDPO / robust / IPO / KTO / Bradley-Terry losses (PAIR_LOSSES registry)
    rl_math.py          KL estimators and controllers, GAE, whitening, PPO clipped losses, group baselines
    rewards/            verifiable, factuality, safety, heuristic rewards and their mixture
    reward_model.py     scalar-head reward model, Bradley-Terry training, pairwise accuracy
    dpo.py              the offline preference trainer (frozen reference, adapters-off, or precomputed)
    steps.py            the loop pieces both trainers share (batches, AdamW + schedule, one step)
    rollout.py          prompt records, engine rollouts from the live policy, greedy held-out evaluation
    online.py           the online loop every RL method shares (reference, reward, eval, metrics, time budget)
    grpo.py             GRPO and RLOO (group baselines, clipped ratio, optional k3 KL term)
    ppo.py              PPO-RLHF: value head, per-token KL penalty, adaptive controller, GAE, whitening
    rft.py              rejection-sampling fine-tuning in iterative rounds
    self_consistency.py majority vote over sampled chains; low agreement flags uncertainty
    self_play.py        asker/answerer self-play dialogue rewarded by the task's verifier
    config.py           AlignConfig, the `lmstack align` run config
    commands.py         `lmstack align --method rm|dpo|cdpo|ipo|kto|ppo|grpo|rloo|rft ...`

Usage:
    from lmstack.align.losses import preference_loss
    from lmstack.align.dpo import PreferenceTrainer
    from lmstack.align.reward_model import RewardModel, train_reward_model
    from lmstack.align.grpo import GroupTrainer          # online: trainer.fit(prompt_records, held_out_records)
"""
