"""The Serve application: its builder (app.py: build_app, app_builder for `serve run` and KubeRay), the
attention deployment (attention.py) and its output streams to the ingress replicas (outputs.py), the
attention request router (routing.py), the expert deployment and its client (experts.py), the expert
directory (directory.py) and `mixserve-haproxy`, the HAProxy Serve starts (haproxy.py). May import
cluster.build, api/, runtime/, cluster.config and below.
"""
