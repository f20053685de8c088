"""The attention/router side: the engine (engine.py: scheduling, the pipelined forward, sampling,
outputs), the continuous-batching scheduler (scheduler.py), the KV-cache blocks (kv_cache.py),
dispatch and combine (dispatch.py), the expert backends (experts.py) and the engine's settings
(config.py). Imports model/ and workers/; never Ray or cluster/.
"""
