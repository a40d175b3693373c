"""Hardware-in-the-loop scenarios: the real agent on a rig of sensors, with faults injected.

A rig (rigfile) is brought up by `Rig`; the agent is watched from outside by
the `Observer` and a `ProcessProbe`; faults come from `NetProxy`,
`BrokerControl`, `Power`, `Disk`, `FakeClock` and each sensor's
`SensorFaults`. README.md explains the rig files and how to run on hardware.
"""

from hil_tests.faults import BrokerControl, Disk, FakeClock, Power
from hil_tests.netproxy import NetProxy
from hil_tests.observe import Arrival, Observer, ProcessProbe, ProcessSample, SignedPack, wait_until
from hil_tests.rig import AgentRun, Rig
from hil_tests.rigfile import RigError, RigSpec, SensorSpec, load_rig
from hil_tests.sensors import FaultUnsupported, SensorFaults

__all__ = [
    "AgentRun",
    "Arrival",
    "BrokerControl",
    "Disk",
    "FakeClock",
    "FaultUnsupported",
    "NetProxy",
    "Observer",
    "Power",
    "ProcessProbe",
    "ProcessSample",
    "Rig",
    "RigError",
    "RigSpec",
    "SensorFaults",
    "SensorSpec",
    "SignedPack",
    "load_rig",
    "wait_until",
]
