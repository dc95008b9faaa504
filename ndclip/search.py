"""Image <-> text search over a collection with a trained NdCLIP: embed it once, then query it.

    ndclip search index --model outputs/ndclip --images photos/ --output_dir photos_index/
    ndclip search index --model outputs/ndclip --dataset_name user/flickr8k --split test \
        --image_column image --caption_column caption --output_dir flickr_index/
    ndclip search query --index photos_index/ --text "a dog runs on the beach" --top_k 5 --png strip.png
    ndclip search query --index flickr_index/ --image query.jpg --json results.json [--faiss]

`index` embeds the images (and the captions, if the collection has them) in chunks that are each saved to disk as
soon as they are done, so an interrupted run picks up where it stopped; when all are done they are joined into
`images/` (and `captions/`): `datasets` datasets with an `embedding` column (L2-normalised), next to `index.json`,
which records the model, its `projection_dim`, a fingerprint of its weights and configuration, and the images skipped
because they cannot be decoded (truncated files, decompression bombs). A query with another model fails.

`query` finds the best images for a text, and the best captions (or with `--target images`, the most similar
images) for an image: exact search with torch, or with `--faiss` a FAISS inner-product index (`pip install
faiss-cpu`) built through `datasets`' `add_faiss_index`.

An index of a folder records the folder and its image paths relative to the index folder, so the two can be moved or
copied together (a Space holds both: `ndclip space`); `query` gives the paths resolved against where the index is
now. Indexes written before recorded absolute paths: they still work where those paths exist, and cannot be moved.
"""

import argparse
import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from tqdm.auto import tqdm

from ndclip.inference import (
    BadInputError,
    contact_sheet,
    embed_images,
    embed_texts,
    find_images,
    load_ndclip,
    log_unreadable,
    positive_int,
)

logger = logging.getLogger(__name__)

INDEX_FILE = "index.json"
SKIPPED_FILE = "skipped.json"  # in each chunk: its unreadable images
# The columns of the saved datasets, besides `embedding` (L2-normalised float32 vectors of `projection_dim`).
COLUMN_TYPES = {
    "row": datasets.Value("int64"),  # images: position in the collection
    "path": datasets.Value("string"),  # images: file path relative to the index folder (folder collections only)
    "image_row": datasets.Value("int64"),  # captions: the `row` of their image
    "caption": datasets.Value("string"),
}


# Config keys that say where and how a model was loaded, not what it computes (the weights' dtype is hashed with them).
UNHASHED_CONFIG_KEYS = {"transformers_version", "dtype"}


def model_fingerprint(model) -> str:
    """A short hash of everything the embeddings depend on: every parameter and buffer, and the configuration. Any
    change to either (another tower weight, another layer-norm epsilon) changes it, so embeddings of two models are
    never mixed; where the model was loaded from does not.

    The tensors' bytes are read on the CPU in name order, so the hash is the same in every process and on every
    device. Hashing every weight of a real-size model is cheap next to embedding a collection, and done once per
    command.
    """
    digest = hashlib.sha256(json.dumps(hashed_config(model.config.to_dict()), sort_keys=True).encode())
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    for name, tensor in sorted(tensors.items()):
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name} {data.dtype} {tuple(data.shape)}".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:16]


def hashed_config(config: dict) -> dict:
    """`config` (a config's `to_dict()`, nested for the towers) without `_name_or_path` and the other private
    bookkeeping keys, nor `UNHASHED_CONFIG_KEYS`."""
    return {
        key: hashed_config(value) if isinstance(value, dict) else value
        for key, value in config.items()
        if not str(key).startswith("_") and key not in UNHASHED_CONFIG_KEYS
    }


# ----- the collection: a folder of images, or a `datasets` dataset --------------------------------------------------


class DatasetImages(Sequence):
    """The images of a dataset column, decoded one at a time (a file that fails to decode fails alone)."""

    def __init__(self, dataset: datasets.Dataset, column: str):
        self.dataset, self.column = dataset.select_columns([column]), column

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        if isinstance(index, slice):  # a view, still undecoded
            return DatasetImages(self.dataset.select(range(len(self))[index]), self.column)
        return self.dataset[index][self.column]


@dataclass
class Collection:
    """What gets indexed: `images` (paths or a `DatasetImages`), their `paths` as the index records them (folders
    only: see `open_collection`) and `captions` (a list of captions per image, when the collection has them)."""

    images: Sequence
    paths: list[str] | None = None
    captions: list[list[str]] | None = None


def open_collection(source: dict, index_dir: str | Path | None = None) -> Collection:
    """The collection that `source` describes: `{"images": folder}`, or `{"dataset_name" and/or "data_dir",
    "split", "image_column", "caption_columns"}` for `datasets.load_dataset` (a folder alone loads as `imagefolder`).
    The `paths` of a folder's images are relative to `index_dir` when it is given (see `relative_path`).
    """
    if source.get("images"):
        found = [str(path) for path in find_images(source["images"])]
        paths = found if index_dir is None else [relative_path(path, index_dir) for path in found]
        return Collection(images=found, paths=paths)
    name = source["dataset_name"] or "imagefolder"
    try:
        dataset = datasets.load_dataset(name, data_dir=source["data_dir"], split=source["split"])
    except OSError as error:  # not found, no data files, Hub unreachable
        raise BadInputError(f"cannot load the dataset {name!r} (data_dir {source['data_dir']}): {error}") from error
    columns = [source["image_column"], *source["caption_columns"]]
    missing = [column for column in columns if column not in dataset.column_names]
    if missing:
        raise BadInputError(
            f"the dataset has no column {', '.join(map(repr, missing))}; its columns: {dataset.column_names}"
        )
    if len(dataset) == 0:
        raise BadInputError(f"the dataset's {source['split']!r} split is empty")
    captions = None
    if source["caption_columns"]:
        table = dataset.select_columns(source["caption_columns"])
        captions = [
            [text for value in row.values() for text in ([value] if isinstance(value, str) else value or [])]
            for row in table
        ]
    return Collection(images=DatasetImages(dataset, source["image_column"]), captions=captions)


def relative_path(path: str | Path, index_dir: str | Path) -> str:
    """`path` relative to `index_dir` (both resolved first, so that a symbolic link on either side cannot make the
    `..` steps wrong), with `/` separators: how an index records a path, so that it moves with its images."""
    return Path(os.path.relpath(Path(path).resolve(), Path(index_dir).resolve())).as_posix()


def resolve_path(index_dir: str | Path, recorded: str) -> str:
    """The file that `recorded`, a path recorded in the index in `index_dir`, names now: relative paths are resolved
    against the index folder; an absolute one (an index written before paths were relative) is kept as it is."""
    return os.path.normpath(Path(index_dir).resolve() / recorded)


# ----- building the index -----------------------------------------------------------------------------------------


def build_index(
    model,
    processor,
    model_name_or_path: str,
    source: dict,
    output_dir: str | Path,
    batch_size: int = 32,
    chunk_size: int = 1024,
    max_chunks: int | None = None,
) -> dict:
    """Embed the collection `source` (see `open_collection`) into `output_dir`, `chunk_size` images at a time.

    Finished chunks are kept on disk and skipped when the same command is run again, so an interrupted run resumes;
    `max_chunks` stops after embedding that many (the rest is done by a later run). Returns the index description
    (`index.json`) with `chunks_done`: the chunks this call embedded. Unreadable images are left out of the index
    (with their captions) and listed in `skipped`, each with its `row` (and `path`) and `reason`. A folder and its
    image paths are recorded relative to `output_dir` (`relative_path`).
    """
    output_dir = Path(output_dir)
    collection = open_collection(source, index_dir=output_dir)
    num_images = len(collection.images)
    if source.get("images"):
        source = {**source, "images": relative_path(source["images"], output_dir)}
    info = {
        "model": str(model_name_or_path),
        "fingerprint": model_fingerprint(model),
        "projection_dim": model.config.projection_dim,
        "source": source,
        "num_images": num_images,
        "chunk_size": chunk_size,
        "has_captions": collection.captions is not None,
        "complete": False,
    }
    previous = read_index_info(output_dir) if (output_dir / INDEX_FILE).is_file() else None
    if previous is not None:
        # The weights are compared by fingerprint, not by where they were loaded from.
        changed = [key for key in info if key not in ("model", "complete") and previous.get(key) != info[key]]
        if changed:
            raise BadInputError(
                f"{output_dir} already holds an index built with other settings ({', '.join(changed)} differ): "
                "remove it or choose another --output_dir"
            )
        if previous["complete"]:
            logger.info("%s already holds this index, complete", output_dir)
            return {**previous, "chunks_done": []}
    output_dir.mkdir(parents=True, exist_ok=True)
    write_index_info(output_dir, info)

    chunks_dir = output_dir / "chunks"
    num_chunks = math.ceil(num_images / chunk_size)
    finished = {k for k in range(num_chunks) if (chunks_dir / f"{k:05d}").is_dir()}
    if finished:
        logger.info("resuming: %d of %d chunks are already embedded", len(finished), num_chunks)
    done = []
    bar = tqdm(total=num_images, initial=sum(chunk_length(k, chunk_size, num_images) for k in finished), unit="img")
    for k in sorted(set(range(num_chunks)) - finished):
        if max_chunks is not None and len(done) == max_chunks:
            break
        embed_chunk(model, processor, collection, k, chunk_size, chunks_dir, batch_size, bar)
        done.append(k)
    bar.close()
    if len(finished) + len(done) < num_chunks:
        logger.info("stopped after %d chunk(s); run the same command again to finish", len(done))
        return {**info, "chunks_done": done}

    chunk_dirs = [chunks_dir / f"{k:05d}" for k in range(num_chunks)]
    info["skipped"] = [entry for chunk in chunk_dirs for entry in json.loads((chunk / SKIPPED_FILE).read_text())]
    log_unreadable({entry.get("path", f"row {entry['row']}"): entry["reason"] for entry in info["skipped"]})
    if len(info["skipped"]) == num_images:
        raise BadInputError(f"none of the {num_images} images of the collection could be read (see the log)")
    for kind in ("images", "captions") if info["has_captions"] else ("images",):
        joined = datasets.concatenate_datasets([datasets.load_from_disk(str(chunk / kind)) for chunk in chunk_dirs])
        save_dataset(joined, output_dir / kind)
    info["complete"] = True
    write_index_info(output_dir, info)
    shutil.rmtree(chunks_dir)
    return {**info, "chunks_done": done}


def chunk_length(k: int, chunk_size: int, total: int) -> int:
    return min(chunk_size, total - k * chunk_size)


def embed_chunk(model, processor, collection: Collection, k: int, chunk_size: int, chunks_dir: Path, batch_size, bar):
    """Embed the images (and their captions) of chunk `k` and save them as `chunks_dir/0000k/{images,captions}`,
    with the chunk's unreadable images in `skipped.json`, written under a temporary name first so that only whole
    chunks ever appear."""
    start = k * chunk_size
    chunk_rows = range(start, start + chunk_length(k, chunk_size, len(collection.images)))
    embeddings, unreadable = embed_images(
        model, processor, collection.images[chunk_rows.start : chunk_rows.stop], batch_size, progress=bar
    )
    skipped = [{"row": start + i, "reason": why} for i, why in unreadable.items()]
    rows = [row for row in chunk_rows if row - start not in unreadable]
    images = {"row": rows, "embedding": embeddings.numpy()}
    if collection.paths is not None:
        images["path"] = [collection.paths[row] for row in rows]
        for entry in skipped:
            entry["path"] = collection.paths[entry["row"]]
    parts = {"images": images}
    if collection.captions is not None:
        owners = [row for row in rows for _ in collection.captions[row]]
        texts = [text for row in rows for text in collection.captions[row]]
        parts["captions"] = {
            "image_row": owners,
            "caption": texts,
            "embedding": embed_texts(model, processor, texts).numpy(),
        }

    temporary = chunks_dir / f"{k:05d}.tmp"
    shutil.rmtree(temporary, ignore_errors=True)
    embedding = datasets.List(datasets.Value("float32"), length=model.config.projection_dim)
    for kind, columns in parts.items():
        features = datasets.Features({name: COLUMN_TYPES.get(name, embedding) for name in columns})
        with quiet_datasets():
            save_dataset(datasets.Dataset.from_dict(columns, features=features), temporary / kind)
    (temporary / SKIPPED_FILE).write_text(json.dumps(skipped, indent=2) + "\n")
    temporary.rename(chunks_dir / f"{k:05d}")


def save_dataset(dataset: datasets.Dataset, path: Path) -> None:
    """`dataset.save_to_disk`, which writes no file at all for an empty dataset (a chunk of unreadable images, a
    collection without captions) unless asked for one shard; without it the folder cannot be loaded back."""
    dataset.save_to_disk(str(path), num_shards=None if len(dataset) else 1)


@contextmanager
def quiet_datasets():
    """No `datasets` progress bars inside (they would break the line of the indexing progress bar)."""
    enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if enabled:
            datasets.enable_progress_bars()


def read_index_info(index_dir: str | Path) -> dict:
    path = Path(index_dir) / INDEX_FILE
    if not path.is_file():
        raise BadInputError(
            f"{index_dir} is not a search index (it has no {INDEX_FILE}); build one with `ndclip search index`"
        )
    return json.loads(path.read_text())


def write_index_info(index_dir: Path, info: dict) -> None:
    temporary = index_dir / (INDEX_FILE + ".tmp")
    temporary.write_text(json.dumps(info, indent=2) + "\n")
    temporary.replace(index_dir / INDEX_FILE)


# ----- querying it ------------------------------------------------------------------------------------------------


def load_index(index_dir: str | Path, model, model_name_or_path: str) -> tuple[dict, dict[str, datasets.Dataset]]:
    """The index description and its datasets (`images`, and `captions` if any), after checking that `model` is the
    one that built it: same embedding size and same fingerprint. Raises `BadInputError` otherwise."""
    info = read_index_info(index_dir)
    if not info["complete"]:
        raise BadInputError(f"the index in {index_dir} is unfinished: run the same `ndclip search index` command again")
    if info["projection_dim"] != model.config.projection_dim:
        raise BadInputError(
            f"embedding size mismatch: the index in {index_dir} holds {info['projection_dim']}-d embeddings of model "
            f"{info['model']}, but {model_name_or_path} gives {model.config.projection_dim}-d ones"
        )
    fingerprint = model_fingerprint(model)
    if info["fingerprint"] != fingerprint:
        raise BadInputError(
            f"model mismatch: the index in {index_dir} was built with {info['model']} (fingerprint "
            f"{info['fingerprint']}), but {model_name_or_path} has fingerprint {fingerprint}: query with that model, "
            "or build a new index"
        )
    kinds = ("images", "captions") if info["has_captions"] else ("images",)
    return info, {kind: datasets.load_from_disk(str(Path(index_dir) / kind)) for kind in kinds}


def nearest(dataset: datasets.Dataset, query: torch.Tensor, top_k: int, use_faiss: bool = False) -> tuple[list, list]:
    """Scores (cosine similarities) and row indices of the `top_k` embeddings of `dataset` nearest to `query`
    (a normalised `[projection_dim]` vector), best first: exact with torch, or through a FAISS inner-product index."""
    top_k = min(top_k, len(dataset))
    if use_faiss:
        try:
            import faiss
        except ImportError as error:
            raise BadInputError("--faiss needs the faiss-cpu package: pip install faiss-cpu") from error
        if "embedding" not in dataset.list_indexes():
            dataset.add_faiss_index("embedding", metric_type=faiss.METRIC_INNER_PRODUCT)
        scores, indices = dataset.search("embedding", query.numpy(), k=top_k)
        return scores.tolist(), indices.tolist()
    embeddings = dataset.with_format("torch", columns=["embedding"])[:]["embedding"]
    scores, indices = (embeddings @ query).topk(top_k)
    return scores.tolist(), indices.tolist()


def query_index(
    model,
    processor,
    index: dict[str, datasets.Dataset],
    text: str | None = None,
    image: str | None = None,
    target: str = "auto",
    top_k: int = 5,
    use_faiss: bool = False,
    index_dir: str | Path | None = None,
) -> list[dict]:
    """The best matches for `text` (images) or `image` (captions if the index has them, else images; `target`
    "images" or "captions" chooses), best first: `rank`, `score` (cosine), `row` of the image in the collection,
    its `path` for a folder, and the `caption` for caption results. The `path` is resolved against `index_dir`, the
    index's folder (`resolve_path`); without it, it is as recorded (relative to the index folder)."""
    if (text is None) == (image is None):
        raise BadInputError("give exactly one query: a text or an image")
    if top_k < 1:
        raise BadInputError(f"top_k must be at least 1, got {top_k}")
    if target == "auto":
        target = "captions" if image is not None and "captions" in index else "images"
    if target not in index:
        raise BadInputError(f"this index has no {target} (its collection had no caption column)")
    if text is not None:
        query = embed_texts(model, processor, [text])[0]
    else:
        embeddings, unreadable = embed_images(model, processor, [image], progress=tqdm(disable=True))
        if unreadable:
            raise BadInputError(f"cannot read the query image {image}: {unreadable[0]}")
        query = embeddings[0]
    scores, indices = nearest(index[target], query, top_k, use_faiss)
    results = []
    for rank, (score, i) in enumerate(zip(scores, indices), start=1):
        entry = index[target][i]
        result = {"rank": rank, "score": round(score, 6)}
        if target == "captions":  # only dataset collections have captions: their images have no path
            result["caption"], result["row"] = entry["caption"], entry["image_row"]
        else:
            result["row"] = entry["row"]
            if "path" in entry:
                result["path"] = entry["path"] if index_dir is None else resolve_path(index_dir, entry["path"])
        results.append(result)
    return results


def format_results(results: Sequence[dict], width: int = 60) -> str:
    """The results as a table: rank, score, and the caption or image."""
    lines = ["rank  score   match", "----  ------  " + "-" * width]
    for r in results:
        match = r.get("caption") or r.get("path") or f"row {r['row']}"
        if len(match) > width:
            # A caption reads from its start; a path is told apart by its end (the file name).
            match = match[: width - 3] + "..." if r.get("caption") else "..." + match[3 - width :]
        lines.append(f"{r['rank']:>4}  {r['score']:.4f}  {match}")
    return "\n".join(lines)


def result_strip(info: dict, results: Sequence[dict], thumb_size: int = 160):
    """A one-row contact sheet of the images of `results`, each with its rank, score and caption."""
    if info["source"].get("images"):
        images = [r["path"] for r in results]
    else:
        collection = open_collection(info["source"])
        images = [collection.images[r["row"]] for r in results]
    captions = [f"#{r['rank']}  {r['score']:.3f}\n{r.get('caption') or Path(r.get('path', '')).name}" for r in results]
    return contact_sheet(images, captions, columns=len(images), thumb_size=thumb_size)


# ----- command line -----------------------------------------------------------------------------------------------


def add_index_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `ndclip search index`."""
    parser.add_argument("--model", required=True, help="a saved NdCLIP folder or a Hub id")
    collection = parser.add_mutually_exclusive_group()
    collection.add_argument("--images", help="a folder of images (searched recursively)")
    collection.add_argument("--dataset_name", help="a dataset for datasets.load_dataset")
    parser.add_argument("--data_dir", help="data_dir for load_dataset (alone: an imagefolder with metadata)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--image_column", default="image")
    parser.add_argument("--caption_column", help="caption column(s), comma-separated; each a string or a list")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--batch_size", type=positive_int, default=32)
    parser.add_argument("--chunk_size", type=positive_int, default=1024, help="images per chunk saved to disk")
    parser.add_argument("--max_chunks", type=positive_int, help="stop after embedding this many chunks (resume later)")
    parser.add_argument("--device", help="cuda, cpu, ... (default: cuda when available)")


def run_index(args: argparse.Namespace) -> None:
    """`ndclip search index`: build (or resume) the index and print what it holds."""
    if args.images:
        source = {"images": str(Path(args.images).resolve())}
    elif args.dataset_name is None and args.data_dir is None:
        raise BadInputError("the collection is missing: pass --images, --dataset_name or --data_dir")
    else:
        source = {
            "dataset_name": args.dataset_name,
            "data_dir": args.data_dir,
            "split": args.split,
            "image_column": args.image_column,
            "caption_columns": [c.strip() for c in (args.caption_column or "").split(",") if c.strip()],
        }
    model, processor = load_ndclip(args.model, args.device)
    model_reference = str(Path(args.model).resolve()) if Path(args.model).is_dir() else args.model
    summary = build_index(
        model, processor, model_reference, source, args.output_dir, args.batch_size, args.chunk_size, args.max_chunks
    )
    skipped = f", {len(summary['skipped'])} unreadable and skipped" if summary.get("skipped") else ""
    state = "complete" if summary["complete"] else "unfinished"
    print(f"{args.output_dir}: {summary['num_images']} images{skipped}, {state}")


def add_query_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `ndclip search query`."""
    parser.add_argument("--index", required=True, help="a folder written by `ndclip search index`")
    parser.add_argument("--model", help="the model that built the index (default: the one recorded in it)")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", help="find the images that best match this text")
    what.add_argument("--image", help="find the captions (or images) that best match this image file")
    parser.add_argument("--target", choices=("auto", "images", "captions"), default="auto")
    parser.add_argument("--top_k", type=positive_int, default=5)
    parser.add_argument("--faiss", action="store_true", help="search a FAISS index instead of exactly with torch")
    parser.add_argument("--json", help="write the results to this JSON file")
    parser.add_argument("--png", help="write a strip of the top images to this PNG file")
    parser.add_argument("--device", help="cuda, cpu, ... (default: cuda when available)")


def run_query(args: argparse.Namespace) -> None:
    """`ndclip search query`: print the best matches, and write them to `--json` and `--png` if given."""
    info = read_index_info(args.index)
    model_name = args.model or info["model"]
    model, processor = load_ndclip(model_name, args.device)
    info, index = load_index(args.index, model, model_name)
    results = query_index(
        model, processor, index, args.text, args.image, args.target, args.top_k, args.faiss, index_dir=args.index
    )
    print(format_results(results))
    if args.json:
        query = {"text": args.text} if args.text is not None else {"image": args.image}
        Path(args.json).write_text(json.dumps({**query, "index": args.index, "results": results}, indent=2) + "\n")
    if args.png:
        result_strip(info, results).save(args.png)
