"""What one run of the demo is, and everything that can be refused before any work starts.

Torch-free on purpose: a mistake in the arguments, the environment or the checkpoint's
config.json is answered in a fraction of a second, before the engine (and torch) is imported.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from head_assignment import even_assignment
from heartbeat_detection import HeartbeatConfig
from llama_config import LlamaConfig
from report_files import check_writable
from request_scheduler import BlockCosts, SchedulerConfig, pool_blocks

DEFAULT_PROMPT = "The history of fault tolerance in distributed computing begins with"
DEFAULT_REPORT = Path("/tmp/kv_cache_performance_report.txt")
FAULTS = ("crash", "hang", "wedge")  # what the demo's device suffers (fault_injection.py says what each is)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}
BUDGET_FLAGS = {"max_num_batched_tokens": "--max-num-batched-tokens", "max_num_seqs": "--max-num-seqs",
                "block_size": "--block-size", "kv_cache_memory_bytes": "--kv-cache-memory-bytes"}
# The other requests' prompts with --requests N > 1 (unless --prompts-file), cycled; each is padded or cut
# to its length, spread below the first request's.
BUILT_IN_PROMPTS = (
    "A heartbeat that stops arriving is the first sign that a worker has died",
    "Tensor parallelism splits every attention layer by heads across the devices",
    "When a device fails, the key and value cache it held is lost with it",
    "Replicating state costs memory in normal running and saves time in recovery",
    "The scheduler admits waiting requests while the token budget allows",
    "Greedy decoding makes every run of the same prompt give the same tokens",
    "Paged attention stores each sequence in fixed-size blocks of positions",
)


class UsageError(Exception):
    """Arguments that cannot describe a run (the message is one line)."""


@dataclass(frozen=True)
class Options:
    model_dir: Path | None
    devices: int
    fail_device: int
    fail_after: int
    prompt: str
    context_tokens: int | None
    new_tokens: int
    reassign: str
    recovery: tuple[str, ...]
    heartbeat_interval: float
    heartbeat_timeout: float
    dtype: str
    repeats: int
    report: Path
    seed: int
    quiet: bool
    backend: str = "threads"
    detector: str = "timeout"
    phi_threshold: float = 8.0
    standby_weights: bool = False
    accelerator: str = "cpu"
    fault: str = "crash"
    requests: int = 1
    prompts_file: Path | None = None
    max_num_batched_tokens: int | None = None  # the budgets of a batch (None: SchedulerConfig's defaults)
    max_num_seqs: int | None = None
    block_size: int | None = None
    kv_cache_memory_bytes: int | None = None

    @property
    def heartbeat(self) -> HeartbeatConfig:
        return HeartbeatConfig(self.heartbeat_interval, self.heartbeat_timeout, self.detector, self.phi_threshold)

    @property
    def scheduling(self) -> SchedulerConfig:
        """The batch's budgets: those given, vLLM's defaults for the others (ValueError if one is not positive)."""
        given = {name: getattr(self, name) for name in BUDGET_FLAGS if getattr(self, name) is not None}
        return SchedulerConfig(**given)

    def to_json(self) -> dict[str, Any]:
        """The options with their real types (paths as strings, tuples as lists, absent as None)."""
        return {k: str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v
                for k, v in asdict(self).items()}


def check_options(o: Options) -> None:
    """Everything that can be refused before reading the model."""
    if o.devices < 2:
        raise UsageError(f"--devices must be at least 2 (one to fail, one to survive), got {o.devices}")
    if not 0 <= o.fail_device < o.devices:
        raise UsageError(f"--fail-device {o.fail_device} does not exist (devices are 0..{o.devices - 1})")
    if o.new_tokens < 2:
        raise UsageError(f"--new-tokens must be at least 2 (tokens before and after the failure), got {o.new_tokens}")
    if not 1 <= o.fail_after < o.new_tokens:
        raise UsageError(f"--fail-after must be between 1 and --new-tokens - 1 ({o.new_tokens - 1}), got {o.fail_after}")
    if o.context_tokens is not None and o.context_tokens < 0:
        raise UsageError(f"--context-tokens must not be negative, got {o.context_tokens}")
    if o.accelerator == "cuda" and o.backend != "processes":
        raise UsageError("--accelerator cuda needs --backend processes (one GPU per device process)")
    if o.fault not in FAULTS:
        raise UsageError(f"--fault {o.fault!r}: choose from {', '.join(FAULTS)}")
    if o.repeats < 1:
        raise UsageError(f"--repeats must be at least 1, got {o.repeats}")
    check_batch_options(o)
    try:
        o.heartbeat
    except ValueError as bad:
        raise UsageError(str(bad)) from None
    try:
        check_writable(o.report)
    except OSError as bad:
        raise UsageError(f"--report {o.report}: {bad}") from None


def check_batch_options(o: Options) -> None:
    """What --requests and the budgets can refuse on their own."""
    if o.requests < 1:
        raise UsageError(f"--requests must be at least 1, got {o.requests}")
    given = [flag for name, flag in BUDGET_FLAGS.items() if getattr(o, name) is not None]
    if o.requests == 1 and (given or o.prompts_file is not None):
        raise UsageError(f"{(given or ['--prompts-file'])[0]} needs --requests of 2 or more (one request is "
                         f"served alone, without a scheduler)")
    for name, flag in BUDGET_FLAGS.items():
        if getattr(o, name) is not None and getattr(o, name) < 1:
            raise UsageError(f"{flag} must be positive, got {getattr(o, name)}")
    if o.requests > 1:
        other_prompts(o)


def other_prompts(o: Options) -> list[str]:
    """The prompts of requests 2..N: --prompts-file's lines (blank ones skipped), else the built-in set,
    cycled to fill."""
    if o.prompts_file is None:
        lines = list(BUILT_IN_PROMPTS)
    else:
        try:
            lines = [line.strip() for line in o.prompts_file.read_text().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as bad:
            raise UsageError(f"--prompts-file {o.prompts_file}: {bad}") from None
        if not lines:
            raise UsageError(f"--prompts-file {o.prompts_file} holds no prompt (one per line)")
    return [lines[i % len(lines)] for i in range(o.requests - 1)]


def keeping(strategies: Sequence[str]) -> tuple[bool, bool]:
    """(hidden states, KV replication): what the strategies compared need kept in normal running."""
    return "reuse-hidden" in strategies, "replicate" in strategies


def check_against_model(o: Options, config: LlamaConfig, prompt_length: int) -> None:
    """What can only be refused once the config is known (and, for the length, the prompt: with many
    requests, the longest)."""
    if o.devices > config.num_attention_heads:
        raise UsageError(f"--devices {o.devices} is more than the model's {config.num_attention_heads} query heads")
    length = max(prompt_length, o.context_tokens or 0) + o.new_tokens
    if length > config.max_position_embeddings:
        raise UsageError(f"context plus new tokens ({length}) exceed the model's {config.max_position_embeddings} positions")
    if o.requests > 1:
        check_budget(o, config, length - 1)  # the last token produced is never fed back


def check_budget(o: Options, config: LlamaConfig, longest: int) -> None:
    """The KV budget must hold the longest request alone, with what the strategies keep (as the
    leader sizes its pool: cluster_leader's pool_blocks)."""
    scheduling = o.scheduling
    blocks = pool_blocks_for(o, config, *keeping(o.recovery))
    need = math.ceil(longest / scheduling.block_size)
    if blocks < need:
        raise UsageError(f"--kv-cache-memory-bytes {scheduling.kv_cache_memory_bytes} holds {blocks} KV blocks of "
                         f"{scheduling.block_size} positions per device, the longest request needs {need}")


def pool_blocks_for(o: Options, config: LlamaConfig, hidden_states: bool, replication: bool) -> int:
    """Blocks every device's pool holds before any failure, keeping what is asked (0 when none fits)."""
    scheduling = o.scheduling
    costs = BlockCosts.for_model(config, scheduling.block_size, DTYPE_BYTES[o.dtype])
    try:
        return pool_blocks(even_assignment(config, o.devices), costs, scheduling.kv_cache_memory_bytes,
                           hidden_states, replication)
    except ValueError:
        return 0
