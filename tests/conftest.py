"""Shared fixtures: a tiny NdCLIP (ViT image 30 / patch 2 / hidden 32, DistilBERT 2 layers / dim 32), a tokenizer
trained offline on a few captions, and small generated images. Nothing here touches the network."""

import io
import os
import struct
import sys
import zlib
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported anywhere
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One torch thread here and in the processes that tests start (`accelerate launch` runs get the same): the tensors are
# tiny, and on a shared small machine OpenMP threads that busy-wait for a core make tiny ops several times slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from modeling_ndclip import NdClipModel  # noqa: E402
from ndclip.tiny_towers import tiny_config, tiny_processor  # noqa: E402

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


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps a process's settings (mixed precision, devices) in singletons that outlive an `Accelerator`,
    and a later `Accelerator()` silently keeps them: each test ends by resetting them, as accelerate's own
    `AccelerateTestCase` does, so that in-process `run_clip.main` runs do not inherit each other's settings."""
    yield
    if "accelerate.state" in sys.modules:  # nothing to reset in tests that never imported accelerate
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


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


@pytest.fixture
def ndclip_error(capsys):
    """`ndclip_error(*argv)`: run the `ndclip` command in-process with `argv`, check that it stops with exit status 2
    (a bad option or a `BadInputError`), and return its error line, `ndclip <command>: error: ...`."""
    from ndclip.cli import main

    def run(*argv) -> str:
        with pytest.raises(SystemExit) as exit_info:
            main([str(arg) for arg in argv])
        assert exit_info.value.code == 2
        return capsys.readouterr().err.splitlines()[-1]

    return run


def write_unreadable_images(folder: Path) -> list[str]:
    """Write three files that PIL identifies as images but cannot decode, and return their names: a JPEG and a PNG
    cut after their headers (truncated downloads), and a real decompression bomb: a 1-bit PNG of 20,000 x 10,000
    pixels (over twice PIL's `MAX_IMAGE_PIXELS`, so `Image.open` raises `DecompressionBombError`) whose blank rows
    compress to a few kB."""
    for name, image_format in (("truncated.jpg", "JPEG"), ("truncated.png", "PNG")):
        encoded = io.BytesIO()
        random_images(1, seed=11)[0].save(encoded, image_format)
        (folder / name).write_bytes(encoded.getvalue()[: len(encoded.getvalue()) * 2 // 3])

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    width, height = 20_000, 10_000
    rows = zlib.compress(bytes(height * (1 + width // 8)), 9)  # each row: filter byte 0, then width / 8 zero bytes
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, greyscale
    (folder / "bomb.png").write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")
    )
    return ["bomb.png", "truncated.jpg", "truncated.png"]
