"""lmstack.align: reward models, offline preference optimisation (DPO, cDPO, IPO, KTO), rule-based rewards,
and the maths of online RL (KL control, GAE, PPO objectives, GRPO/RLOO baselines).

Modules (one idea each):
    logprobs.py         completion log-probs of a policy; prompt/completion encoding; tokenizer check
    preference_data.py  paired and unpaired (KTO) JSONL with counted, reported skips
    losses.py           DPO / cDPO / robust / IPO / KTO / Bradley-Terry losses (PAIR_LOSSES registry)
    rl_math.py          KL estimators and controllers, GAE, whitening, PPO clipped losses, group baselines
    rewards/            verifiable, factuality, safety, heuristic rewards and their mixture
    reward_model.py     scalar-head reward model, Bradley-Terry training, pairwise accuracy
    dpo.py              the offline preference trainer (frozen reference, adapters-off, or precomputed)
    steps.py            the loop pieces both trainers share (batches, AdamW + schedule, one step)
    config.py           AlignConfig, the `lmstack align` run config
    commands.py         `lmstack align --method rm|dpo|cdpo|ipo|kto ...`

Usage:
    from lmstack.align.losses import preference_loss
    from lmstack.align.dpo import PreferenceTrainer
    from lmstack.align.reward_model import RewardModel, train_reward_model
"""
