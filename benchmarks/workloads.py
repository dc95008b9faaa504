"""What the benchmarks train: the two model sizes, random batches, the plain training step, and `run_clip.py`'s
optimizer step without accelerate and without the data.

Sizes: `real` is ViT-B/16 at 224 + DistilBERT-base (`NdClipConfig()` defaults, random weights) fed by
`ViTImageProcessor()` (224); `tiny` is `ndclip.tiny_towers.tiny_config` (ViT image 30) fed by `ViTImageProcessor`
at 30. The real size keeps DistilBERT's own vocabulary whatever the tokenizer (a small tokenizer uses its first ids).
"""

from contextlib import nullcontext

import torch
from common import autocast, heads_without_copies
from transformers import ViTImageProcessor

from configuration_ndclip import NdClipConfig
from modeling_ndclip import NdClipModel
from ndclip.tiny_towers import tiny_config
from processing_ndclip import NdClipProcessor
from run_clip import optimizer_param_groups

SIZES = ("tiny", "real")
IMAGE_SIZE = {"tiny": 30, "real": 224}
DEFAULT_BATCH = {"tiny": 32, "real": 8}  # 32 is run_clip.py's default; a real-size step at 32 takes minutes on a CPU
TINY_VOCAB_SIZE = 1000  # of the tiny text tower fed random tokens
SEQ_LEN = 32  # tokens per caption of a random batch
MAX_SEQ_LENGTH = 64  # run_clip.py's default --max_seq_length, for collated batches
LEARNING_RATE = 5e-5  # run_clip.py's defaults
WEIGHT_DECAY = 0.1
MAX_GRAD_NORM = 1.0


def build_config(size: str, vocab_size: int = TINY_VOCAB_SIZE, projection_type: str = "ndlinear") -> NdClipConfig:
    """The config of `size` (`vocab_size` applies to the tiny text tower only)."""
    if size == "tiny":
        return tiny_config(vocab_size=vocab_size, projection_type=projection_type)
    return NdClipConfig(projection_type=projection_type)


def build_model(size: str, projection_type: str, seed: int, device: str) -> NdClipModel:
    torch.manual_seed(seed)
    return NdClipModel(build_config(size, projection_type=projection_type)).to(device).train()


def image_processor_for(size: str) -> ViTImageProcessor:
    side = IMAGE_SIZE[size]
    return ViTImageProcessor() if size == "real" else ViTImageProcessor(size={"height": side, "width": side})


def save_model_folder(folder, size: str, tokenizer, seed: int):
    """An NdCLIP of `size` with random weights and its processor, saved for `run_clip.py --model_name_or_path`."""
    torch.manual_seed(seed)
    NdClipModel(build_config(size, len(tokenizer))).save_pretrained(folder)
    NdClipProcessor(image_processor=image_processor_for(size), tokenizer=tokenizer).save_pretrained(folder)
    return folder


# ----- random batches and the plain training step ---------------------------------------------------------------


def make_inputs(config: NdClipConfig, batch_size: int, seed: int, device: str, seq_len: int = SEQ_LEN) -> dict:
    """A random batch: pixel values, and `seq_len` random tokens per caption with an all-ones attention mask."""
    generator = torch.Generator().manual_seed(seed)
    image_size = config.vision_config.image_size
    inputs = {
        "pixel_values": torch.randn(batch_size, 3, image_size, image_size, generator=generator),
        "input_ids": torch.randint(0, config.text_config.vocab_size, (batch_size, seq_len), generator=generator),
        "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long),
    }
    return {name: tensor.to(device) for name, tensor in inputs.items()}


def make_train_step(model, optimizer, inputs: dict, device: str, dtype: str, without_copies: bool = False):
    """Forward with the contrastive loss (under bf16 autocast for `dtype == "bf16"`), backward, optimizer step."""

    def train_step():
        with heads_without_copies(model) if without_copies else nullcontext(), autocast(device, dtype):
            loss = model(**inputs, return_loss=True).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return train_step


# ----- run_clip.py's step, without accelerate and without the data ----------------------------------------------


def bare_inputs(batch: dict, seed: int) -> dict:
    """Model inputs of a collated batch's shape: random pixel values, the batch's own tokens."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "pixel_values": torch.randn(batch["pixel_values"].shape, generator=generator),
        "input_ids": batch["input_ids"].clone(),
        "attention_mask": batch["attention_mask"].clone(),
    }


def make_bare_step(model: NdClipModel, inputs: dict):
    """One `run_clip.py` optimizer step without accelerate and without the data: forward, the contrastive loss,
    backward, gradient clipping, AdamW with run_clip's parameter groups and learning rate, zero_grad."""
    optimizer = torch.optim.AdamW(optimizer_param_groups(model, WEIGHT_DECAY), lr=LEARNING_RATE)
    model.train()

    def step():
        loss = model(**inputs, return_loss=True).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad()

    return step
