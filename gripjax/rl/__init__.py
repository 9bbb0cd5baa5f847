"""Reinforcement learning for the token-selection agent.

policy.py   Plackett-Luce policy over visual tokens (Gumbel-top-k sampling,
            log-probabilities, entropy, budgets as static-shape masks).
grpo.py     group-normalized advantages and the clipped GRPO loss.
rewards.py  answer-quality rewards of the frozen VLM on the kept tokens.
"""
