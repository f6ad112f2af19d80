"""Result delivery: destinations, the durable outbox, C-STORE and STOW-RS senders, retries.

``destinations``: configured and run-time destinations, and the built-in ``sender``.
``dimse`` / ``stow``: one delivery attempt (and ``echo``) per protocol.
``policy``: exponential backoff with jitter and a circuit breaker per destination.
``dispatcher``: the thread that turns ``written`` jobs into deliveries and drives them to the end.
"""
