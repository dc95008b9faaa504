"""The `ndclip` command (also `python -m ndclip`): the tools for a trained NdCLIP, one subcommand each.

    ndclip predict --model outputs/ndclip --images photos/ --labels dog,cat,car --output_dir predictions/
    ndclip search index --model outputs/ndclip --images photos/ --output_dir photos_index/
    ndclip search query --index photos_index/ --text "a dog runs on the beach" --top_k 5
    ndclip card outputs/ndclip --dataset_name jxie/flickr8k --repo_id user/ndclip-flickr8k

Each tool's module declares its options (`add_*_arguments`) and runs with the parsed options (`run_*`); this module
only assembles them, as `huggingface-cli` and `accelerate` assemble theirs. Training is not a subcommand: it is
`accelerate launch run_clip.py`, which needs the launcher.
"""

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from ndclip import hub, predict, search
from ndclip.inference import BadInputError


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
