"""The one embedding loop: run an NdCLIP over batches and collect what it computes.

Evaluation (images, captions, zero-shot class prompts and data sets), the frozen-tower feature cache and the
inference tools all embed through `embed`; they differ only in their batches and in the outputs they keep.
"""

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence

import torch
from tqdm.auto import tqdm

# The model inputs of each side, as the collators and the processor name them: passing only one side's runs only
# that tower.
IMAGE_INPUTS = ("pixel_values", "image_tower_features")
TEXT_INPUTS = ("input_ids", "attention_mask", "text_tower_features")
# What the collators put in a batch beside the model's inputs.
BATCH_FIELDS = ("image_ids", "labels")


def model_inputs(batch: Mapping[str, torch.Tensor], inputs: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """The entries of `batch` that the model takes: those named in `inputs`, or (None) all but `BATCH_FIELDS`."""
    if inputs is None:
        return {key: value for key, value in batch.items() if key not in BATCH_FIELDS}
    return {key: value for key, value in batch.items() if key in inputs}


@torch.no_grad()
def embed(
    model: torch.nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    outputs: Sequence[str],
    fields: Sequence[str] = (),
    inputs: Sequence[str] | None = None,
    accelerator=None,
    progress: str | None = None,
) -> dict[str, torch.Tensor]:
    """Run `model` over `batches` in eval mode, without gradients, and concatenate what each batch gives, on the CPU.

    Args:
        model: an `NdClipModel`, possibly wrapped by `accelerator.prepare`.
        batches: dicts of tensors on the model's device (an accelerate-prepared loader puts them there), holding the
            model's inputs and perhaps `BATCH_FIELDS`.
        outputs: fields of the model's output to keep, dotted for nested ones: `image_embeds`, `text_embeds`,
            `vision_model_output.pooler_output` (the vision tower's pooled output)... Floating-point ones are
            returned as float32.
        fields: entries of the batch to keep beside them, e.g. `image_ids`, `labels`.
        inputs: the batch entries passed to the model (default: all but `BATCH_FIELDS`); `IMAGE_INPUTS` runs the
            vision tower alone on batches that also hold captions.
        accelerator: when given, each process embeds its shard of the data and `gather_for_metrics` joins the shards
            (without the samples repeated to fill the last batch), so every process returns the whole set.
        progress: the description of a progress bar on the local main process; None shows none.

    Returns:
        `{name: tensor}` for each name of `outputs` and `fields` that the batches gave (a field absent from the
        batches, or an output the model did not compute, is left out; so is everything when there is no batch).

    The modules' training/eval modes are restored afterwards, so an evaluation in the middle of training leaves the
    model as it found it (frozen towers in eval mode, the rest training).
    """
    show_bar = progress is not None and (accelerator is None or accelerator.is_local_main_process)
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in (*outputs, *fields)}
    with eval_mode(model):
        for batch in tqdm(batches, desc=progress, disable=not show_bar):
            output = model(**model_inputs(batch, inputs), return_dict=True)
            values = {name: output_field(output, name) for name in outputs}
            values = {name: as_float32(value) for name, value in values.items() if value is not None}
            values.update({name: batch[name] for name in fields if name in batch})
            if accelerator is not None:
                values = accelerator.gather_for_metrics(values)
            for name, value in values.items():
                parts[name].append(value.cpu())
    return {name: torch.cat(values) for name, values in parts.items() if values}


def as_float32(tensor: torch.Tensor) -> torch.Tensor:
    """Floating-point tensors as float32 (what the metrics compute in, whatever the model's precision); others as is."""
    return tensor.float() if tensor.is_floating_point() else tensor


def output_field(output, name: str) -> torch.Tensor | None:
    """`output.a.b` for `name` "a.b"; None when a step of the path is None (a tower that did not run)."""
    for attribute in name.split("."):
        if output is None:
            return None
        output = getattr(output, attribute)
    return output


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """`model.eval()` inside the block; each module's own mode back afterwards."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, training in modes.items():
            module.train(training)
