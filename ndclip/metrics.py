"""Evaluation metrics for image-text models: retrieval recall@K and median rank, zero-shot accuracy, and the
contrastive loss over fixed-size batches. Torch functions on embeddings, used by the evaluation during training
(`ndclip.evaluation`) and by the benchmarks; they run on whatever device the embeddings are on.

Retrieval is the `evaluate` metric kept in `ndclip/image_text_retrieval/` (`RETRIEVAL_METRIC`, loaded with
`load_retrieval_metric`): its file holds the one copy of the rank counting, with the rules every metric here follows
-- ties broken at random in expectation, non-finite scores as misses, similarities computed in chunks. Zero-shot
accuracy is built on the same counts.
"""

from pathlib import Path

import evaluate
import torch

from modeling_ndclip import pair_loss
from ndclip.image_text_retrieval.image_text_retrieval import exact_mean, one_correct_rank_counts, retrieval_metrics

# The folder of the `evaluate` metric, as `evaluate.load` takes it.
RETRIEVAL_METRIC = str(Path(__file__).with_name("image_text_retrieval"))


def load_retrieval_metric():
    """The image-text retrieval metric as an `evaluate.EvaluationModule`, loaded from `RETRIEVAL_METRIC` (offline).

    Kept in memory: each process of a distributed evaluation computes it on the gathered embeddings by itself,
    with no cache file shared between processes."""
    return evaluate.load(RETRIEVAL_METRIC, keep_in_memory=True)


def zero_shot_accuracy(
    image_embeds: torch.Tensor, labels: torch.Tensor, class_text_embeds: torch.Tensor, chunk_size: int = 1024
) -> float:
    """Fraction of images whose most cosine-similar class prompt is their label, ties broken at random in expectation.

    An image whose label ties with `t` other classes at the highest similarity counts `1 / (t + 1)`, so constant
    embeddings score exactly the chance level `1 / C`; an image whose similarities hold a NaN or an infinity counts 0
    (the retrieval rules of `image_text_retrieval`, with one correct candidate and K = 1).

    Args:
        image_embeds: `[N, D]` image embeddings (normalised here, so projections work too).
        labels: `[N]` class index of each image, a row of `class_text_embeds`.
        class_text_embeds: `[C, D]` one embedding per class (e.g. of "a photo of a {class}.").
        chunk_size: images scored at once.
    """
    image_embeds = torch.nn.functional.normalize(image_embeds.float(), dim=-1)
    class_text_embeds = torch.nn.functional.normalize(class_text_embeds.float().to(image_embeds.device), dim=-1)
    labels = torch.as_tensor(labels, device=image_embeds.device)
    return exact_mean(one_correct_rank_counts(image_embeds, class_text_embeds, labels, chunk_size).recall_at(1))


def chunked_contrastive_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: float | torch.Tensor,
    batch_size: int,
    logit_bias: float | torch.Tensor | None = None,
    kind: str = "softmax",
) -> float:
    """The model's contrastive loss (`modeling_ndclip.pair_loss`: CLIP's symmetric loss, or SigLIP's sigmoid loss
    with `kind="sigmoid"`) of consecutive batches of `batch_size` pairs.

    The contrastive loss depends on the batch (the negatives are the other pairs in it), so an evaluation that
    gathers all embeddings and re-batches them at a fixed size gives the same number on any number of processes.

    Args:
        image_embeds, text_embeds: `[N, D]` L2-normalised embeddings; pair i is image i with text i.
        logit_scale: the multiplier of the cosine similarities, `model.clamped_logit_scale()` (not its log).
        logit_bias: the sigmoid model's `logit_bias`, added to its logits (`kind="sigmoid"` only).
        kind: the model's `config.contrastive_loss`.
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
        logits_per_text = logit_scale * texts @ images.t() + (logit_bias if kind == "sigmoid" else 0.0)
        total += pair_loss(logits_per_text, kind).item() * len(images)
    return total / len(image_embeds)


__all__ = [
    "RETRIEVAL_METRIC",
    "load_retrieval_metric",
    "retrieval_metrics",
    "zero_shot_accuracy",
    "chunked_contrastive_loss",
]
