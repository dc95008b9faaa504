"""The training loss over the global batch: every process's images and captions, gathered with their gradients, so
that N processes x batch b train exactly like 1 process x batch N*b (as open_clip's `ClipLoss` / `SigLipLoss`).

The per-batch formulas live in `modeling_ndclip` (`pair_loss`: CLIP's softmax loss, multi-positive with several
captions per image, and SigLIP's sigmoid loss), because a saved model's `forward(return_loss=True)` needs them without
this package; here they are applied to the global batch, in float32 whatever the mixed precision.

The sigmoid loss is computed over the all-gathered embeddings rather than by open_clip's ring exchange of text
chunks: the ring saves the memory of the `[global texts, global images]` logits, which at the batch sizes one
process holds here is small, and the all-gather gives the same loss and gradients with one code path for both losses.
"""

import torch
import torch.distributed.nn.functional  # all_gather with gradients
from accelerate import Accelerator

from modeling_ndclip import pair_loss


def gather_with_grad(tensor: torch.Tensor, accelerator: Accelerator | None) -> torch.Tensor:
    """All processes' rows, in process order, with gradients flowing back to each process's own rows.

    `torch.distributed.nn.functional.all_gather` sums the gradients of every copy in its backward; each process
    computes the same global loss, so its rows receive `world_size` times their gradient, which DDP's gradient
    averaging divides back out: N processes x batch b train exactly like 1 process x batch N*b.
    """
    if accelerator is None or accelerator.num_processes == 1:
        return tensor
    return torch.cat(torch.distributed.nn.functional.all_gather(tensor.contiguous()), dim=0)


def global_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor | None = None,
    accelerator: Accelerator | None = None,
    kind: str = "softmax",
    captions_per_image: int = 1,
) -> torch.Tensor:
    """The contrastive loss `kind` ("softmax" or "sigmoid", `config.contrastive_loss`) over the global batch.

    Args:
        image_embeds: this process's L2-normalised image embeddings, `[b, d]`.
        text_embeds: this process's L2-normalised caption embeddings, `[b * captions_per_image, d]`, image-major (the
            captions of image 0 first); caption j belongs to image j // captions_per_image, also once gathered, since
            every process's batch is image-major.
        logit_scale: the multiplier of the cosine similarities (the model output's `logit_scale`, not its log).
        logit_bias: the sigmoid loss's learned bias (the output's `logit_bias`); needed for "sigmoid", unused for
            "softmax".
        accelerator: gathers the embeddings of every process (None, or one process: this batch is the global one).
    """
    if len(text_embeds) != len(image_embeds) * captions_per_image:
        raise ValueError(
            f"{len(text_embeds)} caption embeddings for {len(image_embeds)} images: expected {captions_per_image} "
            "captions per image (--captions_per_image), image-major"
        )
    if kind == "sigmoid" and logit_bias is None:
        raise ValueError("the sigmoid loss needs the model's `logit_bias` (a model with contrastive_loss='sigmoid')")
    images = gather_with_grad(image_embeds.float(), accelerator)
    texts = gather_with_grad(text_embeds.float(), accelerator)
    logits_per_text = logit_scale.float() * texts @ images.t()
    if kind == "sigmoid":
        logits_per_text = logits_per_text + logit_bias.float()
    return pair_loss(logits_per_text, kind)


__all__ = ["gather_with_grad", "global_loss"]
