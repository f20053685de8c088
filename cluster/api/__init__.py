"""The request surface: the OpenAI protocol (protocol.py: schemas, bounded parsing, limits), the
serving logic (serving.py: requests in, responses and SSE out, independent of HTTP and Serve), the
ingress's metrics (metrics.py), the ingress's side of the attention replicas' output streams
(streams.py) and the ingress deployment with its HTTP routes and gRPC servicer (ingress.py). May
import cluster.config, cluster.proto, router/ and model/; not runtime/ or serve/.
"""
