"""retrieval_metrics: recall@K and median ranks on hand-built similarity matrices, chunking, image ids, zero-shot
accuracy, and the fixed-batch contrastive loss."""

import pytest
import torch

from modeling_ndclip import ndclip_loss
from retrieval_metrics import chunked_contrastive_loss, retrieval_metrics, zero_shot_accuracy


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


def test_default_keys():
    image_embeds, text_embeds = embeddings_with_similarity(THREE_IMAGES)
    metrics = retrieval_metrics(image_embeds, text_embeds, THREE_IMAGES_CAPTION_IDS)
    assert set(metrics) == {
        *(f"{direction}_recall@{k}" for direction in ("image_to_text", "text_to_image") for k in (1, 5, 10)),
        "image_to_text_median_rank",
        "text_to_image_median_rank",
    }
    # Only 3 images and 6 captions: every correct answer is within the top 5.
    assert metrics["image_to_text_recall@5"] == metrics["text_to_image_recall@5"] == 1.0
    assert all(isinstance(value, float) for value in metrics.values())


def test_ties_count_in_favour_of_the_hit():
    # 2 images, captions 0, 1 show image 0 and captions 2, 3 image 1.
    similarity = [
        # c0   c1   c2   c3
        [0.5, 0.2, 0.5, 0.1],  # image 0
        [0.7, 0.7, 0.5, 0.7],  # image 1
    ]
    image_embeds, text_embeds = embeddings_with_similarity(similarity)
    metrics = retrieval_metrics(image_embeds, text_embeds, torch.tensor([0, 0, 1, 1]), ks=(1,))
    # Image -> text:
    #   image 0: best correct c0 = 0.5 ties with the wrong c2 = 0.5; nothing strictly higher -> rank 1
    #   image 1: best correct c3 = 0.7 ties with the wrong c0, c1 = 0.7; nothing strictly higher -> rank 1
    assert metrics["image_to_text_recall@1"] == 1.0
    assert metrics["image_to_text_median_rank"] == 1.0
    # Text -> image:
    #   c0 [0.5, 0.7] image 0 -> 2;   c1 [0.2, 0.7] image 0 -> 2
    #   c2 [0.5, 0.5] image 1, tied with image 0 -> 1;   c3 [0.1, 0.7] image 1 -> 1
    # ranks [2, 2, 1, 1]: R@1 = 1/2; median of an even count is the mean of the middle two, (1 + 2) / 2.
    assert metrics["text_to_image_recall@1"] == 0.5
    assert metrics["text_to_image_median_rank"] == 1.5


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


def test_chunked_equals_unchunked_on_random_data():
    image_embeds, text_embeds, caption_ids, image_ids, _ = random_retrieval_problem()
    small_chunks = retrieval_metrics(image_embeds, text_embeds, caption_ids, image_ids, chunk_size=7)
    one_chunk = retrieval_metrics(image_embeds, text_embeds, caption_ids, image_ids, chunk_size=10000)
    assert small_chunks == one_chunk
    # Random data with this much noise is neither perfect nor hopeless, so the comparison says something.
    assert 0.0 < small_chunks["text_to_image_recall@1"] < 1.0


def test_random_data_matches_brute_force_ranks():
    image_embeds, text_embeds, caption_ids, image_ids, caption_rows = random_retrieval_problem(seed=1)
    metrics = retrieval_metrics(image_embeds, text_embeds, caption_ids, image_ids, ks=(1, 5), chunk_size=6)
    similarity = image_embeds @ text_embeds.t()  # the full matrix, fine at this size
    image_ranks = []
    for row in range(len(image_embeds)):
        best_correct = similarity[row, caption_rows == row].max()
        image_ranks.append(1 + int((similarity[row] > best_correct).sum()))
    text_ranks = [1 + int((similarity[:, j] > similarity[caption_rows[j], j]).sum()) for j in range(len(caption_rows))]
    for k in (1, 5):
        assert metrics[f"image_to_text_recall@{k}"] == recall(image_ranks, k)
        assert metrics[f"text_to_image_recall@{k}"] == recall(text_ranks, k)
    assert metrics["image_to_text_median_rank"] == pytest.approx(median(image_ranks))
    assert metrics["text_to_image_median_rank"] == pytest.approx(median(text_ranks))


def recall(ranks: list[int], k: int) -> float:
    return sum(rank <= k for rank in ranks) / len(ranks)


def median(ranks: list[int]) -> float:
    """The median with the mean of the two middle values for an even count (torch's quantile interpolates)."""
    return torch.tensor(ranks, dtype=torch.float64).quantile(0.5).item()


def test_bad_ids_are_rejected():
    image_embeds, text_embeds = embeddings_with_similarity(THREE_IMAGES)
    with pytest.raises(ValueError, match="not in `image_ids`"):
        retrieval_metrics(image_embeds, text_embeds, torch.tensor([0, 0, 1, 1, 2, 7]))
    with pytest.raises(ValueError, match="without any caption"):
        retrieval_metrics(image_embeds, text_embeds, torch.tensor([0, 0, 1, 1, 1, 1]))
    with pytest.raises(ValueError, match="all be different"):
        retrieval_metrics(image_embeds, text_embeds, THREE_IMAGES_CAPTION_IDS, image_ids=torch.tensor([0, 1, 1]))


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
