"""Shared fixtures: a tiny NdCLIP (ViT image 30 / patch 2 / hidden 32, DistilBERT 2 layers / dim 32), a tokenizer
trained offline on a few captions, and small generated images. Nothing here touches the network."""

import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported anywhere
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from modeling_ndclip import NdClipModel  # noqa: E402
from tiny_towers import tiny_config, tiny_processor  # noqa: E402

CAPTIONS = [
    "a red square on green grass",
    "a blue circle in the sky",
    "a dog runs across the field",
    "a cat sleeps on a sofa",
    "two people ride bikes near the sea",
    "a child plays with a yellow ball",
]


def random_images(n: int, size=(40, 48), mode: str = "RGB", seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "CMYK": 4, "L": 1}[mode]
    images = []
    for _ in range(n):
        array = rng.integers(0, 256, size=(*size, channels), dtype=np.uint8)
        images.append(Image.fromarray(array[..., 0] if channels == 1 else array, mode=mode))
    return images


@pytest.fixture(scope="session")
def processor():
    return tiny_processor(CAPTIONS * 3, vocab_size=200)


@pytest.fixture(scope="session")
def make_model(processor):
    """`make_model(**config_overrides)`: a tiny NdCLIP in eval mode, seeded, so two calls give the same weights."""

    def make(seed: int = 0, **overrides) -> NdClipModel:
        torch.manual_seed(seed)
        return NdClipModel(tiny_config(len(processor.tokenizer), **overrides)).eval()

    return make


@pytest.fixture(scope="session")
def batch(processor):
    return processor(text=CAPTIONS[:4], images=random_images(4), return_tensors="pt")


@pytest.fixture(scope="session")
def saved_model_dir(tmp_path_factory, make_model, processor):
    """A tiny NdCLIP saved as a Hub-ready folder (model + processor + code files)."""
    folder = tmp_path_factory.mktemp("ndclip")
    make_model().save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
