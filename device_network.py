"""What every backend gives the devices, and what they share: the errors a wait can end in, and how
often a waiting thread looks up.

A backend (device_threads.py: threads of one process; device_processes.py: OS processes on
torch.distributed) provides inboxes and, for each epoch, a collective among its members. The
leader (cluster_leader.py) and the devices (device_actor.py) are written against this module only,
never against a backend.
"""
from __future__ import annotations

POLL_S = 0.05  # how often a waiting thread looks at aborts, the monitor's verdicts and Ctrl-C


class StepAbandoned(Exception):
    """The step could not finish because a device of its group is gone (or the run is stopping)."""


class StaleEpoch(StepAbandoned):
    """A message or a collective call from an epoch that has ended: its sender was fenced out."""


class WaitStalled(StepAbandoned):
    """A wait saw no progress from what it waited for within its limit (`HeartbeatConfig.wait_limit_s`).

    The message names the device that waited, the device or devices it waited for, and the command
    or call it waited in: a wait never ends without saying on what."""
