"""The collective of one epoch's group between device processes, on torch.distributed (gloo between
CPU devices, NCCL between GPU devices): the processes backend's half that knows torch.distributed.

Every sum a collective returns is taken by each device in member order from every member's part
(gathered, or exchanged all-to-all for a reduce-scatter), never by the library's ring, whose order
of additions depends on the group's size: processes give the thread backend's bits. Where the
shapes are known in advance (an all-reduce, an all-gather of rows) that is one gloo call per sum.
No call waits past its limit (`HeartbeatConfig.call_limit_s`): it ends with WaitStalled.
"""
from __future__ import annotations

import datetime
import io
import threading
import time
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from device_network import (POLL_S, WAIT_LIMIT_S, EpochGroup, StepAbandoned, WaitStalled, row_split, stalled,
                            sum_in_order)
from tensor_parallel_model import CPU

SEND_TAG = 7  # point-to-point messages of the Collective (KV copies), apart from any other traffic
GPU_POLL_S = 1e-4  # how often a call on a GPU is looked at (a GPU collective takes tens of microseconds)
_LEFT_BEHIND: list = []  # groups abandoned with a call in flight: destroying one would wait for that call


def collective_timeout_s(heartbeat_timeout_s: float) -> float:
    """How long forming a group may wait for its members, and gloo's own limit on any call behind
    the wait limit: a backstop far past any step's compute (the heartbeats declare a hung peer long
    before, and its group is then abandoned)."""
    return max(30.0, 10 * heartbeat_timeout_s)



def collective_backend(placement: torch.device) -> str:
    """The torch.distributed backend between devices placed there: NCCL between GPUs, else gloo."""
    return "nccl" if placement.type == "cuda" else "gloo"


def new_process_group(store: dist.Store, rank: int, size: int, timeout: datetime.timedelta,
                      placement: torch.device) -> dist.ProcessGroup:
    """One epoch's group (formed once every member has joined through `store`).

    NCCL's communicator is made non-blocking and formed at once (not at the first call): a member
    that never comes then fails the forming, and `abort()` can end a call that waits for a dead peer
    (a killed GPU peer closes no connection the survivors see: NCCL waits, and it is the heartbeats
    or the launcher that tell)."""
    if collective_backend(placement) == "gloo":
        return dist.ProcessGroupGloo(store, rank, size, timeout)
    options = dist.ProcessGroupNCCL.Options()
    options._timeout = timeout
    options.config.blocking = False
    group = dist.ProcessGroupNCCL(store, rank, size, options)
    group.eager_connect_single_device(placement)
    return group


class DistributedCollective(EpochGroup):
    """The Collective (tensor_parallel_model.py) between the processes of one epoch's group.

    The group is formed in the background from the moment the epoch is known (forming waits for
    every member), and each call waits in short slices, so that aborting the epoch (a member was
    declared dead, or a later epoch began) releases a waiting device at once instead of at the
    backend's timeout. A failed call (a peer's connection closed, a timeout) raises StepAbandoned
    and the device leaves the group: gloo tells only the members connected to a dead peer, and
    leaving closes this device's connections, so the failure reaches every member within tens of
    milliseconds (measured: 51-64 ms for a SIGKILLed member of four). A call that has not completed
    within `wait_limit_s` (a wedged peer never takes part) raises WaitStalled, and the device
    leaves the group too.

    Tensors cross on `placement`: the CPU (gloo) or the device's GPU (NCCL). On a GPU each call is
    polled until the GPU has done it, so that a call waiting for a dead peer can be abandoned (its
    communicator aborted) instead of stalling the device's stream behind it.
    """

    def __init__(self, store: dist.Store | Callable[[], dist.Store], epoch: int, members: Sequence[int], device: int,
                 timeout_s: float, on_broken: Callable[[], None] = lambda: None, placement: torch.device = CPU,
                 wait_limit_s: float = WAIT_LIMIT_S):
        super().__init__(members, epoch)
        self.placement, self.wait_limit_s = placement, wait_limit_s
        self._device, self._rank = device, self.devices.index(device)
        self._timeout = datetime.timedelta(seconds=timeout_s)  # forming, and gloo's own backstop on any call
        self._on_broken = on_broken
        self._group: dist.ProcessGroup | None = None
        self._form_error: BaseException | None = None  # what stopped the group forming, for whoever waits for it
        self._formed, self._aborted = threading.Event(), threading.Event()
        self._sending: list[tuple[dist.Work, torch.Tensor, int]] = []  # sends in flight: buffers kept alive, receiver
        connect = store if callable(store) else (lambda: store)
        threading.Thread(target=self._form, args=(connect,), name=f"epoch-{epoch}-forming", daemon=True).start()

    def _form(self, connect: Callable[[], dist.Store]) -> None:
        """Form the group; whatever stops it (a member that never came, a store out of reach) is kept
        and raised by every call on the group."""
        try:
            prefix = dist.PrefixStore(f"epoch-{self.epoch}/", connect())
            self._group = new_process_group(prefix, self._rank, len(self.devices), self._timeout, self.placement)
        except BaseException as error:  # noqa: BLE001 - raised to whoever waits for the group
            self._form_error = error
        finally:
            self._formed.set()

    # The calls of tensor_parallel_model.Collective

    def own_rows(self, device: int, length: int) -> slice:
        return row_split(self.devices.index(device), len(self.devices), length)

    def all_reduce(self, device: int, tensor: torch.Tensor) -> torch.Tensor:
        return sum_in_order(self._gather_alike(tensor, "all_reduce"))

    def reduce_scatter(self, device: int, tensor: torch.Tensor) -> torch.Tensor:
        length = tensor.shape[0]
        splits = [self._rows(d, length) for d in self.devices]
        mine = splits[self._rank]
        received = tensor.new_empty((mine * len(self.devices), *tensor.shape[1:]))
        self._call("reduce_scatter", lambda group: group.alltoall_base(
            received, tensor.contiguous(), [mine] * len(self.devices), splits, dist.AllToAllOptions()))
        return sum_in_order(received.split(mine))

    def all_gather_rows(self, device: int, rows: torch.Tensor, length: int) -> torch.Tensor:
        splits = [self._rows(d, length) for d in self.devices]
        padded = rows.new_zeros((max(splits), *rows.shape[1:]))
        padded[:rows.shape[0]] = rows
        return torch.cat([part[:n] for part, n in zip(self._gather_alike(padded, "all_gather_rows"), splits)])

    def all_gather(self, device: int, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every member's tensor, whatever its shape (the logits' vocabulary rows split unevenly:
        128256 over 7 devices): the shapes first, then the values padded to the longest. The only
        call made of two: where the shapes are known, the one-call `_gather_alike` serves."""
        shape = torch.tensor(tensor.shape, dtype=torch.int64, device=self.placement)
        shapes = self._gather_alike(shape, "all_gather")
        sizes = [int(s.prod()) for s in shapes]
        flat = tensor.new_zeros(max(sizes))
        flat[:tensor.numel()] = tensor.reshape(-1)
        parts = self._gather_alike(flat, "all_gather")
        return [part[:size].view(*s.tolist()) for part, size, s in zip(parts, sizes, shapes)]

    def _gather_alike(self, tensor: torch.Tensor, call: str) -> list[torch.Tensor]:
        """Every member's tensor of this one's shape and dtype, in member order: one gloo call."""
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in self.devices]
        self._call(call, lambda group: group.allgather([parts], [tensor]))
        return parts

    def send(self, device: int, to: int, payload: Any) -> None:
        """Start sending `payload` (its size, then its bytes) and return: a gloo send completes only
        once the receiver takes it, and every member may send before it receives (replication's ring)."""
        group = self._joined()
        self._sending = [sending for sending in self._sending if not sending[0].is_completed()]
        data = _as_bytes(payload).to(self.placement)
        size = torch.tensor([data.numel()], dtype=torch.int64, device=self.placement)
        rank = self.devices.index(to)
        self._sending += [(group.send([size], rank, SEND_TAG), size, to), (group.send([data], rank, SEND_TAG), data, to)]

    def recv(self, device: int, source: int) -> Any:
        rank, size = self.devices.index(source), torch.empty(1, dtype=torch.int64, device=self.placement)
        self._point_to_point("recv", source, lambda group: group.recv([size], rank, SEND_TAG))
        data = torch.empty(int(size.item()), dtype=torch.uint8, device=self.placement)
        self._point_to_point("recv", source, lambda group: group.recv([data], rank, SEND_TAG))
        return torch.load(io.BytesIO(data.cpu().numpy().tobytes()), map_location=self.placement, weights_only=False)

    def flush(self) -> None:
        """Wait until every send started here was taken by its receiver (before this device reports a
        command done, or leaves: a process that ends with a send in flight takes the data with it)."""
        sending, self._sending = self._sending, []
        for work, _, to in sending:
            self._point_to_point("flush", to, lambda group, work=work: work)

    # Lifetime

    def abort(self) -> None:
        """Release this device from any call it waits in (StepAbandoned); later calls fail at once."""
        self._aborted.set()

    @property
    def aborted(self) -> bool:
        return self._aborted.is_set()

    def _rows(self, device: int, length: int) -> int:
        rows = self.own_rows(device, length)
        return rows.stop - rows.start

    def _joined(self) -> dist.ProcessGroup:
        """The formed group, waiting for it as long as the epoch stands."""
        while not self._formed.wait(POLL_S):
            self.refuse_if_closed()
        self.refuse_if_closed()
        if self._form_error is not None:
            raise StepAbandoned(f"epoch {self.epoch} collective: the group could not be formed "
                                f"({_one_line(self._form_error)})") from self._form_error
        if self._group is None:
            raise StepAbandoned(f"epoch {self.epoch} collective: this device has left the group")
        return self._group

    def _call(self, call: str, start: Callable[[dist.ProcessGroup], dist.Work],
              waited_for: Sequence[int] | None = None) -> None:
        """A call, waited for in slices (an aborted epoch releases it at once) up to the wait limit."""
        work = self._start(start)
        deadline = time.monotonic() + self.wait_limit_s
        while not self._waited_slice(work):
            if self.aborted:
                self._leave(keep_alive=True)
                self.refuse_if_closed()
            if time.monotonic() >= deadline:
                self._leave(keep_alive=True)
                raise self._stalled(call, waited_for)
        self._outcome(work)

    def _waited_slice(self, work: dist.Work) -> bool:
        """Wait a slice of time for `work`: has it completed (well or not)?"""
        if self.placement.type == "cuda":
            deadline = time.monotonic() + POLL_S
            while not work.is_completed() and time.monotonic() < deadline:
                time.sleep(GPU_POLL_S)
            return work.is_completed()
        try:
            work.wait(datetime.timedelta(seconds=POLL_S))
            return True
        except RuntimeError:  # the slice ended (the call may have completed just after), or it failed
            return work.is_completed()

    def _point_to_point(self, call: str, peer: int, start: Callable[[dist.ProcessGroup], dist.Work]) -> None:
        """A send or receive. On gloo it is waited for whole, up to the wait limit: gloo closes the
        connection when a point-to-point wait times out, so it cannot be waited for in slices (nor be
        released by an abort). A dead peer fails it at once; a hung one is fenced by SIGKILL (which
        fails it too), else the wait limit ends it (WaitStalled; the group is then left). On NCCL it
        is polled as any call (an aborted epoch aborts the communicator under it)."""
        if self.placement.type == "cuda":
            self._call(call, start, [peer])
            return
        work, started = self._start(start), time.monotonic()
        try:
            work.wait(datetime.timedelta(seconds=self.wait_limit_s))
        except RuntimeError as error:
            if time.monotonic() - started < self.wait_limit_s:
                self._fail(error)
            self._leave(keep_alive=False)
            raise self._stalled(call, [peer]) from None

    def _stalled(self, call: str, waited_for: Sequence[int] | None) -> WaitStalled:
        """A wait that reached its limit: on whom (a collective waits for every other member)."""
        others = [d for d in self.devices if d != self._device] if waited_for is None else waited_for
        return stalled(self._device, others, call, self.epoch, self.wait_limit_s)

    def _start(self, start: Callable[[dist.ProcessGroup], dist.Work]) -> dist.Work:
        group = self._joined()
        try:
            return start(group)
        except RuntimeError as error:  # the group broke before this call: a peer is gone
            self._fail(error)

    def _outcome(self, work: dist.Work) -> None:
        """A completed call's own outcome: nothing, or its failure (a peer's connection closed, or gloo's
        timeout), after which this device leaves the group and looks for the dead peer."""
        try:
            work.wait()
        except RuntimeError as error:
            self._fail(error)

    def _fail(self, error: RuntimeError) -> None:
        self._leave(keep_alive=False)
        self._on_broken()
        raise StepAbandoned(f"epoch {self.epoch} collective failed: {error}") from None

    def _leave(self, keep_alive: bool) -> None:
        """Drop the group: its connections close, which tells the other members. Destroying a gloo
        group waits for a call still in flight, so that happens on a thread of its own (or never,
        while such a call may still be waiting for a hung peer). An NCCL communicator is aborted,
        which ends the calls still in flight on the GPU."""
        group, self._group = self._group, None
        self._sending = []
        if group is not None and collective_backend(self.placement) == "nccl":
            threading.Thread(target=group.abort, name="aborting-group", daemon=True).start()
        elif group is not None and keep_alive:
            _LEFT_BEHIND.append(group)
        elif group is not None:
            holder = [group]
            threading.Thread(target=holder.clear, name="leaving-group", daemon=True).start()
            del group


def _one_line(error: BaseException) -> str:
    """An error's type and the first line of its message (torch's errors run to many lines)."""
    return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"


def _as_bytes(payload: Any) -> torch.Tensor:
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
