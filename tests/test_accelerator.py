"""Devices on GPUs (`--accelerator cuda`, processes backend): every tensor a device makes lives on
its own GPU, its collectives run on NCCL, and each device process is given one GPU.

No GPU is at hand where these tests were written: the placement is proved on torch's `meta` device
(every op is watched: one that mixes a tensor made on the CPU by mistake into the device's work
fails, as it would on a GPU), the choices and refusals on the CPU, and the run itself on GPUs by
the last test, which is skipped without four.
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import execution_optimization_algorithm_demo as demo
from device_network import row_split
from device_protocol import RecoveryPolicy
from fault_injection import FailurePlan
from fault_tolerant_cluster import FaultTolerantLlama, generate_with_failures
from head_assignment import even_assignment
from heartbeat_detection import HeartbeatConfig
from kv_cache_reused import prefill_context, rebuild_from_hidden_states
from llama_model_loader import Checkpoint
from process_collective import collective_backend
from process_launcher import LaunchError, check_gpus_for, gpu_environment
from task_reassign import make_strategy
from tensor_parallel_model import (DeviceState, HiddenStateStore, device_forward, extend_shard, load_device_state,
                                   load_standby, load_vocab_slice, missing_ranges, replicate_step)

META = torch.device("meta")
PROMPT = list(range(5, 29))


class NoOpMixesDevices(TorchDispatchMode):
    """Every op runs on tensors of one device, or is a copy between devices (reading the checkpoint,
    token ids coming in). On a GPU any other mix fails; on `meta` some would pass unnoticed."""

    COPIES = (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        devices = {t.device for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.dim() > 0}
        if len(devices) > 1 and func not in self.COPIES:
            raise AssertionError(f"{func} mixes tensors on {sorted(map(str, devices))}")
        return func(*args, **(kwargs or {}))


class ShapesOnly:
    """The collective of one device computing alone on `meta`: results of the right shapes, no values
    (sends come back to the sender, as from its ring neighbour)."""

    def __init__(self, devices: tuple[int, ...]):
        self.devices, self._sent = devices, []

    def own_rows(self, device: int, length: int) -> slice:
        return row_split(self.devices.index(device), len(self.devices), length)

    def all_reduce(self, device: int, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def reduce_scatter(self, device: int, tensor: torch.Tensor) -> torch.Tensor:
        return tensor[self.own_rows(device, tensor.shape[0])]

    def all_gather_rows(self, device: int, rows: torch.Tensor, length: int) -> torch.Tensor:
        return rows.new_empty((length, *rows.shape[1:]))

    def all_gather(self, device: int, tensor: torch.Tensor) -> list[torch.Tensor]:
        return [tensor for _ in self.devices]

    def send(self, device: int, to: int, payload: object) -> None:
        self._sent.append(payload)

    def recv(self, device: int, source: int) -> object:
        return self._sent.pop(0)

    def flush(self) -> None:
        pass


def tensors_of(state: DeviceState) -> dict[str, torch.Tensor]:
    """Every tensor a device holds, by a name that says where it is."""
    found = {"kv slot of each query head": state.shard.kv_slot_of_query, "final norm": state.vocab.final_norm,
             "rope inverse frequencies": state.rotary.inv_freq, "rope cos": state.rotary.cos,
             "rope signed sin": state.rotary.signed_sin, "hidden states": state.hidden_states.x}
    for i, layer in enumerate(state.shard.layers):
        for b, block in enumerate(layer.blocks):
            for name in ("wqkv", "wo", "w_gate_up", "w_down", "input_norm", "post_norm"):
                found[f"layer {i} block {b} {name}"] = getattr(block, name)
    for block in state.vocab.blocks:
        found[f"vocabulary rows from {block.start}"] = block.embed
    for cache_name, cache in (("cache", state.cache), ("replica", state.replica)):
        for i, (k, v) in enumerate(zip(cache.k, cache.v)):
            found[f"{cache_name} layer {i} K"], found[f"{cache_name} layer {i} V"] = k, v
    return found


def test_every_tensor_a_device_makes_lives_where_its_checkpoint_is_read_onto(tiny_checkpoint):
    """Device-0 of two, read onto `meta`, through a device's whole life: a prefill split by rows, a
    decode step, its KV copy to the buddy, inheriting Device-1's heads (read, and from standby
    slices), the lost KV rebuilt from hidden states and by replay, and decoding on."""
    with NoOpMixesDevices():
        live_a_devices_life(Checkpoint(tiny_checkpoint).onto(META))


def live_a_devices_life(checkpoint: Checkpoint) -> None:
    config, before = checkpoint.config, even_assignment(checkpoint.config, 2)
    after = make_strategy("random", 0).plan(before, 1).after
    collective = ShapesOnly(before.devices)
    state = load_device_state(checkpoint, before, 0, torch.float32)
    state.hidden_states = HiddenStateStore(config.num_hidden_layers, config.hidden_size, torch.float32,
                                           device=state.placement)
    device_forward(state, torch.tensor(PROMPT), 0, collective)
    logits = device_forward(state, torch.tensor([7]), len(PROMPT), collective)
    replicate_step(state, 0, len(PROMPT) + 1, collective, buddy=1, predecessor=1)

    (standby,) = load_standby(checkpoint, before, {1: after}, 0, torch.float32)
    heads = tuple(h for h in after.heads[0] if h not in before.heads[0])
    columns = missing_ranges(after.mlp[0], before.mlp[0])
    for blocks in (None, standby.layers):
        inherited = replace(state, shard=extend_shard(state.shard, checkpoint, heads, columns, torch.float32, blocks))
    inherited.vocab = load_vocab_slice(checkpoint, after.vocab_range(0, config.vocab_size), torch.float32,
                                       held=state.vocab, standby=standby.vocab)
    lost = tuple(g for g in inherited.shard.kv_heads if g not in state.cache.kv_heads)
    inherited.cache = state.cache.regrouped(inherited.shard.kv_heads)
    rebuild_from_hidden_states(inherited, lost)
    prefill_context(replace(inherited, kv_to_fill=lost), PROMPT + [7], ShapesOnly(after.devices))
    last = device_forward(inherited, torch.tensor([9]), len(PROMPT) + 1, ShapesOnly(after.devices))

    assert lost and inherited.shard.layers[0].inherited, "the scenario inherits heads and their KV"
    made_elsewhere = {name: t.device for name, t in tensors_of(inherited).items() if t.device != META}
    assert made_elsewhere == {}
    assert logits.device == last.device == META
    assert all(t.device == META for layer in standby.layers for t in (layer.wqkv, layer.wo))


def test_collectives_run_on_nccl_between_gpus_and_on_gloo_between_cpus():
    assert collective_backend(torch.device("cuda", 0)) == "nccl"
    assert collective_backend(torch.device("cpu")) == "gloo"


def test_each_device_process_is_given_one_gpu_of_those_the_node_may_use():
    node = {"CUDA_VISIBLE_DEVICES": "3,5,6", "PATH": "/bin"}
    assert [gpu_environment(node, i)["CUDA_VISIBLE_DEVICES"] for i in range(3)] == ["3", "5", "6"]
    assert gpu_environment(node, 0)["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "0", \
        "the heartbeats and the survivors' abort handle a dead peer, not NCCL's watchdog ending the process"
    assert gpu_environment(dict(node, TORCH_NCCL_ASYNC_ERROR_HANDLING="1"), 1)["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    assert node == {"CUDA_VISIBLE_DEVICES": "3,5,6", "PATH": "/bin"}, "the launcher's own environment is untouched"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this host has a GPU")
def test_a_host_without_gpus_refuses_cuda_in_one_line():
    with pytest.raises(LaunchError, match=r"^--accelerator cuda needs a GPU per device process; torch .* here is"):
        check_gpus_for(2)


@pytest.mark.parametrize("backend, phrase", [
    ("threads", "--accelerator cuda needs --backend processes"),
    pytest.param("processes", "--accelerator cuda needs a GPU per device process",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this host has a GPU")),
])
def test_cuda_where_it_cannot_run_is_refused_in_one_line(backend, phrase, tiny_checkpoint, tmp_path, capsys):
    code = demo.main(["--model-dir", str(tiny_checkpoint), "--backend", backend, "--accelerator", "cuda",
                      "--report", str(tmp_path / "r.txt")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"error: {phrase}") and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r.txt").exists()


def test_the_python_api_refuses_cuda_on_threads(tiny):
    with pytest.raises(ValueError, match="cuda with backend='processes'"):
        FaultTolerantLlama(tiny, even_assignment(tiny.config, 2), torch.float32, accelerator="cuda")


@pytest.mark.skipif(torch.cuda.device_count() < 4, reason="needs four GPUs (NCCL: one per device process)")
def test_on_gpus_a_sigkilled_device_is_recovered_losslessly_over_nccl(tiny):
    """Four device processes on four GPUs; Device-2 is SIGKILLed after two tokens; the survivors
    abort the broken communicator, form a new one and recover from the KV copies: the tokens are the
    failure-free GPU run's, whose logits agree with the CPU's (to fp32 rounding: other kernels)."""
    assignment, heartbeat = even_assignment(tiny.config, 4), HeartbeatConfig(interval_s=0.05, timeout_s=0.5)
    with FaultTolerantLlama(tiny, assignment, torch.float32, heartbeat=heartbeat) as model:
        on_cpu = model.prefill(PROMPT)
    options = dict(heartbeat=heartbeat, backend="processes", accelerator="cuda")
    with FaultTolerantLlama(tiny, assignment, torch.float32, **options) as model:
        on_gpus = model.prefill(PROMPT)
        failure_free = model.generate(PROMPT, 6)
    with FaultTolerantLlama(tiny, assignment, torch.float32, policy=RecoveryPolicy(strategy="replicate"),
                            **options) as model:
        model.keep(False, True)
        recovered = generate_with_failures(model, PROMPT, 6, [FailurePlan(2, after_tokens=2)])
        (recovery,) = model.recoveries
    torch.testing.assert_close(on_gpus, on_cpu, rtol=1e-4, atol=1e-4)
    assert recovered == failure_free
    assert [e.device for e in recovery.events] == [2]
