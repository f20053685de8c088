"""The expert runtime: the worker host every expert replica runs and the client every attention
worker dispatches through (experts.py), the TCP data plane between them (channel.py), expert
replicas as plain Ray actors (actors.py) and the autoscaling policy Serve calls (autoscaling.py).
May import cluster.config, router/, workers/ and model/; not api/ or serve/.
"""
