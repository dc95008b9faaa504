"""A local HTTP server around a model folder's Inference Endpoints handler, to try it before deploying.

    ndclip endpoint serve outputs/ndclip --port 8080
    curl -s localhost:8080 -H "Content-Type: application/json" \\
        -d "{\\"inputs\\": \\"$(base64 -w0 photo.jpg)\\", \\"parameters\\": {\\"candidate_labels\\": \\"dog, cat\\"}}"

Inference Endpoints serve a custom handler with `huggingface-inference-toolkit`, which does not install from the
package index; this module stands in for it with the smallest standard ASGI app (Starlette, run by uvicorn) around
the same handler, loaded the way the toolkit loads it (`handler.py` imported from the folder, `EndpointHandler(folder)`)
and served on the toolkit's routes:

- `GET /` and `GET /health`: "Ok" once the model is loaded.
- `POST /` and `POST /predict`: a JSON body `{"inputs": ..., "parameters": {...}}`, or raw image bytes with
  `Content-Type: image/*` (the handler gets `{"inputs": <bytes>}`, with the query string as parameters), answered
  with the handler's result as JSON.

A request the handler refuses (a `ValueError`: it names the field at fault) is answered with HTTP 400 and
`{"error": message}`, as the toolkit answers; anything else with 500 and the kind of failure, its trace going to the
server's log, not to the caller. Bodies over `max_body_bytes` get 413 without being read to the end.
"""

import importlib.util
import json
import logging
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

logger = logging.getLogger(__name__)


class BodyTooLarge(Exception):
    pass


def load_handler(folder: str | Path):
    """`EndpointHandler(folder)` from the folder's own `handler.py`, imported from its path as the toolkit does."""
    spec = importlib.util.spec_from_file_location("handler", Path(folder) / "handler.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.EndpointHandler(str(folder))


def build_app(handler, max_body_bytes: int) -> Starlette:
    """The ASGI app serving `handler` (any callable taking the request dict) on the toolkit's routes."""

    async def health(request: Request) -> PlainTextResponse:
        return PlainTextResponse("Ok")

    async def predict(request: Request) -> JSONResponse:
        try:
            payload = parse_request(request, await read_body(request, max_body_bytes))
            # In a worker thread: the model's work must not block the event loop (health checks, other requests).
            return JSONResponse(await run_in_threadpool(handler, payload))
        except BodyTooLarge:
            return error_response(413, f"the request body is over the limit of {max_body_bytes} bytes")
        except ValueError as error:
            return error_response(400, str(error))
        except Exception as error:
            logger.exception("the handler failed")
            return error_response(500, f"the handler failed ({type(error).__name__}); see the server log")

    return Starlette(
        routes=[
            Route("/", health, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/", predict, methods=["POST"]),
            Route("/predict", predict, methods=["POST"]),
        ]
    )


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, or `BodyTooLarge` as soon as it (or its announced length) is over `limit` bytes."""
    announced = request.headers.get("content-length", "")
    if announced.isdigit() and int(announced) > limit:
        raise BodyTooLarge
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise BodyTooLarge
    return bytes(body)


def parse_request(request: Request, body: bytes) -> dict:
    """The handler's request dict: the JSON body, or `{"inputs": <image bytes>}` for an `image/*` body. As in the
    toolkit, the query string gives the parameters of a request whose body has none."""
    if request.headers.get("content-type", "").startswith("image/"):
        payload = {"inputs": body}
    else:
        try:
            payload = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"the request body is not valid JSON: {error}") from None
    if request.query_params and isinstance(payload, dict) and "parameters" not in payload:
        payload["parameters"] = dict(request.query_params)
    return payload


def error_response(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def serve(folder: str | Path, host: str, port: int, max_body_bytes: int) -> None:
    """Load the folder's handler and serve it until interrupted."""
    import uvicorn

    uvicorn.run(build_app(load_handler(folder), max_body_bytes), host=host, port=port, log_level="info")
