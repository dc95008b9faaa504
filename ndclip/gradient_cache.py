"""Exact contrastive accumulation: a contrastive batch of k x b pairs trained in the memory of b, with the gradients
of the one big batch (the gradient-cache method of Gao et al., "Scaling Deep Contrastive Learning Batch Size under
Memory Limited Setup", 2021).

Plain gradient accumulation computes each micro-batch's loss with that micro-batch's negatives only: 8 x 32 is not a
contrastive batch of 256. The contrastive loss couples every pair of the batch, but it only depends on the
embeddings, which are small; so a step here runs in three phases (`run_clip.py --contrastive_accumulation`):

1. `embed_without_gradients`: each micro-batch through the model without autograd (nothing is kept but its
   embeddings, and the random state it started from);
2. the caller computes the loss over all the embeddings (of every process: the global batch) from the cache's leaf
   tensors, so that its backward stops at the embeddings (`CachedOutputs`);
3. `backward_through_cache`: the loss's gradients with respect to the embeddings, then each micro-batch through the
   model again, with autograd, from the same random state (the same dropout masks), back-propagating its slice of
   those gradients. Parameter gradients add up over the micro-batches to those of the big batch; under DDP they are
   synchronised once, on the last micro-batch.

The second forward pass is the cost: about one more forward per step. It is exact for towers whose output for a
sample does not depend on the other samples of its batch (transformers: ViT, BERT-like text towers); a tower with
BatchNorm in training mode would see micro-batch statistics (and update its running statistics twice).
"""

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch


@dataclass
class RngState:
    """The random state a forward pass draws from (dropout, stochastic layers): torch's CPU generator and, for a model
    on an accelerator, that device's current generator."""

    cpu: torch.Tensor
    device_type: str
    device: torch.Tensor | None = None


def capture_rng_state(device: torch.device) -> RngState:
    device_type = torch.device(device).type
    device_state = None if device_type == "cpu" else torch.get_device_module(device_type).get_rng_state()
    return RngState(cpu=torch.get_rng_state(), device_type=device_type, device=device_state)


def restore_rng_state(state: RngState) -> None:
    torch.set_rng_state(state.cpu)
    if state.device is not None:
        torch.get_device_module(state.device_type).set_rng_state(state.device)


def split_batch(inputs: dict, chunks: int) -> list[dict]:
    """`chunks` micro-batches of a batch of model inputs: every tensor cut into `chunks` equal row blocks, in order.

    Images and texts are cut alike, so micro-batch i holds images i*b .. (i+1)*b - 1 and, texts being image-major
    (the N captions of each image in a row), exactly their captions. Texts keep the batch's padding (to its longest
    caption), so each micro-batch computes what the big batch does."""
    micro_batches = [{} for _ in range(chunks)]
    for name, value in inputs.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"cannot split the batch input {name!r}: expected a tensor, got {type(value).__name__}")
        if len(value) % chunks:
            raise ValueError(
                f"the batch input {name!r} has {len(value)} rows, which do not split into {chunks} equal micro-batches"
            )
        for micro_batch, part in zip(micro_batches, value.chunk(chunks)):
            micro_batch[name] = part
    return micro_batches


@dataclass
class CachedOutputs:
    """What the loss reads, as the model's output would give it, but as leaf tensors of the whole batch (this process's
    micro-batches in order): `image_embeds` `[k*b, dim]`, `text_embeds` `[k*b*N, dim]` (normalised, float32),
    `logit_scale` (the model's `exp(logit_scale)`) and `logit_bias` (sigmoid models; else None). A loss computed from
    them back-propagates into them only; `backward_through_cache` carries their gradients on into the model."""

    image_embeds: torch.Tensor
    text_embeds: torch.Tensor
    logit_scale: torch.Tensor
    logit_bias: torch.Tensor | None = None
    rng_states: list[RngState] = field(default_factory=list, repr=False)

    def leaves(self) -> list[torch.Tensor]:
        return [t for t in (self.image_embeds, self.text_embeds, self.logit_scale, self.logit_bias) if t is not None]


def embed_without_gradients(model, micro_batches: list[dict], device: torch.device) -> CachedOutputs:
    """Phase 1: every micro-batch through `model` without autograd, recording the random state each started from.

    `model` is what trains: with accelerate, the prepared model, whose forward applies mixed precision's autocast (in
    this pass as in the second)."""
    rng_states, image_embeds, text_embeds = [], [], []
    with torch.no_grad():
        for inputs in micro_batches:
            rng_states.append(capture_rng_state(device))
            outputs = model(**inputs)
            image_embeds.append(outputs.image_embeds.float())
            text_embeds.append(outputs.text_embeds.float())
        bias = getattr(outputs, "logit_bias", None)

    def leaf(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.detach().float().requires_grad_()

    return CachedOutputs(
        image_embeds=leaf(torch.cat(image_embeds)),
        text_embeds=leaf(torch.cat(text_embeds)),
        logit_scale=leaf(outputs.logit_scale),
        logit_bias=None if bias is None else leaf(bias),
        rng_states=rng_states,
    )


def backward_through_cache(
    model,
    micro_batches: list[dict],
    cache: CachedOutputs,
    loss: torch.Tensor,
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
    no_sync: Callable = lambda model: nullcontext(),
) -> None:
    """Phases 2 and 3: the gradients of `loss` (computed from `cache`'s leaves) with respect to the embeddings, then
    each micro-batch through `model` again with autograd, from the random state its first pass started from, and
    `backward` (e.g. `accelerator.backward`, which applies fp16 loss scaling) of the sum of its embeddings times their
    gradients: the chain rule, one micro-batch's activations at a time.

    `logit_scale` and `logit_bias` get their gradient through the last micro-batch's output. Every micro-batch but the
    last runs under `no_sync(model)` (`accelerator.no_sync`): DDP all-reduces the summed gradients once. The random
    state ends where the first pass left it, as after one pass: the rest of the run draws what it would have drawn."""
    leaves = cache.leaves()
    grads = dict(zip(("image", "text", "scale", "bias"), torch.autograd.grad(loss, leaves)))
    image_grads = grads["image"].chunk(len(micro_batches))
    text_grads = grads["text"].chunk(len(micro_batches))
    end_state = capture_rng_state(torch.device(cache.rng_states[0].device_type))
    for index, inputs in enumerate(micro_batches):
        last = index == len(micro_batches) - 1
        restore_rng_state(cache.rng_states[index])
        with nullcontext() if last else no_sync(model):
            outputs = model(**inputs)
            surrogate = (outputs.image_embeds.float() * image_grads[index]).sum()
            surrogate = surrogate + (outputs.text_embeds.float() * text_grads[index]).sum()
            if last:
                surrogate = surrogate + outputs.logit_scale.float() * grads["scale"]
                if cache.logit_bias is not None:
                    bias = getattr(outputs, "logit_bias", None)
                    surrogate = surrogate + bias.float() * grads["bias"]
            backward(surrogate)
        del outputs, surrogate  # this micro-batch's outputs are not kept alive into the next one's pass
    restore_rng_state(end_state)
