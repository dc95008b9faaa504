"""The Inference Endpoints handler (ndclip/endpoint/handler.py, copied into every saved folder) and its local server,
tested as an Endpoint runs them: the handler imported from a saved folder's `handler.py`, called with JSON payloads
in a fresh process without the ndclip package, and served over real HTTP."""

import base64
import http.client
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.parse
import urllib.request
from importlib.metadata import requires
from pathlib import Path

import pytest
import torch
from conftest import random_images, write_unreadable_images
from huggingface_hub.utils import filter_repo_objects
from packaging.requirements import Requirement
from PIL import Image
from transformers import pipeline

from ndclip.endpoint import ENDPOINT_REQUIREMENTS, HANDLER_SOURCE, write_endpoint_files
from ndclip.hub import HUB_IGNORE_PATTERNS, write_model_card

LABELS = ["a red square", "a blue circle", "a dog"]
TEXTS = ["a dog runs across the field", "a cat sleeps on a sofa"]
BODY_LIMIT = 1_000_000  # of the test server: above every other request of the tests
SERVER_START_TIMEOUT = 180  # seconds: loading torch and the model on a busy 2-core machine


def encode(image: Image.Image, image_format: str = "PNG") -> str:
    data = io.BytesIO()
    image.save(data, image_format)
    return base64.b64encode(data.getvalue()).decode()


def load_handler_module(folder: Path):
    """The folder's `handler.py` as a module, imported from its path as the Endpoints toolkit imports it."""
    spec = importlib.util.spec_from_file_location("handler", folder / "handler.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def endpoint_dir(tmp_path_factory, saved_model_dir, make_model):
    """A saved tiny NdCLIP (conftest's) with its handler added by `ndclip endpoint add` and its card; unreadable
    images beside it."""
    from ndclip.cli import main

    folder = tmp_path_factory.mktemp("endpoint") / "model"
    shutil.copytree(saved_model_dir, folder)
    main(["endpoint", "add", str(folder)])
    write_model_card(folder, make_model(), repo_id="user/ndclip-endpoint")
    write_unreadable_images(folder.parent)
    return folder


@pytest.fixture(scope="module")
def handler_module(endpoint_dir):
    return load_handler_module(endpoint_dir)


@pytest.fixture(scope="module")
def handler(handler_module, endpoint_dir):
    return handler_module.EndpointHandler(str(endpoint_dir))


@pytest.fixture(scope="module")
def image_b64():
    return [encode(image) for image in random_images(3, seed=5)]


def payloads(image_b64: list[str]) -> dict:
    """A request of every task (JSON-serialisable), by name."""
    return {
        "zero_shot": {"inputs": image_b64[0], "parameters": {"candidate_labels": LABELS}},
        "zero_shot_toolkit_shape": {
            "inputs": {"image": image_b64[0]},
            "parameters": {"candidate_labels": ", ".join(LABELS), "hypothesis_template": "This is a photo of {}."},
        },
        "image_embedding": {"inputs": image_b64, "parameters": {"task": "image-embedding"}},
        "text_embedding": {"inputs": TEXTS, "parameters": {"task": "text-embedding"}},
        "similarity": {
            "inputs": {"images": image_b64[:2], "texts": TEXTS},
            "parameters": {"task": "image-text-similarity"},
        },
    }


def test_endpoint_add_writes_the_files_that_are_pushed(endpoint_dir, ndclip_error, tmp_path):
    assert (endpoint_dir / "handler.py").read_bytes() == HANDLER_SOURCE.read_bytes()
    assert (endpoint_dir / "requirements.txt").read_text().split() == list(ENDPOINT_REQUIREMENTS)
    # what run_clip.py's push selects from a folder (huggingface_hub's own filter) includes them
    files = [str(p.relative_to(endpoint_dir)) for p in endpoint_dir.rglob("*") if p.is_file()]
    assert {"handler.py", "requirements.txt"} <= set(filter_repo_objects(files, ignore_patterns=HUB_IGNORE_PATTERNS))
    # each requirement is the one setup.cfg installs (the Endpoint must get what the tests ran with)
    installed = {Requirement(spec).name: Requirement(spec) for spec in requires("ndclip")}
    for spec in ENDPOINT_REQUIREMENTS:
        assert str(installed[Requirement(spec).name].specifier) == str(Requirement(spec).specifier), spec

    assert "not an NdCLIP" in ndclip_error("endpoint", "add", write_other_model(tmp_path / "bert"))
    assert "does not exist" in ndclip_error("endpoint", "add", tmp_path / "missing")
    bare = shutil.copytree(endpoint_dir, tmp_path / "bare", ignore=shutil.ignore_patterns("handler.py"))
    assert "no handler.py" in ndclip_error("endpoint", "serve", bare)


def write_other_model(folder: Path) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    return folder


def test_run_clip_saves_the_handler(tmp_path, saved_model_dir):
    """run_clip.py's Hub folder (`save_hub_folder`, also what checkpoint pushes upload) carries the two files."""
    import run_clip
    from ndclip.layouts import write_kaggle_flickr8k

    write_kaggle_flickr8k(tmp_path / "data", 8)
    out = tmp_path / "out"
    run_clip.main(["--model_name_or_path", str(saved_model_dir), "--data_dir", str(tmp_path / "data"),
                   "--output_dir", str(out), "--max_train_steps", "1", "--per_device_train_batch_size", "4",
                   "--per_device_eval_batch_size", "4", "--dataloader_num_workers", "0"])  # fmt: skip
    assert (out / "handler.py").read_bytes() == HANDLER_SOURCE.read_bytes()
    assert (out / "requirements.txt").read_text().split() == list(ENDPOINT_REQUIREMENTS)


def test_zero_shot_matches_the_pipeline(handler, endpoint_dir, image_b64):
    requests = payloads(image_b64)
    answer = handler(requests["zero_shot"])
    classifier = pipeline("zero-shot-image-classification", model=str(endpoint_dir), trust_remote_code=True)
    expected = classifier(Image.open(io.BytesIO(base64.b64decode(image_b64[0]))), candidate_labels=LABELS)
    assert [item["label"] for item in answer] == [item["label"] for item in expected]
    assert [item["score"] for item in answer] == pytest.approx([item["score"] for item in expected], abs=1e-5)
    assert [s["score"] for s in answer] == sorted((s["score"] for s in answer), reverse=True)
    assert_close(handler(requests["zero_shot_toolkit_shape"]), answer, "toolkit shape")
    # a data URI with base64 wrapped in lines of 76 characters (as `base64` writes it by default)
    data_uri = "data:image/png;base64," + base64.encodebytes(base64.b64decode(image_b64[0])).decode()
    assert_close(handler({**requests["zero_shot"], "inputs": data_uri}), answer, "data URI")


def test_embeddings_and_similarity_agree_with_the_model(handler, endpoint_dir, image_b64):
    requests = payloads(image_b64)
    images = torch.tensor(handler(requests["image_embedding"]))
    texts = torch.tensor(handler(requests["text_embedding"]))
    assert images.shape == (3, handler.model.config.projection_dim) and texts.shape[0] == 2
    assert torch.linalg.norm(images, dim=-1) == pytest.approx(torch.ones(3), abs=1e-5)
    # a single text or image is a list of one
    one = handler({"inputs": TEXTS[1], "parameters": {"task": "text-embedding"}})
    assert torch.tensor(one) == pytest.approx(texts[1:], abs=1e-6)

    answer = handler(requests["similarity"])
    cosine = torch.tensor(answer["cosine_similarity"])
    assert cosine == pytest.approx(images[:2] @ texts.T, abs=1e-5)
    # the model's own logits, from its forward pass on the processor's batch
    batch = handler.processor(text=TEXTS, images=random_images(3, seed=5)[:2], return_tensors="pt")
    with torch.no_grad():
        logits = handler.model(**batch).logits_per_image
    assert torch.tensor(answer["probabilities"]) == pytest.approx(logits.softmax(-1), abs=1e-5)


def test_sigmoid_model_scores_are_independent_sigmoids(tmp_path, make_model, processor, image_b64):
    folder = tmp_path / "sigmoid"
    model = make_model(contrastive_loss="sigmoid")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    write_endpoint_files(folder)
    answer = load_handler_module(folder).EndpointHandler(str(folder))(
        {"inputs": image_b64[0], "parameters": {"candidate_labels": LABELS, "hypothesis_template": "{}"}}
    )
    batch = processor(text=LABELS, images=random_images(1, seed=5), return_tensors="pt")
    with torch.no_grad():
        expected = dict(zip(LABELS, torch.sigmoid(model(**batch).logits_per_image[0]).tolist()))
    assert {item["label"]: item["score"] for item in answer} == pytest.approx(expected, abs=1e-5)
    assert abs(sum(expected.values()) - 1) > 1e-3, "sigmoid scores are not a distribution over the labels"


def bad_requests(folder: Path, image: str, limits) -> dict:
    """Requests the handler must refuse, each with (a pattern of) the start of its error: the field at fault."""
    raw = (folder.parent / "bomb.png").read_bytes(), (folder.parent / "truncated.jpg").read_bytes()
    long_text = "dog " * 100

    def zero_shot(inputs, **parameters):
        return {"inputs": inputs, "parameters": {"candidate_labels": LABELS, **parameters}}

    return {
        "no inputs": ({"parameters": {}}, 'the request must be a JSON object with an "inputs" field'),
        "not an object": (["inputs"], 'the request must be a JSON object with an "inputs" field'),
        "parameters not an object": ({"inputs": image, "parameters": [1]}, "parameters must be a JSON object"),
        "missing base64": (zero_shot(""), "inputs is empty"),
        "malformed base64": (zero_shot("iVBOR%%w0KGgo="), "inputs is not valid base64"),
        "not an image": (zero_shot(base64.b64encode(b"plain text").decode()), "inputs is not an image"),
        "truncated image": (zero_shot(base64.b64encode(raw[1]).decode()), "inputs is not a readable image"),
        "decompression bomb": (
            zero_shot(base64.b64encode(raw[0]).decode()),
            "inputs is refused as a decompression bomb",
        ),
        "URL": (zero_shot("https://example.com/cat.png"), "inputs is a URL"),
        "image dict with other keys": (zero_shot({"url": "x"}), "inputs must be a base64 image"),
        "number as image": (zero_shot(42), "inputs must be a base64-encoded image"),
        "no labels": ({"inputs": image}, "parameters.candidate_labels is required"),
        "empty labels": (zero_shot(image, candidate_labels=[]), "parameters.candidate_labels is empty"),
        "empty label string": (zero_shot(image, candidate_labels=" , "), "parameters.candidate_labels is empty"),
        "oversized labels": (
            zero_shot(image, candidate_labels=[f"label {i}" for i in range(limits.MAX_TEXTS + 1)]),
            f"parameters.candidate_labels has {limits.MAX_TEXTS + 1} items, more than the limit",
        ),
        "label not a string": (zero_shot(image, candidate_labels=["dog", 3]), r"parameters.candidate_labels\[1\]"),
        "label too long": (
            zero_shot(image, candidate_labels=["dog", long_text]),
            r"parameters.candidate_labels\[1\] is \d+ tokens long",
        ),
        "template without {}": (zero_shot(image, hypothesis_template="a photo"), "parameters.hypothesis_template"),
        "list for zero-shot": (zero_shot([image]), "inputs must be one image"),
        "unknown task": ({"inputs": image, "parameters": {"task": "caption"}}, "parameters.task 'caption'"),
        "unknown parameter": (zero_shot(image, top_k=2), "parameters.top_k is not a parameter"),
        "text too long": (
            {"inputs": ["a dog", long_text], "parameters": {"task": "text-embedding"}},
            r"inputs\[1\] is \d+ tokens long .* over the model's limit of 64",
        ),
        "empty text": (
            {"inputs": [" "], "parameters": {"task": "text-embedding"}},
            r"inputs\[0\] must be a non-empty",
        ),
        "too many images": (
            {"inputs": [image] * (limits.MAX_IMAGES + 1), "parameters": {"task": "image-embedding"}},
            f"inputs has {limits.MAX_IMAGES + 1} items",
        ),
        "bad image in a list": (
            {"inputs": [image, "@@"], "parameters": {"task": "image-embedding"}},
            r"inputs\[1\] is not valid base64",
        ),
        "similarity without texts": (
            {"inputs": {"images": [image]}, "parameters": {"task": "image-text-similarity"}},
            'inputs must have either "text" or "texts"',
        ),
        "similarity bad text": (
            {"inputs": {"image": image, "texts": [long_text]}, "parameters": {"task": "image-text-similarity"}},
            r"inputs.texts\[0\] is \d+ tokens long",
        ),
    }


def test_bad_requests_are_refused_naming_the_field(handler_module, handler, endpoint_dir, image_b64):
    for name, (payload, message) in bad_requests(endpoint_dir, image_b64[0], handler_module).items():
        with pytest.raises(handler_module.RequestError) as error:
            handler(payload)
        assert re.match(message, str(error.value)), f"{name}: {error.value}"


def test_images_over_the_pixel_limit_are_refused_before_decoding(handler_module, handler, image_b64, monkeypatch):
    """Between PIL's limit and twice it, PIL only warns: the handler refuses those too."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40 * 48 - 1)  # the test images are 40 x 48
    with pytest.raises(handler_module.RequestError, match="inputs is refused as a decompression bomb"):
        handler({"inputs": image_b64[0], "parameters": {"candidate_labels": LABELS}})


FRESH_PROCESS_SCRIPT = textwrap.dedent(
    """
    import importlib.util, json, sys
    folder, payloads = sys.argv[1], json.loads(sys.stdin.read())
    spec = importlib.util.spec_from_file_location("handler", folder + "/handler.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    handler = module.EndpointHandler(folder)
    answers = {name: handler(json.loads(json.dumps(payload))) for name, payload in payloads.items()}
    print(json.dumps({
        "answers": answers,
        "model_module": type(handler.model).__module__,
        "ndclip_modules": sorted(m for m in sys.modules if m == "ndclip" or m.startswith("ndclip.")),
    }))
    """
)


def test_handler_runs_in_a_fresh_process_without_the_ndclip_package(handler, endpoint_dir, image_b64, tmp_path):
    """As on an Endpoint: a new Python process, another working directory, handler.py imported from the folder;
    the model is the folder's own code, and nothing imports the ndclip package."""
    requests = payloads(image_b64)
    result = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS_SCRIPT, str(endpoint_dir)],
        input=json.dumps(requests),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=SERVER_START_TIMEOUT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["ndclip_modules"] == []
    assert report["model_module"].startswith("transformers_modules.")
    for name, payload in requests.items():
        assert_close(report["answers"][name], handler(payload), name)


def assert_close(actual, expected, name: str) -> None:
    """Equal JSON answers, floats within 1e-5."""
    if isinstance(expected, dict):
        assert actual.keys() == expected.keys(), name
        for key in expected:
            assert_close(actual[key], expected[key], f"{name}.{key}")
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), name
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_close(a, e, f"{name}[{i}]")
    elif isinstance(expected, float):
        assert actual == pytest.approx(expected, abs=1e-5), name
    else:
        assert actual == expected, name


# ----- over HTTP ------------------------------------------------------------------------------------------------


def start_server(folder: Path, log: Path, max_body_bytes: int) -> tuple[subprocess.Popen, str]:
    """`ndclip endpoint serve` on a free port; returns the process and its URL once it answers."""
    argv = [sys.executable, "-m", "ndclip", "endpoint", "serve", str(folder), "--port", "0"]
    process = subprocess.Popen(
        [*argv, "--max_body_bytes", str(max_body_bytes)],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        cwd=log.parent,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while time.monotonic() < deadline:
        started = re.search(r"Uvicorn running on (http://[\d.]+:\d+)", log.read_text())
        if started:
            return process, started.group(1)
        if process.poll() is not None:
            break
        time.sleep(0.2)
    process.kill()
    raise AssertionError(f"the server did not start:\n{log.read_text()[-3000:]}")


def fetch(url: str, body: bytes | None = None, content_type: str = "application/json") -> tuple[int, object]:
    """(status, parsed JSON or text) of a GET (no body) or POST."""
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type} if body else {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, data, kind = response.status, response.read(), response.headers.get_content_type()
    except urllib.error.HTTPError as error:
        status, data, kind = error.code, error.read(), error.headers.get_content_type()
    return status, (json.loads(data) if kind == "application/json" else data.decode())


def post_announcing(url: str, length: int) -> tuple[int, dict]:
    """(status, JSON) of a POST that announces a `length`-byte body and sends none: a body over the limit must be
    refused from the headers alone (sending it would race the server's early answer)."""
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        connection.putrequest("POST", "/")
        connection.putheader("Content-Type", "application/json")
        connection.putheader("Content-Length", str(length))
        connection.endheaders()
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_server_answers_requests_over_http(handler_module, handler, endpoint_dir, image_b64, tmp_path, monkeypatch):
    process, url = start_server(endpoint_dir, tmp_path / "server.log", max_body_bytes=BODY_LIMIT)
    try:
        assert fetch(url + "/health") == (200, "Ok")
        for name, payload in payloads(image_b64).items():
            status, answer = fetch(url, json.dumps(payload).encode())
            assert status == 200, (name, answer)
            assert_close(answer, handler(payload), name)
        # a raw image body with the parameters in the query string, as the toolkit takes it
        raw = base64.b64decode(image_b64[0])
        status, answer = fetch(f"{url}/predict?candidate_labels={','.join(LABELS).replace(' ', '+')}", raw, "image/png")
        assert status == 200, answer
        assert_close(answer, handler(payloads(image_b64)["zero_shot"]), "raw image body")
        status, answer = fetch(f"{url}/?task=text-embedding", json.dumps({"inputs": TEXTS[0]}).encode())
        assert status == 200 and len(answer) == 1, "the query string gives the parameters of a body without them"

        for name, (payload, message) in bad_requests(endpoint_dir, image_b64[0], handler_module).items():
            status, answer = fetch(url, json.dumps(payload).encode())
            assert status == 400 and re.match(message, answer["error"]), (name, status, answer)
        status, answer = fetch(url, b"{not json")
        assert status == 400 and answer["error"].startswith("the request body is not valid JSON")
        status, answer = post_announcing(url, BODY_LIMIT + 1)
        assert status == 413 and f"over the limit of {BODY_LIMIT} bytes" in answer["error"]

        # the card's Python example, against this server
        code = re.search(r"## Deploy.*?```python\n(.*?)```", (endpoint_dir / "README.md").read_text(), re.S).group(1)
        Image.new("RGB", (40, 30), "red").save(tmp_path / "photo.jpg")
        monkeypatch.chdir(tmp_path)
        monkeypatch.setenv("HF_TOKEN", "hf_test")
        namespace = {}
        exec(code.replace("https://<your-endpoint>.endpoints.huggingface.cloud", url), namespace)
        assert {item["label"] for item in namespace["labels"]} == {"dog", "cat", "bicycle"}
        assert len(namespace["text_embeddings"]) == 2 and len(namespace["scores"]["probabilities"][0]) == 2
        assert process.poll() is None, "the server is still up after every bad request"
    finally:
        process.terminate()
        process.wait(timeout=30)
