"""Evaluation: time and peak memory of the full retrieval evaluation (`ndclip.metrics.retrieval_metrics`:
image->text and text->image recall@1/5/10 and median ranks) for 1000 images x 5000 captions and for 10x that
(10,000 x 50,000), embeddings given, showing that its memory stays bounded.

The embeddings are random, L2-normalised, `--dim` wide (256, NdCLIP's projection), 5 captions per image, each
caption its image's embedding plus noise; `--shared_captions` of them are copies of another caption (as captions
repeated word for word under several images in Flickr8k), so the evaluation meets exact ties. The baseline is the
naive evaluation that materialises the whole `[images, captions]` similarity matrix (and boolean masks of the same
shape) and applies the tie rule (ties broken at random, in expectation) on its own: counts from the masks,
probabilities from log-binomials rather than the library's product form. It is checked to give the same metrics,
and it is run at the small size only: at 10,000 x 50,000 its similarity matrix alone would take
10,000 x 50,000 x 4 bytes = 2.0 GB, which is computed and reported instead.

Time: the naive and the chunked evaluation run interleaved after a warmup, medians and their ratio; the large
size runs the chunked one only. Peak memory: each configuration in a fresh subprocess (`--memory_child`), which
builds the embeddings, then resets the peak and runs the evaluation once; the extra memory is the peak minus the
memory before the evaluation. On CPU that is the resident set size and the kernel's `VmHWM` reset through
`/proc/self/clear_refs`; on CUDA, `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`.
`chunked_bound_bytes` is the bound the chunking promises: one chunk of `chunk_size x max(images, captions)`
float32 similarities.

    python benchmarks/bench_eval.py
    python benchmarks/bench_eval.py --device cuda --chunk_size 4096
"""

import argparse
import gc
import os
import statistics
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported

import torch
from common import (
    PeakMemory,
    add_common_args,
    emit,
    finish,
    hardware_info,
    mib,
    ratio,
    run_child,
    setup_torch,
    summarize,
    time_interleaved,
)

from ndclip.metrics import retrieval_metrics

KS = (1, 5, 10)
FLOAT_BYTES = 4


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1000, help="images of the small size (captions: 5x)")
    parser.add_argument("--scale", type=int, default=10, help="the large size has this many times more of both")
    parser.add_argument("--captions_per_image", type=int, default=5)
    parser.add_argument(
        "--shared_captions", type=float, default=0.1, help="fraction of captions that copy another caption exactly"
    )
    parser.add_argument("--dim", type=int, default=256, help="embedding width")
    parser.add_argument("--chunk_size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=5, help="timed runs per candidate at the small size")
    parser.add_argument("--large_steps", type=int, default=2, help="timed runs at the large size")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--memory_child", choices=("naive", "chunked"), default=None, help=argparse.SUPPRESS)
    add_common_args(parser)
    return parser.parse_args(argv)


def make_embeddings(num_images: int, captions_per_image: int, dim: int, seed: int, device: str, shared: float = 0.0):
    """L2-normalised image embeddings, and `captions_per_image` noisy copies of each as caption embeddings, a
    `shared` fraction of which are then replaced by an exact copy of a random caption (mostly another image's)."""
    generator = torch.Generator().manual_seed(seed)
    image_embeds = torch.nn.functional.normalize(torch.randn(num_images, dim, generator=generator), dim=-1)
    text_image_ids = torch.arange(num_images).repeat_interleave(captions_per_image)
    noise = torch.randn(len(text_image_ids), dim, generator=generator).mul_(0.3)
    text_embeds = torch.nn.functional.normalize(noise.add_(image_embeds[text_image_ids]), dim=-1)
    num_shared = int(shared * len(text_embeds))
    copies = torch.randperm(len(text_embeds), generator=generator)[:num_shared]
    text_embeds[copies] = text_embeds[torch.randint(len(text_embeds), (num_shared,), generator=generator)]
    return image_embeds.to(device), text_embeds.to(device), text_image_ids.to(device)


def naive_retrieval_metrics(image_embeds, text_embeds, text_image_ids, ks=KS) -> dict[str, float]:
    """The same metrics as `retrieval_metrics` (image ids `0..N-1`), from the whole `[N, M]` similarity matrix."""
    similarity = image_embeds @ text_embeds.t()  # [N, M]
    images = torch.arange(len(image_embeds), device=similarity.device)
    correct = text_image_ids[None, :] == images[:, None]  # [N, M]
    metrics, ranks = {}, {}
    # Text -> image from its own matmul, as the library computes it: ties must compare within one product.
    for direction, scores, is_correct in (
        ("image_to_text", similarity, correct),
        ("text_to_image", text_embeds @ image_embeds.t(), correct.t()),
    ):
        recall_at, ranks[direction] = naive_first_correct(scores, is_correct)
        metrics |= {f"{direction}_recall@{k}": recall_at(k).mean().item() for k in ks}
    metrics["image_to_text_median_rank"] = median(ranks["image_to_text"])
    metrics["text_to_image_median_rank"] = median(ranks["text_to_image"])
    return metrics


def naive_first_correct(scores: torch.Tensor, correct: torch.Tensor):
    """Per query row of `scores` (`[Q, C]`, `correct` the mask of its correct candidates): a function of K giving
    P(first correct in the top K) when tied candidates come in a uniformly random order, and the expected rank.

    P = 1 - C(t, m) / C(t + c, m): all `m = K - g` tied places of the top K go to the `t` tied wrong candidates
    (`g` strictly better, `c` correct tied). A NaN or an infinity anywhere in the row is a miss.
    """
    best = scores.masked_fill(~correct, float("-inf")).amax(dim=1, keepdim=True)
    tied = scores == best
    better = (scores > best).sum(dim=1).double()
    tied_correct = (tied & correct).sum(dim=1).double()
    tied_wrong = (tied & ~correct).sum(dim=1).double()
    miss = ~scores.isfinite().all(dim=1)

    def log_binomial(n, k):
        return torch.lgamma(n + 1) - torch.lgamma(k + 1) - torch.lgamma(n - k + 1)

    def recall_at(k: int) -> torch.Tensor:
        places = k - better
        inside = places.clamp(min=0).minimum(tied_wrong)  # valid lgamma arguments; the where() below decides
        all_wrong = torch.exp(log_binomial(tied_wrong, inside) - log_binomial(tied_wrong + tied_correct, inside))
        hit = torch.where(places <= 0, 0.0, torch.where(places > tied_wrong, 1.0, 1 - all_wrong))
        return hit.masked_fill(miss, 0.0)

    ranks = (better + (tied_wrong + tied_correct + 1) / (tied_correct + 1)).masked_fill(miss, scores.shape[1])
    return recall_at, ranks


def median(values: torch.Tensor) -> float:
    """As `numpy.median`: the mean of the two middle values for an even count."""
    ordered = values.double().sort().values
    middle = len(ordered) // 2
    return ordered[middle].item() if len(ordered) % 2 else ((ordered[middle - 1] + ordered[middle]) / 2).item()


def evaluation(method: str, embeddings, chunk_size: int):
    if method == "naive":
        return lambda: naive_retrieval_metrics(*embeddings)
    return lambda: retrieval_metrics(*embeddings, ks=KS, chunk_size=chunk_size)


def size_key(num_images: int, captions_per_image: int) -> str:
    return f"{num_images}x{num_images * captions_per_image}"


# ----- time -----------------------------------------------------------------------------------------------------


def measure_time(args, num_images: int, methods: tuple[str, ...], steps: int) -> dict:
    embeddings = make_embeddings(
        num_images, args.captions_per_image, args.dim, args.seed, args.device, args.shared_captions
    )
    candidates = {method: evaluation(method, embeddings, args.chunk_size) for method in methods}
    times = time_interleaved(candidates, rounds=steps, warmup=args.warmup, device=args.device, alternate_order=True)
    result = {method: summarize(seconds) for method, seconds in times.items()}
    if "naive" in methods:
        result["chunked_vs_naive_time"] = statistics.median(times["chunked"]) / statistics.median(times["naive"])
        chunked, naive = candidates["chunked"](), candidates["naive"]()
        result["metrics_max_abs_diff_naive_vs_chunked"] = max(abs(chunked[k] - naive[k]) for k in chunked)
        result["metrics"] = chunked
    return result


# ----- peak memory, one fresh process per configuration ---------------------------------------------------------


def memory_child(args) -> dict:
    """Runs inside the fresh subprocess: the extra peak memory of one evaluation."""
    embeddings = make_embeddings(
        args.images, args.captions_per_image, args.dim, args.seed, args.device, args.shared_captions
    )
    run = evaluation(args.memory_child, embeddings, args.chunk_size)
    memory = PeakMemory(args.device)
    gc.collect()
    before = memory.current()
    memory.reset_peak()
    run()
    extra = memory.peak() - before
    return {"method": memory.method, "extra_bytes": extra, "extra_mib": mib(extra)}


def measure_memory(args, num_images: int, method: str) -> dict:
    argv = (
        f"--memory_child {method} --images {num_images} --captions_per_image {args.captions_per_image} "
        f"--dim {args.dim} --chunk_size {args.chunk_size} --device {args.device} --seed {args.seed} "
        f"--shared_captions {args.shared_captions}"
    ).split()
    if args.threads:
        argv += ["--threads", str(args.threads)]
    return run_child(Path(__file__), argv)


def matrix_bytes(num_images: int, num_captions: int) -> int:
    return num_images * num_captions * FLOAT_BYTES


def memory_report(args, num_images: int, methods: tuple[str, ...]) -> dict:
    num_captions = num_images * args.captions_per_image
    report = {method: measure_memory(args, num_images, method) for method in methods}
    report["naive_similarity_matrix_bytes"] = matrix_bytes(num_images, num_captions)
    report["chunked_bound_bytes"] = args.chunk_size * max(num_images, num_captions) * FLOAT_BYTES
    report["chunked_vs_naive_matrix"] = report["chunked"]["extra_bytes"] / report["naive_similarity_matrix_bytes"]
    if "naive" in methods:
        report["chunked_vs_naive_memory"] = ratio(report["chunked"]["extra_bytes"], report["naive"]["extra_bytes"])
    return report


def main(argv=None) -> None:
    args = parse_args(argv)
    setup_torch(args)
    if args.memory_child:
        emit(memory_child(args))
        return
    small, large = args.images, args.images * args.scale
    small_key, large_key = size_key(small, args.captions_per_image), size_key(large, args.captions_per_image)
    result = {
        "benchmark": "eval",
        "hardware": hardware_info(args.device),
        "setup": {
            "dim": args.dim,
            "captions_per_image": args.captions_per_image,
            "shared_captions": args.shared_captions,
            "chunk_size": args.chunk_size,
        },
        "time": {
            small_key: measure_time(args, small, ("naive", "chunked"), args.steps),
            large_key: measure_time(args, large, ("chunked",), args.large_steps),
        },
        "memory": {
            small_key: memory_report(args, small, ("naive", "chunked")),
            large_key: memory_report(args, large, ("chunked",)),
        },
    }
    small_extra = result["memory"][small_key]["chunked"]["extra_bytes"]
    large_extra = result["memory"][large_key]["chunked"]["extra_bytes"]
    result["bounded_memory"] = {
        "pairs_growth": args.scale**2,
        "chunked_extra_growth": ratio(large_extra, small_extra),
        "naive_matrix_growth": args.scale**2,
        "large_chunked_extra_vs_bound": large_extra / result["memory"][large_key]["chunked_bound_bytes"],
        "large_naive_matrix_gb": matrix_bytes(large, large * args.captions_per_image) / 1e9,
    }
    emit(finish(result), args.output)


if __name__ == "__main__":
    main()
