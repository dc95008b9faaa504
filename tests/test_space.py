"""The Space: `ndclip space` writes a self-contained folder (the app, the package, the model, the images and their
index with relative paths, the Space card); its app, started with `python app.py` from a moved copy of the folder,
is used in a real headless chromium (selenium + chromedriver), and what the page shows is checked against the
model's forward pass and `ndclip.search`'s own query. The push stops at the Hub, unreachable here (offline)."""

import importlib.metadata
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import CAPTIONS, random_images
from huggingface_hub import SpaceCard
from PIL import Image

from ndclip.cli import main
from ndclip.inference import BadInputError, load_ndclip
from ndclip.prompts import BUILTIN_TEMPLATES, DEFAULT_TEMPLATE
from ndclip.search import load_index, query_index
from ndclip.space import app
from ndclip.space.browser import AppPage, chromium, fetch, find_browser, running_app

NUM_IMAGES = 8
LABELS = ["a red square", "a blue circle", "a dog"]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Eight images, two of them in a sub-folder, and a file that is not an image."""
    folder = tmp_path_factory.mktemp("photos")
    (folder / "more").mkdir()
    for i, image in enumerate(random_images(NUM_IMAGES, size=(36, 44), seed=21)):
        image.save(folder / ("more" if i >= 6 else ".") / f"img_{i}.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


@pytest.fixture(scope="module")
def space_dir(saved_model_dir, image_folder, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("spaces") / "space"
    main(["space", "--model", str(saved_model_dir), "--images", str(image_folder), "--output_dir", str(output_dir)])
    return output_dir


def files_under(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_space_folder_holds_everything_the_app_runs_on(space_dir, saved_model_dir, image_folder):
    top = sorted(p.name for p in space_dir.iterdir())
    assert top == [
        "README.md", "app.py", "configuration_ndclip.py", "gallery", "index", "model", "modeling_ndclip.py", "ndclip",
        "processing_ndclip.py", "requirements.txt", "space.json",
    ]  # fmt: skip
    repo = Path(__file__).resolve().parent.parent
    assert (space_dir / "app.py").read_bytes() == (repo / "ndclip/space/app.py").read_bytes()
    package = {name: data for name, data in files_under(repo / "ndclip").items() if "__pycache__" not in name}
    assert files_under(space_dir / "ndclip") == package
    for module in ("configuration_ndclip", "modeling_ndclip", "processing_ndclip"):
        assert (space_dir / f"{module}.py").read_bytes() == (repo / f"{module}.py").read_bytes()
    assert files_under(space_dir / "model") == files_under(saved_model_dir)
    images = {name: data for name, data in files_under(image_folder).items() if name.endswith(".png")}
    assert files_under(space_dir / "gallery") == images and len(images) == NUM_IMAGES

    index = json.loads((space_dir / "index/index.json").read_text())
    assert index["model"] == "model" and index["source"] == {"images": "../gallery"} and index["complete"]
    assert json.loads((space_dir / "space.json").read_text()) == {"model": "model", "index": "index", "title": "NdCLIP"}

    card = SpaceCard.load(space_dir / "README.md")
    assert card.data.sdk == "gradio" and card.data.app_file == "app.py"
    assert card.data.sdk_version == importlib.metadata.version("gradio")
    assert card.data.models is None  # the model is in the Space, not on the Hub
    required = (space_dir / "requirements.txt").read_text().splitlines()
    assert {"ndlinear>=1.0", "torch>=2.4", "datasets>=4.0"} <= set(required)
    assert not any("pytest" in line or "gradio" in line for line in required)


def test_space_command_errors(saved_model_dir, image_folder, space_dir, tmp_path, ndclip_error):
    space = ["space", "--model", saved_model_dir, "--images", image_folder]
    assert ndclip_error(*space, "--output_dir", tmp_path / "a", "--push") == (
        "ndclip space: error: --push needs --space_id user/name"
    )
    error = ndclip_error(*space, "--output_dir", tmp_path / "a", "--push", "--space_id", "not/a/hub id")
    assert error.startswith("ndclip space: error: --space_id 'not/a/hub id' is not a Hub id (user/name)")
    assert not (tmp_path / "a").exists()
    assert ndclip_error(*space, "--output_dir", space_dir) == f"ndclip space: error: {space_dir} is not empty: " + (
        "choose a new --output_dir"
    )
    error = ndclip_error(
        "space", "--model", tmp_path / "nope", "--images", image_folder, "--output_dir", tmp_path / "b"
    )
    assert error == f"ndclip space: error: model folder {tmp_path / 'nope'} does not exist"

    # The push itself: the folder is written, then huggingface_hub is asked to create the Space, which cannot
    # happen offline (tests run with HF_HUB_OFFLINE=1): a clear error, not a traceback.
    written = tmp_path / "pushed"
    error = ndclip_error(*space, "--output_dir", written, "--push", "--space_id", "someone/ndclip-demo")
    assert error.startswith(f"ndclip space: error: cannot push {written} to the Space someone/ndclip-demo: ")
    assert "offline mode is enabled" in error and (written / "index/index.json").is_file()


def forward_probabilities(model, processor, image, labels, templates) -> torch.Tensor:
    """Zero-shot probabilities from the model's forward pass: the text embeddings of every label in every template
    averaged per label (normalised before and after), scaled, biased, and turned into probabilities by the model."""
    texts = [template.format(label) for template in templates for label in labels]
    with torch.no_grad():
        outputs = model(**processor(text=texts, images=[image], return_tensors="pt"))
        per_template = outputs.text_embeds.reshape(len(templates), len(labels), -1)
        classes = torch.nn.functional.normalize(per_template.mean(dim=0), dim=-1)
        logits = model.clamped_logit_scale() * outputs.image_embeds @ classes.t()
        if model.config.contrastive_loss == "sigmoid":
            logits = logits + model.logit_bias
        return model.logits_to_probabilities(logits)[0]


def test_zero_shot_of_a_sigmoid_model_and_bad_requests(make_model, processor):
    model = make_model(seed=3, contrastive_loss="sigmoid")
    image = random_images(1, seed=8)[0]
    labels = app.zero_shot(model, processor, image, " , ".join(LABELS), [DEFAULT_TEMPLATE])
    expected = forward_probabilities(model, processor, image, LABELS, [DEFAULT_TEMPLATE])
    assert [m["label"] for m in labels] == [LABELS[i] for i in expected.argsort(descending=True).tolist()]
    by_label = dict(zip(LABELS, expected.tolist()))
    for match in labels:  # independent sigmoids: they need not sum to one
        assert match["score"] == pytest.approx(by_label[match["label"]], abs=1e-6)
    assert abs(sum(by_label.values()) - 1) > 1e-3

    for arguments, message in [
        ((None, "a, b"), "upload an image first"),
        ((image, " , ,"), "type at least one label"),
        ((image, "a cat, a dog, a cat"), "the label list has duplicates: 'a cat'"),
        ((image, ",".join(f"label {i}" for i in range(app.MAX_LABELS + 1))), f"at most {app.MAX_LABELS}"),
    ]:
        with pytest.raises(BadInputError, match=message):
            app.zero_shot(model, processor, *arguments, [DEFAULT_TEMPLATE])
    with pytest.raises(BadInputError, match="needs exactly one '{}'"):
        app.templates_for(False, "a photo of a cat")
    assert app.templates_for(True, "ignored") == list(BUILTIN_TEMPLATES)


def test_app_refuses_a_model_that_did_not_build_its_index(space_dir, make_model, processor, tmp_path, monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")  # what app.main sets for the server, undone after the test
    other = tmp_path / "other"  # what a Space loading a Hub model whose weights changed would meet
    make_model(seed=1).save_pretrained(other)
    processor.save_pretrained(other)
    with pytest.raises(SystemExit) as stop:
        app.main(["--model", str(other), "--index", str(space_dir / "index")])
    assert str(stop.value.code).startswith(f"app.py: error: model mismatch: the index in {space_dir / 'index'}")
    with pytest.raises(SystemExit, match="app.py: error: model folder .* does not exist"):
        app.main(["--model", str(tmp_path / "nope")])


def test_app_in_chromium(space_dir, saved_model_dir, tmp_path):
    browser = find_browser()
    if browser is None:
        pytest.skip("chromium and chromedriver not found: apt-get install chromium chromium-driver")
    # The app runs from a moved copy: the index must find the images through its relative paths.
    moved = tmp_path / "moved" / "my_space"
    shutil.copytree(space_dir, moved)
    image_file = tmp_path / "upload.png"
    random_images(1, size=(50, 40), seed=31)[0].save(image_file)
    log = tmp_path / "app.log"
    model, processor = load_ndclip(str(saved_model_dir), "cpu")

    env = {"GRADIO_TEMP_DIR": str(tmp_path / "gradio"), "GRADIO_ANALYTICS_ENABLED": "False"}
    with running_app(moved, log, env) as url, chromium(browser) as driver:
        page = AppPage(driver, url)
        image = Image.open(image_file).convert("RGB")
        for ensemble, templates in ((False, [DEFAULT_TEMPLATE]), (True, list(BUILTIN_TEMPLATES))):
            rows, chart = page.classify(image_file, ", ".join(LABELS), ensemble=ensemble)
            expected = forward_probabilities(model, processor, image, LABELS, templates)
            order = expected.argsort(descending=True).tolist()
            assert [label for label, _ in rows] == [LABELS[i] for i in order]
            shown = torch.tensor([float(probability) for _, probability in rows])
            torch.testing.assert_close(shown, expected[order], atol=6e-5, rtol=0)  # shown with 4 decimals
            assert chart.splitlines()[1] == LABELS[order[0]]  # the chart's heading: the top label
        page.screenshot(tmp_path / "labels.png")

        rows, sources = page.search(CAPTIONS[2])
        _, index = load_index(moved / "index", model, "the Space's model")
        top = min(6, NUM_IMAGES)  # the app's default number of results
        expected = query_index(model, processor, index, text=CAPTIONS[2], top_k=top, index_dir=moved / "index")
        names = [Path(r["path"]).relative_to(moved / "gallery").as_posix() for r in expected]
        assert [row[:2] for row in rows] == [[str(r["rank"]), name] for r, name in zip(expected, names)]
        torch.testing.assert_close(
            torch.tensor([float(row[2]) for row in rows]),
            torch.tensor([r["score"] for r in expected]),
            atol=6e-5,
            rtol=0,
        )
        # The gallery shows those very files, served by the app.
        assert [fetch(source) for source in sources] == [(moved / "gallery" / name).read_bytes() for name in names]
    assert f"ndclip package: {moved / 'ndclip'}" in log.read_text()  # the Space's copy, not the installed one
    with Image.open(tmp_path / "labels.png") as screenshot:
        assert screenshot.size[0] >= 1000
