"""The serving frameworks Percept is measured against, each in its own virtualenv (bench/peers/envs.py)."""
