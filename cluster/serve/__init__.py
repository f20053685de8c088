"""The Serve application: its builder (app.py: build_app, app_builder for `serve run` and KubeRay), the
attention deployment (attention.py), the expert deployment and its client (experts.py) and the expert
directory (directory.py). May import cluster.build, api/, runtime/, cluster.config and below.
"""
