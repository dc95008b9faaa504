"""Data pipeline: images/s through loading + transforms + collation with 0, 1 and 2 DataLoader workers, against the
model's training-step rate at the same batch, so that data never starves the model.

The data are Flickr8k-like (`flickr8k_like.py`): `--images` JPEG photos (default 200; 500x375, every fourth one
375x500 as Flickr8k's portrait photos, about 75 KB each) in a Kaggle-layout folder (`Images/` + `captions.txt`, five
captions per image). They are read through the real path: `ndclip.data.load_image_caption_dataset(data_dir=...)`,
then `run_clip.make_loader` (the training DataLoader: shuffled, full batches) over the train split (images left
encoded, `without_image_decoding`, as run_clip.py reads them: the collator decodes them) with
`CaptionCollator(tokenizer, 64, seed=0, image_transform=train_image_transform(image_processor))`, the
tokenizer a WordPiece one trained on the captions (`ndclip.tiny_towers.train_wordpiece_tokenizer`, 2000 words).

Sizes (`workloads.py`): `real` is ViT-B/16 at 224 + DistilBERT-base fed by `ViTImageProcessor()` (224); `tiny` is
`ndclip.tiny_towers.tiny_config` (ViT image 30) fed by `ViTImageProcessor` at 30. The photos are the same for both:
decoding a 500x375 JPEG costs the same whatever the model.

How it measures, all candidates interleaved in the same rounds (after `--warmup` untimed rounds):
- Data: one call is one epoch over the train split, as `run_clip.py` runs it: a fresh iterator (so with workers, the
  worker processes start anew, as without `persistent_workers`), `collate.set_epoch(epoch)`, every batch pulled and
  dropped. `epoch_images_per_s` counts the whole epoch, worker start included; `steady_images_per_s` the batches
  after the first one (the rate of a long epoch: Flickr8k has 750 batches of 8 per epoch, not 22).
- Model: one training step of `run_clip.py` without accelerate and without the data: forward, the symmetric
  contrastive loss, backward, gradient clipping at 1.0, AdamW (run_clip's parameter groups) step, zero_grad; fp32,
  train mode (dropout), on a batch of the same shape as the pipeline's (random pixel values, the tokens of a real
  collated batch). `samples_per_s` = batch / median step time.
- `data_over_model[size][workers]` = steady data images/s / model samples/s: >= 1 means the pipeline can keep up
  with the model (when it runs in parallel with it), < 1 that it starves it. With 0 workers the data are loaded in
  the training process between steps, so the step rate becomes 1 / (1/model + 1/data):
  `serial_fraction_workers0` = that / the model's rate, the fraction of the model's speed a `run_clip.py` run keeps
  (compare with `bench_end_to_end.py`, which measures it).
- `workers0_torch_threads1` (diagnostic, when torch uses more than one thread): 0 workers with this process's torch
  intra-op threads set to 1 during the epoch. Worker processes always run with 1 thread (the DataLoader sets it);
  the training process runs the per-image transforms (crop and resize of one image's uint8 pixels) and the batch's
  normalisation with all of torch's threads unless the collator limits them (`ndclip.transforms.one_torch_thread`),
  and every such small op then pays a fork/join, which is slow when another process holds the other core.

Caveat: each candidate runs alone. In training, worker processes share the CPU cores with the model's threads, so on
a 2-core CPU a worker's images are not free: `bench_end_to_end.py` measures the combination.

    python benchmarks/bench_data_pipeline.py
    python benchmarks/bench_data_pipeline.py --size real --batch_size 32 --images 400 --workers 0,2,4
"""

import argparse
import os
import statistics
import tempfile
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers or datasets is imported

import torch
from common import (
    LoaderEpoch,
    add_common_args,
    comma_list,
    emit,
    finish,
    hardware_info,
    setup_torch,
    summarize,
    time_interleaved,
)
from flickr8k_like import prepare_data
from workloads import IMAGE_SIZE, MAX_SEQ_LENGTH, SIZES, bare_inputs, build_config, image_processor_for, make_bare_step

from modeling_ndclip import NdClipModel
from ndclip.transforms import CaptionCollator, train_image_transform
from run_clip import make_loader

TINY_STEP_REPEATS = 5  # tiny steps per timed sample: one is short for a shared machine's clock
SINGLE_THREAD = "workers0_torch_threads1"  # 0 workers, this process's torch intra-op threads at 1 during the epoch


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=comma_list(SIZES), default=list(SIZES), help="tiny, real or tiny,real")
    parser.add_argument("--batch_size", type=int, default=8, help="the DataLoader's and the model step's batch")
    parser.add_argument("--images", type=int, default=200, help="photos generated (10%% are held out for validation)")
    parser.add_argument("--workers", default="0,1,2", help="DataLoader num_workers to compare, e.g. 0,1,2")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (one epoch / one step per candidate)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--data_dir", help="use this Kaggle-layout folder instead of generating one")
    parser.add_argument("--no_single_thread", action="store_true",
                        help=f"skip the `{SINGLE_THREAD}` candidate (0 workers, torch at 1 thread during the epoch)")
    add_common_args(parser)
    args = parser.parse_args(argv)
    args.workers = [int(w) for w in args.workers.split(",") if w.strip()]
    return args


# ----- one epoch of data ----------------------------------------------------------------------------------------


class DataEpoch(LoaderEpoch):
    """One epoch of `run_clip.make_loader`'s training DataLoader over `split`, collated by `CaptionCollator` with the
    training transform (see `common.LoaderEpoch`)."""

    def __init__(self, split, tokenizer, image_processor, batch_size: int, workers: int, seed: int,
                 threads: int | None = None):
        collator = CaptionCollator(
            tokenizer, MAX_SEQ_LENGTH, seed=seed, image_transform=train_image_transform(image_processor)
        )
        loader_args = SimpleNamespace(dataloader_num_workers=workers, dataloader_pin_memory=False, seed=seed)
        super().__init__(make_loader(split, batch_size, collator, loader_args, train=True), collator, threads)
        self.batch_size = batch_size

    def steady_images_per_s(self, rounds: int) -> float:
        """Images per second after the first batch, over the last `rounds` (timed) epochs."""
        return (self.batches - 1) * self.batch_size / statistics.median(self.rest_s[-rounds:])


# ----- the benchmark --------------------------------------------------------------------------------------------


def main(argv=None) -> None:
    args = parse_args(argv)
    setup_torch(args)
    if args.device != "cpu":
        raise SystemExit("the data pipeline runs on the CPU; the model rate is measured with --device cpu only")
    result = {"benchmark": "data_pipeline", "hardware": hardware_info(args.device)}
    with tempfile.TemporaryDirectory(prefix="bench_data_pipeline_") as tmp:
        _, train_split, tokenizer, result["data"] = prepare_data(Path(tmp), args.images, args.seed, args.data_dir)
        if len(train_split) < 2 * args.batch_size:
            raise SystemExit(f"{len(train_split)} training images give fewer than 2 batches of {args.batch_size}")
        candidates, data_epochs, repeats = {}, {}, {}
        for size in args.size:
            processor = image_processor_for(size)
            for workers in args.workers:
                epoch = DataEpoch(train_split, tokenizer, processor, args.batch_size, workers, args.seed)
                data_epochs[(size, f"workers{workers}")] = epoch
            if 0 in args.workers and torch.get_num_threads() > 1 and not args.no_single_thread:
                epoch = DataEpoch(train_split, tokenizer, processor, args.batch_size, 0, args.seed, threads=1)
                data_epochs[(size, SINGLE_THREAD)] = epoch
            candidates.update({f"data/{size}/{key}": epoch for (s, key), epoch in data_epochs.items() if s == size})
            first_batch = next(iter(DataEpoch(train_split, tokenizer, processor, args.batch_size, 0, args.seed).loader))
            torch.manual_seed(args.seed)
            model = NdClipModel(build_config(size, len(tokenizer)))
            candidates[f"model/{size}"] = make_bare_step(model, bare_inputs(first_batch, args.seed))
            if size == "tiny":
                repeats["model/tiny"] = TINY_STEP_REPEATS
        times = time_interleaved(candidates, rounds=args.rounds, warmup=args.warmup, device="cpu", repeats=repeats)

    result["settings"] = {"batch_size": args.batch_size, "rounds": args.rounds, "warmup": args.warmup,
                          "workers": args.workers, "image_size": {s: IMAGE_SIZE[s] for s in args.size},
                          "max_seq_length": MAX_SEQ_LENGTH, "batches_per_epoch": len(train_split) // args.batch_size}
    result["model"], result["data_pipeline"], result["data_over_model"] = {}, {}, {}
    result["serial_fraction_workers0"] = {}
    for size in args.size:
        model_s = statistics.median(times[f"model/{size}"])
        model_rate = args.batch_size / model_s
        result["model"][size] = {**summarize(times[f"model/{size}"]), "samples_per_s": model_rate, "dtype": "fp32"}
        result["data_pipeline"][size], result["data_over_model"][size] = {}, {}
        for (data_size, key), epoch in data_epochs.items():
            if data_size != size:
                continue
            name = f"data/{size}/{key}"
            steady = epoch.steady_images_per_s(args.rounds)
            epoch_rate = epoch.batches * args.batch_size / statistics.median(times[name])
            result["data_pipeline"][size][key] = {
                "epoch": summarize(times[name]),
                "epoch_images_per_s": epoch_rate,
                "steady_images_per_s": steady,
                "first_batch_median_s": statistics.median(epoch.first_batch_s[-args.rounds:]),
            }
            result["data_over_model"][size][key] = {
                "steady": steady / model_rate,
                "epoch": epoch_rate / model_rate,
                "starves_model": steady < model_rate,
            }
        for key in ("workers0", SINGLE_THREAD):
            if key in result["data_pipeline"][size]:
                data_rate = result["data_pipeline"][size][key]["steady_images_per_s"]
                result["serial_fraction_workers0"].setdefault(size, {})[key] = 1 / (1 + model_rate / data_rate)
    emit(finish(result), args.output)


if __name__ == "__main__":
    main()
