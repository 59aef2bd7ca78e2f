"""Teacher backends: each turns (review, prompt) pairs into generations (see tasks/generate.py)."""
