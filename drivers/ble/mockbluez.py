"""A mock BlueZ on a private D-Bus system bus, for tests, demos and emulated HIL rigs.

`MockBlueZ` starts a private `dbus-daemon` with a system-bus configuration on
a socket in a temporary directory, runs python-dbusmock's `bluez5` template on
it as a subprocess (playing bluetoothd), adds an adapter, and points
`DBUS_SYSTEM_BUS_ADDRESS` at that bus while it runs, so that bleak, unchanged,
scans it as it would scan the real BlueZ. Devices are D-Bus objects under the
adapter; an "advertisement" is a PropertiesChanged of the device's
`ManufacturerData` (a{qv}), `ServiceData` (a{sv}) and `RSSI`, which is what
bluetoothd emits when it receives one.

Devices are not created with the template's `AddDevice`: it types
`ManufacturerData`/`ServiceData` as arrays, and the InterfacesAdded signal it
sends would reach a running scanner before any fix-up. `add_device` creates
the object through the generic dbusmock API with the types BlueZ uses, then
announces it with InterfacesAdded. `remove_device` goes through the adapter's
`RemoveDevice`, as a technician's `bluetoothctl remove` would.

Trust: this is test equipment; callers are trusted test code. dbus-python
(a dev dependency) is imported only when a mock is started, so importing this
module costs nothing on a gateway.

Use it as a context manager; `stop()` ends both processes and removes the
directory, and restores the environment variable.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

_log = logging.getLogger(__name__)

ENV_VAR = "DBUS_SYSTEM_BUS_ADDRESS"
BLUEZ = "org.bluez"
MOCK_IFACE = "org.freedesktop.DBus.Mock"
BLUEZ_MOCK_IFACE = "org.bluez.Mock"
ADAPTER_IFACE = "org.bluez.Adapter1"
DEVICE_IFACE = "org.bluez.Device1"
OBJECT_MANAGER_IFACE = "org.freedesktop.DBus.ObjectManager"
_BASE_UUID_TAIL = "-0000-1000-8000-00805f9b34fb"
_START_TIMEOUT_S = 10.0

_BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_type="method_call"/>
    <allow send_type="method_return"/>
    <allow send_type="error"/>
    <allow send_type="signal"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
  </policy>
</busconfig>
"""


class MockBlueZError(RuntimeError):
    """The mock could not be started or did not do what was asked."""


def full_uuid(uuid: int | str) -> str:
    """The 128-bit form BlueZ uses for a 16-bit UUID (0xFCD2 -> 0000fcd2-0000-1000-...)."""
    if isinstance(uuid, int):
        return f"{uuid:08x}{_BASE_UUID_TAIL}"
    text = uuid.lower()
    if len(text) == 4:
        return f"0000{text}{_BASE_UUID_TAIL}"
    return text


def device_path(adapter: str, address: str) -> str:
    return f"/org/bluez/{adapter}/dev_{address.upper().replace(':', '_')}"


class _Device:
    """What the harness remembers of a device, to merge advertisements as BlueZ does."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.manufacturer_data: dict[int, bytes] = {}
        self.service_data: dict[str, bytes] = {}


class MockBlueZ:
    """A private system bus with a mock bluetoothd on it; see the module docstring."""

    def __init__(self, *, adapter: str | None = "hci0", export_env: bool = True) -> None:
        """`adapter`: the adapter added at start (None: no adapter, as on a gateway whose
        dongle is missing). `export_env`: set DBUS_SYSTEM_BUS_ADDRESS in this process
        while the mock runs (and restore it on stop)."""
        self.adapter = adapter
        self.export_env = export_env
        self.bus_address = ""
        self._dir: Path | None = None
        self._daemon: subprocess.Popen[str] | None = None
        self._bluez: subprocess.Popen[bytes] | None = None
        self._bus: Any = None
        self._lock = threading.RLock()
        self._devices: dict[str, _Device] = {}
        self._saved_env: str | None = None

    # -- lifecycle -----------------------------------------------------------------------

    def __enter__(self) -> MockBlueZ:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Start the bus and the mock bluetoothd, add the adapter, export the address."""
        if self._daemon is not None:
            raise MockBlueZError("mock BlueZ already started")
        try:
            self._start_daemon()
            self.start_bluez()
        except BaseException:
            self.stop()
            raise
        if self.export_env:
            self._saved_env = os.environ.get(ENV_VAR)
            os.environ[ENV_VAR] = self.bus_address
        _log.info("mock BlueZ on %s (adapter %s)", self.bus_address, self.adapter)

    def stop(self) -> None:
        """Stop bluetoothd and the bus; nothing is left running, the directory is removed."""
        with self._lock:
            self.stop_bluez()
            if self._daemon is not None:
                _end(self._daemon)
                self._daemon = None
            if self._dir is not None:
                shutil.rmtree(self._dir, ignore_errors=True)
                self._dir = None
            if self.export_env and os.environ.get(ENV_VAR) == self.bus_address:
                if self._saved_env is None:
                    del os.environ[ENV_VAR]
                else:
                    os.environ[ENV_VAR] = self._saved_env
            self.bus_address = ""

    def environ(self) -> dict[str, str]:
        """The environment a subprocess (an agent) needs to see this bus."""
        return {ENV_VAR: self.bus_address}

    def stop_bluez(self) -> None:
        """Stop the mock bluetoothd only (the bus stays): "BlueZ is not running"."""
        with self._lock:
            if self._bus is not None:
                with contextlib.suppress(Exception):
                    self._bus.close()
                self._bus = None
            if self._bluez is not None:
                _end(self._bluez)
                self._bluez = None
            self._devices.clear()

    def start_bluez(self) -> None:
        """(Re)start the mock bluetoothd with the adapter and no devices."""
        with self._lock:
            if self._daemon is None or self._dir is None:
                raise MockBlueZError("the bus is not running")
            if self._bluez is not None:
                raise MockBlueZError("bluetoothd already running")
            env = dict(os.environ, **{ENV_VAR: self.bus_address})
            log = (self._dir / "bluetoothd.log").open("ab")
            with log:
                self._bluez = subprocess.Popen(
                    [sys.executable, "-m", "dbusmock", "--template", "bluez5", "--system"],
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                )
            dbus = _dbus()
            self._bus = dbus.bus.BusConnection(self.bus_address)
            self._wait_for_bluez()
            if self.adapter is not None:
                self.add_adapter(self.adapter)

    # -- adapters and devices ----------------------------------------------------------

    def add_adapter(self, name: str = "hci0") -> None:
        """Add a powered adapter with the LE central role (a dongle plugged in); devices
        are added to it from now on."""
        with self._lock:
            self._call("/", BLUEZ_MOCK_IFACE, "AddAdapter", name, "citygate")
            self.adapter = name

    def remove_adapter(self, name: str = "hci0") -> None:
        """Remove an adapter and its devices (a dongle pulled out)."""
        with self._lock:
            self._call("/", BLUEZ_MOCK_IFACE, "RemoveAdapterWithDevices", name)
            if name == self.adapter:
                self.adapter = None
                self._devices.clear()

    def add_device(self, address: str, name: str, *, rssi: int = -70) -> None:
        """Make a device known to BlueZ, with no advertising data yet."""
        dbus = _dbus()
        adapter = self._adapter()
        address = address.upper()
        path = device_path(adapter, address)
        props = {
            "Address": dbus.String(address),
            "AddressType": dbus.String("public"),
            "Name": dbus.String(name),
            "Alias": dbus.String(name),
            "Adapter": dbus.ObjectPath(f"/org/bluez/{adapter}"),
            "Paired": dbus.Boolean(False),
            "Bonded": dbus.Boolean(False),
            "Connected": dbus.Boolean(False),
            "Trusted": dbus.Boolean(False),
            "Blocked": dbus.Boolean(False),
            "LegacyPairing": dbus.Boolean(False),
            "ServicesResolved": dbus.Boolean(False),
            "UUIDs": dbus.Array([], signature="s"),
            "RSSI": dbus.Int16(rssi),
            "ManufacturerData": dbus.Dictionary({}, signature="qv"),
            "ServiceData": dbus.Dictionary({}, signature="sv"),
        }
        methods = [(m, "", "", "") for m in ("Connect", "Disconnect", "Pair", "CancelPairing")]
        with self._lock:
            if address in self._devices:
                raise MockBlueZError(f"device {address} already exists")
            self._call("/", MOCK_IFACE, "AddObject", path, DEVICE_IFACE, props, methods)
            added = dbus.Dictionary(
                {DEVICE_IFACE: dbus.Dictionary(props, signature="sv")}, signature="sa{sv}"
            )
            self._call(
                "/",
                MOCK_IFACE,
                "EmitSignal",
                OBJECT_MANAGER_IFACE,
                "InterfacesAdded",
                "oa{sa{sv}}",
                [dbus.ObjectPath(path), added],
            )
            self._devices[address] = _Device(name)

    def remove_device(self, address: str) -> None:
        """Remove a device (InterfacesRemoved), as BlueZ does when it forgets one."""
        dbus = _dbus()
        adapter = self._adapter()
        address = address.upper()
        with self._lock:
            self._device(address)
            path = dbus.ObjectPath(device_path(adapter, address))
            self._call(f"/org/bluez/{adapter}", ADAPTER_IFACE, "RemoveDevice", path)
            del self._devices[address]

    def has_device(self, address: str) -> bool:
        with self._lock:
            return address.upper() in self._devices

    def advertise_manufacturer(
        self, address: str, company_id: int, data: bytes, *, rssi: int | None = None
    ) -> None:
        """Deliver one advertisement carrying manufacturer data `data` for `company_id`
        (the bytes after the 2-byte company id, as bleak hands them out)."""
        dbus = _dbus()
        with self._lock:
            device = self._device(address)
            device.manufacturer_data[company_id] = bytes(data)
            value = dbus.Dictionary(
                {
                    dbus.UInt16(cid): dbus.Array(payload, signature="y")
                    for cid, payload in device.manufacturer_data.items()
                },
                signature="qv",
            )
            self._update(address, {"ManufacturerData": value}, rssi)

    def advertise_service(
        self, address: str, uuid: int | str, data: bytes, *, rssi: int | None = None
    ) -> None:
        """Deliver one advertisement carrying service data `data` for `uuid` (16-bit as an
        int such as 0xFCD2, or a UUID string; the bytes after the UUID)."""
        dbus = _dbus()
        with self._lock:
            device = self._device(address)
            device.service_data[full_uuid(uuid)] = bytes(data)
            value = dbus.Dictionary(
                {
                    dbus.String(key): dbus.Array(payload, signature="y")
                    for key, payload in device.service_data.items()
                },
                signature="sv",
            )
            self._update(address, {"ServiceData": value}, rssi)

    # -- internals ------------------------------------------------------------------------

    def _start_daemon(self) -> None:
        if shutil.which("dbus-daemon") is None:
            raise MockBlueZError("dbus-daemon not found (Debian package dbus-daemon)")
        self._dir = Path(tempfile.mkdtemp(prefix="citygate-bluez-"))
        config = self._dir / "system-bus.conf"
        config.write_text(_BUS_CONFIG.format(socket=self._dir / "system_bus_socket"))
        with (self._dir / "dbus-daemon.log").open("ab") as log:
            self._daemon = subprocess.Popen(
                [
                    "dbus-daemon",
                    f"--config-file={config}",
                    "--print-address",
                    "--nofork",
                    "--nopidfile",
                    "--nosyslog",
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )
        assert self._daemon.stdout is not None
        address = self._daemon.stdout.readline().strip()
        self._daemon.stdout.close()
        if not address:
            raise MockBlueZError(f"dbus-daemon did not start: {self._tail('dbus-daemon.log')}")
        self.bus_address = address

    def _wait_for_bluez(self) -> None:
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not self._bus.name_has_owner(BLUEZ):
            assert self._bluez is not None
            if self._bluez.poll() is not None:
                raise MockBlueZError(f"mock bluetoothd exited: {self._tail('bluetoothd.log')}")
            if time.monotonic() > deadline:
                raise MockBlueZError("mock bluetoothd did not claim org.bluez")
            time.sleep(0.01)

    def _tail(self, name: str) -> str:
        assert self._dir is not None
        with contextlib.suppress(OSError):
            return (self._dir / name).read_text(errors="replace").strip()[-2000:]
        return "(no log)"

    def _adapter(self) -> str:
        if self.adapter is None:
            raise MockBlueZError("no adapter: devices need one")
        return self.adapter

    def _device(self, address: str) -> _Device:
        try:
            return self._devices[address.upper()]
        except KeyError:
            raise MockBlueZError(f"no device {address.upper()}; add_device() first") from None

    def _update(self, address: str, props: dict[str, Any], rssi: int | None) -> None:
        dbus = _dbus()
        if rssi is not None:
            props["RSSI"] = dbus.Int16(rssi)
        path = device_path(self._adapter(), address)
        self._call(path, MOCK_IFACE, "UpdateProperties", DEVICE_IFACE, props)

    def _call(self, path: str, interface: str, method: str, *args: Any) -> Any:
        with self._lock:
            if self._bus is None:
                raise MockBlueZError("bluetoothd is not running")
            proxy = self._bus.get_object(BLUEZ, path, introspect=False)
            dbus = _dbus()
            try:
                return proxy.get_dbus_method(method, interface)(
                    *args, signature=_SIGNATURES[method]
                )
            except dbus.exceptions.DBusException as exc:
                raise MockBlueZError(f"{method} failed: {exc}") from exc


# signatures of the methods we call, so dbus-python need not introspect on every call
_SIGNATURES = {
    "AddAdapter": "ss",
    "RemoveAdapterWithDevices": "s",
    "AddObject": "ssa{sv}a(ssss)",
    "EmitSignal": "sssav",
    "RemoveDevice": "o",
    "UpdateProperties": "sa{sv}",
}


def _dbus() -> Any:
    """dbus-python, imported on first use (a dev dependency; it has no type information)."""
    import dbus  # type: ignore[import-untyped]
    import dbus.bus  # type: ignore[import-untyped]
    import dbus.exceptions  # type: ignore[import-untyped]

    return dbus


def _end(proc: subprocess.Popen[Any]) -> None:
    """Terminate a child and reap it (kill it if it ignores SIGTERM)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
