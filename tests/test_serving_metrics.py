"""The serving benchmark's metrics, arrivals and flags, against answers worked out by hand.

The metrics are vLLM's (`vllm bench serve`): a failed request counts as failed and nowhere else,
TPOT leaves out the first token and one-token requests, ITL is every gap; plus the longest stall
and the time until the output rate is back after a failure. Arrivals are vLLM's gamma gaps.
"""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from common import Parser  # noqa: E402
from provenance import strict_json  # noqa: E402
from serving_args import add_serving_args, check_serving_args  # noqa: E402
from serving_metrics import RequestRecord, serving_metrics, throughput_recovery_s  # noqa: E402
from serving_workload import Admission, arrival_times  # noqa: E402

# Three completed requests and one failed, times in seconds from the start:
#   fast:   arrives 0,   tokens 0.1 0.2 0.4      ttft 100 ms, e2el 400, tpot 300/2 = 150, gaps 100 200
#   single: arrives 1,   token 1.3               ttft 300, e2el 300, no tpot, no gap
#   queued: arrives 0.5, sent 1 (queued 0.5 s), tokens 1.2 1.5 1.8 2.1
#                                                ttft 200 (from sending), e2el 1100, tpot 900/3 = 300, gaps 300 x3
#   failed: arrives 0.2, one token at 0.5, fails at 2.5 (the end of the run)
FAST = RequestRecord(arrival_s=0.0, prompt_len=10, token_times_s=(0.1, 0.2, 0.4))
SINGLE = RequestRecord(arrival_s=1.0, prompt_len=20, token_times_s=(1.3,))
QUEUED = RequestRecord(arrival_s=0.5, prompt_len=30, token_times_s=(1.2, 1.5, 1.8, 2.1), sent_s=1.0)
FAILED = RequestRecord(arrival_s=0.2, prompt_len=40, token_times_s=(0.5,), error="device 1 lost", finished_s=2.5)
RECORDS = [FAST, SINGLE, QUEUED, FAILED]
ALL = ("ttft", "tpot", "itl", "e2el")


def metrics(records=RECORDS, **options):
    return serving_metrics(records, **{"percentile_metrics": ALL, **options})


def test_counts_tokens_and_throughputs_stand_on_the_completed_requests_over_the_whole_run():
    m = metrics()
    assert (m["completed"], m["failed"], m["duration"]) == (3, 1, 2.5)
    assert (m["total_input_tokens"], m["total_output_tokens"]) == (60, 8)
    assert m["request_throughput"] == pytest.approx(3 / 2.5)
    assert m["output_throughput"] == pytest.approx(8 / 2.5)
    assert m["total_token_throughput"] == pytest.approx(68 / 2.5)
    assert m["errors"] == [None, None, None, "device 1 lost"]


def test_means_medians_stds_and_percentiles_are_numpys_as_in_vllm():
    m = metrics(percentiles=(25, 99, 99.9))
    assert m["mean_ttft_ms"] == pytest.approx(200)
    assert m["median_ttft_ms"] == pytest.approx(200)
    assert m["std_ttft_ms"] == pytest.approx(math.sqrt((100 ** 2 + 100 ** 2) / 3))  # population std
    assert m["p25_ttft_ms"] == pytest.approx(150)  # linear interpolation between 100 and 200
    assert m["p99_ttft_ms"] == pytest.approx(298)
    assert m["p99.9_ttft_ms"] == pytest.approx(299.8)
    assert (m["mean_itl_ms"], m["median_itl_ms"], m["p25_itl_ms"]) == pytest.approx((240, 300, 200))
    assert (m["mean_e2el_ms"], m["median_e2el_ms"]) == pytest.approx((600, 400))


def test_tpot_leaves_out_the_first_token_and_one_token_requests():
    m = metrics()
    assert (m["mean_tpot_ms"], m["median_tpot_ms"], m["p99_tpot_ms"]) == pytest.approx((225, 225, 298.5))
    assert m["tpot_requests"] == 2
    only_single = metrics([SINGLE])
    assert only_single["mean_tpot_ms"] is None and only_single["tpot_requests"] == 0


def test_the_output_says_how_many_requests_each_statistic_stands_on():
    m = metrics()
    assert (m["ttft_requests"], m["tpot_requests"], m["itl_requests"], m["e2el_requests"]) == (3, 2, 2, 3)
    assert m["itl_gaps"] == 5


def test_a_failed_request_is_left_out_of_every_latency_statistic():
    with_failure, without = metrics(), metrics([FAST, SINGLE, QUEUED])
    for metric in ALL:
        for stat in ("mean", "median", "std"):
            key = f"{stat}_{metric}_ms"
            assert with_failure[key] == without[key], key
    assert without["failed"] == 0


def test_only_the_selected_metrics_are_reported_by_default_ttft_tpot_itl():
    m = serving_metrics(RECORDS)
    assert "p99_ttft_ms" in m and "p99_itl_ms" in m and "mean_e2el_ms" not in m


@pytest.mark.parametrize("slos, good", [
    ({"ttft": 250}, 2),                 # fast 100 and queued 200; single's 300 is over
    ({"tpot": 200}, 2),                 # fast 150 and single (one token: tpot 0); queued's 300 is over
    ({"ttft": 250, "tpot": 200}, 1),    # every SLO at once: only fast
    ({"e2el": 400}, 2),                 # at the SLO is within it: fast 400 and single 300
])
def test_goodput_counts_completed_requests_within_every_slo_per_second(slos, good):
    assert metrics(goodput=slos)["request_goodput"] == pytest.approx(good / 2.5)


def test_without_goodput_slos_request_goodput_is_none():
    assert metrics()["request_goodput"] is None


def test_the_longest_stall_is_the_longest_gap_between_tokens_of_each_completed_request():
    m = metrics()
    assert m["longest_stall_ms_per_request"] == pytest.approx([200, None, 300, None])
    assert m["longest_stall_ms"] == pytest.approx(300)


def test_no_requests_give_strict_json_with_none_where_undefined():
    m = metrics([], goodput={"ttft": 1}, failure_s=1.0)
    strict_json(m)
    assert m["request_throughput"] is None and m["mean_ttft_ms"] is None and m["longest_stall_ms"] is None
    assert m["throughput_recovery_s"] is None


def test_a_completed_request_has_at_least_one_token():
    with pytest.raises(ValueError):
        RequestRecord(arrival_s=0.0, prompt_len=4, token_times_s=())


# Throughput recovery. A survivor emits a token every 10 ms from 0 to 15 s, except from the
# failure at 5 s until 7 s; a second request dies at the failure. From t in [5, 7] the 2 s window
# holds the tokens of [7, t + 2): a rate of 100 (t - 5) / 2 per second, and the rate later in the
# run is the 800 tokens of [7, 15] over 15 - t seconds. The window first reaches 90% of it where
# 50 (t - 5) = 0.9 * 800 / (15 - t): t = 10 - sqrt(10.6) = 6.744, 1.744 s after the failure.
# Every later window holds 100 tokens per second: at least 90% of the rate later.


def ticks(start: float, stop: float, step: float = 0.01) -> tuple[float, ...]:
    return tuple(round(start + i * step, 6) for i in range(round((stop - start) / step) + 1))


SURVIVOR = RequestRecord(0.0, 8, tuple(t for t in ticks(0, 15) if not 5 < t < 7))
VICTIM = RequestRecord(0.0, 8, ticks(0, 5, 0.1), error="device 2 lost", finished_s=5.0)
RECOVERED_AFTER_S = 10 - math.sqrt(10.6) - 5


def test_throughput_is_back_when_every_later_2s_window_keeps_90_percent_of_the_later_rate():
    assert throughput_recovery_s([SURVIVOR, VICTIM], 5.0) == pytest.approx(RECOVERED_AFTER_S, abs=0.02)
    assert metrics([SURVIVOR, VICTIM], failure_s=5.0)["throughput_recovery_s"] == pytest.approx(
        RECOVERED_AFTER_S, abs=0.02)


def test_the_drain_after_the_last_request_was_sent_is_not_held_against_recovery():
    # the last request runs alone from 15.5 s to 20 s at a fifth of the rate: the run is draining
    straggler = RequestRecord(0.0, 8, ticks(15.5, 20, 0.05))
    assert throughput_recovery_s([SURVIVOR, VICTIM, straggler], 5.0) == pytest.approx(RECOVERED_AFTER_S, abs=0.02)


def test_a_failure_that_costs_no_throughput_is_recovered_at_once():
    steady = RequestRecord(0.0, 8, ticks(0, 15))
    assert throughput_recovery_s([steady], 5.0) == 0.0


def test_throughput_never_back_is_none():
    stopped = RequestRecord(0.0, 8, ticks(0, 5) + (15.0,))
    assert throughput_recovery_s([stopped], 5.5) is None  # no token between the failure and the end
    assert throughput_recovery_s([SURVIVOR], 14.0) is None  # no 2 s window fits before the end
    assert metrics([SURVIVOR])["throughput_recovery_s"] is None  # no failure


# Arrivals


def gaps(times: list[float]) -> np.ndarray:
    return np.diff([0.0, *times])


def test_poisson_arrivals_are_seeded_with_mean_gap_one_over_the_rate():
    first, again, other = arrival_times(5000, 4.0, seed=1), arrival_times(5000, 4.0, seed=1), arrival_times(5000, 4.0)
    assert first == again and first != other
    assert gaps(first).mean() == pytest.approx(1 / 4.0, rel=1e-9)  # rescaled so the last arrives at n / rate
    assert gaps(first).std() / gaps(first).mean() == pytest.approx(1.0, abs=0.05)  # exponential: CV 1
    assert all(b >= a for a, b in zip(first, first[1:]))


def test_an_infinite_rate_sends_every_request_at_once():
    assert arrival_times(5, math.inf) == [0.0] * 5


@pytest.mark.parametrize("burstiness", [0.25, 4.0])
def test_burstiness_is_the_gamma_shape_so_the_gaps_spread_as_one_over_its_root(burstiness):
    g = gaps(arrival_times(5000, 2.0, burstiness, seed=3))
    assert g.std() / g.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.1)


def test_infinite_burstiness_spaces_the_arrivals_evenly():
    assert arrival_times(4, 2.0, math.inf) == pytest.approx([0.5, 1.0, 1.5, 2.0])


def test_admission_sends_arrived_requests_in_order_while_fewer_than_max_concurrency_are_in_flight():
    admission = Admission([0.0, 0.0, 0.0, 1.0], max_concurrency=2)
    assert admission.due(0.0) == [0, 1]
    assert admission.next_arrival() == 0.0  # request 2 has arrived and waits for room
    admission.finished(0)
    assert admission.due(0.5) == [2] and admission.sent_s[2] == 0.5
    assert admission.due(1.0) == []  # request 3 has arrived, but two are in flight
    admission.finished(1)
    assert admission.due(1.2) == [3] and admission.next_arrival() is None


def test_without_max_concurrency_every_arrived_request_is_sent():
    assert Admission([0.0, 0.3, 2.0]).due(1.0) == [0, 1]


# Flags


def parse(*argv: str):
    parser = Parser(prog="bench_serving.py")
    add_serving_args(parser)
    args = parser.parse_args(argv)
    return args, check_serving_args(parser, args)


def test_the_flags_default_to_vllms():
    args, options = parse()
    assert (args.dataset_name, args.num_prompts, args.seed, args.request_rate, args.burstiness) == (
        "random", 1000, 0, math.inf, 1.0)
    assert (args.random_input_len, args.random_output_len, args.random_range_ratio) == (1024, 128, 0.0)
    assert (args.sharegpt_max_input_len, args.sharegpt_max_output_len, args.max_concurrency) == (1024, None, None)
    assert options.percentiles == (99.0,) and options.percentile_metrics == ("ttft", "tpot", "itl")
    assert options.goodput is None


def test_goodput_and_percentile_flags_are_parsed():
    _, options = parse("--goodput", "ttft:500", "tpot:50.5", "--metric-percentiles", "50,99.9",
                       "--percentile-metrics", "e2el,itl")
    assert options.goodput == {"ttft": 500.0, "tpot": 50.5}
    assert options.percentiles == (50.0, 99.9) and options.percentile_metrics == ("e2el", "itl")


@pytest.mark.parametrize("argv, message", [
    (["--goodput", "ttft=500"], "--goodput ttft=500: expected KEY:MS"),
    (["--goodput", "itl:5"], "--goodput itl:5: KEY must be one of ttft,tpot,e2el"),
    (["--goodput", "ttft:-1"], "non-negative"),
    (["--percentile-metrics", "ttft,latency"], "--percentile-metrics ttft,latency"),
    (["--metric-percentiles", "99,101"], "each in [0, 100]"),
    (["--request-rate", "0"], "--request-rate 0.0: must be positive"),
    (["--burstiness", "-1"], "--burstiness -1.0: must be positive"),
    (["--max-concurrency", "0"], "--max-concurrency 0: must be at least 1"),
    (["--num-prompts", "0"], "--num-prompts 0: must be at least 1"),
    (["--random-range-ratio", "1"], "--random-range-ratio 1.0: must be in [0, 1)"),
    (["--dataset-path", "x.json"], "the random dataset reads no file"),
    (["--dataset-name", "sharegpt", "--dataset-path", "/no/such.json"], "no such file"),
])
def test_a_bad_flag_is_one_line_and_exit_status_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse(*argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and err.count("\n") == 1


def test_the_serving_modules_import_without_torch():
    code = ("import sys; sys.path.insert(0, 'bench'); import serving_args, serving_dataset, serving_workload; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
