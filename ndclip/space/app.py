"""NdCLIP demo: zero-shot labels for an uploaded image, and the nearest images of an indexed folder for a caption.

The `app.py` of a Space written by `ndclip space` (a copy of `ndclip/space/app.py`), run on CPU by the Space or
locally with `python app.py [--model M] [--index DIR] [--host H] [--port N]`. Each setting is taken from, in order:
the option, the environment variable (`NDCLIP_MODEL`, `NDCLIP_INDEX`), the Space's `space.json` (paths in it are
relative to the Space folder), the default (`model` and `index` next to this file). The model is a saved NdCLIP
folder or a Hub id; the index is a folder written by `ndclip search index` with this model (optional: without one
the search tab says so).

Zero-shot probabilities are the model's own (`ndclip.predict.predict`): a softmax over the labels for a model trained
with the softmax loss, a sigmoid per label for a sigmoid model, with one template or the built-in prompt ensemble
(`ndclip.prompts`).
"""

import argparse
import json
import logging
import os
from pathlib import Path

import ndclip
from ndclip.inference import BadInputError, load_ndclip
from ndclip.predict import parse_labels, predict
from ndclip.prompts import BUILTIN_TEMPLATES, DEFAULT_TEMPLATE, check_template
from ndclip.search import INDEX_FILE, load_index, query_index, resolve_path

logger = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
SETTINGS_FILE = "space.json"  # written by `ndclip space`: {"model": ..., "index": ..., "title": ...}
DEFAULTS = {"model": "model", "index": "index", "title": "NdCLIP"}
MAX_LABELS = 100  # each label is one text (per template) to embed per request: keep a request cheap on a CPU
MAX_RESULTS = 24
EXAMPLE_LABELS = "a dog, a cat, a bicycle"


def space_settings(argv: list[str] | None = None) -> argparse.Namespace:
    """The app's settings: options, else environment variables, else `space.json`, else the defaults."""
    from_file = json.loads((HERE / SETTINGS_FILE).read_text()) if (HERE / SETTINGS_FILE).is_file() else {}

    def default(key: str, variable: str | None = None) -> str:
        if variable and os.environ.get(variable):
            return os.environ[variable]
        value = from_file.get(key, DEFAULTS[key])
        # A path in space.json (or a default) is relative to the Space folder; a Hub id is not a folder here.
        return str(HERE / value) if key != "title" and (HERE / value).exists() else value

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=default("model", "NDCLIP_MODEL"), help="a saved NdCLIP folder or Hub id")
    parser.add_argument("--index", default=default("index", "NDCLIP_INDEX"), help="an `ndclip search index` folder")
    parser.add_argument("--title", default=default("title"))
    # None: Gradio's defaults, which read GRADIO_SERVER_NAME / GRADIO_SERVER_PORT (set on a Space).
    parser.add_argument("--host", help="the address to serve on (default: Gradio's, 127.0.0.1)")
    parser.add_argument("--port", type=int, help="the port to serve on (default: Gradio's, 7860)")
    return parser.parse_args(argv)


# ----- what the app computes (no Gradio here: usable and testable without it) ---------------------------------------


def zero_shot(model, processor, image, labels_text: str, templates: list[str]) -> list[dict]:
    """The labels typed in `labels_text` (comma-separated) with their probabilities for the PIL `image`, best first:
    `[{"label", "score"}]`. Raises `BadInputError` for a missing image, no label, too many or repeated labels."""
    if image is None:
        raise BadInputError("upload an image first")
    if not labels_text or not labels_text.replace(",", "").strip():
        raise BadInputError("type at least one label (several: separated by commas)")
    labels = parse_labels(labels_text)  # raises for repeated labels
    if len(labels) > MAX_LABELS:
        raise BadInputError(f"{len(labels)} labels: at most {MAX_LABELS}")
    predictions, skipped = predict(model, processor, [image], labels, templates, top_k=len(labels))
    if skipped:
        raise BadInputError(f"cannot read the image: {skipped[0]['reason']}")
    return predictions[0]["labels"]


def templates_for(ensemble: bool, template: str) -> list[str]:
    """The built-in prompt ensemble, or the one `template` (checked: exactly one `{}`)."""
    return list(BUILTIN_TEMPLATES) if ensemble else [check_template(template or DEFAULT_TEMPLATE)]


class ImageIndex:
    """A search index (`ndclip search index`) with the model that built it; `nearest` finds images for a text."""

    def __init__(self, index_dir: str | Path, model, model_name: str):
        self.index_dir = Path(index_dir)
        info, self.datasets = load_index(self.index_dir, model, model_name)  # refuses another model
        if not info["source"].get("images"):
            raise BadInputError(f"the index in {index_dir} is of a dataset, not of a folder of images: nothing to show")
        self.images_dir = Path(resolve_path(self.index_dir, info["source"]["images"]))
        self.size = len(self.datasets["images"])

    def nearest(self, model, processor, text: str, top_k: int) -> list[dict]:
        """The `top_k` images nearest to `text`, best first: `rank`, `score` (cosine), `path` (resolved) and `name`
        (the path within the indexed folder)."""
        if not text or not text.strip():
            raise BadInputError("type a caption to search for")
        results = query_index(
            model, processor, self.datasets, text=text.strip(), top_k=int(top_k), index_dir=self.index_dir
        )
        return [{**r, "name": Path(r["path"]).relative_to(self.images_dir).as_posix()} for r in results]


def open_index(index_dir: str | Path, model, model_name: str) -> ImageIndex | None:
    """The index in `index_dir`, or None (logged) where there is none."""
    if not (Path(index_dir) / INDEX_FILE).is_file():
        logger.warning("no search index in %s: the search tab is disabled", index_dir)
        return None
    return ImageIndex(index_dir, model, model_name)


def describe(model, model_name: str, index: ImageIndex | None) -> str:
    """The Markdown line under the title: which model, its loss, and what the search covers."""
    sigmoid = model.config.contrastive_loss == "sigmoid"
    probabilities = "a sigmoid per label" if sigmoid else "a softmax over the labels"
    searched = f"{index.size} indexed images" if index else "no image index"
    return (
        f"Model `{Path(model_name).name if Path(model_name).is_dir() else model_name}` "
        f"({model.config.projection_dim}-d embeddings; probabilities: {probabilities}); {searched}. Runs on CPU."
    )


# ----- the interface ------------------------------------------------------------------------------------------------


def build_demo(model, processor, model_name: str, index: ImageIndex | None, title: str = DEFAULTS["title"]):
    """The Gradio app (`gr.Blocks`) for the model `model_name` and its `index`, and the folders it serves images
    from (`launch(allowed_paths=...)`)."""
    # Gradio is imported here, not at the top, so that the functions above can be used (and tested) without it.
    import gradio as gr

    def classify(image, labels_text, ensemble, template):
        try:
            labels = zero_shot(model, processor, image, labels_text, templates_for(ensemble, template))
        except BadInputError as error:
            raise gr.Error(str(error)) from error
        scores = {m["label"]: m["score"] for m in labels}
        return scores, [[m["label"], f"{m['score']:.4f}"] for m in labels]

    def search(text, top_k):
        try:
            results = index.nearest(model, processor, text, top_k)
        except BadInputError as error:
            raise gr.Error(str(error)) from error
        gallery = [(r["path"], f"{r['rank']}. {r['name']} ({r['score']:.3f})") for r in results]
        return gallery, [[r["rank"], r["name"], f"{r['score']:.4f}"] for r in results]

    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(f"# {title}\n\n{describe(model, model_name, index)}")
        with gr.Tab("Zero-shot labels", id="labels_tab"):
            with gr.Row():
                image = gr.Image(type="pil", label="Image", elem_id="image", height=320)
                with gr.Column():
                    labels = gr.Textbox(label="Labels, comma-separated", value=EXAMPLE_LABELS, elem_id="labels")
                    ensemble = gr.Checkbox(
                        label=f"Prompt ensemble: average over {len(BUILTIN_TEMPLATES)} built-in templates",
                        elem_id="ensemble",
                    )
                    template = gr.Textbox(label="Template (without the ensemble)", value=DEFAULT_TEMPLATE)
                    classify_button = gr.Button("Classify", variant="primary", elem_id="classify")
            with gr.Row():
                chart = gr.Label(label="Probabilities", elem_id="probabilities")
                table = gr.Dataframe(headers=["label", "probability"], elem_id="probability_table", interactive=False)
            classify_button.click(classify, [image, labels, ensemble, template], [chart, table])
        with gr.Tab("Search images by caption", id="search_tab"):
            if index is None:
                gr.Markdown("This app has no image index: write the Space with `ndclip space --images FOLDER`.")
            else:
                with gr.Row():
                    query = gr.Textbox(label="Caption", placeholder="a red circle", elem_id="query", scale=4)
                    top_k = gr.Slider(1, min(MAX_RESULTS, index.size), value=min(6, index.size), step=1, label="Images")
                    search_button = gr.Button("Search", variant="primary", elem_id="search", scale=1)
                gallery = gr.Gallery(label="Nearest images", elem_id="gallery", columns=6, height=300)
                results = gr.Dataframe(headers=["rank", "image", "cosine"], elem_id="search_table", interactive=False)
                search_button.click(search, [query, top_k], [gallery, results])
                query.submit(search, [query, top_k], [gallery, results])
    # Gradio serves only files under the working folder, its temporary folder and the `allowed_paths` of `launch`.
    return demo, [str(index.images_dir)] if index else []


def main(argv: list[str] | None = None) -> None:
    settings = space_settings(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logger.info("ndclip package: %s", Path(ndclip.__file__).resolve().parent)
    logger.info("model: %s; index: %s", settings.model, settings.index)
    os.environ.setdefault("TQDM_DISABLE", "1")  # no embedding progress bars in the server's log
    try:
        model, processor = load_ndclip(settings.model, "cpu")
        index = open_index(settings.index, model, settings.model)  # refuses an index built with other weights
    except BadInputError as error:
        raise SystemExit(f"app.py: error: {error}") from error
    demo, allowed_paths = build_demo(model, processor, settings.model, index, settings.title)
    # ssr_mode=False: server-side rendering needs Node.js, which a Gradio Space has but a Python environment may not.
    demo.queue().launch(
        server_name=settings.host, server_port=settings.port, allowed_paths=allowed_paths, ssr_mode=False
    )


if __name__ == "__main__":
    main()
