"""Deploying an NdCLIP as a Hugging Face Inference Endpoint: the custom handler (`handler.py`) and the
`requirements.txt` that every saved model folder carries, and a local HTTP server to try them before deploying.

    ndclip endpoint add outputs/ndclip
    ndclip endpoint serve outputs/ndclip --port 8080

run_clip.py writes the two files into every folder it saves (and so pushes them); `ndclip endpoint add` writes them
into a folder saved otherwise, or refreshes them. `handler.py` is `ndclip/endpoint/handler.py` copied verbatim: it is
self-contained, since an Endpoint runs it without this package. `ndclip endpoint serve` serves a folder's own copy
with `ndclip.endpoint.server` (extra `serve`).
"""

import argparse
import shutil
from pathlib import Path

from ndclip.hub import REMOTE_CODE_REQUIREMENTS
from ndclip.inference import BadInputError, check_ndclip, positive_int

HANDLER_FILE = "handler.py"
MAX_BODY_BYTES = 32 * 1024 * 1024  # the largest request `ndclip endpoint serve` reads: a few photos, base64-encoded
REQUIREMENTS_FILE = "requirements.txt"
HANDLER_SOURCE = Path(__file__).with_name(HANDLER_FILE)
# What the handler needs beyond an Endpoint's image, which the Endpoint pip-installs before importing it: the
# packages the model code imports (ndlinear, and the transformers version it was written for), and torchvision, on
# which transformers 5 runs the ViT image processor (as setup.cfg requires it).
ENDPOINT_REQUIREMENTS = (*REMOTE_CODE_REQUIREMENTS, "torchvision>=0.19")


def write_endpoint_files(folder: str | Path) -> list[Path]:
    """Write `handler.py` and `requirements.txt` into the saved model folder `folder`, and return their paths."""
    folder = Path(folder)
    handler = folder / HANDLER_FILE
    shutil.copyfile(HANDLER_SOURCE, handler)
    requirements = folder / REQUIREMENTS_FILE
    requirements.write_text("".join(f"{requirement}\n" for requirement in ENDPOINT_REQUIREMENTS))
    return [handler, requirements]


def add_add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `ndclip endpoint add`."""
    parser.add_argument("folder", help="a saved NdCLIP model folder (e.g. run_clip.py's --output_dir)")


def run_add(args: argparse.Namespace) -> None:
    """`ndclip endpoint add`: write the handler and its requirements into `args.folder`."""
    check_saved_folder(args.folder)
    for path in write_endpoint_files(args.folder):
        print(f"wrote {path}")


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `ndclip endpoint serve`."""
    parser.add_argument("folder", help="a saved NdCLIP model folder with its handler.py (`ndclip endpoint add`)")
    parser.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: this machine only)")
    parser.add_argument("--port", type=int, default=8080, help="the port to listen on (0: any free port)")
    parser.add_argument(
        "--max_body_bytes",
        type=positive_int,
        default=MAX_BODY_BYTES,
        help=f"larger request bodies are refused with HTTP 413 (default: {MAX_BODY_BYTES})",
    )


def run_serve(args: argparse.Namespace) -> None:
    """`ndclip endpoint serve`: serve the folder's handler over HTTP until interrupted."""
    check_saved_folder(args.folder)
    if not (Path(args.folder) / HANDLER_FILE).is_file():
        raise BadInputError(f"{args.folder} has no {HANDLER_FILE}: add it with `ndclip endpoint add {args.folder}`")
    try:
        from ndclip.endpoint.server import serve
    except ImportError as error:
        raise BadInputError(f"serving needs starlette and uvicorn ({error}): pip install 'ndclip[serve]'") from error
    serve(args.folder, host=args.host, port=args.port, max_body_bytes=args.max_body_bytes)


def check_saved_folder(folder: str) -> None:
    """Raise `BadInputError` unless `folder` is a local folder holding a saved NdCLIP."""
    if not Path(folder).is_dir():
        raise BadInputError(f"model folder {folder} does not exist")
    check_ndclip(folder)
