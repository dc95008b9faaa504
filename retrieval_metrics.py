"""Evaluation metrics for image-text models: retrieval recall@K and median rank, zero-shot accuracy, and the
contrastive loss over fixed-size batches. Pure torch functions on embeddings, used by `run_clip.py`'s evaluation
and by the benchmarks; they run on whatever device the embeddings are on.

Similarities are computed `chunk_size` rows at a time, so that 10,000 images x 50,000 captions never hold the whole
similarity matrix in memory: the peak is one chunk of `chunk_size x max(images, captions)` float32 similarities
(1024 x 50,000 x 4 bytes = 205 MB), in which the ranks are then counted in place. On 2 CPU cores that case takes
about 6 s with `D = 256`.
"""

from collections.abc import Sequence

import torch

try:
    from .modeling_ndclip import ndclip_loss
except ImportError:
    from modeling_ndclip import ndclip_loss


def retrieval_metrics(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    text_image_ids: torch.Tensor,
    image_ids: torch.Tensor | None = None,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Image->text and text->image retrieval metrics when each image has one or more captions.

    Args:
        image_embeds: `[N, D]` L2-normalised image embeddings.
        text_embeds: `[M, D]` L2-normalised caption embeddings.
        text_image_ids: `[M]` integer id of the image each caption describes (a value of `image_ids`); a tensor,
            array or list.
        image_ids: `[N]` integer id of each image row, all different; defaults to `arange(N)`.
        ks: the K of recall@K.
        chunk_size: rows of the similarity matrix computed at once (bounds the memory, not the result).

    Returns:
        `image_to_text_recall@K`: fraction of images with at least one of their captions in their top K captions.
        `text_to_image_recall@K`: fraction of captions whose image is in their top K images.
        `image_to_text_median_rank`: median over images of the 1-based rank of the best-ranked correct caption.
        `text_to_image_median_rank`: median over captions of the 1-based rank of their image.
        Medians of an even count are the mean of the two middle ranks, as `numpy.median`.

    A rank is 1 + the number of candidates scoring *strictly* higher than the correct one, so a wrong candidate
    that ties with the correct one does not push it down: ties count in favour of the hit. Other correct captions
    of the same image never push the best one down either (they score at most as high).
    """
    device = image_embeds.device
    image_embeds, text_embeds = image_embeds.float(), text_embeds.float().to(device)
    if image_ids is None:
        image_ids = torch.arange(len(image_embeds), device=device)
    image_ids = torch.as_tensor(image_ids, device=device)
    text_image_ids = torch.as_tensor(text_image_ids, device=device)
    _check_retrieval_inputs(image_embeds, text_embeds, text_image_ids, image_ids)

    text_image_rows = _image_rows_of_captions(text_image_ids, image_ids)
    image_ranks = image_to_text_ranks(image_embeds, text_embeds, text_image_rows, chunk_size)
    text_ranks = text_to_image_ranks(image_embeds, text_embeds, text_image_rows, chunk_size)

    metrics = {}
    for k in ks:
        metrics[f"image_to_text_recall@{k}"] = _fraction(image_ranks <= k)
    for k in ks:
        metrics[f"text_to_image_recall@{k}"] = _fraction(text_ranks <= k)
    metrics["image_to_text_median_rank"] = _median(image_ranks)
    metrics["text_to_image_median_rank"] = _median(text_ranks)
    return metrics


def image_to_text_ranks(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, text_image_rows: torch.Tensor, chunk_size: int = 1024
) -> torch.Tensor:
    """`[N]` 1-based rank, for each image, of its best-ranked caption among all `M` captions.

    `text_image_rows` (`[M]`) is the image row each caption belongs to. Each chunk holds `chunk_size` complete rows
    of the `[N, M]` similarity matrix, so a row's correct scores and its competitors come from the same matmul and
    compare exactly (a separately computed dot product could differ in the last bit and break ties).
    """
    num_images = len(image_embeds)
    ranks = torch.empty(num_images, dtype=torch.long, device=image_embeds.device)
    caption_columns = torch.arange(len(text_embeds), device=image_embeds.device)
    for start in range(0, num_images, chunk_size):
        end = min(start + chunk_size, num_images)
        similarity = image_embeds[start:end] @ text_embeds.t()  # [chunk, M]
        # The best correct score of each image in the chunk: a max over its captions' cells, scattered by row.
        in_chunk = (text_image_rows >= start) & (text_image_rows < end)
        rows, columns = text_image_rows[in_chunk] - start, caption_columns[in_chunk]
        best_correct = torch.full((end - start,), float("-inf"), device=similarity.device)
        best_correct.scatter_reduce_(0, rows, similarity[rows, columns], reduce="amax")
        ranks[start:end] = _count_strictly_greater(similarity, best_correct[:, None]) + 1
        del similarity  # freed before the next chunk's matmul allocates: one chunk alive at a time, not two
    return ranks


def text_to_image_ranks(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, text_image_rows: torch.Tensor, chunk_size: int = 1024
) -> torch.Tensor:
    """`[M]` 1-based rank, for each caption, of its image (row `text_image_rows[j]`) among all `N` images.

    Computed `chunk_size` captions at a time over complete rows of the `[M, N]` similarity matrix.
    """
    num_texts = len(text_embeds)
    ranks = torch.empty(num_texts, dtype=torch.long, device=text_embeds.device)
    for start in range(0, num_texts, chunk_size):
        end = min(start + chunk_size, num_texts)
        similarity = text_embeds[start:end] @ image_embeds.t()  # [chunk, N]
        correct = similarity.gather(1, text_image_rows[start:end, None])  # [chunk, 1]
        ranks[start:end] = _count_strictly_greater(similarity, correct) + 1
        del similarity  # one chunk alive at a time
    return ranks


def zero_shot_accuracy(image_embeds: torch.Tensor, labels: torch.Tensor, class_text_embeds: torch.Tensor) -> float:
    """Fraction of images whose most cosine-similar class prompt is their label.

    Args:
        image_embeds: `[N, D]` image embeddings (normalised here, so projections work too).
        labels: `[N]` class index of each image, a row of `class_text_embeds`.
        class_text_embeds: `[C, D]` one embedding per class (e.g. of "a photo of a {class}.").
    """
    image_embeds = torch.nn.functional.normalize(image_embeds.float(), dim=-1)
    class_text_embeds = torch.nn.functional.normalize(class_text_embeds.float().to(image_embeds.device), dim=-1)
    predictions = (image_embeds @ class_text_embeds.t()).argmax(dim=1)
    return _fraction(predictions == torch.as_tensor(labels, device=predictions.device))


def chunked_contrastive_loss(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: float | torch.Tensor, batch_size: int
) -> float:
    """The symmetric CLIP loss (`modeling_ndclip.ndclip_loss`) of consecutive batches of `batch_size` pairs.

    The contrastive loss depends on the batch (the negatives are the other pairs in it), so an evaluation that
    gathers all embeddings and re-batches them at a fixed size gives the same number on any number of processes.

    Args:
        image_embeds, text_embeds: `[N, D]` L2-normalised embeddings; pair i is image i with text i.
        logit_scale: the multiplier of the cosine similarities, `model.clamped_logit_scale()` (not its log).
        batch_size: pairs per batch; the last batch may be smaller.

    Returns:
        The mean of the batch losses weighted by their number of pairs (the plain mean when all batches are full).
    """
    if len(image_embeds) != len(text_embeds):
        raise ValueError(f"need one text per image, got {len(image_embeds)} images and {len(text_embeds)} texts")
    if len(image_embeds) == 0:
        raise ValueError("cannot compute a loss over zero pairs")
    image_embeds, text_embeds = image_embeds.float(), text_embeds.float()
    total = 0.0
    for start in range(0, len(image_embeds), batch_size):
        images, texts = image_embeds[start : start + batch_size], text_embeds[start : start + batch_size]
        logits_per_text = logit_scale * texts @ images.t()
        total += ndclip_loss(logits_per_text).item() * len(images)
    return total / len(image_embeds)


def _count_strictly_greater(similarity: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """`[rows]` how many entries of each row of `similarity` (`[rows, columns]`) exceed `threshold` (`[rows, 1]`).

    Overwrites `similarity` with 1.0 / 0.0 in place: a boolean mask summed as integers would allocate 1 + 8 bytes
    per cell (more than the float chunk itself). Float32 counts are exact below 2**24 columns; beyond, float64.
    """
    count_dtype = torch.float32 if similarity.shape[1] < 2**24 else torch.float64
    return similarity.gt_(threshold).sum(dim=1, dtype=count_dtype).long()


def _image_rows_of_captions(text_image_ids: torch.Tensor, image_ids: torch.Tensor) -> torch.Tensor:
    """`[M]` the row of `image_ids` holding each caption's image id (ids may be in any order)."""
    sorted_ids, order = image_ids.sort()
    positions = torch.searchsorted(sorted_ids, text_image_ids).clamp(max=len(sorted_ids) - 1)
    found = sorted_ids[positions] == text_image_ids
    if not found.all():
        missing = text_image_ids[~found].unique()[:5].tolist()
        raise ValueError(f"captions refer to image ids that are not in `image_ids`, e.g. {missing}")
    return order[positions]


def _check_retrieval_inputs(image_embeds, text_embeds, text_image_ids, image_ids) -> None:
    if image_embeds.dim() != 2 or text_embeds.dim() != 2 or image_embeds.shape[1] != text_embeds.shape[1]:
        raise ValueError(
            "need [N, D] image and [M, D] text embeddings, "
            f"got {tuple(image_embeds.shape)} and {tuple(text_embeds.shape)}"
        )
    if len(image_embeds) == 0 or len(text_embeds) == 0:
        raise ValueError("retrieval needs at least one image and one caption")
    if text_image_ids.shape != (len(text_embeds),):
        raise ValueError(f"`text_image_ids` must have shape ({len(text_embeds)},), got {tuple(text_image_ids.shape)}")
    if image_ids.shape != (len(image_embeds),):
        raise ValueError(f"`image_ids` must have shape ({len(image_embeds)},), got {tuple(image_ids.shape)}")
    if image_ids.unique().numel() != len(image_ids):
        raise ValueError("`image_ids` must all be different (one row per image)")
    # An image without captions has no correct answer, so its image->text rank would be meaningless.
    without_captions = ~torch.isin(image_ids, text_image_ids)
    if without_captions.any():
        raise ValueError(f"images without any caption: ids {image_ids[without_captions][:5].tolist()}")


def _fraction(hits: torch.Tensor) -> float:
    """The share of True in `hits`, as an exact Python division (a float32 mean would report 0.72 as 0.72000003)."""
    return hits.sum().item() / hits.numel()


def _median(values: torch.Tensor) -> float:
    """Median as `numpy.median`: the mean of the two middle values for an even count."""
    ordered = values.float().sort().values
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle].item()
    return ((ordered[middle - 1] + ordered[middle]) / 2).item()


__all__ = [
    "retrieval_metrics",
    "image_to_text_ranks",
    "text_to_image_ranks",
    "zero_shot_accuracy",
    "chunked_contrastive_loss",
]
