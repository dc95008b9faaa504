"""Image-text retrieval: recall@K and median rank, image->text and text->image, as an `evaluate` metric.

    import evaluate
    retrieval = evaluate.load("path/to/image_text_retrieval")  # this folder; offline, nothing is downloaded
    retrieval.compute(predictions=text_embeds, references=caption_image_ids, image_embeds=image_embeds)

The file is self-contained (torch, numpy, datasets, evaluate), so the folder can be pushed to the Hub as a metric
Space as it is; `retrieval_metrics` is the same computation on tensors, without evaluate's Arrow round trip.

**Ties are broken at random, in expectation.** Candidates are ranked by score, and candidates with exactly equal
scores in a uniformly random order. For a query with `g` candidates scoring strictly higher than its best correct
one, and, tied exactly at that best correct score, `c` correct and `t` wrong candidates, the reported recall@K is
the probability that the first correct candidate lands in the top K, `1 - C(t, m) / C(t + c, m)` with
`m = K - g` (0 when `m <= 0`, 1 when `m > t`), and the reported rank is its expected rank,
`g + (t + c + 1) / (c + 1)`. With one correct candidate (text->image, zero-shot) that is `clamp((K - g) / (t + 1))`
and `g + 1 + t / 2`. So ties count neither for nor against the hit: a collapsed tower (every caption, or every image,
the same vector), constant embeddings, or captions repeated word for word under several images score exactly at
chance where they tie, instead of a perfect recall.

**Non-finite scores are misses.** A query whose row of similarities holds a NaN or an infinity, correct or wrong
candidate, has recall 0 at every K and the worst rank, the number of candidates: such a score comes from a broken
(diverged) embedding, and comparisons with NaN are false, so without this rule "nothing scores higher" would read as
a perfect rank. (A row whose float32 sum overflows, which takes scores beyond 1e33, counts as non-finite too.)

**Memory stays bounded.** Similarities are computed `chunk_size` rows at a time, so that 10,000 images x 50,000
captions never hold the whole similarity matrix in memory: the peak is one chunk of
`chunk_size x max(images, captions)` float32 similarities, in which the ties are then counted in place.
"""

from collections.abc import Sequence
from typing import NamedTuple

import datasets
import evaluate
import numpy as np
import torch

_CITATION = """\
@inproceedings{radford2021clip,
  title={Learning Transferable Visual Models From Natural Language Supervision},
  author={Radford, Alec and Kim, Jong Wook and Hallacy, Chris and Ramesh, Aditya and Goh, Gabriel and Agarwal,
          Sandhini and Sastry, Girish and Askell, Amanda and Mishkin, Pamela and Clark, Jack and Krueger, Gretchen
          and Sutskever, Ilya},
  booktitle={International Conference on Machine Learning},
  year={2021}
}
"""

_DESCRIPTION = """\
Image-text retrieval recall@K and median rank, in both directions, for image-caption data sets where an image has
one or more captions (Flickr8k/30k, COCO). Image->text: for each image, rank all captions by similarity; recall@K is
the fraction of images with at least one of their captions in the top K. Text->image: for each caption, rank all
images; recall@K is the fraction of captions whose image is in the top K. Ties are broken at random, in expectation
(a degenerate model scores at chance, not perfectly), a query with a NaN or infinite score is a miss, and the
similarity matrix is computed in chunks, so memory stays bounded on large evaluation sets.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `float`, `[M, D]`): the embedding of each caption, L2-normalised (the
        similarity is the dot product).
    references (`list` of `int`, `[M]`): the id of the image each caption describes, a value of `image_ids`.
    image_embeds (array or tensor, `[N, D]`): the embedding of each image, L2-normalised.
    image_ids (array or tensor of `int`, `[N]`, optional): the id of each image row, all different; defaults to
        `0 .. N-1`. Every image needs at least one caption.
    ks (`tuple` of `int`, optional): the K of recall@K; defaults to `(1, 5, 10)`.
    chunk_size (`int`, optional): rows of the similarity matrix computed at once (bounds the memory, not the
        result); defaults to 1024.
Returns:
    `image_to_text_recall@K` (`float`, 0 to 1): mean over images of the probability that at least one of their
        captions is in their top K captions.
    `text_to_image_recall@K` (`float`, 0 to 1): mean over captions of the probability that their image is in their
        top K images.
    `image_to_text_median_rank` (`float`, 1 to M): median over images of the expected 1-based rank of their first
        correct caption.
    `text_to_image_median_rank` (`float`, 1 to N): median over captions of the expected 1-based rank of their image.
Examples:
    >>> retrieval = evaluate.load("image_text_retrieval")
    >>> images = [[1.0, 0.0], [0.0, 1.0]]
    >>> captions = [[0.8, 0.6], [0.6, 0.8], [0.0, 1.0]]  # caption 0 shows image 0, captions 1 and 2 image 1
    >>> results = retrieval.compute(predictions=captions, references=[0, 1, 1], image_embeds=images, ks=(1,))
    >>> results["image_to_text_recall@1"], results["text_to_image_recall@1"]
    (1.0, 1.0)
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ImageTextRetrieval(evaluate.Metric):
    """Recall@K and median rank of image->text and text->image retrieval (see the module docstring)."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("float32")),
                    "references": datasets.Value("int64"),
                }
            ),
            reference_urls=["https://arxiv.org/abs/2103.00020"],
        )

    def _compute(self, predictions, references, image_embeds, image_ids=None, ks=(1, 5, 10), chunk_size=1024):
        text_embeds = torch.as_tensor(np.asarray(predictions, dtype=np.float32))
        image_embeds = torch.as_tensor(np.asarray(image_embeds, dtype=np.float32))
        image_ids = None if image_ids is None else torch.as_tensor(np.asarray(image_ids, dtype=np.int64))
        caption_image_ids = torch.as_tensor(np.asarray(references, dtype=np.int64))
        return retrieval_metrics(image_embeds, text_embeds, caption_image_ids, image_ids, ks, chunk_size)


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
        `image_to_text_recall@K`: mean over images of the probability that at least one of their captions is in
        their top K captions.
        `text_to_image_recall@K`: mean over captions of the probability that their image is in their top K images.
        `image_to_text_median_rank`: median over images of the expected 1-based rank of the first correct caption.
        `text_to_image_median_rank`: median over captions of the expected 1-based rank of their image.
        Medians of an even count are the mean of the two middle ranks, as `numpy.median`.

    Ties are broken at random, in expectation (see the module docstring): a wrong candidate scoring exactly as high
    as the best correct one comes first as often as not, so a tied group of `c` correct and `t` wrong candidates
    after `g` better ones counts `P(rank <= K) = 1 - C(t, K - g) / C(t + c, K - g)` and rank
    `g + (t + c + 1) / (c + 1)`. A query whose row holds a NaN or an infinity is a miss: recall 0, rank = the number
    of candidates.
    """
    device = image_embeds.device
    image_embeds, text_embeds = image_embeds.float(), text_embeds.float().to(device)
    if image_ids is None:
        image_ids = torch.arange(len(image_embeds), device=device)
    image_ids = torch.as_tensor(image_ids, device=device)
    text_image_ids = torch.as_tensor(text_image_ids, device=device)
    _check_retrieval_inputs(image_embeds, text_embeds, text_image_ids, image_ids)

    text_image_rows = _image_rows_of_captions(text_image_ids, image_ids)
    image_counts = image_to_text_rank_counts(image_embeds, text_embeds, text_image_rows, chunk_size)
    text_counts = text_to_image_rank_counts(image_embeds, text_embeds, text_image_rows, chunk_size)

    metrics = {}
    for k in ks:
        metrics[f"image_to_text_recall@{k}"] = exact_mean(image_counts.recall_at(k))
    for k in ks:
        metrics[f"text_to_image_recall@{k}"] = exact_mean(text_counts.recall_at(k))
    metrics["image_to_text_median_rank"] = _median(image_counts.expected_rank())
    metrics["text_to_image_median_rank"] = _median(text_counts.expected_rank())
    return metrics


class RankCounts(NamedTuple):
    """Where each query's first correct candidate can land, as counts: all the tie-breaking rule needs.

    Fields (`[Q]` tensors, one entry per query, on the device of the embeddings):
        better: candidates scoring strictly higher than the query's best correct candidate.
        tied_wrong: wrong candidates scoring exactly the best correct score.
        tied_correct: correct candidates scoring exactly the best correct score (at least 1, the best itself).
        miss: True where the query cannot be scored: a NaN or an infinity in its row.
        num_candidates: candidates per query (an int), the rank reported for a miss.
    The counts of a miss are set to those of a lone hit (0, 0, 1) so that no arithmetic on them overflows.
    """

    better: torch.Tensor
    tied_wrong: torch.Tensor
    tied_correct: torch.Tensor
    miss: torch.Tensor
    num_candidates: int

    def recall_at(self, k: int) -> torch.Tensor:
        """`[Q]` float64 P(the first correct candidate is in the top `k`) under a random order of the tied group.

        `1 - C(t, m) / C(t + c, m)` with `m` the tied places inside the top k, computed as the product
        `prod_{i < c} (t + c - m - i) / (t + c - i)` (the same ratio, rewritten): `c` factors, each at most 1, so
        it neither overflows nor loses precision as binomials of 50,000 candidates would. Clamping `m` to `t + 1`
        makes a factor 0 once the top k holds more tied places than there are tied wrong candidates.
        """
        wrong, correct = self.tied_wrong.double(), self.tied_correct.double()
        places = (k - self.better).clamp(min=0).minimum(self.tied_wrong + 1).double()
        all_wrong = torch.ones_like(wrong)
        for i in range(int(self.tied_correct.max())):
            factor = (wrong + correct - places - i) / (wrong + correct - i)
            all_wrong *= torch.where(i < correct, factor, 1.0)
        return torch.where(self.miss, 0.0, 1 - all_wrong)

    def expected_rank(self) -> torch.Tensor:
        """`[Q]` float64 expected 1-based rank of the first correct candidate; `num_candidates` for a miss."""
        correct = self.tied_correct.double()
        rank = self.better + (self.tied_wrong + correct + 1) / (correct + 1)
        return torch.where(self.miss, float(self.num_candidates), rank)


def image_to_text_rank_counts(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, text_image_rows: torch.Tensor, chunk_size: int = 1024
) -> RankCounts:
    """For each image, the counts that place its first correct caption among all `M` captions.

    `text_image_rows` (`[M]`) is the image row each caption belongs to. Each chunk holds `chunk_size` complete rows
    of the `[N, M]` similarity matrix, so a row's correct scores and its competitors come from the same matmul and
    compare exactly (a separately computed dot product could differ in the last bit and make or break a tie).
    """
    num_images, device = len(image_embeds), image_embeds.device
    counts = _empty_counts(num_images, len(text_embeds), device)
    caption_columns = torch.arange(len(text_embeds), device=device)
    for start in range(0, num_images, chunk_size):
        end = min(start + chunk_size, num_images)
        similarity = image_embeds[start:end] @ text_embeds.t()  # [chunk, M]
        # The best correct score of each image in the chunk: a max over its captions' cells, scattered by row; then
        # how many of its captions reach it.
        in_chunk = (text_image_rows >= start) & (text_image_rows < end)
        rows, columns = text_image_rows[in_chunk] - start, caption_columns[in_chunk]
        correct_scores = similarity[rows, columns]
        best_correct = torch.full((end - start,), float("-inf"), device=device)
        best_correct.scatter_reduce_(0, rows, correct_scores, reduce="amax")
        tied_correct = torch.zeros(end - start, dtype=torch.long, device=device)
        tied_correct.index_add_(0, rows, (correct_scores == best_correct[rows]).long())
        better, tied, non_finite = _count_above_and_tied(similarity, best_correct[:, None])
        del similarity  # freed before the next chunk's matmul allocates: one chunk alive at a time, not two
        _store_counts(counts, slice(start, end), better, tied - tied_correct, tied_correct, non_finite)
    return counts


def text_to_image_rank_counts(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, text_image_rows: torch.Tensor, chunk_size: int = 1024
) -> RankCounts:
    """For each caption, the counts that place its image (row `text_image_rows[j]`) among all `N` images.

    Computed `chunk_size` captions at a time over complete rows of the `[M, N]` similarity matrix.
    """
    return one_correct_rank_counts(text_embeds, image_embeds, text_image_rows, chunk_size)


def one_correct_rank_counts(
    queries: torch.Tensor, candidates: torch.Tensor, correct_columns: torch.Tensor, chunk_size: int
) -> RankCounts:
    """Rank counts when query `i` has exactly one correct candidate, `candidates[correct_columns[i]]`.

    `chunk_size` complete rows of the `[Q, C]` similarity matrix at a time: each correct score is picked out of the
    same matmul as its competitors, so ties compare exactly.
    """
    num_queries, device = len(queries), queries.device
    counts = _empty_counts(num_queries, len(candidates), device)
    for start in range(0, num_queries, chunk_size):
        end = min(start + chunk_size, num_queries)
        similarity = queries[start:end] @ candidates.t()  # [chunk, C]
        correct = similarity.gather(1, correct_columns[start:end, None])  # [chunk, 1]
        better, tied, non_finite = _count_above_and_tied(similarity, correct)
        del similarity  # one chunk alive at a time
        _store_counts(counts, slice(start, end), better, tied - 1, torch.ones_like(tied), non_finite)
    return counts


def _count_above_and_tied(
    similarity: torch.Tensor, threshold: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of `similarity` (`[rows, columns]`): how many entries exceed `threshold` (`[rows, 1]`), how many
    equal it, and whether the row holds a non-finite score.

    A row sum is finite exactly when the row is (barring a float32 overflow, beyond any similarity of normalised
    embeddings); it is taken first, as `sign` below would map NaN to 0, a tie. Then `similarity` is overwritten in
    place with the sign of its difference to the threshold (+1 above, 0 tied, -1 below): two boolean masks would
    allocate two bytes per cell. For finite floats `s - t` is 0 exactly when `s == t` (IEEE subtraction with gradual
    underflow), so ties stay exact. The sum of the signs is above - below, their L1 norm above + below. Float32 sums
    of +-1 are exact below 2**24 columns; beyond, float64.
    """
    count_dtype = torch.float32 if similarity.shape[1] < 2**24 else torch.float64
    non_finite = ~similarity.sum(dim=1).isfinite()
    signs = similarity.sub_(threshold).sign_()
    above_minus_below = signs.sum(dim=1, dtype=count_dtype)
    not_tied = torch.linalg.vector_norm(signs, ord=1, dim=1, dtype=count_dtype)
    above = ((not_tied + above_minus_below) / 2).long()
    tied = (similarity.shape[1] - not_tied).long()
    return above, tied, non_finite


def _empty_counts(num_queries: int, num_candidates: int, device) -> RankCounts:
    def longs():
        return torch.empty(num_queries, dtype=torch.long, device=device)

    miss = torch.empty(num_queries, dtype=torch.bool, device=device)
    return RankCounts(longs(), longs(), longs(), miss, num_candidates)


def _store_counts(counts: RankCounts, rows: slice, better, tied_wrong, tied_correct, miss) -> None:
    """Writes one chunk's counts; a miss gets the counts of a lone hit, so later arithmetic on them stays finite
    (the garbage counts of a non-finite row could be anything)."""
    counts.better[rows] = better.masked_fill(miss, 0)
    counts.tied_wrong[rows] = tied_wrong.masked_fill(miss, 0)
    counts.tied_correct[rows] = tied_correct.masked_fill(miss, 1)
    counts.miss[rows] = miss


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


def exact_mean(values: torch.Tensor) -> float:
    """The mean as a float64 sum and an exact Python division (a float32 mean would report 0.72 as 0.72000003)."""
    return values.sum(dtype=torch.float64).item() / values.numel()


def _median(values: torch.Tensor) -> float:
    """Median as `numpy.median`: the mean of the two middle values for an even count."""
    ordered = values.double().sort().values
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle].item()
    return ((ordered[middle - 1] + ordered[middle]) / 2).item()
