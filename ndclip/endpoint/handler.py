"""The Hugging Face Inference Endpoints handler of an NdCLIP model repository (`handler.py` beside `config.json`).

An Endpoint with a custom handler imports this file from the repository, builds `EndpointHandler(path)` with the
repository's folder, and calls it with each request's JSON body, `{"inputs": ..., "parameters": {...}}`. The file is
self-contained (torch, transformers, PIL and the standard library): the Endpoint does not have the `ndclip` package,
and the model and processor are the repository's own code, loaded with `trust_remote_code=True`. What the image
lacks is in `requirements.txt` beside this file, which the Endpoint installs first.

`parameters.task` selects the task; without it the request is a zero-shot classification, the model's pipeline task
(so a request written for the zero-shot-image-classification task works unchanged). Images are sent as base64
strings (a `data:image/...;base64,` prefix is accepted, as is `{"image": <base64>}` in place of the string, and raw
bytes, which is how the Endpoint passes a request sent as `Content-Type: image/*`). URLs are refused: the handler
never fetches anything on a caller's behalf.

    task (parameters.task)            inputs                                  response
    zero-shot-image-classification    an image                                [{"label": str, "score": float}, ...],
      (the default)                   + parameters.candidate_labels           best first
                                        (a list, or one comma-separated string)
                                      + parameters.hypothesis_template
                                        (optional, default "This is a photo of {}.")
    image-embedding                   an image, or a list of images           [[float, ...], ...]: one L2-normalised
    text-embedding                    a text, or a list of texts                embedding per input, in order
    image-text-similarity             {"images": [...], "texts": [...]}       {"cosine_similarity": [[...]],
                                      ("image" / "text" for a single one)      "probabilities": [[...]]}: one row per
                                                                                 image, one column per text

Scores and probabilities are the model's: a softmax over the labels (texts) of each image, or for a model trained
with the sigmoid loss (`config.contrastive_loss == "sigmoid"`) an independent sigmoid per image-text pair.

A request the handler cannot answer raises `RequestError` (a `ValueError`) whose message names the request field
(`inputs`, `parameters.candidate_labels`, ...): the server answers it with HTTP 400 and `{"error": message}`.
Texts longer than the model's limit are refused, not truncated; images with more pixels than PIL's
`Image.MAX_IMAGE_PIXELS` (decompression bombs) are refused before they are decoded.
"""

import base64
import binascii
import io
import warnings

import torch
from PIL import Image, UnidentifiedImageError
from transformers import AutoModel, AutoProcessor

ZERO_SHOT = "zero-shot-image-classification"
IMAGE_EMBEDDING = "image-embedding"
TEXT_EMBEDDING = "text-embedding"
SIMILARITY = "image-text-similarity"
TASKS = (ZERO_SHOT, IMAGE_EMBEDDING, TEXT_EMBEDDING, SIMILARITY)
# The parameters each task takes besides `task`; any other is refused rather than silently ignored.
TASK_PARAMETERS = {ZERO_SHOT: {"candidate_labels", "hypothesis_template"}}
# The default of transformers' zero-shot-image-classification pipeline, so that both give the same scores.
DEFAULT_HYPOTHESIS_TEMPLATE = "This is a photo of {}."
# Request size limits: each text and image is run through the model, so these bound the work one request asks for.
# 1,000 labels cover ImageNet-1k's classes. Edit them here, in the repository's copy, to serve larger requests.
MAX_TEXTS = 1000  # candidate labels, or texts of a text-embedding / similarity request
MAX_IMAGES = 32  # images of an image-embedding / similarity request
URL_PREFIXES = ("http://", "https://", "ftp://", "file:", "//")
MODEL_INPUTS = ("pixel_values", "input_ids", "attention_mask")  # the processor's outputs the model takes
RESULTS = ("image_embeds", "text_embeds", "logits_per_image")  # the model outputs the tasks use


class RequestError(ValueError):
    """A request the handler cannot answer; the message names the request field at fault. Served as HTTP 400."""


class EndpointHandler:
    """Loads the NdCLIP of the repository at `path` (on the GPU when there is one) and answers requests."""

    def __init__(self, path: str = ""):
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = AutoModel.from_pretrained(path or ".", trust_remote_code=True).eval().to(self.device)
        self.processor = AutoProcessor.from_pretrained(path or ".", trust_remote_code=True)
        self.sigmoid = getattr(self.model.config, "contrastive_loss", "softmax") == "sigmoid"
        self.max_text_tokens = text_token_limit(self.model.config, self.processor.tokenizer)

    def __call__(self, data: dict):
        if not isinstance(data, dict) or "inputs" not in data:
            raise RequestError('the request must be a JSON object with an "inputs" field')
        parameters = data.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise RequestError(f"parameters must be a JSON object, got {type(parameters).__name__}")
        task = parameters.get("task", ZERO_SHOT)
        if task not in TASKS:
            raise RequestError(f"parameters.task {task!r} is not a task of this model: use one of {', '.join(TASKS)}")
        unknown = sorted(set(parameters) - {"task"} - TASK_PARAMETERS.get(task, set()))
        if unknown:
            raise RequestError(f"parameters.{unknown[0]} is not a parameter of the task {task}")
        inputs = data["inputs"]
        if task == ZERO_SHOT:
            return self.classify(inputs, parameters)
        if task == IMAGE_EMBEDDING:
            return self.embed_images(decode_images(inputs, "inputs")).tolist()
        if task == TEXT_EMBEDDING:
            return self.embed_texts(self.check_texts(as_list(inputs, "inputs", MAX_TEXTS), "inputs")).tolist()
        return self.similarity(inputs)

    # ----- tasks --------------------------------------------------------------------------------------------------

    def classify(self, inputs, parameters: dict) -> list[dict]:
        """Zero-shot labels of one image, best first, as the zero-shot-image-classification pipeline gives them."""
        if isinstance(inputs, list):
            raise RequestError("inputs must be one image for zero-shot-image-classification, got a list")
        image = decode_image(inputs, "inputs")
        labels = candidate_labels(parameters.get("candidate_labels"))
        template = parameters.get("hypothesis_template", DEFAULT_HYPOTHESIS_TEMPLATE)
        prompts = self.check_texts(hypotheses(template, labels), "parameters.candidate_labels")
        probabilities = self.probabilities(self.forward([image], prompts)["logits_per_image"])[0]
        ranked = sorted(zip(labels, probabilities.tolist()), key=lambda pair: -pair[1])
        return [{"label": label, "score": score} for label, score in ranked]

    def similarity(self, inputs) -> dict:
        """Cosine similarities and probabilities of every image with every text (rows: images, columns: texts)."""
        if not isinstance(inputs, dict):
            raise RequestError(
                'inputs must be a JSON object {"images": [...], "texts": [...]} for image-text-similarity'
            )
        images = decode_images(*one_or_many(inputs, "image", "images"))
        texts, field = one_or_many(inputs, "text", "texts")
        outputs = self.forward(images, self.check_texts(as_list(texts, field, MAX_TEXTS), field))
        return {
            "cosine_similarity": (outputs["image_embeds"] @ outputs["text_embeds"].T).tolist(),
            "probabilities": self.probabilities(outputs["logits_per_image"]).tolist(),
        }

    # ----- the model ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def forward(self, images: list | None = None, texts: list[str] | None = None) -> dict[str, torch.Tensor]:
        """The model's outputs the tasks use (embeddings, and with both inputs `logits_per_image`), on the CPU in
        float32. Texts must have been checked by `check_texts`, so the processor's truncation never applies."""
        batch = self.processor(images=images, text=texts, return_tensors="pt").to(self.device)
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(self.model.dtype)
        outputs = self.model(**{key: batch[key] for key in MODEL_INPUTS if key in batch})
        return {key: value.float().cpu() for key, value in outputs.items() if key in RESULTS}

    def embed_images(self, images: list) -> torch.Tensor:
        """L2-normalised image embeddings `[len(images), projection_dim]`."""
        return self.forward(images=images)["image_embeds"]

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """L2-normalised text embeddings `[len(texts), projection_dim]`."""
        return self.forward(texts=texts)["text_embeds"]

    def probabilities(self, logits_per_image: torch.Tensor) -> torch.Tensor:
        """`[images, texts]` probabilities from the model's logits: sigmoid per pair for a model trained with the
        sigmoid loss (its logits include its bias), else softmax over the texts of each image."""
        return torch.sigmoid(logits_per_image) if self.sigmoid else logits_per_image.softmax(dim=-1)

    def check_texts(self, texts: list[str], field: str) -> list[str]:
        """`texts`, once each is known to fit the model: a longer text would be cut by the tokenizer, and its
        embedding describe only its beginning, so it is refused instead."""
        lengths = [len(ids) for ids in self.processor.tokenizer(texts, truncation=False, verbose=False)["input_ids"]]
        for i, length in enumerate(lengths):
            if length > self.max_text_tokens:
                raise RequestError(
                    f"{field}[{i}] is {length} tokens long (with the special tokens), over the model's limit of "
                    f"{self.max_text_tokens}: shorten it (texts are not truncated)"
                )
        return texts


def text_token_limit(config, tokenizer) -> int:
    """The most tokens a text may have: the tokenizer's `model_max_length` (a huge placeholder when unset) and the
    text tower's position embeddings, whichever is smaller."""
    limits = [tokenizer.model_max_length, getattr(config.text_config, "max_position_embeddings", None)]
    return min(limit for limit in limits if isinstance(limit, int) and 0 < limit < 1_000_000)


# ----- reading requests -----------------------------------------------------------------------------------------


def decode_image(value, field: str) -> Image.Image:
    """The image in a request field: base64 text (optionally a data URI), `{"image": <base64>}`, or raw bytes."""
    if isinstance(value, dict):
        if set(value) != {"image"}:
            raise RequestError(f'{field} must be a base64 image or {{"image": <base64>}}, got keys {sorted(value)}')
        return decode_image(value["image"], f"{field}.image")
    if isinstance(value, str):
        value = value.strip()
        if value.lower().startswith(URL_PREFIXES):
            raise RequestError(f"{field} is a URL: the endpoint does not fetch URLs, send the image base64-encoded")
        if value.startswith("data:"):
            header, _, value = value.partition(",")
            if not header.endswith(";base64"):
                raise RequestError(f"{field} is a data URI that is not base64-encoded")
        try:  # line breaks (as `base64` writes without -w0) are dropped; any other character is an error
            value = base64.b64decode("".join(value.split()), validate=True)
        except (binascii.Error, ValueError) as error:
            raise RequestError(f"{field} is not valid base64: {error}") from None
    elif not isinstance(value, bytes | bytearray):
        raise RequestError(f"{field} must be a base64-encoded image (a string), got {type(value).__name__}")
    if not value:
        raise RequestError(f"{field} is empty: it must hold an image")
    return open_image(bytes(value), field)


def open_image(data: bytes, field: str) -> Image.Image:
    """The decoded image in `data`. Its size is read from the header first: PIL refuses an image of more than
    `Image.MAX_IMAGE_PIXELS` pixels (it warns up to twice that; the warning is an error here), so a small file that
    would expand to gigabytes is never decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise RequestError(f"{field} is refused as a decompression bomb: {error}") from None
    except UnidentifiedImageError:
        raise RequestError(f"{field} is not an image: its bytes are in no image format PIL reads") from None
    except Exception as error:  # PIL's decoders raise many kinds of errors on bad data (OSError, SyntaxError, ...)
        raise RequestError(f"{field} is not a readable image: {error}") from None
    return image


def decode_images(inputs, field: str) -> list[Image.Image]:
    """One image or a list of them (`{"images": [...]}` too)."""
    if isinstance(inputs, dict) and "images" in inputs:
        return decode_images(inputs["images"], f"{field}.images")
    items = as_list(inputs, field, MAX_IMAGES, kinds=(str, bytes, dict))
    return [decode_image(item, f"{field}[{i}]") for i, item in enumerate(items)]


def as_list(value, field: str, limit: int, kinds=(str,)) -> list:
    """`value` as a non-empty list of at most `limit` items (one item becomes a list of one)."""
    items = [value] if isinstance(value, kinds) else value
    if not isinstance(items, list):
        raise RequestError(f"{field} must be a {kinds[0].__name__} or a list, got {type(value).__name__}")
    if not items:
        raise RequestError(f"{field} is empty")
    if len(items) > limit:
        raise RequestError(f"{field} has {len(items)} items, more than the limit of {limit} per request")
    for i, item in enumerate(items):
        if not isinstance(item, kinds) or (isinstance(item, str) and kinds == (str,) and not item.strip()):
            raise RequestError(f"{field}[{i}] must be a non-empty {kinds[0].__name__}, got {item!r:.40}")
    return items


def one_or_many(inputs: dict, one: str, many: str) -> tuple:
    """`inputs[many]` or `inputs[one]` (exactly one of the two must be given), and the name of its field."""
    given = [key for key in (one, many) if key in inputs]
    if len(given) != 1:
        raise RequestError(f'inputs must have either "{one}" or "{many}" for image-text-similarity')
    return inputs[given[0]], f"inputs.{given[0]}"


def candidate_labels(value) -> list[str]:
    """`parameters.candidate_labels` as a list: a JSON list, or one comma-separated string (as the Hub widget
    sends them)."""
    if value is None:
        raise RequestError("parameters.candidate_labels is required for zero-shot-image-classification")
    if isinstance(value, str):
        value = [label.strip() for label in value.split(",") if label.strip()]
    return as_list(value, "parameters.candidate_labels", MAX_TEXTS)


def hypotheses(template, labels: list[str]) -> list[str]:
    """The prompt of each label: `template` with `{}` replaced by it, as the pipeline builds them."""
    if not isinstance(template, str) or "{}" not in template:
        raise RequestError(f"parameters.hypothesis_template must be a string with {{}} for the label, got {template!r}")
    try:
        return [template.format(label) for label in labels]
    except (IndexError, KeyError, ValueError) as error:
        raise RequestError(f"parameters.hypothesis_template {template!r} is not a valid template: {error}") from None
