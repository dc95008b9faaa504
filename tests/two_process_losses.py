"""Launched by tests/test_losses.py with `accelerate launch --num_processes 2`: one optimizer step of each loss
(softmax, sigmoid) with 1 and 3 captions per image, 2 processes x 4 images against 1 process x 8 images.

Every process holds the same tiny NdCLIP (no dropout) and the same global batch of 8 images with their captions,
image-major. The distributed run: each process trains the DDP-wrapped model on its half of the batch with
`ndclip.losses.global_loss`, which gathers the other half with gradients. The reference: each process also trains a
plain copy of the model on the whole batch, as one process would. The main process writes, per variant, both losses,
the largest difference between the two models' gradients (relative to the largest gradient) and weights after an
AdamW step, and the loss of its own half alone (what the loss would be without the gather), to the JSON file named by
the first argument.
"""

import copy
import json
import sys

import torch
from accelerate import Accelerator

from modeling_ndclip import NdClipModel
from ndclip.losses import global_loss
from ndclip.tiny_towers import tiny_config

IMAGES, VOCABULARY, LENGTH = 8, 50, 6


def make_batch(captions_per_image: int) -> dict:
    generator = torch.Generator().manual_seed(captions_per_image)
    input_ids = torch.randint(5, VOCABULARY, (IMAGES * captions_per_image, LENGTH), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1::2, -2:] = 0  # captions of different lengths
    pixel_values = torch.randn(IMAGES, 3, 30, 30, generator=generator)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}


def shard(batch: dict, rank: int, processes: int, captions_per_image: int) -> dict:
    """Process `rank`'s images and their captions: consecutive slices, so the gathered batch is image-major."""
    images = IMAGES // processes
    texts = images * captions_per_image
    return {
        "input_ids": batch["input_ids"][rank * texts : (rank + 1) * texts],
        "attention_mask": batch["attention_mask"][rank * texts : (rank + 1) * texts],
        "pixel_values": batch["pixel_values"][rank * images : (rank + 1) * images],
    }


def step(model, optimizer, batch: dict, accelerator, kind: str, captions_per_image: int) -> torch.Tensor:
    outputs = model(**batch)
    loss = global_loss(
        outputs.image_embeds, outputs.text_embeds, outputs.logit_scale, outputs.logit_bias, accelerator,
        kind=kind, captions_per_image=captions_per_image,
    )  # fmt: skip
    (accelerator.backward(loss) if accelerator is not None else loss.backward())
    return loss.detach()


def max_difference(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def relative_difference(a, b) -> float:
    """The largest difference between the tensors of `a` and `b`, relative to the largest value of `b`."""
    return max_difference(a, b) / max(y.abs().max().item() for y in b)


def compare(accelerator: Accelerator, kind: str, captions_per_image: int) -> dict:
    torch.manual_seed(0)
    config = tiny_config(VOCABULARY, contrastive_loss=kind)
    config.text_config.dropout = config.text_config.attention_dropout = 0.0
    config.vision_config.hidden_dropout_prob = config.vision_config.attention_probs_dropout_prob = 0.0
    reference = NdClipModel(config).train()
    model, initial = copy.deepcopy(reference), copy.deepcopy(reference)
    reference_optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-3)
    model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-3))

    batch = make_batch(captions_per_image)
    own = shard(batch, accelerator.process_index, accelerator.num_processes, captions_per_image)
    distributed_loss = step(model, optimizer, own, accelerator, kind, captions_per_image)
    reference_loss = step(reference, reference_optimizer, batch, None, kind, captions_per_image)
    with torch.no_grad():
        outputs = reference(**own)
        local_loss = global_loss(
            outputs.image_embeds, outputs.text_embeds, outputs.logit_scale, outputs.logit_bias, None,
            kind=kind, captions_per_image=captions_per_image,
        )  # fmt: skip

    unwrapped = accelerator.unwrap_model(model)
    gradients = relative_difference([p.grad for p in unwrapped.parameters()], [p.grad for p in reference.parameters()])
    optimizer.step()
    reference_optimizer.step()
    weights = max_difference(list(unwrapped.parameters()), list(reference.parameters()))
    moved = max_difference(list(reference.parameters()), list(initial.parameters()))
    return {
        "distributed_loss": distributed_loss.item(), "reference_loss": reference_loss.item(),
        "own_half_loss": local_loss.item(), "gradient_difference": gradients, "weight_difference": weights,
        "weights_moved": moved, "processes": accelerator.num_processes,
    }  # fmt: skip


def main(output: str) -> None:
    accelerator = Accelerator(cpu=True)
    variants = [(kind, captions) for kind in ("softmax", "sigmoid") for captions in (1, 3)]
    results = {f"{kind}-{captions}": compare(accelerator, kind, captions) for kind, captions in variants}
    if accelerator.is_main_process:
        with open(output, "w") as f:
            json.dump(results, f, indent=2)
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1])
