"""Jobs: the state machine every job moves through (transitions.py)."""
