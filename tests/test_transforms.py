"""ndclip.transforms: the image transforms (equal to the image processor at evaluation, caption-safe random crops in
training that keep the boxes of the previous PIL path, JPEGs decoded by torchvision to PIL's pixels, every colour mode
and bit depth, normalisation once per batch) and the collators (reproducible captions and crops, padding,
truncation), on small generated images (`ndclip.layouts`)."""

import io

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, Features, Image, List, Value
from PIL import Image as PILImage
from torchvision.transforms import v2
from transformers import CLIPImageProcessor, ViTImageProcessor

from ndclip.data import without_image_decoding
from ndclip.inference import open_image
from ndclip.layouts import captions_of, encoded, picture, write_messy_images
from ndclip.tiny_towers import train_wordpiece_tokenizer
from ndclip.transforms import (
    CaptionCollator,
    DecodeImage,
    TextCollator,
    draft_scale,
    encoded_image_source,
    eval_image_transform,
    one_torch_thread,
    random_crop_box,
    to_rgb_array,
    train_image_transform,
    with_image_transform,
)


@pytest.fixture(scope="module")
def tokenizer():
    texts = [caption for number in range(16) for caption in captions_of(number)]
    return train_wordpiece_tokenizer(texts, vocab_size=200)


@pytest.fixture(scope="module")
def image_processor():
    return ViTImageProcessor(size={"height": 30, "width": 30})


# ----------------------------------------------------------------------------------------------------------------
# Transforms
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_eval_transform_matches_the_image_processor(mode):
    image_processor = ViTImageProcessor(size={"height": 30, "width": 30}, do_convert_rgb=True)
    image = picture(0, size=(40, 48), mode=mode)
    expected = image_processor(images=image, return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(eval_image_transform(image_processor)(image), expected, atol=1e-5, rtol=0)


def test_eval_transform_with_shortest_edge_and_center_crop_matches_the_image_processor():
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 28, "width": 28})
    image = picture(0, size=(40, 60))
    expected = image_processor(images=image, return_tensors="pt")["pixel_values"][0]
    actual = eval_image_transform(image_processor)(image)
    assert actual.shape == (3, 28, 28)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def test_train_transform_is_random_but_keeps_left_right_and_colours(image_processor):
    """Red left half, blue right half: no crop, flip or colour change may move red to the right or alter it."""
    array = np.zeros((36, 48, 3), dtype=np.uint8)
    array[:, :24, 0] = 255
    array[:, 24:, 2] = 255
    image = PILImage.fromarray(array)
    transform = train_image_transform(image_processor)
    torch.manual_seed(0)
    outputs = [transform(image) for _ in range(30)]

    assert not all(torch.equal(outputs[0], output) for output in outputs[1:]), "training crops are random"
    for pixels in outputs:
        assert pixels.shape == (3, 30, 30)
        left, right = pixels[:, :, :4], pixels[:, :, -4:]
        red, blue = torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1), torch.tensor([-1.0, -1.0, 1.0]).view(3, 1, 1)
        torch.testing.assert_close(left, red.expand_as(left))
        torch.testing.assert_close(right, blue.expand_as(right))


def deep_grey(grey: PILImage.Image, mode: str, values: str) -> PILImage.Image:
    """The 8-bit greyscale picture `grey` as PIL gives it from a deeper file: `values` "16-bit" (v * 257, as an 8-bit
    value is widened), "8-bit" (v), "unit" (v / 255) or "offset" (1000 v - 100000, a range to stretch)."""
    v = np.asarray(grey).astype(np.int64)
    array = {"16-bit": v * 257, "8-bit": v, "unit": v / 255, "offset": 1000 * v - 100000}[values]
    if mode == "I;16B":
        return PILImage.frombytes(mode, grey.size, array.astype(">u2").tobytes())
    return PILImage.fromarray(array.astype({"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]))


def full_range_grey() -> PILImage.Image:
    grey = np.asarray(picture(0, size=(40, 48), mode="L")).copy()
    grey[0, :2] = [0, 255]  # the full 8-bit range, so that a stretched range maps back onto it exactly
    return PILImage.fromarray(grey)


@pytest.mark.parametrize(
    "mode, values",
    [("I;16", "16-bit"), ("I;16B", "16-bit"), ("I", "16-bit"), ("I", "8-bit"), ("I", "offset"), ("F", "unit"),
     ("F", "offset")],
)
def test_high_bit_depth_greyscale_gives_the_pixels_of_its_8_bit_rendering(image_processor, mode, values):
    grey = full_range_grey()
    deep = deep_grey(grey, mode, values)
    assert deep.mode == mode

    evaluate = eval_image_transform(image_processor)
    torch.testing.assert_close(evaluate(deep), evaluate(grey), rtol=0, atol=0)
    assert np.array_equal(np.asarray(open_image(deep)), np.asarray(grey.convert("RGB")))


def test_16_bit_png_gives_the_same_pixels_in_training_and_prediction(tmp_path, image_processor):
    """A real 16-bit greyscale PNG, read from its file as training (encoded rows, decoded by the transforms; decoded
    rows) and prediction (`open_image`) read it: the pixels of the same picture saved with 8 bits, not white."""
    grey = full_range_grey()
    deep_grey(grey, "I;16", "16-bit").save(tmp_path / "deep.png")
    grey.save(tmp_path / "grey.png")
    assert PILImage.open(tmp_path / "deep.png").mode == "I;16"
    rows = Dataset.from_dict({"image": [str(tmp_path / "deep.png"), str(tmp_path / "grey.png")]})
    deep_row, grey_row = rows.cast_column("image", Image())
    deep_encoded, grey_encoded = without_image_decoding(rows)

    assert np.array_equal(np.asarray(open_image(tmp_path / "deep.png")), np.asarray(open_image(tmp_path / "grey.png")))
    evaluate, train = eval_image_transform(image_processor), train_image_transform(image_processor)
    torch.testing.assert_close(evaluate(deep_row["image"]), evaluate(grey_row["image"]), rtol=0, atol=0)
    torch.testing.assert_close(evaluate(deep_encoded["image"]), evaluate(grey_encoded["image"]), rtol=0, atol=0)
    torch.manual_seed(0)
    deep_crop = train(deep_encoded["image"])
    torch.manual_seed(0)
    torch.testing.assert_close(deep_crop, train(grey_encoded["image"]), rtol=0, atol=0)


def red_left_blue_right(height: int, width: int) -> PILImage.Image:
    array = np.zeros((height, width, 3), dtype=np.uint8)
    array[:, : width // 2, 0] = 255
    array[:, width // 2 :, 2] = 255
    return PILImage.fromarray(array)


def previous_train_transform(image_processor, draft: bool) -> v2.Compose:
    """The training transform as it was before the per-batch normalisation: PIL decoding (a JPEG at reduced size,
    `draft`, whenever that stays at least twice the output), RGB conversion, the random crop on the decoded frame
    and per-image float conversion and normalisation. The crops of today's transform must keep its boxes."""

    def decode(image):
        if isinstance(image, PILImage.Image):
            return image
        picture = PILImage.open(encoded_image_source(image))
        if draft:
            picture.draft(None, (60, 60))
        picture.load()
        return picture

    return v2.Compose([
        decode, to_rgb_array, v2.ToImage(),
        v2.RandomResizedCrop((30, 30), scale=(0.8, 1.0), ratio=(3 / 4, 4 / 3), interpolation=image_processor.resample),
        v2.ToDtype(torch.float32, scale=True), v2.Normalize(image_processor.image_mean, image_processor.image_std),
    ])  # fmt: skip


def seeded(transform, image, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return transform(image)


def smooth_photo(height: int, width: int) -> PILImage.Image:
    """Colour waves (a few per side): resizing from a decode at 1/4 size and from the full size give nearly equal
    pixels, and crops of other boxes differ."""
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    channels = [np.sin(20 * x + 2 * y), np.cos(14 * y - 3 * x), np.sin(10 * (x + y))]
    return PILImage.fromarray(np.stack([(c + 1) * 127.5 for c in channels], axis=-1).astype(np.uint8))


@pytest.mark.parametrize("resample", [PILImage.Resampling.BILINEAR, PILImage.Resampling.BICUBIC])
def test_training_crops_of_other_images_are_those_of_the_previous_transform(tmp_path, resample):
    """PNG rows and decoded images: the same seed gives exactly the pixels of the previous (per-image, PIL-decoded)
    transform, so the seeded crops of a run are those it always had (ViT's bilinear and CLIP's bicubic resize)."""
    image_processor = ViTImageProcessor(size={"height": 30, "width": 30}, resample=resample)
    image = smooth_photo(36, 48)
    image.save(tmp_path / "photo.png")
    png = {"bytes": None, "path": str(tmp_path / "photo.png")}
    train, previous = train_image_transform(image_processor), previous_train_transform(image_processor, draft=True)
    for seed in range(8):
        for row in (image, png):
            torch.testing.assert_close(seeded(train, row, seed), seeded(previous, row, seed), rtol=0, atol=1e-6)
    assert not torch.allclose(seeded(train, image, 0), seeded(train, image, 1)), "the seed moves the crop"


def test_training_jpeg_crops_keep_the_boxes_of_the_reduced_size_decode(image_processor):
    """A 400x300 JPEG for a 30 px model was decoded at 1/4 scale (100x75, the smallest DCT scale still at least twice
    the output) and cropped there. It is now decoded at full size, and the crop box of a seed is that box scaled by 4:
    the same region of the photo, so the pixels are nearly those of the previous transform (resized from more
    pixels) and far from another seed's."""
    photo = {"bytes": encoded(smooth_photo(300, 400), "JPEG"), "path": "photo.jpg"}
    train, previous = train_image_transform(image_processor), previous_train_transform(image_processor, draft=True)
    drafted = previous.transforms[0](photo)
    assert drafted.size == (100, 75)
    crop = v2.RandomResizedCrop((30, 30), scale=(0.8, 1.0), ratio=(3 / 4, 4 / 3))
    for seed in range(10):
        torch.manual_seed(seed)
        box = crop.make_params([v2.functional.to_image(drafted)])
        torch.manual_seed(seed)
        top, left, height, width = train.pixels.crop_box((300, 400), is_jpeg=True)
        assert (top, left) == (4 * box["top"], 4 * box["left"])
        assert (height, width) == (min(4 * box["height"], 300 - top), min(4 * box["width"], 400 - left))

        now = seeded(train, photo, seed)
        assert (now - seeded(previous, photo, seed)).abs().mean() < 0.01
        assert (now - seeded(previous, photo, seed + 100)).abs().mean() > 0.03


def test_random_crop_box_draws_torchvisions_boxes():
    """`random_crop_box` is `RandomResizedCrop.make_params` written out: the same boxes from the same seeds, on
    landscape, portrait and square frames, and on frames too narrow for any draw (the centred fallback)."""
    crop = v2.RandomResizedCrop((30, 30), scale=(0.8, 1.0), ratio=(3 / 4, 4 / 3))
    for height, width in [(75, 100), (125, 94), (64, 64), (7, 5), (10, 100), (300, 12)]:
        for seed in range(40):
            torch.manual_seed(seed)
            expected = crop.make_params([torch.zeros(3, height, width, dtype=torch.uint8)])
            next_draw = torch.rand(1)
            torch.manual_seed(seed)
            box = random_crop_box(height, width)
            assert box == (expected["top"], expected["left"], expected["height"], expected["width"]), (height, width)
            assert torch.equal(torch.rand(1), next_draw), "as many draws: the random stream continues alike"


@pytest.mark.parametrize("width, height", [(400, 300), (375, 500), (61, 60), (119, 60), (120, 60), (1000, 70)])
def test_draft_scale_is_the_reduction_pil_picks(width, height):
    jpeg = PILImage.open(io.BytesIO(encoded(smooth_photo(height, width), "JPEG")))
    jpeg.draft(None, (60, 60))
    scale = draft_scale((width, height), (60, 60))
    assert jpeg.size == (-(-width // scale), -(-height // scale))


def test_jpegs_are_decoded_to_the_pixels_pil_gives():
    """RGB, greyscale and CMYK JPEGs (torchvision's decoder) give the RGB pixels PIL's decoding and conversion give."""
    for mode in ("RGB", "L", "CMYK"):
        jpeg = encoded(picture(4, size=(40, 48), mode=mode), "JPEG")
        pixels, is_jpeg = DecodeImage().decode({"bytes": jpeg, "path": None})
        expected = to_rgb_array(PILImage.open(io.BytesIO(jpeg)))
        assert is_jpeg and pixels.dtype == torch.uint8 and pixels.shape == (3, *expected.shape[:2])
        assert np.array_equal(pixels.permute(1, 2, 0).numpy(), expected), mode


def test_every_colour_mode_gives_the_same_pixels_decoded_or_encoded(tmp_path, image_processor):
    """The colour modes the loader keeps (greyscale, RGBA, CMYK, palette), as datasets decodes them and as training
    reads them (encoded rows, decoded by the transforms): float [3, H, W] tensors, the same pixels both ways."""
    names = write_messy_images(tmp_path)[:5]
    decoded = Dataset.from_dict({"image": [str(tmp_path / name) for name in names]}).cast_column("image", Image())
    encoded_rows = without_image_decoding(decoded)
    assert [image.mode for image in decoded["image"]] == ["RGB", "L", "RGBA", "CMYK", "P"]
    evaluate, train = eval_image_transform(image_processor), train_image_transform(image_processor)
    for decoded_row, encoded_row in zip(decoded, encoded_rows):
        pixels = evaluate(decoded_row["image"])
        assert pixels.shape == (3, 30, 30) and pixels.dtype == torch.float32
        torch.testing.assert_close(evaluate(encoded_row["image"]), pixels, rtol=0, atol=0)
        assert train(encoded_row["image"]).shape == (3, 30, 30)


# ----------------------------------------------------------------------------------------------------------------
# Collation
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def captioned_images() -> Dataset:
    features = Features(
        {
            "image": Image(),
            "captions": List(Value("string")),
            "image_id": Value("int64"),
            "label": ClassLabel(num_classes=2),
        }
    )
    table = {"image": [picture(n) for n in range(8)], "captions": [captions_of(n) for n in range(8)],
             "image_id": list(range(8)), "label": [n % 2 for n in range(8)]}
    return Dataset.from_dict(table, features=features)


def decoded_captions(tokenizer, batch) -> list[str]:
    return tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)


def round_trip(tokenizer, captions: list[str]) -> list[str]:
    """The captions as `decoded_captions` gives them back (lower case, the tokenizer's spacing)."""
    return tokenizer.batch_decode(tokenizer(captions)["input_ids"], skip_special_tokens=True)


def test_with_image_transform_gives_pixel_values_captions_ids_and_label(captioned_images, image_processor):
    row = with_image_transform(captioned_images, eval_image_transform(image_processor))[3]
    assert set(row) == {"pixel_values", "captions", "image_id", "label"}
    assert row["pixel_values"].shape == (3, 30, 30)
    assert (row["captions"], row["image_id"], row["label"]) == (captions_of(3), 3, 1)


def test_training_caption_depends_only_on_seed_epoch_and_image(captioned_images, image_processor, tokenizer):
    examples = list(with_image_transform(captioned_images, eval_image_transform(image_processor)))
    collator = CaptionCollator(tokenizer, seed=7)
    collator.set_epoch(3)
    batch = collator(examples)
    resumed = CaptionCollator(tokenizer, seed=7)  # a restarted run, seeing the images in another order
    resumed.set_epoch(3)
    reordered = resumed(examples[::-1])

    chosen = decoded_captions(tokenizer, batch)
    assert chosen == decoded_captions(tokenizer, reordered)[::-1]
    assert batch["image_ids"].tolist() == list(range(8))
    assert all(caption in round_trip(tokenizer, captions_of(n)) for n, caption in enumerate(chosen))
    collator.set_epoch(4)
    assert decoded_captions(tokenizer, collator(examples)) != chosen, "another epoch draws other captions"
    other_seed = CaptionCollator(tokenizer, seed=8)
    other_seed.set_epoch(3)
    assert decoded_captions(tokenizer, other_seed(examples)) != chosen
    choices = set()
    for epoch in range(40):
        collator.set_epoch(epoch)
        choices.update(collator.choose_captions(captions_of(0), image_id=0))
    assert choices == set(captions_of(0)), "over epochs every caption of an image is used"


def test_training_crop_depends_only_on_seed_epoch_and_image(captioned_images, image_processor, tokenizer):
    """The collator applies the random crop per sample from (seed, epoch, image_id), so a resumed run crops the same
    way, and it leaves torch's global random stream (which dropout uses) exactly where it was."""
    examples = [captioned_images[n] for n in range(6)]
    collator = CaptionCollator(tokenizer, seed=7, image_transform=train_image_transform(image_processor))
    collator.set_epoch(2)
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    pixels = collator(examples)["pixel_values"]
    assert torch.equal(torch.random.get_rng_state(), before)
    torch.manual_seed(123)  # another global state: same crops
    torch.testing.assert_close(collator(examples[::-1])["pixel_values"], pixels.flip(0), rtol=0, atol=0)
    collator.set_epoch(3)
    assert not torch.allclose(collator(examples)["pixel_values"], pixels), "another epoch crops differently"
    plain = CaptionCollator(tokenizer, train=False, image_transform=eval_image_transform(image_processor))(examples)
    assert plain["pixel_values"].shape == pixels.shape == (6, 3, 30, 30)


def test_batches_are_normalised_once_with_the_values_of_each_image_alone(captioned_images, image_processor, tokenizer):
    """The collator stacks each image's uint8 pixels and converts and normalises the batch once: exactly the values
    of each image transformed alone, and the image processor's."""
    examples = [captioned_images[n] for n in range(6)]
    transform = eval_image_transform(image_processor)
    collator = CaptionCollator(tokenizer, train=False, image_transform=transform)
    assert collator.image_pixels(examples[0]).dtype == torch.uint8
    batch = collator(examples)["pixel_values"]
    assert batch.dtype == torch.float32
    torch.testing.assert_close(batch, torch.stack([transform(e["image"]) for e in examples]), rtol=0, atol=0)
    expected = image_processor(images=[e["image"] for e in examples], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(batch, expected, rtol=0, atol=1e-5)


def test_evaluation_takes_the_first_caption_and_pads_to_the_longest(captioned_images, image_processor, tokenizer):
    dataset = with_image_transform(captioned_images, eval_image_transform(image_processor))
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=CaptionCollator(tokenizer, train=False))
    batch = next(iter(loader))

    assert set(batch) == {"pixel_values", "input_ids", "attention_mask", "image_ids", "labels"}
    assert batch["labels"].tolist() == captioned_images["label"][:4]
    assert batch["pixel_values"].shape == (4, 3, 30, 30)
    assert decoded_captions(tokenizer, batch) == round_trip(tokenizer, [captions_of(n)[0] for n in range(4)])
    lengths = [len(tokenizer(captions_of(n)[0])["input_ids"]) for n in range(4)]
    assert batch["input_ids"].shape == (4, max(lengths)) and max(lengths) < 64
    assert batch["attention_mask"].sum(dim=1).tolist() == lengths

    truncated = CaptionCollator(tokenizer, max_seq_length=4, train=False)([dataset[0], dataset[1]])
    assert truncated["input_ids"].shape == (2, 4)


def test_text_collator_pads_to_the_longest_caption_and_keeps_image_ids(tokenizer):
    """Examples as `ndclip.data.flatten_captions` gives them: one caption each, with its image's id."""
    examples = [{"image_id": 1, "caption": captions_of(1)[0]}, {"image_id": 4, "caption": captions_of(4)[4]}]
    batch = TextCollator(tokenizer, max_seq_length=64)(examples)
    assert batch["image_ids"].tolist() == [1, 4]
    assert decoded_captions(tokenizer, batch) == round_trip(tokenizer, [captions_of(1)[0], captions_of(4)[4]])
    lengths = [len(tokenizer(example["caption"])["input_ids"]) for example in examples]
    assert batch["input_ids"].shape == (2, max(lengths)) and lengths[0] != lengths[1]
    assert batch["attention_mask"].sum(dim=1).tolist() == lengths
    assert TextCollator(tokenizer, max_seq_length=4)(examples)["input_ids"].shape == (2, 4)


def test_one_torch_thread_inside_the_block_and_restored_after():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with one_torch_thread():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError), one_torch_thread():
            raise RuntimeError("the thread count is restored on errors too")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
