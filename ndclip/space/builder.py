"""Write a Gradio Space for a saved or published NdCLIP (zero-shot labels, caption search over a folder of images),
and push it to the Hub.

    ndclip space --model outputs/demo --images photos/ --output_dir my_space/
    ndclip space --model outputs/demo --images photos/ --output_dir my_space/ --push --space_id user/ndclip-demo
    ndclip space --model outputs/demo --hub_model_id user/ndclip-demo --images photos/ --output_dir my_space/

A Space installs its `requirements.txt` from PyPI and cannot install this package, so the folder carries all it runs:

    README.md          the Space card: YAML front matter (sdk: gradio, sdk_version: the installed Gradio's,
                       app_file: app.py, models: the Hub model, if any) and a short description
    app.py             the app (a copy of ndclip/space/app.py)
    space.json         the app's settings: model (a folder of the Space or a Hub id), index, title
    requirements.txt   the ndclip package's own requirements (Gradio comes with the Space's SDK)
    ndclip/            the ndclip package
    configuration_ndclip.py, modeling_ndclip.py, processing_ndclip.py
    model/             a copy of --model (left out with --hub_model_id, or when --model is a Hub id)
    gallery/           the images of --images (sub-folders kept)
    index/             their search index (`ndclip search index`), with paths relative to it

The index is built here, with --model; with --hub_model_id the Space loads that Hub model instead of a copy, and
refuses to start if its weights differ from those of --model (the index records a fingerprint of them). `--push`
creates the Space (`huggingface_hub.create_repo(repo_type="space", space_sdk="gradio")`) and uploads the folder.
"""

import argparse
import importlib.metadata
import importlib.util
import json
import logging
import shutil
from pathlib import Path

from huggingface_hub import HfApi, SpaceCard, SpaceCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import filter_repo_objects, validate_repo_id

from ndclip.hub import HUB_IGNORE_PATTERNS
from ndclip.inference import BadInputError, find_images, load_ndclip, positive_int
from ndclip.search import build_index

logger = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent.parent  # the ndclip package
APP_FILE = Path(__file__).resolve().parent / "app.py"
MODEL_MODULES = ("configuration_ndclip", "modeling_ndclip", "processing_ndclip")  # the flat model files
# Space paths (app.py reads space.json; its defaults are the same names).
MODEL_DIR, GALLERY_DIR, INDEX_DIR, SETTINGS_FILE = "model", "gallery", "index", "space.json"
SPACE_DESCRIPTION = """# {title}

A demo of the NdCLIP model {model}: upload an image and type labels to get zero-shot probabilities (optionally
averaged over a prompt ensemble), or type a caption to find the nearest of the {num_images} images in `gallery/`.

Written by `ndclip space`; the app is `app.py`, its settings `space.json`. Run it locally with
`pip install gradio=={sdk_version} -r requirements.txt && python app.py`.
"""


def gradio_version() -> str:
    """The installed Gradio's version: the Space runs the same one (`sdk_version`)."""
    try:
        return importlib.metadata.version("gradio")
    except importlib.metadata.PackageNotFoundError as error:
        raise BadInputError("`ndclip space` needs Gradio: pip install 'ndclip[space]'") from error


def requirements() -> list[str]:
    """What the package needs at run time (its install_requires, without the extras), as pip requirement lines."""
    try:
        required = importlib.metadata.requires("ndclip") or []
    except importlib.metadata.PackageNotFoundError as error:
        raise BadInputError("the ndclip package is not installed: pip install -e . in the repository") from error
    return [line for line in required if "extra ==" not in line]


def copy_code(space_dir: Path) -> None:
    """The app as `app.py`, the ndclip package (so that its `ndclip` command works in the Space too) and the three
    model modules."""
    shutil.copy2(APP_FILE, space_dir / "app.py")
    shutil.copytree(PACKAGE_DIR, space_dir / "ndclip", ignore=shutil.ignore_patterns("__pycache__"))
    for module in MODEL_MODULES:
        shutil.copy2(importlib.util.find_spec(module).origin, space_dir / f"{module}.py")


def copy_model(model_dir: Path, destination: Path) -> None:
    """The saved model's files, without what stays local when a training run is pushed (checkpoints, logs)."""
    files = [path.relative_to(model_dir).as_posix() for path in sorted(model_dir.rglob("*")) if path.is_file()]
    for name in filter_repo_objects(files, ignore_patterns=HUB_IGNORE_PATTERNS):
        (destination / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(model_dir / name, destination / name)


def copy_images(images_dir: Path, destination: Path) -> int:
    """The image files under `images_dir` (`find_images`), in the same sub-folders; returns how many."""
    images = find_images(images_dir)
    for path in images:
        target = destination / path.relative_to(images_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    return len(images)


def space_card(title: str, model_reference: str, hub_model: str | None, sdk_version: str, num_images: int) -> str:
    """The Space's README.md: the configuration Spaces read from its front matter, and a short description."""
    data = SpaceCardData(
        title=title,
        sdk="gradio",
        sdk_version=sdk_version,
        app_file="app.py",
        models=[hub_model] if hub_model else None,
        tags=["ndclip", "zero-shot-image-classification", "image-text-retrieval"],
        emoji="🔎",
        colorFrom="indigo",
        colorTo="green",
        pinned=False,
    )
    model = f"[{hub_model}](https://huggingface.co/{hub_model})" if hub_model else f"in `{model_reference}/`"
    body = SPACE_DESCRIPTION.format(title=title, model=model, num_images=num_images, sdk_version=sdk_version)
    return str(SpaceCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))


def write_space(
    model_name_or_path: str,
    images: str | Path,
    output_dir: str | Path,
    hub_model_id: str | None = None,
    title: str = "NdCLIP",
    batch_size: int = 32,
) -> Path:
    """Write the Space folder `output_dir` (see the module docstring) for the model `model_name_or_path` (a saved
    folder or a Hub id) and the images of the folder `images`, and return it. Refuses a folder that is not empty."""
    output_dir, images = Path(output_dir), Path(images)
    if output_dir.exists() and any(output_dir.iterdir()):
        raise BadInputError(f"{output_dir} is not empty: choose a new --output_dir")
    if not images.is_dir():
        raise BadInputError(f"image folder {images} does not exist")
    sdk_version = gradio_version()
    model, processor = load_ndclip(model_name_or_path, "cpu")  # checks it is an NdCLIP before anything is written
    local_model = Path(model_name_or_path).is_dir()
    hub_model = hub_model_id or (None if local_model else model_name_or_path)

    output_dir.mkdir(parents=True, exist_ok=True)
    copy_code(output_dir)
    if hub_model is None:
        copy_model(Path(model_name_or_path), output_dir / MODEL_DIR)
    num_images = copy_images(images, output_dir / GALLERY_DIR)
    model_reference = hub_model or MODEL_DIR  # as app.py finds it: a Hub id, or a folder of the Space
    build_index(
        model, processor, model_reference, {"images": str(output_dir / GALLERY_DIR)}, output_dir / INDEX_DIR, batch_size
    )
    settings = {"model": model_reference, "index": INDEX_DIR, "title": title}
    (output_dir / SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n")
    (output_dir / "requirements.txt").write_text("\n".join(requirements()) + "\n")
    card = space_card(title, model_reference, hub_model, sdk_version, num_images)
    (output_dir / "README.md").write_text(card, encoding="utf-8")
    return output_dir


def push_space(space_dir: str | Path, space_id: str, private: bool = False, token: str | None = None) -> str:
    """Create the Gradio Space `space_id` (if it does not exist) and upload `space_dir` to it; returns its URL."""
    api = HfApi(token=token)
    try:
        url = api.create_repo(space_id, repo_type="space", space_sdk="gradio", private=private, exist_ok=True)
        api.upload_folder(
            repo_id=space_id, repo_type="space", folder_path=str(space_dir), commit_message="Upload the NdCLIP Space"
        )
    except OSError as error:  # offline, unreachable, refused (huggingface_hub's HTTP errors are OSErrors)
        raise BadInputError(f"cannot push {space_dir} to the Space {space_id}: {error}") from error
    return str(url)


# ----- command line -----------------------------------------------------------------------------------------------


def add_space_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `ndclip space`."""
    parser.add_argument("--model", required=True, help="a saved NdCLIP folder or a Hub id")
    parser.add_argument("--images", required=True, help="a folder of images to index and search (recursively)")
    parser.add_argument("--output_dir", required=True, help="the Space folder to write (new or empty)")
    parser.add_argument(
        "--hub_model_id", help="the Space loads this published copy of --model instead of holding the weights"
    )
    parser.add_argument("--title", default="NdCLIP", help="the Space's title")
    parser.add_argument("--batch_size", type=positive_int, default=32, help="images per batch when indexing")
    parser.add_argument("--push", action="store_true", help="create the Space --space_id and upload the folder")
    parser.add_argument("--space_id", help="user/name of the Space to push to")
    parser.add_argument("--private", action="store_true", help="make a new Space private")
    parser.add_argument("--hub_token", help="the Hub token (default: the one huggingface_hub finds)")


def check_repo_id(repo_id: str, flag: str) -> None:
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise BadInputError(f"{flag} {repo_id!r} is not a Hub id (user/name): {error}") from error


def run_space(args: argparse.Namespace) -> None:
    """`ndclip space`: write the folder, and push it with `--push`."""
    if args.push and not args.space_id:
        raise BadInputError("--push needs --space_id user/name")
    for flag, value in (("--space_id", args.space_id), ("--hub_model_id", args.hub_model_id)):
        if value:
            check_repo_id(value, flag)
    space_dir = write_space(args.model, args.images, args.output_dir, args.hub_model_id, args.title, args.batch_size)
    print(f"wrote the Space to {space_dir}; try it with: cd {space_dir} && python app.py")
    if args.push:
        print(f"pushed: {push_space(space_dir, args.space_id, args.private, args.hub_token)}")
