"""Request state machine, queues, admission and batch formation (pure Python: ints and lists)."""

from scheduler.request import SchedRequest, ScheduledBatch, ScheduledRow, Status
from scheduler.scheduler import QueueFull, Scheduler, SchedulerConfig

__all__ = [
    "QueueFull",
    "SchedRequest",
    "ScheduledBatch",
    "ScheduledRow",
    "Scheduler",
    "SchedulerConfig",
    "Status",
]
