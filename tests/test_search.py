"""`ndclip search`: the index (embeddings saved with `datasets`, resumable), text->image and image->caption/image
queries checked against the model's own forward pass, exact vs FAISS search, the printed table and the JSON and PNG
outputs, and clear errors for bad input (another model, an unfinished or missing index, an empty folder). In-process
through `ndclip.cli.main`."""

import json
import logging
import os
import shutil

import datasets
import pytest
import torch
from conftest import CAPTIONS, random_images, write_unreadable_images
from PIL import Image

from modeling_ndclip import NdClipModel
from ndclip.cli import main
from ndclip.inference import LINE_HEIGHT, PAD, BadInputError, load_ndclip
from ndclip.search import build_index, load_index, query_index

NUM_IMAGES = 7
EXTRA_CAPTIONS = {1: ["a dog sleeps on the grass"], 3: ["a cat runs near the sea"]}


@pytest.fixture(scope="module")
def model_and_processor(saved_model_dir):
    return load_ndclip(str(saved_model_dir), "cpu")


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("collection")
    for i, image in enumerate(random_images(NUM_IMAGES, size=(36, 44), seed=5)):
        image.save(folder / f"img_{i}.png")
    (folder / "index.html").write_text("<p>not an image</p>")
    return folder


@pytest.fixture(scope="module")
def folder_index(model_and_processor, saved_model_dir, image_folder, tmp_path_factory):
    """An index of the folder, built in one go (three chunks of three images)."""
    output_dir = tmp_path_factory.mktemp("index") / "idx"
    summary = build_index(
        *model_and_processor,
        str(saved_model_dir),
        {"images": str(image_folder)},
        output_dir,
        batch_size=2,
        chunk_size=3,
    )
    assert summary["complete"] and summary["chunks_done"] == [0, 1, 2]
    return output_dir


@pytest.fixture(scope="module")
def caption_dataset_dir(tmp_path_factory):
    """An `imagefolder` dataset: five images and a metadata.jsonl giving each one or two captions (all different)."""
    folder = tmp_path_factory.mktemp("imagefolder")
    rows = []
    for i, image in enumerate(random_images(5, seed=9)):
        image.save(folder / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": CAPTIONS[i], "extra": EXTRA_CAPTIONS.get(i, [])})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def search(*argv) -> None:
    """Run `ndclip search argv...` in-process."""
    main(["search", *map(str, argv)])


def query_results(tmp_path, *argv) -> list[dict]:
    """The results of `ndclip search query argv...`, read back from its --json file."""
    json_file = tmp_path / "results.json"
    search("query", *argv, "--json", json_file)
    return json.loads(json_file.read_text())["results"]


def forward_scores(model, processor, texts, images):
    """Cosine similarities `[images, texts]` from the model's forward pass (not the tools' batched embedding)."""
    with torch.no_grad():
        logits = model(**processor(text=texts, images=images, return_tensors="pt")).logits_per_image
    return logits / model.clamped_logit_scale()


def test_index_is_a_saved_dataset_with_the_model_recorded(
    folder_index, image_folder, model_and_processor, saved_model_dir
):
    model, processor = model_and_processor
    info = json.loads((folder_index / "index.json").read_text())
    assert info["model"] == str(saved_model_dir) and info["projection_dim"] == 16 and len(info["fingerprint"]) == 16
    assert info["complete"] and info["num_images"] == NUM_IMAGES and not (folder_index / "chunks").exists()
    # The folder and its images are recorded relative to the index folder (tmp/index0/idx and tmp/collection0).
    assert info["source"] == {"images": f"../../{image_folder.name}"}

    images = datasets.load_from_disk(str(folder_index / "images"))
    assert images.column_names == ["row", "embedding", "path"] and images[:]["row"] == list(range(NUM_IMAGES))
    assert images[:]["path"] == [f"../../{image_folder.name}/img_{i}.png" for i in range(NUM_IMAGES)]
    embeddings = images.with_format("torch")[:]["embedding"]
    assert embeddings.shape == (NUM_IMAGES, 16) and embeddings.dtype == torch.float32
    torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(NUM_IMAGES))


def test_text_query_ranks_images_as_the_forward_pass_does(folder_index, model_and_processor, image_folder):
    model, processor = model_and_processor
    _, index = load_index(folder_index, model, "the same model")
    results = query_index(model, processor, index, text=CAPTIONS[2], top_k=4, index_dir=folder_index)

    pictures = [Image.open(image_folder / f"img_{i}.png") for i in range(NUM_IMAGES)]
    expected = forward_scores(model, processor, [CAPTIONS[2]], pictures)[:, 0]
    scores, rows = expected.topk(4)
    assert [r["row"] for r in results] == rows.tolist() and [r["rank"] for r in results] == [1, 2, 3, 4]
    torch.testing.assert_close(torch.tensor([r["score"] for r in results]), scores, atol=1e-5, rtol=0)
    assert [r["path"] for r in results] == [str(image_folder / f"img_{i}.png") for i in rows.tolist()]


def test_image_query_without_captions_finds_the_image_itself_first(folder_index, model_and_processor, image_folder):
    model, processor = model_and_processor
    _, index = load_index(folder_index, model, "the same model")
    results = query_index(model, processor, index, image=str(image_folder / "img_3.png"), top_k=NUM_IMAGES + 5)
    assert len(results) == NUM_IMAGES and results[0]["row"] == 3 and results[0]["score"] == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(BadInputError, match="this index has no captions"):
        query_index(model, processor, index, image=str(image_folder / "img_3.png"), target="captions")


def test_exact_and_faiss_search_give_the_same_results(folder_index, model_and_processor, image_folder):
    pytest.importorskip("faiss")
    model, processor = model_and_processor
    _, index = load_index(folder_index, model, "the same model")
    for query in ({"text": "a dog runs across the field"}, {"image": str(image_folder / "img_5.png")}):
        exact = query_index(model, processor, index, top_k=5, **query)
        approximate = query_index(model, processor, index, top_k=5, use_faiss=True, **query)
        assert [r["row"] for r in exact] == [r["row"] for r in approximate]
        for a, b in zip(exact, approximate):
            assert a["score"] == pytest.approx(b["score"], abs=1e-5)


def test_interrupted_index_resumes_without_recomputing_finished_chunks(
    model_and_processor, saved_model_dir, image_folder, folder_index, tmp_path
):
    output_dir = tmp_path / "idx"
    source = {"images": str(image_folder)}
    first = build_index(*model_and_processor, str(saved_model_dir), source, output_dir, chunk_size=2, max_chunks=2)
    assert not first["complete"] and first["chunks_done"] == [0, 1]
    chunks = output_dir / "chunks"
    assert sorted(os.listdir(chunks)) == ["00000", "00001"]
    with pytest.raises(BadInputError, match="unfinished"):
        load_index(output_dir, model_and_processor[0], "the same model")

    # A crash in the middle of writing chunk 2 leaves a temporary folder: it is thrown away and chunk 2 redone.
    (chunks / "00002.tmp" / "images").mkdir(parents=True)
    (chunks / "00002.tmp" / "images" / "junk.arrow").write_text("half-written")
    stamps = {p: p.stat().st_mtime_ns for p in (chunks / "00000").rglob("*")}
    second = build_index(*model_and_processor, str(saved_model_dir), source, output_dir, chunk_size=2, max_chunks=1)
    assert second["chunks_done"] == [2] and sorted(os.listdir(chunks)) == ["00000", "00001", "00002"]
    assert {p: p.stat().st_mtime_ns for p in (chunks / "00000").rglob("*")} == stamps  # untouched

    third = build_index(*model_and_processor, str(saved_model_dir), source, output_dir, chunk_size=2)
    assert third["complete"] and third["chunks_done"] == [3]
    resumed = datasets.load_from_disk(str(output_dir / "images")).with_format("torch")[:]
    whole = datasets.load_from_disk(str(folder_index / "images")).with_format("torch")[:]  # in one go, other chunks
    assert resumed["path"] == whole["path"] and resumed["row"].tolist() == whole["row"].tolist() == list(range(7))
    torch.testing.assert_close(resumed["embedding"], whole["embedding"])
    again = build_index(*model_and_processor, str(saved_model_dir), source, output_dir, chunk_size=2)
    assert again["complete"] and again["chunks_done"] == []


def test_dataset_collection_with_captions(model_and_processor, saved_model_dir, caption_dataset_dir, tmp_path):
    model, processor = model_and_processor
    output_dir = tmp_path / "idx"
    search("index", "--model", saved_model_dir, "--data_dir", caption_dataset_dir, "--caption_column", "text,extra",
           "--chunk_size", "2", "--output_dir", output_dir)  # fmt: skip
    captions = datasets.load_from_disk(str(output_dir / "captions"))[:]  # columns as lists
    # One row per caption, in the collection's order: image i's "text", then its "extra" captions.
    expected = [(i, text) for i in range(5) for text in [CAPTIONS[i], *EXTRA_CAPTIONS.get(i, [])]]
    assert list(zip(captions["image_row"], captions["caption"])) == expected

    query = tmp_path / "query.png"
    random_images(5, seed=9)[1].save(query)
    results = query_results(
        tmp_path, "--index", output_dir, "--image", query, "--top_k", "3", "--png", tmp_path / "r.png"
    )
    scores = forward_scores(model, processor, captions["caption"], [Image.open(query)])[0]
    top = scores.topk(3)
    assert [r["caption"] for r in results] == [captions["caption"][i] for i in top.indices.tolist()]
    assert [r["row"] for r in results] == [captions["image_row"][i] for i in top.indices.tolist()]
    torch.testing.assert_close(torch.tensor([r["score"] for r in results]), top.values, atol=1e-5, rtol=0)
    with Image.open(tmp_path / "r.png") as strip:  # the images come from the dataset: three cells, two text lines
        assert strip.size == (3 * (160 + 2 * PAD), 160 + 2 * PAD + 2 * LINE_HEIGHT)


def test_query_with_another_model_fails_clearly(
    folder_index, image_folder, make_model, processor, tmp_path, ndclip_error
):
    other = tmp_path / "other"  # same shape, other weights
    make_model(seed=1).save_pretrained(other)
    processor.save_pretrained(other)
    error = ndclip_error("search", "query", "--index", folder_index, "--model", other, "--text", "a dog")
    assert error.startswith(f"ndclip search query: error: model mismatch: the index in {folder_index} was built with")
    assert f"but {other} has fingerprint" in error

    smaller = tmp_path / "smaller"  # another embedding size
    make_model(projection_dim=8).save_pretrained(smaller)
    processor.save_pretrained(smaller)
    error = ndclip_error("search", "query", "--index", folder_index, "--model", smaller, "--text", "a dog")
    assert "embedding size mismatch:" in error and "holds 16-d embeddings" in error and "gives 8-d ones" in error

    partial = tmp_path / "partial"  # resuming with another model is refused too
    shutil.copytree(folder_index, partial)
    info = json.loads((partial / "index.json").read_text())
    (partial / "index.json").write_text(json.dumps({**info, "complete": False}))
    error = ndclip_error("search", "index", "--model", other, "--images", image_folder, "--chunk_size", "3",
                         "--output_dir", partial)  # fmt: skip
    assert "already holds an index built with other settings (fingerprint differ)" in error


def test_bad_index_and_collection_inputs(saved_model_dir, caption_dataset_dir, tmp_path, ndclip_error):
    error = ndclip_error("search", "query", "--index", tmp_path, "--model", saved_model_dir, "--text", "a dog")
    assert error == (
        f"ndclip search query: error: {tmp_path} is not a search index (it has no index.json); build one with "
        "`ndclip search index`"
    )
    index = ["search", "index", "--model", saved_model_dir, "--output_dir", tmp_path / "i"]
    (tmp_path / "empty").mkdir()
    assert "holds no images" in ndclip_error(*index, "--images", tmp_path / "empty")
    error = ndclip_error(*index, "--data_dir", caption_dataset_dir, "--caption_column", "caption")
    assert "the dataset has no column 'caption'" in error
    error = ndclip_error(*index)
    assert error == "ndclip search index: error: the collection is missing: pass --images, --dataset_name or --data_dir"
    assert not (tmp_path / "i").exists()


def test_query_prints_a_table_and_writes_json_and_png(folder_index, tmp_path, capsys):
    results = query_results(tmp_path, "--index", folder_index, "--text", "a cat sleeps on a sofa", "--top_k", "4",
                            "--png", tmp_path / "strip.png")  # fmt: skip
    assert [r["rank"] for r in results] == [1, 2, 3, 4]
    table = capsys.readouterr().out
    rows = table.splitlines()[2:]
    assert len(rows) == 4
    for row, r in zip(rows, results):  # long paths keep their end, the file name
        assert row.startswith(f"{r['rank']:>4}  {r['score']:.4f}  ") and row.endswith(r["path"][-40:])
    with Image.open(tmp_path / "strip.png") as strip:
        assert strip.size == (4 * (160 + 2 * PAD), 160 + 2 * PAD + 2 * LINE_HEIGHT)


def test_index_skips_unreadable_images_and_counts_them(saved_model_dir, tmp_path, caplog, capsys, ndclip_error):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, image in enumerate(random_images(3, seed=6)):
        image.save(folder / f"good_{i}.png")
    unreadable = write_unreadable_images(folder)  # bomb.png, truncated.jpg, truncated.png: rows 0, 4 and 5
    output_dir = tmp_path / "idx"
    with caplog.at_level(logging.INFO):
        search("index", "--model", saved_model_dir, "--images", folder, "--output_dir", output_dir, "--chunk_size", "4")
    info = json.loads((output_dir / "index.json").read_text())
    assert info["complete"] and info["num_images"] == 6
    assert [(entry["row"], os.path.basename(entry["path"])) for entry in info["skipped"]] == [
        (0, "bomb.png"), (4, "truncated.jpg"), (5, "truncated.png")
    ]  # fmt: skip
    assert "skipped 3 unreadable image(s)" in caplog.text and all(name in caplog.text for name in unreadable)
    assert f"{output_dir}: 6 images, 3 unreadable and skipped, complete" in capsys.readouterr().out

    images = datasets.load_from_disk(str(output_dir / "images"))[:]
    assert images["row"] == [1, 2, 3]
    assert [os.path.basename(path) for path in images["path"]] == ["good_0.png", "good_1.png", "good_2.png"]
    results = query_results(tmp_path, "--index", output_dir, "--text", "a dog", "--top_k", "10")
    assert sorted(r["row"] for r in results) == [1, 2, 3]
    error = ndclip_error("search", "query", "--index", output_dir, "--image", folder / "truncated.png")
    assert f"cannot read the query image {folder / 'truncated.png'}" in error


def test_dataset_collection_skips_unreadable_images_with_their_captions(saved_model_dir, tmp_path):
    folder = tmp_path / "imagefolder"
    folder.mkdir()
    random_images(1, seed=3)[0].save(folder / "good.png")
    names = ["good.png", *write_unreadable_images(folder)]
    rows = [{"file_name": name, "text": f"caption of {name}"} for name in names]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    output_dir = tmp_path / "idx"
    search("index", "--model", saved_model_dir, "--data_dir", folder, "--caption_column", "text",
           "--output_dir", output_dir)  # fmt: skip
    assert len(json.loads((output_dir / "index.json").read_text())["skipped"]) == 3
    captions = datasets.load_from_disk(str(output_dir / "captions"))[:]
    kept = datasets.load_from_disk(str(output_dir / "images"))[:]["row"]
    assert len(kept) == 1 and captions["image_row"] == kept


@pytest.mark.parametrize("value", ["0", "-3"])
def test_top_k_must_be_positive(folder_index, ndclip_error, value):
    error = ndclip_error("search", "query", "--index", folder_index, "--text", "a dog", "--top_k", value)
    assert error == f"ndclip search query: error: argument --top_k: must be a positive integer, got {value}"


def test_index_refuses_a_model_that_differs_in_one_tower_weight(
    folder_index, saved_model_dir, processor, tmp_path, ndclip_error
):
    model = NdClipModel.from_pretrained(saved_model_dir)
    with torch.no_grad():  # one weight of the image tower, far from the heads and the logit scale
        model.vision_model.layers[0].attention.q_proj.weight[0, 0] += 0.5
    other = tmp_path / "other_vision"
    model.save_pretrained(other)
    processor.save_pretrained(other)
    query = ["search", "query", "--index", folder_index, "--text", "a dog", "--model"]
    assert "model mismatch" in ndclip_error(*query, other)

    model = NdClipModel.from_pretrained(saved_model_dir)  # the same weights, another config
    model.config.vision_config.layer_norm_eps = 1e-3
    other_config = tmp_path / "other_config"
    model.save_pretrained(other_config)
    processor.save_pretrained(other_config)
    assert "model mismatch" in ndclip_error(*query, other_config)

    copy = tmp_path / "copy"  # the same model elsewhere: where it was loaded from does not matter
    shutil.copytree(saved_model_dir, copy)
    assert [r["rank"] for r in query_results(tmp_path, *query[2:], copy)] == [1, 2, 3, 4, 5]  # the default --top_k


def test_index_moved_with_its_images_still_finds_them(folder_index, image_folder, saved_model_dir, tmp_path):
    # The index and its folder keep their places relative to each other: tmp/index0/idx and tmp/collection0.
    moved = tmp_path / "moved"
    shutil.copytree(folder_index, moved / folder_index.parent.name / folder_index.name)
    shutil.copytree(image_folder, moved / image_folder.name)
    moved_index = moved / folder_index.parent.name / folder_index.name
    query = ["--index", moved_index, "--model", saved_model_dir, "--text", CAPTIONS[1], "--top_k", "3"]
    results = query_results(tmp_path, *query, "--png", tmp_path / "strip.png")
    original = query_results(tmp_path, "--index", folder_index, *query[2:])
    assert [r["row"] for r in results] == [r["row"] for r in original]
    assert [r["path"] for r in results] == [str(moved / image_folder.name / f"img_{r['row']}.png") for r in original]
    assert os.path.isfile(tmp_path / "strip.png")  # drawn from the moved images

    # An index written before paths were relative records absolute ones: still found where they are.
    old = tmp_path / "old_index"
    shutil.copytree(folder_index, old)
    images = datasets.load_from_disk(str(folder_index / "images"))
    absolute = images.map(lambda row: {"path": str(image_folder / os.path.basename(row["path"]))})
    shutil.rmtree(old / "images")
    absolute.save_to_disk(str(old / "images"))
    results = query_results(tmp_path, "--index", old, *query[2:])
    assert [r["path"] for r in results] == [str(image_folder / f"img_{r['row']}.png") for r in original]
