"""Frozen towers, computed once: LiT-style training of the heads from cached tower features.

A frozen tower runs in eval mode (no dropout) on un-augmented inputs, so its pooled output for an image or a caption
never changes during training. `run_clip.py` then computes it once for the whole training split and trains the
heads (and whatever is not frozen) from the cache: the result equals the uncached frozen run, and every epoch after
the one that fills the cache skips the frozen tower entirely.
"""

import torch

from ndclip.embedding import IMAGE_INPUTS, TEXT_INPUTS, embed
from ndclip.transforms import CaptionCollator


def compute_image_features(model, loader, accelerator, num_images: int) -> torch.Tensor:
    """Pooled, unprojected vision-tower output of every image, as a `[num_images, width]` CPU tensor indexed by
    `image_id`. The loader (prepared, unshuffled) yields `pixel_values` and `image_ids`; each process embeds its
    shard and the shards are gathered, so every process ends with the whole cache."""
    embedded = embed(
        model, loader, ["vision_model_output.pooler_output"], fields=["image_ids"], inputs=IMAGE_INPUTS,
        accelerator=accelerator, progress="caching image features",
    )  # fmt: skip
    pooled = embedded["vision_model_output.pooler_output"]
    features = torch.zeros(num_images, pooled.shape[-1])
    features[embedded["image_ids"]] = pooled
    return features


def compute_caption_features(model, loader, accelerator) -> torch.Tensor:
    """Pooled, unprojected text-tower output of every caption, in the order of `flatten_captions(split)` (image by
    image, each image's captions in order), as a `[num_captions, width]` CPU tensor."""
    embedded = embed(
        model, loader, ["text_model_output.pooler_output"], inputs=TEXT_INPUTS, accelerator=accelerator,
        progress="caching caption features",
    )  # fmt: skip
    return embedded["text_model_output.pooler_output"]


def caption_offsets(captions_per_image: list[int]) -> list[int]:
    """Row of each image's first caption in the flattened caption cache."""
    offsets, row = [], 0
    for count in captions_per_image:
        offsets.append(row)
        row += count
    return offsets


class CachedTowerCollator:
    """A `CaptionCollator` whose frozen towers' inputs are replaced by their cached features.

    It chooses the same captions (and, for an unfrozen vision tower, applies the same crop) as the wrapped collator,
    so a cached run sees exactly the data of an uncached one. With the image cache the examples need no `image`
    column at all, and no picture is decoded.
    """

    def __init__(self, collator: CaptionCollator, image_features=None, caption_features=None, offsets=None):
        self.collator = collator
        self.image_features = image_features
        self.caption_features = caption_features
        self.offsets = offsets

    def set_epoch(self, epoch: int) -> None:
        self.collator.set_epoch(epoch)

    def __call__(self, examples: list[dict]) -> dict:
        collator, ids = self.collator, [example["image_id"] for example in examples]
        if self.caption_features is None:
            captions = [text for e in examples for text in collator.choose_captions(e["captions"], e["image_id"])]
            batch = collator.tokenize(captions)
        else:
            chosen = [(e["image_id"], collator.caption_indices(e["captions"], e["image_id"])) for e in examples]
            rows = [self.offsets[image_id] + n for image_id, indices in chosen for n in indices]
            batch = {"text_tower_features": self.caption_features[rows]}
        if self.image_features is None:
            batch["pixel_values"] = collator.pixel_batch(examples)
        else:
            batch["image_tower_features"] = self.image_features[ids]
        batch["image_ids"] = torch.tensor(ids)
        if "label" in examples[0]:
            batch["labels"] = torch.tensor([example["label"] for example in examples])
        return batch


class CachedCaptionCollator:
    """collate_fn over `flatten_captions(split)` with a `row` column: the cached text-tower features of the captions
    instead of their tokens (what `TextCollator` gives a running text tower)."""

    def __init__(self, caption_features: torch.Tensor):
        self.caption_features = caption_features

    def __call__(self, examples: list[dict]) -> dict:
        rows = [example["row"] for example in examples]
        return {
            "text_tower_features": self.caption_features[rows],
            "image_ids": torch.tensor([example["image_id"] for example in examples]),
        }
