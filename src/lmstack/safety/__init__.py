"""lmstack.safety: moderation and guardrails, red teaming and adversarial training, DP-SGD with a privacy
accountant, bias penalties, explanations (attention maps and attributions), safe decoding, audits and feedback.

Each technique has one module here; the parts that belong to another stage live there (the SFT/DPO/GRPO
machinery in lmstack.align and lmstack.adapt, the server routes in lmstack.serve, the safety eval tasks in
lmstack.eval.tasks.safety) and docs/techniques.md links them. Nothing is imported here, so importing one
module does not pull in the others.
"""
