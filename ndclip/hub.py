"""The model card (`README.md`) of a trained NdCLIP, written with `huggingface_hub`'s `ModelCard` before the folder
is pushed to the Hub (`model.push_to_hub` / `processor.push_to_hub` upload it with the rest of the folder).

    ndclip card outputs/ndclip --dataset_name jxie/flickr8k --repo_id user/ndclip-flickr8k

The metadata says how the Hub should show and run the model (library, pipeline, tags, datasets, base models, a
widget example) and carries the evaluation results of `eval_results.json` as a `model-index`; the body describes
the model, its heads, its training, its results, how to use it (with the package versions its code needs), how to
deploy it as an Inference Endpoint (`deploy_section`) and its limitations. The metadata names Hub datasets only:
data that is not on the Hub (the demo's, local files) is described in the body, and results measured on it stay out
of the model-index, as transformers' own cards do.
"""

import argparse
import json
from pathlib import Path

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

from modeling_ndclip import NdClipModel
from ndclip.inference import BadInputError, check_ndclip
from ndclip.training import CHECKPOINTS_DIR, RUN_FILE

# The keys of `eval_results.json` (written by run_clip.py) reported in the model-index, with their names on the Hub.
RETRIEVAL_METRICS = {
    "image_to_text_recall@1": "Image-to-text R@1",
    "image_to_text_recall@5": "Image-to-text R@5",
    "image_to_text_recall@10": "Image-to-text R@10",
    "text_to_image_recall@1": "Text-to-image R@1",
    "text_to_image_recall@5": "Text-to-image R@5",
    "text_to_image_recall@10": "Text-to-image R@10",
    "image_to_text_median_rank": "Image-to-text median rank",
    "text_to_image_median_rank": "Text-to-image median rank",
}
RETRIEVAL_TASK = "image-text-retrieval"
ZERO_SHOT_TASK = "zero-shot-image-classification"
TAGS = ["ndlinear", "clip", "custom_code", "vision", "zero-shot-image-classification", "image-text-retrieval"]
# What the model code stored with the weights imports, as setup.cfg requires it (a test keeps the two equal). A
# constant rather than `importlib.metadata`: the card is also written from a checkout that was never pip-installed.
REMOTE_CODE_REQUIREMENTS = ("transformers>=5.24,<6", "torch>=2.4", "ndlinear>=1.0")
WIDGET = [
    {
        "src": "https://huggingface.co/datasets/mishig/sample_images/resolve/main/cat-dog-music.png",
        "candidate_labels": "a dog, a cat, people playing music",
        "example_title": "Cat & dog",
    }
]


def is_hub_dataset_id(name: str | None) -> bool:
    """Whether `name` can name a dataset on the Hub: a valid repo id that is not a local file or folder (which
    `datasets.load_dataset` would load instead)."""
    if not name or Path(name).exists():
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def eval_results_to_model_index(eval_results: dict, dataset_name: str | None) -> list[EvalResult]:
    """`EvalResult`s for the metrics of `eval_results.json` that are present and were measured on Hub datasets:
    retrieval on the evaluation split of `dataset_name`, and zero-shot accuracy on `zero_shot_dataset`.

    A model-index result names its dataset by Hub id, so results on other data (the demo's, local files) are left
    out, as transformers' `TrainingSummary` drops results without a dataset; the card's body still reports them."""
    results = []
    if dataset_name is not None:
        results += [
            EvalResult(
                task_type=RETRIEVAL_TASK,
                task_name="Image-text retrieval",
                dataset_type=dataset_name,
                dataset_name=dataset_name,
                dataset_split=eval_results.get("split"),
                metric_type=key,
                metric_name=name,
                metric_value=eval_results[key],
            )
            for key, name in RETRIEVAL_METRICS.items()
            if eval_results.get(key) is not None
        ]
    zero_shot_dataset = eval_results.get("zero_shot_dataset")
    if eval_results.get("zero_shot_accuracy") is not None and is_hub_dataset_id(zero_shot_dataset):
        results.append(
            EvalResult(
                task_type=ZERO_SHOT_TASK,
                task_name="Zero-shot image classification",
                dataset_type=zero_shot_dataset,
                dataset_name=zero_shot_dataset,
                metric_type="accuracy",
                metric_name="Zero-shot accuracy",
                metric_value=eval_results["zero_shot_accuracy"],
            )
        )
    return results


def tower_names(model) -> list[str]:
    """The Hub ids (or paths) the two towers were loaded from, when the config remembers them."""
    names = [getattr(c, "_name_or_path", "") for c in (model.config.vision_config, model.config.text_config)]
    return [name for name in names if name]


def format_value(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(format_value(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


# What each loss (`config.contrastive_loss`) means for the card: how the model was trained, what its scores are, and
# the line of the usage example that turns its logits into probabilities.
LOSS_DESCRIPTIONS = {
    "softmax": (
        "the symmetric contrastive (CLIP) loss over image-caption pairs: a softmax over every caption of the batch for "
        "each image, and over every image for each caption",
        "Its probabilities are a softmax of the logits over the candidate texts (labels) of each image: they sum to "
        "one, and say which of the candidates fits best.",
        "probs = outputs.logits_per_image.softmax(dim=-1)  # [images, texts], each row sums to one",
    ),
    "sigmoid": (
        "the pairwise sigmoid (SigLIP) loss over image-caption pairs: every image-caption pair of the batch is a "
        "binary decision, with a learned temperature and bias",
        "Its logits include its learned bias (`logit_bias`), and its probabilities are a sigmoid of each logit: the "
        "probability that a text matches the image, independently of the other candidates (they need not sum to "
        "one). The zero-shot pipeline scores this way (the model's config names its pipeline).",
        "probs = torch.sigmoid(outputs.logits_per_image)  # [images, texts], each pair on its own",
    ),
}


def card_body(
    model,
    model_id: str,
    eval_results: dict | None,
    training_args: dict | None,
    dataset_name: str | None,
    training_data: str | None,
    base_models: list[str],
) -> str:
    config = model.config
    vision, text = config.vision_config, config.text_config
    counts = model.head_parameter_counts()
    heads = counts["visual_projection"] + counts["text_projection"]
    head_kind = "NdLinear" if config.projection_type == "ndlinear" else "linear"
    grids = (
        f"the image tower's output is viewed as a {' x '.join(map(str, config.vision_input_grid))} grid and the text "
        f"tower's as {' x '.join(map(str, config.text_input_grid))}, each mapped to a "
        f"{' x '.join(map(str, config.projection_grid))} grid with one small linear layer per axis"
        if config.projection_type == "ndlinear"
        else "each head is a plain `nn.Linear`"
    )
    towers = (
        " and ".join(f"`{name}`" for name in base_models)
        if base_models
        else (f"a {vision.model_type} image tower and a {text.model_type} text tower")
    )
    requirements = " ".join(f'"{requirement}"' for requirement in REMOTE_CODE_REQUIREMENTS)
    trained_with, scores, probabilities_line = LOSS_DESCRIPTIONS[config.contrastive_loss]
    if dataset_name:
        dataset = f"[{dataset_name}](https://huggingface.co/datasets/{dataset_name})"
    else:
        dataset = training_data or "a custom dataset"

    sections = [
        f"# {model_id.split('/')[-1]}",
        f"An NdCLIP model: a CLIP-style image-text dual encoder built from {towers}, whose projection heads are "
        f"[NdLinear](https://github.com/ensemble-core/NdLinear) layers. Images and texts are embedded into one "
        f"{config.projection_dim}-dimensional, L2-normalised space where matching pairs have a high cosine "
        "similarity: use it for zero-shot image classification, image-to-text and text-to-image retrieval.",
        "## Projection heads\n\n"
        f"The heads are {head_kind} layers: {grids}.\n\n"
        + markdown_table(
            ["head", "parameters"],
            [
                ["image (visual_projection)", f"{counts['visual_projection']:,}"],
                ["text (text_projection)", f"{counts['text_projection']:,}"],
                [f"both {head_kind} heads", f"{heads:,}"],
                ["two linear heads of the same shape", f"{counts['linear_equivalent']:,}"],
            ],
        )
        + f"\n\nThe heads have {heads / counts['linear_equivalent']:.2%} of the parameters of linear heads.",
        "## Training\n\n"
        f"Trained on {dataset} with {trained_with} (`contrastive_loss: {config.contrastive_loss}` in its config). "
        f"{scores}"
        + (
            "\n\n" + markdown_table(["hyperparameter", "value"], [[f"`{k}`", v] for k, v in training_args.items()])
            if training_args
            else ""
        ),
    ]
    if eval_results:
        rows = [[name, eval_results[key]] for key, name in RETRIEVAL_METRICS.items() if key in eval_results]
        if eval_results.get("zero_shot_accuracy") is not None:
            where = eval_results.get("zero_shot_dataset") or "the evaluation data"
            where = where if is_hub_dataset_id(where) else Path(where).name  # not a path of the training machine
            rows.append([f"Zero-shot accuracy ({where})", eval_results["zero_shot_accuracy"]])
        if "eval_loss" in eval_results:
            rows.append([f"Contrastive loss ({config.contrastive_loss})", eval_results["eval_loss"]])
        measured = ", ".join(f"{key} {eval_results[key]}" for key in ("split", "step", "epoch") if key in eval_results)
        sections.append(
            f"## Evaluation\n\nRetrieval among the images and captions of the evaluation data ({measured}): R@k is "
            "the expected fraction of queries whose match is among the top k results when candidates scoring exactly "
            "alike are taken in random order (so ties never count as hits); lower median ranks are better.\n\n"
            + markdown_table(["metric", "value"], rows)
        )
    sections.append(
        "## Usage\n\n"
        "The model is custom code stored with the weights: load it with `trust_remote_code=True`, after installing "
        "the versions of the packages it was written for:\n\n"
        "```bash\n"
        f"pip install {requirements}\n"
        "```\n\n"
        "```python\n"
        "import torch\n"
        "from PIL import Image\n"
        "from transformers import AutoModel, AutoProcessor\n\n"
        f'model = AutoModel.from_pretrained("{model_id}", trust_remote_code=True).eval()\n'
        f'processor = AutoProcessor.from_pretrained("{model_id}", trust_remote_code=True)\n\n'
        'inputs = processor(text=["a dog runs on the grass", "a child plays with a ball"],\n'
        '                   images=[Image.open("photo.jpg")], return_tensors="pt")\n'
        "with torch.no_grad():\n"
        "    outputs = model(**inputs)\n"
        f"{probabilities_line}\n\n"
        "# embeddings for search (unnormalised: normalise before comparing)\n"
        'image_embeds = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output\n'
        'text_embeds = model.get_text_features(inputs["input_ids"], inputs["attention_mask"]).pooler_output\n'
        "```\n\n"
        "Zero-shot classification with the pipeline:\n\n"
        "```python\n"
        "from transformers import pipeline\n\n"
        f'classifier = pipeline("zero-shot-image-classification", model="{model_id}", trust_remote_code=True)\n'
        'classifier("photo.jpg", candidate_labels=["dog", "cat", "bicycle"], hypothesis_template="a photo of a {}.")\n'
        "```"
    )
    sections.append(deploy_section(model_id))
    sections.append(
        "## Limitations\n\n"
        f"- Trained on {dataset} only. It knows far fewer concepts than CLIP models trained on hundreds of millions "
        "of pairs: zero-shot labels far from what its training captions describe are unreliable, and it does not "
        "read text in images.\n"
        "- English only; captions longer than the tokenizer's maximum length are truncated.\n"
        "- It inherits the biases of its pretrained towers and of its captions; do not use it for decisions about "
        "people.\n"
        "- Loading runs the model code in this repository (`trust_remote_code=True`): read it first."
    )
    return "\n\n".join(sections) + "\n"


def deploy_section(model_id: str) -> str:
    """The card's "Deploy" section: how to run the model as an Inference Endpoint with the repository's custom
    handler (`handler.py`, written by `ndclip.endpoint`), with a curl and a Python request for each of its tasks."""
    return (
        "## Deploy\n\n"
        "The Hub's serverless inference (the widget on this page, the Inference API) does not run custom code, so it "
        "cannot run this model. Deploy it as an [Inference Endpoint](https://huggingface.co/docs/inference-endpoints) "
        f"instead: create one from `{model_id}` and the Endpoint finds the custom handler of this repository "
        "(`handler.py`) and installs what it needs (`requirements.txt`).\n\n"
        'A request is a JSON object `{"inputs": ..., "parameters": {...}}`; `parameters.task` selects the task (a '
        "zero-shot classification without it). Images are sent base64-encoded (URLs are not fetched); a bad request "
        "(bad base64, not an image, an empty label list, a text longer than the model takes...) is answered with HTTP "
        '400 and `{"error": "..."}` naming the field at fault.\n\n'
        + markdown_table(
            ["`parameters.task`", "`inputs`", "response"],
            [
                [
                    "`zero-shot-image-classification` (default)",
                    "an image; `parameters.candidate_labels` (a list or a comma-separated string), optional "
                    '`parameters.hypothesis_template` (default `"This is a photo of {}."`)',
                    '`[{"label", "score"}]`, best first',
                ],
                ["`image-embedding`", "an image or a list of images", "one L2-normalised embedding per image"],
                ["`text-embedding`", "a text or a list of texts", "one L2-normalised embedding per text"],
                [
                    "`image-text-similarity`",
                    '`{"images": [...], "texts": [...]}`',
                    '`{"cosine_similarity": [[...]], "probabilities": [[...]]}`, a row per image',
                ],
            ],
        )
        + "\n\n"
        "```bash\n"
        "ENDPOINT=https://<your-endpoint>.endpoints.huggingface.cloud\n"
        'AUTH="Authorization: Bearer $HF_TOKEN"\n'
        "# zero-shot classification (the image goes through a file: a photo is too long for a command line)\n"
        'printf \'{"inputs": "%s", "parameters": {"candidate_labels": ["dog", "cat", "bicycle"]}}\' '
        '"$(base64 -w0 photo.jpg)" > request.json\n'
        'curl "$ENDPOINT" -H "$AUTH" -H "Content-Type: application/json" -d @request.json\n'
        "# the same with the raw image as the body, the parameters in the query string\n"
        'curl "$ENDPOINT?candidate_labels=dog,cat,bicycle" -H "$AUTH" -H "Content-Type: image/jpeg" '
        "--data-binary @photo.jpg\n"
        "# image embeddings\n"
        'printf \'{"inputs": ["%s"], "parameters": {"task": "image-embedding"}}\' "$(base64 -w0 photo.jpg)" '
        "> request.json\n"
        'curl "$ENDPOINT" -H "$AUTH" -H "Content-Type: application/json" -d @request.json\n'
        "# text embeddings\n"
        'curl "$ENDPOINT" -H "$AUTH" -H "Content-Type: application/json" \\\n'
        '  -d \'{"inputs": ["a dog runs on the grass"], "parameters": {"task": "text-embedding"}}\'\n'
        "# image-text similarity\n"
        'printf \'{"inputs": {"images": ["%s"], "texts": ["a dog", "a cat"]}, '
        '"parameters": {"task": "image-text-similarity"}}\' "$(base64 -w0 photo.jpg)" > request.json\n'
        'curl "$ENDPOINT" -H "$AUTH" -H "Content-Type: application/json" -d @request.json\n'
        "```\n\n"
        "```python\n"
        "import base64\n"
        "import os\n\n"
        "import requests\n\n"
        'ENDPOINT = "https://<your-endpoint>.endpoints.huggingface.cloud"\n\n\n'
        "def query(inputs, **parameters):\n"
        "    response = requests.post(\n"
        '        ENDPOINT, json={"inputs": inputs, "parameters": parameters},\n'
        '        headers={"Authorization": f"Bearer {os.environ[\'HF_TOKEN\']}"},\n'
        "    )\n"
        "    if response.status_code == 400:\n"
        '        raise ValueError(response.json()["error"])\n'
        "    response.raise_for_status()\n"
        "    return response.json()\n\n\n"
        'with open("photo.jpg", "rb") as file:\n'
        "    image = base64.b64encode(file.read()).decode()\n"
        'labels = query(image, candidate_labels=["dog", "cat", "bicycle"], hypothesis_template="a photo of a {}.")\n'
        'image_embeddings = query([image], task="image-embedding")\n'
        'text_embeddings = query(["a dog runs on the grass", "a cat sleeps"], task="text-embedding")\n'
        'scores = query({"images": [image], "texts": ["a dog", "a cat"]}, task="image-text-similarity")\n'
        "```"
    )


def write_model_card(
    output_dir: str | Path,
    model,
    eval_results: dict | None = None,
    training_args: dict | None = None,
    dataset_name: str | None = None,
    training_data: str | None = None,
    base_models: list[str] | None = None,
    repo_id: str | None = None,
) -> ModelCard:
    """Write `output_dir/README.md`, the model card of `model`, and return it.

    Args:
        output_dir: the saved model folder (the card goes next to `config.json`).
        model: the trained `NdClipModel` (its config and head sizes are described).
        eval_results: the metrics of run_clip.py's `eval_results.json`; read from `output_dir/eval_results.json`
            when None and that file exists.
        training_args: hyperparameters to list (name -> value).
        dataset_name: the Hub id of the training dataset (listed in the metadata, and in the model-index with the
            results); raises `BadInputError` (a ValueError) for anything else.
        training_data: for data that is not on the Hub, how the body describes it (e.g. "local data: my_photos").
        base_models: the Hub ids of the two towers; defaults to those the config remembers.
        repo_id: the Hub id the folder will be pushed to (used in the usage snippets).
    """
    if dataset_name is not None and not is_hub_dataset_id(dataset_name):
        raise BadInputError(
            f"dataset_name {dataset_name!r} is not a Hub dataset id: the card's metadata would link to a page that "
            "does not exist. Describe local or generated data with training_data instead."
        )
    output_dir = Path(output_dir)
    if eval_results is None and (output_dir / "eval_results.json").is_file():
        eval_results = json.loads((output_dir / "eval_results.json").read_text())
    base_models = base_models if base_models is not None else tower_names(model)
    model_id = repo_id or output_dir.name
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag=ZERO_SHOT_TASK,
        license="apache-2.0",
        language="en",
        tags=TAGS,
        datasets=[dataset_name] if dataset_name else None,
        base_model=base_models or None,
        model_name=model_id.split("/")[-1],
        eval_results=(eval_results_to_model_index(eval_results, dataset_name) or None) if eval_results else None,
        widget=WIDGET,
    )
    body = card_body(model, model_id, eval_results, training_args, dataset_name, training_data, base_models)
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")
    output_dir.mkdir(parents=True, exist_ok=True)
    card.save(output_dir / "README.md")
    return card


def add_card_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `ndclip card`."""
    parser.add_argument("folder", help="the saved model folder")
    parser.add_argument("--eval_results", help="an eval_results.json (default: the folder's, if any)")
    parser.add_argument("--training_args", help="a JSON file of hyperparameters to list")
    parser.add_argument("--dataset_name", help="the Hub id of the training dataset")
    parser.add_argument("--training_data", help="how to describe training data that is not on the Hub")
    parser.add_argument("--base_models", help="the Hub ids of the two towers, comma-separated")
    parser.add_argument("--repo_id", help="the Hub id the folder will be pushed to")


def run_card(args: argparse.Namespace) -> None:
    """`ndclip card`: write the model card of the saved model folder `args.folder`."""

    def read(path):
        return json.loads(Path(path).read_text()) if path else None

    check_ndclip(args.folder)
    write_model_card(
        args.folder,
        NdClipModel.from_pretrained(args.folder),
        eval_results=read(args.eval_results),
        training_args=read(args.training_args),
        dataset_name=args.dataset_name,
        training_data=args.training_data,
        base_models=args.base_models.split(",") if args.base_models else None,
        repo_id=args.repo_id,
    )


# ----- run_clip.py's output folder on the Hub -----------------------------------------------------------------------


def write_card(args, model, eval_results) -> None:
    """The model card of the model run_clip.py trained with `args` (its parsed arguments), in `args.output_dir`."""
    # The card's metadata names Hub datasets only; the demo's data and local files are described in its body.
    local = args.data_dir or args.train_file or (None if is_hub_dataset_id(args.dataset_name) else args.dataset_name)
    if args.preset == "demo" and not (args.data_dir or args.train_file):
        dataset, training_data = None, "the offline demo's generated data"
    else:
        dataset, training_data = (None, f"local data: {Path(local).name}") if local else (args.dataset_name, None)
    training_args = {
        k: v
        for k, v in vars(args).items()
        if k in {
            "learning_rate", "weight_decay", "num_train_epochs", "max_train_steps", "per_device_train_batch_size",
            "gradient_accumulation_steps", "contrastive_accumulation", "lr_scheduler_type", "num_warmup_steps", "seed",
            "max_seq_length", "freeze_vision_model", "freeze_text_model", "preset",
        }
    }  # fmt: skip
    training_args["lr_scheduler_type"] = str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type))
    base_models = None if args.preset == "demo" or args.model_name_or_path else [
        args.vision_model_name_or_path,
        args.text_model_name_or_path,
    ]  # fmt: skip
    write_model_card(
        args.output_dir,
        model,
        eval_results=eval_results,
        training_args=training_args,
        dataset_name=dataset,
        training_data=training_data,
        base_models=base_models,
        repo_id=args.hub_model_id,
    )


# What stays local when run_clip.py's output folder is pushed: resumable training state, the run's settings (local
# paths) and tracker logs.
HUB_IGNORE_PATTERNS = [f"{CHECKPOINTS_DIR}/*", "runs/*", RUN_FILE]


def push_folder(args, message: str) -> None:
    """Upload run_clip.py's Hub-ready output folder (not the training checkpoints or tracker logs) to
    `args.hub_model_id`."""
    api = HfApi(token=args.hub_token)
    api.create_repo(args.hub_model_id, private=args.hub_private_repo, exist_ok=True)
    api.upload_folder(
        repo_id=args.hub_model_id,
        folder_path=args.output_dir,
        commit_message=message,
        ignore_patterns=HUB_IGNORE_PATTERNS,
    )
