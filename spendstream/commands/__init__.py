"""Command groups of the ``spendstream`` CLI, one module per concern.

Each module exposes ``register(app)``; heavy clients (faust, chDB, confluent-kafka) are
imported inside the command bodies so that ``spendstream --help`` stays fast.
"""
