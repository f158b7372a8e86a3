"""gpuctl.engine: fleet state, routing, slots, the fair queue, leases, wake and idle pause."""

from gpuctl.engine.api import (
    ActionResult,
    EngineMetrics,
    GpuMetrics,
    GpuState,
    GpuView,
    LeaseView,
    ModelView,
    Progress,
    ProgressCallback,
    Ticket,
    Usage,
)
from gpuctl.engine.clock import Clock, FakeClock, SystemClock, VirtualClock
from gpuctl.engine.engine import Engine, NodeFactory

__all__ = [
    "ActionResult",
    "Clock",
    "Engine",
    "EngineMetrics",
    "FakeClock",
    "GpuMetrics",
    "GpuState",
    "GpuView",
    "LeaseView",
    "ModelView",
    "NodeFactory",
    "Progress",
    "ProgressCallback",
    "SystemClock",
    "Ticket",
    "Usage",
    "VirtualClock",
]
