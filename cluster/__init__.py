"""mixserve on Ray, by layer (docs/architecture.md). Imports run one way:

    cli -> serve -> build -> api / runtime -> config -> router / workers / model

config.py   every schema (pure pydantic: importing it loads neither Ray nor torch)
build.py    the one place that builds an engine from a config
api/        the OpenAI protocol, the serving logic, HTTP routes, gRPC, the ingress deployment
runtime/    the expert runtime: worker host and client, the data plane, Ray actors, the autoscaling policy
serve/      the Serve application: its builder and the attention, expert and directory deployments
cli.py      the `mixserve` command
proto/      the gRPC contract (mixserve.proto and its generated stubs)
"""
