"""Retrieval recall@K and median ranks on hand-built similarity matrices, ties broken at random in expectation
(degenerate models score exactly at chance), non-finite scores as misses, chunking, image ids; the same through the
`evaluate` module loaded offline from its folder; zero-shot accuracy, and the fixed-batch contrastive loss."""

import itertools
import math
import socket
import statistics
import sys
from pathlib import Path

import evaluate
import pytest
import torch

from modeling_ndclip import ndclip_loss
from ndclip.metrics import (
    RETRIEVAL_METRIC,
    chunked_contrastive_loss,
    load_retrieval_metric,
    retrieval_metrics,
    zero_shot_accuracy,
)


def embeddings_with_similarity(similarity: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Image and text embeddings whose dot products are exactly `similarity` (`[images][captions]`).

    Image i is the one-hot vector e_i and caption j is column j of the matrix, so `image @ text.T` picks the entries
    out unchanged (products with 1 and 0 are exact, hence ties stay ties).
    """
    matrix = torch.tensor(similarity, dtype=torch.float32)
    return torch.eye(matrix.shape[0]), matrix.t().contiguous()


# 3 images, 2 captions each: captions 0, 1 show image 0; captions 2, 3 image 1; captions 4, 5 image 2.
THREE_IMAGES = [
    # c0    c1    c2    c3    c4    c5
    [0.9, 0.1, 0.5, 0.3, 0.2, 0.0],  # image 0
    [0.8, 0.7, 0.6, 0.1, 0.2, 0.3],  # image 1
    [0.5, 0.4, 0.3, 0.9, 0.6, 0.7],  # image 2
]
THREE_IMAGES_CAPTION_IDS = torch.tensor([0, 0, 1, 1, 2, 2])


def test_hand_built_matrix_with_two_captions_per_image():
    image_embeds, text_embeds = embeddings_with_similarity(THREE_IMAGES)
    metrics = retrieval_metrics(image_embeds, text_embeds, THREE_IMAGES_CAPTION_IDS, ks=(1, 2, 3))
    # Image -> text, the rank of the best correct caption:
    #   image 0: best correct c0 = 0.9, nothing higher -> rank 1
    #   image 1: best correct c2 = 0.6 (c3 = 0.1), higher: c0 0.8, c1 0.7 -> rank 3
    #   image 2: best correct c5 = 0.7 (c4 = 0.6), higher: c3 0.9 -> rank 2
    # ranks [1, 3, 2]: R@1 = 1/3, R@2 = 2/3, R@3 = 1, median 2. Recalls are exact fractions (hits / count), not
    # float32 means, so they compare with ==.
    assert metrics["image_to_text_recall@1"] == 1 / 3
    assert metrics["image_to_text_recall@2"] == 2 / 3
    assert metrics["image_to_text_recall@3"] == pytest.approx(1.0)
    assert metrics["image_to_text_median_rank"] == 2.0
    # Text -> image, each column against its own image:
    #   c0 [0.9, 0.8, 0.5] image 0 -> 1;  c1 [0.1, 0.7, 0.4] image 0 -> 3
    #   c2 [0.5, 0.6, 0.3] image 1 -> 1;  c3 [0.3, 0.1, 0.9] image 1 -> 3
    #   c4 [0.2, 0.2, 0.6] image 2 -> 1;  c5 [0.0, 0.3, 0.7] image 2 -> 1
    # ranks [1, 3, 1, 3, 1, 1]: R@1 = R@2 = 4/6, R@3 = 1; sorted [1, 1, 1, 1, 3, 3] -> median (1 + 1) / 2 = 1.
    assert metrics["text_to_image_recall@1"] == pytest.approx(4 / 6)
    assert metrics["text_to_image_recall@2"] == pytest.approx(4 / 6)
    assert metrics["text_to_image_recall@3"] == pytest.approx(1.0)
    assert metrics["text_to_image_median_rank"] == 1.0


def test_default_ks():
    image_embeds, text_embeds = embeddings_with_similarity(THREE_IMAGES)
    metrics = retrieval_metrics(image_embeds, text_embeds, THREE_IMAGES_CAPTION_IDS)
    assert set(metrics) == {
        *(f"{direction}_recall@{k}" for direction in ("image_to_text", "text_to_image") for k in (1, 5, 10)),
        "image_to_text_median_rank",
        "text_to_image_median_rank",
    }
    # Only 3 images and 6 captions: every correct answer is within the top 5.
    assert metrics["image_to_text_recall@5"] == metrics["text_to_image_recall@5"] == 1.0


def test_ties_are_broken_at_random_in_expectation():
    # 2 images, captions 0, 1 show image 0 and captions 2, 3 image 1.
    similarity = [
        # c0   c1   c2   c3
        [0.5, 0.2, 0.5, 0.1],  # image 0
        [0.7, 0.7, 0.5, 0.7],  # image 1
    ]
    image_embeds, text_embeds = embeddings_with_similarity(similarity)
    metrics = retrieval_metrics(image_embeds, text_embeds, torch.tensor([0, 0, 1, 1]), ks=(1, 2))
    # Image -> text, the first correct caption in a random order of the group tied at the best correct score:
    #   image 0: best correct c0 = 0.5 ties with the wrong c2: first with probability 1/2, expected rank 1.5
    #   image 1: best correct c3 = 0.7 ties with the wrong c0, c1: P(rank 1) = 1/3, P(rank <= 2) = 2/3,
    #            expected rank (1 + 2 + 3) / 3 = 2
    assert metrics["image_to_text_recall@1"] == pytest.approx((1 / 2 + 1 / 3) / 2)
    assert metrics["image_to_text_recall@2"] == pytest.approx((1 + 2 / 3) / 2)
    assert metrics["image_to_text_median_rank"] == pytest.approx((1.5 + 2) / 2)
    # Text -> image:
    #   c0 [0.5, 0.7] image 0 -> rank 2;   c1 [0.2, 0.7] image 0 -> rank 2
    #   c2 [0.5, 0.5] image 1, tied with image 0 -> rank 1 or 2, each with probability 1/2: expected 1.5
    #   c3 [0.1, 0.7] image 1 -> rank 1
    # R@1 = (0 + 0 + 1/2 + 1) / 4; ranks sorted [1, 1.5, 2, 2]: the median is the mean of the middle two.
    assert metrics["text_to_image_recall@1"] == pytest.approx(1.5 / 4)
    assert metrics["text_to_image_recall@2"] == 1.0
    assert metrics["text_to_image_median_rank"] == pytest.approx(1.75)


def test_several_correct_captions_in_a_tie():
    # Image 0 owns captions 0-2, image 1 caption 3, image 2 captions 4-5.
    similarity = [
        # c0   c1   c2   c3   c4   c5
        [0.5, 0.5, 0.1, 0.5, 0.9, 0.5],  # image 0
        [0.0, 0.0, 0.0, 0.9, 0.0, 0.0],  # image 1
        [0.9, 0.9, 0.9, 0.0, 0.5, 0.5],  # image 2
    ]
    image_embeds, text_embeds = embeddings_with_similarity(similarity)
    metrics = retrieval_metrics(image_embeds, text_embeds, torch.tensor([0, 0, 0, 1, 2, 2]), ks=(1, 2, 3, 4))
    # Image 0: c4 (wrong) is strictly better; c0, c1 (correct) tie with c3, c5 (wrong) at 0.5. Two correct among
    # four tied places after one better candidate:
    #   R@1 = 0;  R@2 = 1 - C(2,1)/C(4,1) = 1/2;  R@3 = 1 - C(2,2)/C(4,2) = 5/6;  R@4 = 1 (only two wrong ones
    #   can come first);  expected rank 1 + (2 + 2 + 1) / (2 + 1) = 8/3.
    # Image 1: its c3 is first -> rank 1.  Image 2: c4, c5 tie, both correct, after three better -> rank 4.
    assert metrics["image_to_text_recall@1"] == pytest.approx((0 + 1 + 0) / 3)
    assert metrics["image_to_text_recall@2"] == pytest.approx((1 / 2 + 1 + 0) / 3)
    assert metrics["image_to_text_recall@3"] == pytest.approx((5 / 6 + 1 + 0) / 3)
    assert metrics["image_to_text_recall@4"] == 1.0
    assert metrics["image_to_text_median_rank"] == pytest.approx(8 / 3)  # ranks [8/3, 1, 4]


def test_duplicated_captions_across_images_are_not_hits_in_full():
    # The same caption text under two images (common in Flickr8k) gives the same embedding: for image 0, its
    # caption c0 ties exactly with image 1's identical c2, so image 0 finds its own first with probability 1/2.
    dog, cat, bird = [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]
    image_embeds = torch.tensor([dog, [0.0, 0.5, 0.5]])
    text_embeds = torch.tensor([dog, bird, dog, cat])  # captions of image 0: c0, c1; of image 1: c2, c3
    metrics = retrieval_metrics(image_embeds, text_embeds, torch.tensor([0, 0, 1, 1]), ks=(1, 2))
    # image 0: scores [1, 0, 1, 0]: best correct c0 tied with the wrong c2 -> R@1 1/2, rank 1.5
    # image 1: scores [0, 0.5, 0, 0.5]: best correct c3 tied with the wrong c1 -> R@1 1/2, rank 1.5
    assert metrics["image_to_text_recall@1"] == 0.5
    assert metrics["image_to_text_recall@2"] == 1.0
    assert metrics["image_to_text_median_rank"] == 1.5


def test_image_ids_in_any_order():
    # The rows of THREE_IMAGES reordered to (image 2, image 0, image 1), with ids 30, 10, 20 for images 0, 1, 2
    # of the original: the metrics must not change, since each caption still finds its image through its id.
    image_embeds, text_embeds = embeddings_with_similarity([THREE_IMAGES[2], THREE_IMAGES[0], THREE_IMAGES[1]])
    image_ids = torch.tensor([20, 30, 10])
    caption_ids = torch.tensor([30, 30, 10, 10, 20, 20])
    reordered = retrieval_metrics(image_embeds, text_embeds, caption_ids, image_ids=image_ids, ks=(1, 2, 3))
    original = retrieval_metrics(
        *embeddings_with_similarity(THREE_IMAGES), THREE_IMAGES_CAPTION_IDS, ks=(1, 2, 3)
    )
    assert reordered == original


def random_retrieval_problem(num_images: int = 40, seed: int = 0):
    """Normalised embeddings with 1 to 7 captions per image, captions shuffled, image ids not 0..N-1."""
    generator = torch.Generator().manual_seed(seed)
    image_embeds = torch.nn.functional.normalize(torch.randn(num_images, 16, generator=generator), dim=-1)
    captions_per_image = torch.randint(1, 8, (num_images,), generator=generator)
    caption_rows = torch.repeat_interleave(torch.arange(num_images), captions_per_image)
    caption_rows = caption_rows[torch.randperm(len(caption_rows), generator=generator)]
    noise = 0.8 * torch.randn(len(caption_rows), 16, generator=generator)
    text_embeds = torch.nn.functional.normalize(image_embeds[caption_rows] + noise, dim=-1)
    image_ids = torch.randperm(1000, generator=generator)[:num_images]
    return image_embeds, text_embeds, image_ids[caption_rows], image_ids, caption_rows


def tie_heavy_retrieval_problem(num_images: int = 12, seed: int = 0):
    """Embeddings with entries in {-1, 0, 1} over 3 dimensions, 1 to 4 captions per image: the dot products are small
    integers, exact in any summation order, so many candidates tie exactly with a query's correct one."""
    generator = torch.Generator().manual_seed(seed)
    image_embeds = torch.randint(-1, 2, (num_images, 3), generator=generator).float()
    captions_per_image = torch.randint(1, 5, (num_images,), generator=generator)
    caption_rows = torch.repeat_interleave(torch.arange(num_images), captions_per_image)
    caption_rows = caption_rows[torch.randperm(len(caption_rows), generator=generator)]
    text_embeds = torch.randint(-1, 2, (len(caption_rows), 3), generator=generator).float()
    image_ids = torch.randperm(1000, generator=generator)[:num_images] * 3  # not 0..N-1, not sorted
    return image_embeds, text_embeds, image_ids[caption_rows], image_ids, caption_rows


@pytest.mark.parametrize("problem", [random_retrieval_problem, tie_heavy_retrieval_problem])
def test_chunked_equals_unchunked(problem):
    image_embeds, text_embeds, caption_ids, image_ids, _ = problem()
    small_chunks = retrieval_metrics(image_embeds, text_embeds, caption_ids, image_ids, chunk_size=7)
    one_chunk = retrieval_metrics(image_embeds, text_embeds, caption_ids, image_ids, chunk_size=10000)
    assert small_chunks == one_chunk
    # Neither perfect nor hopeless, so the comparison says something.
    assert 0.0 < small_chunks["text_to_image_recall@1"] < 1.0


def first_correct_by_enumeration(scores: list[float], correct: list[bool], k: int) -> tuple[float, float]:
    """P(rank <= k) and the expected rank of the first correct candidate when the candidates are ordered by score
    and ties in a uniformly random order: every placement of the correct ones among the places of the group tied
    at the best correct score is equally likely, so average over all of them."""
    best = max(score for score, is_correct in zip(scores, correct) if is_correct)
    better = sum(score > best for score in scores)
    tied = [is_correct for score, is_correct in zip(scores, correct) if score == best]
    placements = list(itertools.combinations(range(len(tied)), sum(tied)))
    first_ranks = [better + 1 + min(places) for places in placements]
    return statistics.fmean(rank <= k for rank in first_ranks), statistics.fmean(first_ranks)


@pytest.mark.parametrize("seed", [1, 2])
def test_tie_heavy_data_matches_enumeration_of_tie_orders(seed):
    image_embeds, text_embeds, caption_ids, image_ids, caption_rows = tie_heavy_retrieval_problem(seed=seed)
    ks = (1, 3, 5)
    metrics = retrieval_metrics(image_embeds, text_embeds, caption_ids, image_ids, ks=ks, chunk_size=5)
    similarity = (image_embeds @ text_embeds.t()).tolist()  # exact integers
    queries = {"image_to_text": [], "text_to_image": []}
    for row, scores in enumerate(similarity):
        queries["image_to_text"].append((scores, [caption_row == row for caption_row in caption_rows.tolist()]))
    for column, caption_row in enumerate(caption_rows.tolist()):
        scores = [similarity[row][column] for row in range(len(similarity))]
        queries["text_to_image"].append((scores, [row == caption_row for row in range(len(similarity))]))
    ties = 0
    for direction, cases in queries.items():
        for k in ks:
            expected = statistics.fmean(first_correct_by_enumeration(*case, k)[0] for case in cases)
            assert metrics[f"{direction}_recall@{k}"] == pytest.approx(expected, rel=1e-12), (direction, k)
        ranks = [first_correct_by_enumeration(*case, 1)[1] for case in cases]
        assert metrics[f"{direction}_median_rank"] == pytest.approx(statistics.median(ranks), rel=1e-12)
        ties += sum(rank != int(rank) for rank in ranks)
    assert ties > 10  # the data really is full of ties


def test_bad_ids_are_rejected():
    image_embeds, text_embeds = embeddings_with_similarity(THREE_IMAGES)
    with pytest.raises(ValueError, match="not in `image_ids`"):
        retrieval_metrics(image_embeds, text_embeds, torch.tensor([0, 0, 1, 1, 2, 7]))
    with pytest.raises(ValueError, match="without any caption"):
        retrieval_metrics(image_embeds, text_embeds, torch.tensor([0, 0, 1, 1, 1, 1]))
    with pytest.raises(ValueError, match="all be different"):
        retrieval_metrics(image_embeds, text_embeds, THREE_IMAGES_CAPTION_IDS, image_ids=torch.tensor([0, 1, 1]))


# ----- the evaluate module ----------------------------------------------------------------------------------------
# Its inputs go through evaluate's Arrow table (float32 lists): the results must be those of `retrieval_metrics`
# exactly, ties and NaN included.


def compute_with_module(image_embeds, text_embeds, caption_ids, image_ids=None, **kwargs) -> dict:
    return load_retrieval_metric().compute(
        predictions=text_embeds.numpy(), references=caption_ids.numpy(), image_embeds=image_embeds,
        image_ids=image_ids, **kwargs,
    )  # fmt: skip


@pytest.mark.parametrize("problem", [random_retrieval_problem, tie_heavy_retrieval_problem])
def test_evaluate_module_equals_retrieval_metrics(problem):
    image_embeds, text_embeds, caption_ids, image_ids, _ = problem()
    expected = retrieval_metrics(image_embeds, text_embeds, caption_ids, image_ids)
    assert compute_with_module(image_embeds, text_embeds, caption_ids, image_ids) == expected
    chunked = compute_with_module(image_embeds, text_embeds, caption_ids, image_ids, ks=(1, 3), chunk_size=5)
    assert chunked == retrieval_metrics(image_embeds, text_embeds, caption_ids, image_ids, ks=(1, 3))


def test_evaluate_module_counts_non_finite_scores_as_misses():
    image_embeds, text_embeds = embeddings_with_similarity(THREE_IMAGES)
    text_embeds[4] = float("nan")
    metrics = compute_with_module(image_embeds, text_embeds, THREE_IMAGES_CAPTION_IDS, ks=(1, 3))
    assert metrics == retrieval_metrics(image_embeds, text_embeds, THREE_IMAGES_CAPTION_IDS, ks=(1, 3))
    assert metrics["image_to_text_recall@3"] == 0.0 and metrics["image_to_text_median_rank"] == 6


def test_evaluate_module_loads_offline_from_its_folder_alone(monkeypatch):
    # Pushed to the Hub, the folder is all there is: evaluate copies the script alone into its modules cache, and
    # the script may import only what its requirements.txt lists (not ndclip, not the model files).
    def no_network(*args):
        raise OSError("no network in this test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    metric = evaluate.load(RETRIEVAL_METRIC)
    assert metric.name == "image_text_retrieval"
    requirements = (Path(RETRIEVAL_METRIC) / "requirements.txt").read_text().split()
    allowed = {name.split(">")[0].split("=")[0] for name in requirements} | set(sys.stdlib_module_names)
    script = Path(RETRIEVAL_METRIC) / "image_text_retrieval.py"
    imported = {name for kind, name, *_ in evaluate.loading.get_imports(str(script)) if kind == "library"}
    assert imported <= allowed, imported - allowed
    identity = [[1.0, 0.0], [0.0, 1.0]]
    metrics = metric.compute(predictions=identity, references=[0, 1], image_embeds=identity, ks=(1,))
    assert metrics["text_to_image_recall@1"] == metrics["image_to_text_recall@1"] == 1.0


# ----- degenerate models score at chance ------------------------------------------------------------------------
# Their embeddings hold small multiples of powers of two, so every dot product is exact whatever the order of the
# sums inside the matmul: identical vectors then give identical scores, as the exact ties of the rule require (with
# arbitrary floats, a BLAS kernel may round the edge columns of a small matmul differently in the last bit).

NUM_IMAGES, CAPTIONS_PER_IMAGE = 6, 5
NUM_CAPTIONS = NUM_IMAGES * CAPTIONS_PER_IMAGE
CAPTION_IDS = torch.arange(NUM_IMAGES).repeat_interleave(CAPTIONS_PER_IMAGE)
KS = (1, 2, 5, 10)


def image_to_text_chance(num_captions: int, own_captions: int, k: int) -> float:
    """P(at least one of an image's `own_captions` is among the first k of `num_captions` in a random order)."""
    return 1 - math.comb(num_captions - own_captions, k) / math.comb(num_captions, k)


def image_to_text_chance_rank(num_captions: int, own_captions: int) -> float:
    """The expected position of the first of `own_captions` among `num_captions` in a random order."""
    return (num_captions + 1) / (own_captions + 1)


def distinct_vectors(count: int, dim: int = 4) -> torch.Tensor:
    """`count` different vectors, first coordinate 0.25 * row (exact), the rest fixed."""
    vectors = torch.full((count, dim), 0.5)
    vectors[:, 0] = 0.25 * torch.arange(count)
    return vectors


def assert_text_to_image_at_chance(metrics: dict, num_images: int) -> None:
    for k in KS:
        assert metrics[f"text_to_image_recall@{k}"] == pytest.approx(min(k, num_images) / num_images, rel=1e-12)
    assert metrics["text_to_image_median_rank"] == pytest.approx((num_images + 1) / 2, rel=1e-12)


def test_collapsed_text_tower_scores_at_chance():
    # Every caption is the same vector: image -> text can only guess. Each image has 5 of the 30 captions, all tied.
    image_embeds = distinct_vectors(NUM_IMAGES)
    text_embeds = torch.tensor([[1.0, 0.0, 0.0, 0.0]]).expand(NUM_CAPTIONS, -1)
    metrics = retrieval_metrics(image_embeds, text_embeds, CAPTION_IDS, ks=KS)
    for k in KS:
        expected = image_to_text_chance(NUM_CAPTIONS, CAPTIONS_PER_IMAGE, k)
        assert metrics[f"image_to_text_recall@{k}"] == pytest.approx(expected, rel=1e-12), k
    expected_rank = image_to_text_chance_rank(NUM_CAPTIONS, CAPTIONS_PER_IMAGE)
    assert metrics["image_to_text_median_rank"] == pytest.approx(expected_rank, rel=1e-12)
    # Text -> image: every caption ranks the images the same way (by their first coordinate), so each image is at
    # each place for exactly its 5 captions: chance as well.
    assert_text_to_image_at_chance(metrics, NUM_IMAGES)


def test_collapsed_image_tower_scores_at_chance():
    # Every image is the same vector: for each caption all 6 images tie.
    image_embeds = torch.tensor([[1.0, 0.0, 0.0, 0.0]]).expand(NUM_IMAGES, -1)
    metrics = retrieval_metrics(image_embeds, distinct_vectors(NUM_CAPTIONS), CAPTION_IDS, ks=KS)
    assert_text_to_image_at_chance(metrics, NUM_IMAGES)


@pytest.mark.parametrize("value", [1.0, 0.0])  # all ones, and all zeros (every score 0)
def test_constant_embeddings_score_at_chance(value):
    # Images with 1 to 4 captions: each image's chance depends on how many captions it has.
    captions_per_image = torch.tensor([1, 2, 3, 4, 1, 2, 3])
    caption_ids = torch.arange(len(captions_per_image)).repeat_interleave(captions_per_image)
    num_images, num_captions = len(captions_per_image), len(caption_ids)
    image_embeds = torch.full((num_images, 4), value)
    text_embeds = torch.full((num_captions, 4), value)
    metrics = retrieval_metrics(image_embeds, text_embeds, caption_ids, ks=KS)
    for k in KS:
        expected = statistics.fmean(image_to_text_chance(num_captions, c, k) for c in captions_per_image.tolist())
        assert metrics[f"image_to_text_recall@{k}"] == pytest.approx(expected, rel=1e-12), k
    expected_ranks = [image_to_text_chance_rank(num_captions, c) for c in captions_per_image.tolist()]
    assert metrics["image_to_text_median_rank"] == pytest.approx(statistics.median(expected_ranks), rel=1e-12)
    assert_text_to_image_at_chance(metrics, num_images)


def test_random_embeddings_score_near_chance():
    # An untrained model: independent random embeddings. No ties, but no signal either.
    generator = torch.Generator().manual_seed(0)
    num_images, per_image = 200, 5
    image_embeds = torch.nn.functional.normalize(torch.randn(num_images, 32, generator=generator), dim=-1)
    text_embeds = torch.nn.functional.normalize(torch.randn(num_images * per_image, 32, generator=generator), dim=-1)
    caption_ids = torch.arange(num_images).repeat_interleave(per_image)
    metrics = retrieval_metrics(image_embeds, text_embeds, caption_ids, ks=(1, 10))
    for k in (1, 10):
        chance = image_to_text_chance(num_images * per_image, per_image, k)
        assert metrics[f"image_to_text_recall@{k}"] == pytest.approx(chance, abs=0.06)
        assert metrics[f"text_to_image_recall@{k}"] == pytest.approx(k / num_images, abs=0.03)
    chance_rank = image_to_text_chance_rank(num_images * per_image, per_image)
    assert metrics["image_to_text_median_rank"] == pytest.approx(chance_rank, rel=0.35)
    assert metrics["text_to_image_median_rank"] == pytest.approx((num_images + 1) / 2, rel=0.15)


# ----- non-finite scores are misses --------------------------------------------------------------------------------


def assert_all_misses(metrics: dict, num_images: int, num_captions: int, directions=("image_to_text", "text_to_image")):
    worst = {"image_to_text": num_captions, "text_to_image": num_images}
    for direction in directions:
        assert all(value == 0.0 for key, value in metrics.items() if key.startswith(f"{direction}_recall@")), metrics
        assert metrics[f"{direction}_median_rank"] == worst[direction]


def test_nan_embeddings_are_misses():
    # A diverged run: every saved tensor is NaN. Comparisons with NaN are false, which must not read as "nothing
    # scored higher".
    image_embeds = torch.full((NUM_IMAGES, 4), float("nan"))
    text_embeds = torch.full((NUM_CAPTIONS, 4), float("nan"))
    metrics = retrieval_metrics(image_embeds, text_embeds, CAPTION_IDS, ks=KS)
    assert_all_misses(metrics, NUM_IMAGES, NUM_CAPTIONS)


def test_a_nan_score_makes_its_query_a_miss():
    # One broken caption embedding: a NaN in every image's row (no image -> text query can be trusted), and a
    # miss for that caption's own text -> image query. The other captions still rank their images.
    image_embeds, text_embeds = embeddings_with_similarity(THREE_IMAGES)
    text_embeds[4] = float("nan")
    metrics = retrieval_metrics(image_embeds, text_embeds, THREE_IMAGES_CAPTION_IDS, ks=(1, 3))
    assert_all_misses(metrics, 3, 6, directions=("image_to_text",))
    # Text -> image as in test_hand_built_matrix_with_two_captions_per_image, but caption 4 (rank 1 there) misses:
    # ranks [1, 3, 1, 3, worst = 3, 1].
    assert metrics["text_to_image_recall@1"] == pytest.approx(3 / 6)
    assert metrics["text_to_image_recall@3"] == pytest.approx(5 / 6)
    assert metrics["text_to_image_median_rank"] == 2.0


def test_infinite_scores_are_misses():
    # One-dimensional embeddings, so each score is a single product. Captions: c0 (image 0) +inf, c1 (image 1) -inf,
    # c2 (image 1) 1.0, c3 (image 2) 1.0. Every score in the columns of c0 and c1 is infinite.
    image_embeds = torch.tensor([[1.0], [2.0], [3.0]])
    text_embeds = torch.tensor([[float("inf")], [float("-inf")], [1.0], [1.0]])
    metrics = retrieval_metrics(image_embeds, text_embeds, torch.tensor([0, 1, 1, 2]), ks=(1, 2, 4))
    # Image -> text: every row holds the infinite scores of c0 and c1 (correct for images 0 and 1, wrong for image
    # 2, which c0's +inf would otherwise beat): all miss, at every K, even K = 4 = all captions.
    assert_all_misses(metrics, 3, 4, directions=("image_to_text",))
    # Text -> image: c0 (all +inf) and c1 (all -inf) miss (rank 3); c2 and c3 score [1, 2, 3] -> ranks 2 and 1.
    assert metrics["text_to_image_recall@1"] == pytest.approx(1 / 4)
    assert metrics["text_to_image_recall@2"] == pytest.approx(2 / 4)
    assert metrics["text_to_image_median_rank"] == 2.5  # ranks [3, 3, 2, 1]


def test_zero_shot_accuracy_uses_cosine_similarity():
    # Class 0's prompt embedding is short (norm 0.1): by raw dot product image 0 would go to class 1
    # (0.09 < 0.3), by cosine it goes to class 0 (0.95 > 0.32).
    class_text_embeds = torch.tensor([[0.1, 0.0], [0.0, 1.0], [-5.0, 0.0]])
    image_embeds = torch.nn.functional.normalize(
        torch.tensor([[0.9, 0.3], [0.1, 0.9], [-0.8, 0.2], [0.6, 0.8]]), dim=-1
    )
    # Predictions by cosine: 0, 1, 2, 1 (0.8 > 0.6); labels say the last is class 0 -> 3 of 4 right.
    labels = torch.tensor([0, 1, 2, 0])
    assert zero_shot_accuracy(image_embeds, labels, class_text_embeds) == 0.75
    assert zero_shot_accuracy(image_embeds, torch.tensor([0, 1, 2, 1]), class_text_embeds) == 1.0


def test_zero_shot_ties_count_one_over_the_tied_classes():
    num_classes = 4
    labels = torch.tensor([1, 2, 3, 1, 2, 3, 1, 0])  # unbalanced: picking class 0 for all would score 1/8
    images = distinct_vectors(len(labels))
    one_prompt = torch.tensor([[1.0, 0.0, 0.0, 0.0]]).expand(num_classes, -1)
    # Constant embeddings on both sides, or all class prompts the same: every class ties, accuracy 1/C.
    constant = torch.ones(len(labels), 4)
    assert zero_shot_accuracy(constant, labels, torch.ones(num_classes, 4)) == pytest.approx(1 / num_classes)
    assert zero_shot_accuracy(images, labels, one_prompt) == pytest.approx(1 / num_classes)
    # Image 0 ties between classes 0 and 1 (its label): 1/2. Image 1 ties between 0 and 1, label 2: 0.
    prompts = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    images = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert zero_shot_accuracy(images, torch.tensor([1, 2]), prompts) == 0.25


def test_zero_shot_non_finite_scores_are_misses():
    prompts = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    labels = torch.tensor([0, 1])
    assert zero_shot_accuracy(torch.full((2, 2), float("nan")), labels, prompts) == 0.0
    assert zero_shot_accuracy(torch.full((2, 2), float("inf")), labels, prompts) == 0.0  # normalised to NaN
    assert zero_shot_accuracy(torch.tensor([[1.0, 0.1], [0.1, 1.0]]), labels, torch.full((3, 2), float("nan"))) == 0.0
    # One NaN prompt, not the label of any image: every image's row holds a NaN, so no prediction can be trusted.
    assert zero_shot_accuracy(torch.tensor([[1.0, 0.1], [0.1, 1.0]]), labels, prompts) == 1.0
    prompts[2] = float("nan")
    assert zero_shot_accuracy(torch.tensor([[1.0, 0.1], [0.1, 1.0]]), labels, prompts) == 0.0


def random_pairs(num_pairs: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.nn.functional.normalize(torch.randn(num_pairs, 8, generator=generator), dim=-1)
    texts = torch.nn.functional.normalize(images + torch.randn(num_pairs, 8, generator=generator), dim=-1)
    return images, texts


def test_chunked_loss_on_one_batch_is_ndclip_loss():
    images, texts = random_pairs(6)
    scale = torch.tensor(14.3)
    expected = ndclip_loss(scale * texts @ images.t()).item()
    assert chunked_contrastive_loss(images, texts, scale, batch_size=6) == pytest.approx(expected, rel=1e-6)
    assert chunked_contrastive_loss(images, texts, scale, batch_size=100) == pytest.approx(expected, rel=1e-6)


def test_chunked_loss_is_the_mean_over_batches():
    images, texts = random_pairs(12, seed=1)
    batch_losses = [ndclip_loss(20.0 * texts[s : s + 4] @ images[s : s + 4].t()).item() for s in (0, 4, 8)]
    assert chunked_contrastive_loss(images, texts, 20.0, batch_size=4) == pytest.approx(sum(batch_losses) / 3)
    # Batches really are separate: one batch of 12 has more negatives, hence a different loss.
    assert chunked_contrastive_loss(images, texts, 20.0, batch_size=12) != pytest.approx(sum(batch_losses) / 3)


def test_chunked_loss_weights_a_short_last_batch_by_its_pairs():
    images, texts = random_pairs(10, seed=2)
    full = [ndclip_loss(20.0 * texts[s : s + 4] @ images[s : s + 4].t()).item() for s in (0, 4)]
    last = ndclip_loss(20.0 * texts[8:] @ images[8:].t()).item()
    expected = (4 * full[0] + 4 * full[1] + 2 * last) / 10
    assert chunked_contrastive_loss(images, texts, 20.0, batch_size=4) == pytest.approx(expected)


def test_chunked_loss_of_nan_embeddings_stays_nan():
    # A diverged model must not get a finite (flattering) evaluation loss.
    images, texts = random_pairs(8, seed=3)
    images[2] = float("nan")
    assert math.isnan(chunked_contrastive_loss(images, texts, 20.0, batch_size=4))
    assert math.isnan(chunked_contrastive_loss(torch.full((8, 8), float("nan")), texts, 20.0, batch_size=4))
