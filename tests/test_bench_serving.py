"""The serving benchmark on the tiny preset with a small random workload: one failure-free run, one
recovery strategy and abort, each with every field vLLM's `vllm bench serve` writes and the tool's
own, in strict JSON; the recovery completes every request with the failure-free outputs, abort loses
the requests in flight; the percentiles are numpy's over the requests, the Poisson arrivals seeded;
the pictures and the results file are written. The driver's client timeout is checked on a stand-in
engine. --help and bad arguments are answered before torch is imported.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "bench") not in sys.path:
    sys.path.insert(0, str(REPO / "bench"))

import bench_serving  # noqa: E402
from serving_dataset import SampleRequest  # noqa: E402
from serving_driver import serve  # noqa: E402
from serving_workload import arrival_times  # noqa: E402
from test_benchmarks import TORCH_IMPORTED, messages, run_script, strict_load  # noqa: E402

SCRIPT = "bench/bench_serving.py"
RATE, PROMPTS = 20.0, 6
VLLM_FIELDS = ("completed", "failed", "duration", "total_input_tokens", "total_output_tokens", "request_throughput",
               "request_goodput", "output_throughput", "total_token_throughput", "errors",
               *(f"{stat}_{m}_ms" for m in ("ttft", "tpot", "itl") for stat in ("mean", "median", "std", "p99")))
TOOL_FIELDS = ("strategy", "standby_weights", "outputs_differing", "near_ties", "interruption_s",
               "interruption_phases", "longest_stall_ms", "in_flight_at_failure", "in_flight_tokens_at_failure",
               "throughput_recovery_s", "ttft_requests", "itl_gaps")


@pytest.fixture(scope="module")
def result(tiny_checkpoint, tmp_path_factory) -> tuple[dict, Path]:
    folder = tmp_path_factory.mktemp("serving")
    argv = ["--model-dir", str(tiny_checkpoint), "--devices", "4", "--dataset-name", "random",
            "--num-prompts", str(PROMPTS), "--random-input-len", "16", "--random-output-len", "8",
            "--request-rate", str(RATE), "--seed", "3", "--heartbeat-interval", "0.05", "--heartbeat-timeout", "0.5",
            "--strategies", "reuse-hidden", "abort", "--fail-after-tokens", "10", "--insurance-batches", "1", "2",
            "--insurance-steps", "2", "--save-result", "--result-dir", str(folder), "--result-filename", "run.json",
            "--results", "serving", "--results-dir", str(folder / "results")]
    assert bench_serving.main(argv) == 0
    return strict_load((folder / "run.json").read_text()), folder


def runs(result) -> dict[str, dict]:
    return {run["strategy"]: run for run in result[0]["runs"]}


def test_every_run_has_vllms_fields_and_the_tools(result):
    assert list(runs(result)) == ["none", "reuse-hidden", "abort"]
    for run in runs(result).values():
        missing = [name for name in (*VLLM_FIELDS, *TOOL_FIELDS) if name not in run]
        assert not missing, f"{run['strategy']} lacks {missing}"
        assert isinstance(run["near_ties"], int)


def test_the_recovery_completes_every_request_with_the_failure_free_outputs(result):
    none, recovered = runs(result)["none"], runs(result)["reuse-hidden"]
    assert none["failed"] == recovered["failed"] == 0 and recovered["completed"] == PROMPTS
    assert recovered["defects"] == [] and recovered["outputs_differing"] == recovered["near_ties"]
    assert recovered["recovery"]["strategy"] == "reuse-hidden"
    assert recovered["interruption_s"] == pytest.approx(sum(recovered["interruption_phases"].values()))
    assert recovered["in_flight_at_failure"] >= 1 and none["interruption_s"] is None


def test_abort_fails_the_requests_in_flight(result):
    aborted = runs(result)["abort"]
    assert aborted["failed"] > 0 and aborted["completed"] + aborted["failed"] == PROMPTS
    assert aborted["recovery"]["strategy"] == "abort" and aborted["recovery"]["positions_rebuilt"] == 0
    assert {e for e in aborted["errors"] if e} == {"aborted at the failure"}


def test_percentiles_are_numpys_over_the_requests_and_the_arrivals_are_seeded(result):
    for run in runs(result).values():
        ttfts_ms = [t * 1000 for t in run["ttfts"] if t is not None]
        assert run["ttft_requests"] == len(ttfts_ms) == run["completed"]
        assert run["p99_ttft_ms"] == pytest.approx(np.percentile(ttfts_ms, 99))
        assert run["median_ttft_ms"] == pytest.approx(np.median(ttfts_ms))
        assert run["arrivals_s"] == pytest.approx(arrival_times(PROMPTS, RATE, 1.0, seed=3))


def test_the_pictures_and_the_results_file_are_written(result):
    saved, folder = result
    assert (folder / "run.throughput.png").stat().st_size > 0 and (folder / "run.requests.png").stat().st_size > 0
    text = (folder / "results" / "serving.md").read_text()
    assert "| reuse-hidden |" in text and "](../run.throughput.png)" in text
    assert saved["provenance"]["command"].startswith(f"python {SCRIPT}")
    assert [row["kept"] for row in saved["insurance"]["rows"]] == ["nothing kept", "hidden states", "replica"]
    held = {row["kept"]: row["requests_held"] for row in saved["insurance"]["rows"]}
    assert held["hidden states"] < held["replica"] < held["nothing kept"]


# --------------------------------------------------------------------------------------------
# The client's timeout, on a stand-in engine that serves one token per request per step


@dataclass
class Served:
    tokens: dict
    margins: dict
    ended: dict
    logit_scales: dict = field(default_factory=dict)
    recoveries: tuple = ()
    batch_tokens: int = 0
    waiting: int = 0


@dataclass
class StandInEngine:
    lengths: dict = field(default_factory=dict)
    made: dict = field(default_factory=dict)
    strikes: tuple = ()

    def submit(self, prompt_ids, max_new_tokens) -> int:
        self.lengths[len(self.lengths) + 1] = max_new_tokens
        self.made[len(self.made) + 1] = 0
        return len(self.lengths)

    def cancel(self, request_id) -> bool:
        return self.lengths.pop(request_id, None) is not None

    def step(self) -> Served:
        for request_id in self.lengths:
            self.made[request_id] += 1
        done = {r: "finished" for r, n in self.lengths.items() if self.made[r] == n}
        served = Served({r: 7 for r in self.lengths}, {r: 1.0 for r in self.lengths}, done,
                        {r: 10.0 for r in self.lengths}, batch_tokens=len(self.lengths))
        self.lengths = {r: n for r, n in self.lengths.items() if r not in done}
        return served


def test_a_divergence_is_a_near_tie_only_within_twice_the_bound_of_its_rows_largest_logit():
    def run(*outputs):
        return SimpleNamespace(requests=[SimpleNamespace(error=None, tokens=tokens, margins=margins,
                                                         logit_scales=scales) for tokens, margins, scales in outputs])

    baseline = run(([1, 2, 3], [5.0, 0.0019, 1.0], [9.0, 10.0, 9.0]),   # 0.0019 <= 2 x 1e-4 x 10: a near-tie
                   ([1, 2, 3], [5.0, 0.0021, 1.0], [9.0, 10.0, 9.0]),   # 0.0021 > 0.002: a defect
                   ([4, 5], [3.0, 3.0], [9.0, 9.0]))                    # the same output: not compared
    got = run(([1, 9, 9], [], []), ([1, 9, 3], [], []), ([4, 5], [], []))
    verdict = bench_serving.compare_outputs(got, baseline, 1e-4)
    assert (verdict["outputs_differing"], verdict["near_ties"]) == (2, 1)
    assert verdict["defects"] == [{"request": 1, "first_divergent_token": 1, "margin": 0.0021,
                                   "bound": pytest.approx(0.002)}]


def test_a_request_past_the_client_timeout_is_cancelled_and_failed():
    samples = [SampleRequest((1, 2), 2), SampleRequest((1, 2), 10 ** 9)]
    run = serve(StandInEngine(), samples, [0.0, 0.0], timeout_s=0.05)
    short, long = run.requests
    assert short.error is None and short.tokens == [7, 7]
    assert long.error == "timed out after 0.05 s" and long.finished_s >= 0.05


@dataclass
class PoolOfTwo:
    """A stand-in engine whose KV pool holds two requests: a third preempts the newest."""
    running: list = field(default_factory=list)

    def submit(self, prompt_ids, max_new_tokens) -> int:
        self.running.append(len(self.running) + 1)
        return self.running[-1]

    def cancel(self, request_id) -> bool:
        self.running.remove(request_id)
        return True

    def step(self) -> SimpleNamespace:
        preempted = tuple(self.running[2:])
        return SimpleNamespace(preempted=preempted, batch_tokens=min(len(self.running), 2),
                               running=min(len(self.running), 2), waiting=len(preempted))


def test_a_batch_the_kv_budget_cannot_hold_is_reported_as_not_fitting_and_its_requests_cancelled():
    from serving_insurance import break_even, decode_step_s, insurance_rows

    engine = PoolOfTwo()
    assert decode_step_s(engine, [[1, 2]], 2, steps=2, step_budget=8) is not None
    assert decode_step_s(engine, [[1, 2]], 3, steps=2, step_budget=8) is None and engine.running == []
    seconds = {"nothing kept": {1: 0.010, 8: 0.020}, "hidden states": {1: 0.011, 8: None},
               "replica": {1: 0.010, 8: 0.021}}
    rows = insurance_rows(seconds, {"nothing kept": 9, "hidden states": 1, "replica": 4})
    runs = [{"strategy": "full-recompute", "standby_weights": False, "interruption_s": 5.0},
            {"strategy": "reuse-hidden", "standby_weights": False, "interruption_s": 4.0}]
    table = bench_serving.insurance_table({"batches": [1, 8], "steps": 2, "mean_request_tokens": 100.0,
                                           "rows": rows, "break_even": break_even(rows, runs)})
    assert "| hidden states | 11.0 | does not fit | 90.9 | does not fit | 1 |" in table
    assert "| reuse-hidden | 1.00 | 327.27 | does not fit |" in table


# --------------------------------------------------------------------------------------------
# Answers before torch


def test_help_is_answered_without_importing_torch():
    done = run_script(SCRIPT, "--help")
    assert done.returncode == 0 and done.stdout.startswith("usage:")
    assert "--fail-after-tokens" in done.stdout and "not vLLM's serving" in done.stdout
    assert not TORCH_IMPORTED.search(done.stderr)


@pytest.mark.parametrize("args, phrase", [(("--fail-device", "3"), "--fail-device 3"),
                                          (("--devices", "1"), "--devices 1"),
                                          (("--request-rate", "0"), "--request-rate"),
                                          (("--fail-after-tokens", "5", "--fail-at-s", "2"), "not allowed with"),
                                          (("--model-dir", "/no/such/folder"), "no such folder")])
def test_a_bad_argument_is_one_line_and_exit_2_without_torch(args, phrase):
    done = run_script(SCRIPT, *args)
    assert done.returncode == 2
    [line] = messages(done.stderr)
    assert "error:" in line and phrase in line
    assert not TORCH_IMPORTED.search(done.stderr)
