"""What one run of the demo is, and everything that can be refused before any work starts.

Torch-free on purpose: a mistake in the arguments, the environment or the checkpoint's
config.json is answered in a fraction of a second, before the engine (and torch) is imported.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from heartbeat_detection import HeartbeatConfig
from llama_config import LlamaConfig
from recovery_report import check_writable

DEFAULT_PROMPT = "The history of fault tolerance in distributed computing begins with"
DEFAULT_REPORT = Path("/tmp/kv_cache_performance_report.txt")
FAULTS = ("crash", "hang", "wedge")  # what the demo's device suffers (fault_injection.py says what each is)


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

    @property
    def heartbeat(self) -> HeartbeatConfig:
        return HeartbeatConfig(self.heartbeat_interval, self.heartbeat_timeout, self.detector, self.phi_threshold)

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
    try:
        o.heartbeat
    except ValueError as bad:
        raise UsageError(str(bad)) from None
    try:
        check_writable(o.report)
    except OSError as bad:
        raise UsageError(f"--report {o.report}: {bad}") from None


def check_against_model(o: Options, config: LlamaConfig, prompt_length: int) -> None:
    """What can only be refused once the config is known (and, for the length, the prompt)."""
    if o.devices > config.num_attention_heads:
        raise UsageError(f"--devices {o.devices} is more than the model's {config.num_attention_heads} query heads")
    length = max(prompt_length, o.context_tokens or 0) + o.new_tokens
    if length > config.max_position_embeddings:
        raise UsageError(f"context plus new tokens ({length}) exceed the model's {config.max_position_embeddings} positions")
