"""The `ndclip` command (also `python -m ndclip`): the tools for a trained NdCLIP, one subcommand each.

    ndclip predict --model outputs/ndclip --images photos/ --labels dog,cat,car --output_dir predictions/
    ndclip search index --model outputs/ndclip --images photos/ --output_dir photos_index/
    ndclip search query --index photos_index/ --text "a dog runs on the beach" --top_k 5
    ndclip card outputs/ndclip --dataset_name jxie/flickr8k --repo_id user/ndclip-flickr8k
    ndclip shards --data_dir ~/data/Flickr8k --output_dir shards/flickr8k --samples_per_shard 1000
    ndclip endpoint serve outputs/ndclip --port 8080
    ndclip space --model outputs/ndclip --images photos/ --output_dir my_space/ --push --space_id user/ndclip-demo

Each tool's module declares its options (`add_*_arguments`) and runs with the parsed options (`run_*`); this module
only assembles them, as `huggingface-cli` and `accelerate` assemble theirs. Training is not a subcommand: it is
`accelerate launch run_clip.py`, which needs the launcher.
"""

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from ndclip import endpoint, hub, predict, search, shards
from ndclip.inference import BadInputError
from ndclip.space import builder as space


def summary(docstring: str) -> str:
    """The first paragraph of a module's docstring: the description of its command."""
    return docstring.split("\n\n")[0]


def add_command(
    commands,
    name: str,
    help: str,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], object],
    description: str | None = None,
) -> argparse.ArgumentParser:
    """A subcommand `name` of `commands` (what `add_subparsers` returns) with the options of `add_arguments`, that
    calls `run(args)`."""
    parser = commands.add_parser(name, help=help, description=description or help)
    add_arguments(parser)
    parser.set_defaults(run=run, prog=parser.prog)  # prog: "ndclip search query", which names it in errors
    return parser


def build_parser() -> argparse.ArgumentParser:
    # prog: `python -m ndclip` would otherwise call itself "__main__.py".
    parser = argparse.ArgumentParser(
        prog="ndclip",
        description=summary(__doc__),
        epilog="examples:\n" + __doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="<command>")
    add_command(
        commands,
        "predict",
        "zero-shot labels and caption matching on a folder of images",
        predict.add_predict_arguments,
        predict.run_predict,
        description=summary(predict.__doc__),
    )
    search_commands = commands.add_parser(
        "search", help="image <-> text search: index a collection, then query it", description=summary(search.__doc__)
    ).add_subparsers(dest="search_command", required=True, metavar="<command>")
    add_command(
        search_commands,
        "index",
        "embed a collection into an index folder (resumable)",
        search.add_index_arguments,
        search.run_index,
    )
    add_command(
        search_commands,
        "query",
        "search an index with a text or an image",
        search.add_query_arguments,
        search.run_query,
    )
    add_command(
        commands,
        "card",
        "write the model card (README.md) of a saved model folder",
        hub.add_card_arguments,
        hub.run_card,
    )
    add_command(
        commands,
        "space",
        "write a Gradio Space (zero-shot labels, caption search) for a model, and push it",
        space.add_space_arguments,
        space.run_space,
        description=summary(space.__doc__),
    )
    endpoint_commands = commands.add_parser(
        "endpoint",
        help="deploy as an Inference Endpoint: add the handler to a saved model, serve it locally",
        description=summary(endpoint.__doc__),
    ).add_subparsers(dest="endpoint_command", required=True, metavar="<command>")
    add_command(
        endpoint_commands,
        "add",
        "write handler.py and requirements.txt into a saved model folder",
        endpoint.add_add_arguments,
        endpoint.run_add,
    )
    add_command(
        endpoint_commands,
        "serve",
        "serve a model folder's handler.py over HTTP, as an Endpoint does",
        endpoint.add_serve_arguments,
        endpoint.run_serve,
    )
    add_command(
        commands,
        "shards",
        "write a dataset as webdataset (or parquet) shards for streaming training",
        shards.add_shards_arguments,
        shards.run_shards,
        description=summary(shards.__doc__),
    )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Run `ndclip <command> ...` with `argv` (None: the command line). Bad options are argparse's errors; a
    `BadInputError` (a missing folder, another model, an empty label list) is reported as one line,
    `ndclip <command>: error: ...`, with exit status 2, like them."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        args.run(args)
    except BadInputError as error:
        print(f"{args.prog}: error: {error}", file=sys.stderr)
        sys.exit(2)
