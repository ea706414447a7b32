"""The OpenAI-compatible HTTP server over :mod:`memdec_fast.engine` (``memdec-fast serve``).

protocol.py: the request and response models; serving.py: one request -> engine streams -> a response;
app.py: build_app(engine) -> FastAPI; metrics.py: the /metrics text; cli.py: the ``serve`` subcommand.
Importing this package imports neither FastAPI nor torch.
"""

MAX_BODY_BYTES = 4 * 1024 * 1024
"""Default limit on a request body (``--max-body-bytes``): a larger one gets 413 before it is read."""
