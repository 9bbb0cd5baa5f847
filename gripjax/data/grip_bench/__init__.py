"""GRIP-Bench: digit scenes over photo backgrounds with VQA questions (see scenes.py)."""
