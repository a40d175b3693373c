"""The agent service: drivers -> spool -> packer -> uplink, as one asyncio task group.

`run_service(config)` loads the identity (refusing bad credentials before
anything else starts), opens the spool, and runs under one TaskGroup:

- one task per sensor driver, emitting readings into the spool's memory buffer;
- the committer, which makes buffered readings durable every
  `commit_interval_s` and packs full batches (or a partial one every
  `batch_interval_s`) into signed outbox messages;
- the uplink, which keeps an MQTT session up;
- the outbox sender;
- the certificate rotation (agent.rotation), which warns before the certificate
  expires and renews it in time;
- the commands (agent.commands): `cmd/health` and `ota/offer`, checked and
  rate-limited, on every session of the uplink;
- the clock watch (agent.clock), which gives held readings wall-clock times
  once the clock is trusted, and reports jumps;
- health (agent.health): signed reports on each new session and every
  `health.interval_s`, and signed events (sensor faults, a full disk, the
  clock) queued while offline;
- updates (agent.ota.task): the trial of a new release, checks of the update
  repository on an `ota/offer` hint or a timer, and the update history as events.

When the rotation has staged a renewed certificate, the service stops as for a
stop request (without telling systemd it is stopping), `adopt_staged` tries the
new credential and swaps it in if the broker accepts it, and the service starts
again with whichever credential is now installed.

When an update has switched to a new release, or a release on trial switches
back, the service stops the same way and `run_service` returns EXIT_RESTART
(75): systemd starts whichever release `current` now points to.

A stop request (SIGTERM/SIGINT, or the `stop` event in tests) ends the
drivers, commits and packs what they produced, gives the sender a bounded
time to drain the outbox while connected, publishes the retained offline
status and exits. Whatever is not acknowledged stays in the spool.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

from agent import version
from agent.backoff import Backoff
from agent.clock import TRUSTED, UNTRUSTED, WallClock, trust_floor
from agent.commands import MAX_PACKET_SIZE, Commands
from agent.config import Config
from agent.envelope import encode_senml, seal, signer_for
from agent.health import Groups, Health, report_groups
from agent.identity import Identity, load_identity
from agent.mqtt import SessionSettings
from agent.ota.flow import manager_for
from agent.ota.task import EXIT_RESTART, OtaTask
from agent.pipeline import Pipeline
from agent.rotation import Rotation, adopt_staged, recover_identity
from agent.spool import Spool, SpoolError, SpoolFull
from agent.state import Inventory, open_state
from agent.systemd import Notifier, keep_alive
from agent.tls import client_context
from agent.uplink import OutboxSender, Uplink, status_payload
from drivers import Driver, Reading, family
from drivers.ble import set_unknown_listener

log = logging.getLogger(__name__)

DRAIN_TIMEOUT_S = 5.0
#: how often the clock task looks for the wall clock being set or jumping
CLOCK_CHECK_S = 1.0
#: written to the state directory when the service stops cleanly
RUN_SUMMARY = "last-run.json"
#: small human-readable state (DESIGN.md §2): the inventory of unconfigured devices, ...
STATE_FILE = "state.json"


def _write_json(path: Path, data: Mapping[str, object]) -> None:
    """Best effort: a summary that cannot be written is logged, never fatal."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("cannot write %s: %s", path, exc)


def topics(prefix: str, gateway_id: str) -> dict[str, str]:
    base = f"{prefix}/{gateway_id}"
    return {name: f"{base}/{name}" for name in ("telemetry", "status", "health", "events")}


class Packer:
    """Builds signed telemetry messages for the spool's `pack` (sign once, store, re-send)."""

    def __init__(self, identity: Identity, topic: str) -> None:
        self._signer = signer_for(identity.key)
        self._gateway_id = identity.gateway_id
        self._topic = topic

    def __call__(self, readings: Sequence[Reading], seq: int) -> tuple[str, bytes]:
        senml = encode_senml(self._gateway_id, readings)
        message = seal(
            senml,
            signer=self._signer,
            gateway_id=self._gateway_id,
            seq=seq,
            iat=int(time.time()),
            topic=self._topic,
        )
        return self._topic, message


class Service:
    def __init__(self, config: Config, identity: Identity) -> None:
        self.config = config
        self.identity = identity
        self.boot_time = time.time()
        self.clock = WallClock(trust_floor(identity.certificate.not_valid_before_utc))
        self.topics = topics(config.broker.prefix, identity.gateway_id)
        spool_cfg = config.spool
        self.spool = Spool(
            spool_cfg.path,
            config.gateway.state_dir / f"seq-{identity.kid.hex()}",
            budget_bytes=spool_cfg.budget_bytes,
            memory_max_readings=spool_cfg.memory_max_readings,
        )
        self.packer = Packer(identity, self.topics["telemetry"])
        broker = config.broker
        settings = SessionSettings(
            host=broker.host,
            port=broker.port,
            client_id=identity.gateway_id,
            tls=client_context(identity) if broker.tls else None,
            keepalive_s=broker.keepalive_s,
            connect_timeout_s=broker.connect_timeout_s,
            inflight=broker.inflight,
            max_packet_size=MAX_PACKET_SIZE,
        )

        def status(state: str) -> bytes:
            return status_payload(
                state, gateway_id=identity.gateway_id, version=version(), boot_time=self.boot_time
            )

        self.uplink = Uplink(
            settings,
            Backoff(broker.backoff_initial_s, broker.backoff_max_s),
            status_topic=self.topics["status"],
            online=status("online"),
            offline=status("offline"),
        )
        self.sender = OutboxSender(
            self.spool,
            self.uplink,
            window=broker.inflight,
            backlog_rate=broker.backlog_messages_per_s,
        )
        self.inventory = Inventory(open_state(config.gateway.state_dir / STATE_FILE))
        self.pipeline = Pipeline(
            {s.sensor_id: s.bin for s in config.sensors if s.bin is not None},
            self.spool.add,
            clock=self.clock,
        )
        self.rotation = Rotation(
            identity,
            prefix=broker.prefix,
            sessions=self.uplink.session,
            state_dir=config.gateway.state_dir,
            enabled=config.rotation.renew and broker.tls,
            renew_at_fraction=config.rotation.renew_at_fraction,
            reply_timeout_s=config.rotation.reply_timeout_s,
        )
        self.drivers: list[Driver] = [
            family(sensor.driver).create(sensor.sensor_id, sensor.options)
            for sensor in config.sensors
        ]
        self.health = Health(
            gateway_id=identity.gateway_id,
            signer=signer_for(identity.key),
            health_topic=self.topics["health"],
            events_topic=self.topics["events"],
            interval_s=config.health.interval_s,
            events_max=config.health.events_max,
            take_seq=self.spool.take_seq,
            sources=self._health_sources,
            wall=self.clock,
        )
        self.health.watch_drivers(self.drivers)
        self.commands = Commands(
            identity.gateway_id,
            prefix=broker.prefix,
            sessions=self.uplink.session,
            on_health_request=self.health.request,
            on_ota_offer=self._ota_offer,
            on_event=self._command_event,
        )
        self.ota = OtaTask(
            manager_for(config),
            own_version=version(),
            repo=config.ota.repo,
            check_interval_s=config.ota.check_interval_s,
            report_acked=self.health.report_acked,
            event=self.health.event,
        )
        self._disk_full = False  # a disk_full event was raised and no disk_ok yet
        self._disk_error = ""

    def _ota_offer(self, offered: str) -> None:
        self.ota.offer(offered)

    def _command_event(self, kind: str, /, **fields: object) -> None:
        """A command's rejection (agent.commands) as a signed event; counts stay numbers."""
        subject = str(fields.pop("subject", "commands"))
        detail = {
            k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in fields.items()
        }
        self.health.event(kind, subject, on_sent=None, **detail)

    def _health_sources(self) -> Groups:
        """What a health report says: spool, drivers, certificate, clock, link."""
        return report_groups(
            spool=self.spool.stats(),
            drivers=self.drivers,
            cert_not_after=self.identity.not_after.timestamp(),
            clock_synced=self.clock.trusted(),
            connects=self.uplink.counters.connects,
            update_state=self.ota.state,
            now=time.time(),
        )

    def status_line(self) -> str:
        """One line for `systemctl status`: the broker link and what waits in the spool."""
        stats = self.spool.stats()
        broker = self.config.broker
        link = "connected to" if self.uplink.connected else "connecting to"
        return (
            f"{link} {broker.host}:{broker.port}; {stats.readings + stats.buffered} "
            f"reading(s) and {stats.messages} message(s) spooled"
        )

    async def run(self, stop: asyncio.Event, notifier: Notifier | None = None) -> None:
        notify = notifier or Notifier(None)
        log.info(
            "citygate %s starting as gateway %s with %d sensor(s); spool %s",
            version(),
            self.identity.gateway_id,
            len(self.drivers),
            self.config.spool.path,
        )
        previous_listener = set_unknown_listener(self._heard_unknown)
        try:
            async with asyncio.TaskGroup() as group:
                driver_tasks = [
                    group.create_task(d.run(self.pipeline), name=f"driver-{d.sensor_id}")
                    for d in self.drivers
                ]
                committer = group.create_task(self._commit_loop(), name="committer")
                clock = group.create_task(self._clock_loop(), name="clock")
                uplink = group.create_task(self.uplink.run(), name="uplink")
                sender = group.create_task(self.sender.run(), name="sender")
                watchdog = group.create_task(keep_alive(notify, self.status_line), name="watchdog")
                rotation = group.create_task(self.rotation.run(), name="rotation")
                health = group.create_task(self.health.run(self.uplink.session), name="health")
                commands = group.create_task(self.commands.run(), name="commands")
                ota = group.create_task(self.ota.run(), name="ota")
                notify.ready(self.status_line())
                await _first_set(stop, self.rotation.staged, self.ota.restart)
                if stop.is_set():
                    notify.stopping("stopping: flushing the spool")
                    log.info("stopping: flushing the spool")
                elif self.ota.restart.is_set():
                    notify.stopping("restarting into another release: flushing the spool")
                    log.info("restarting into another release: flushing the spool")
                else:  # a renewed certificate: restart with it; systemd must not see a stop
                    notify.status("switching to the renewed certificate")
                    log.info("restarting with the renewed certificate: flushing the spool")
                rotation.cancel()
                ota.cancel()
                commands.cancel()
                health.cancel()  # before the drivers: their "stopped" is no sensor fault
                for task in [*driver_tasks, committer, clock]:
                    task.cancel()
                await asyncio.gather(*driver_tasks, committer, clock, return_exceptions=True)
                self._flush()
                if self.uplink.connected:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(DRAIN_TIMEOUT_S):
                            await self.sender.drained()
                sender.cancel()
                await self.uplink.say_goodbye()
                uplink.cancel()
                watchdog.cancel()
        finally:
            set_unknown_listener(previous_listener)
            summary = self._run_summary()
            log.info(
                "stopped: %d reading(s) accepted this run; %d reading(s) and %d message(s) "
                "remain spooled",
                summary["accepted"],
                summary["spooled_readings"],
                summary["spooled_messages"],
            )
            self.spool.close()
            _write_json(self.config.gateway.state_dir / RUN_SUMMARY, summary)

    def _heard_unknown(self, address: str, kind: str, rssi: int | None) -> None:
        """A BLE sensor nobody configured: list it in the inventory for adoption."""
        self.inventory.heard(address, kind, rssi)

    def _run_summary(self) -> dict[str, int | float]:
        """What this run did, for operators (and the demo) to read after a clean stop."""
        stats = self.spool.stats()
        return {
            "boot_time": self.boot_time,
            "stop_time": time.time(),
            "accepted": self.spool.accepted,
            "published_messages": self.uplink.counters.published,
            "refused_messages": self.uplink.counters.refused,
            "spooled_readings": stats.readings + stats.buffered,
            "spooled_messages": stats.messages,
            "dropped_readings": stats.dropped_readings,
            "dropped_memory": stats.memory_dropped,
            "fill_out_of_range": sum(self.pipeline.counters.values()),
            "commands_accepted": self.commands.counters.accepted,
            "commands_rejected": sum(self.commands.counters.rejected.values()),
            "commands_dropped": self.commands.counters.dropped,
        }

    async def _commit_loop(self) -> None:
        spool_cfg = self.config.spool
        last_pack = time.monotonic()
        while True:
            await asyncio.sleep(spool_cfg.commit_interval_s)
            try:
                self.spool.commit()
                due = time.monotonic() - last_pack >= spool_cfg.batch_interval_s
                # a message's iat is the wall clock: nothing is packed until it is trusted
                if self.clock.trusted() and self.spool.pack_ready(
                    spool_cfg.batch_max_readings, self.packer, partial=due
                ):
                    self.sender.wake()
                if due:
                    last_pack = time.monotonic()
            except SpoolFull as exc:
                self._disk_error = str(exc)
            except SpoolError as exc:
                log.error("spool: %s (readings are kept in memory and retried)", exc)
            self._watch_disk()

    def _watch_disk(self) -> None:
        """One event when the disk starts refusing writes, one when it takes them again."""
        full = self.spool.disk_full
        if full == self._disk_full:
            return
        self._disk_full = full
        if full:
            self.health.event(
                "disk_full",
                "agent",
                reason=self._disk_error or "the filesystem refused a write",
                held_in_memory=float(self.spool.stats().buffered),
            )
        else:
            self.health.event("disk_ok", "agent")

    async def _clock_loop(self) -> None:
        """Give spooled boot-relative times wall time whenever the clock is (again) trusted."""
        uncorrected = True  # readings of an earlier run or boot may wait for a trusted clock
        if not self.clock.trusted():
            log.warning(
                "the wall clock is not set (it reads before %s): readings keep boot-relative "
                "times until it is",
                f"{datetime.fromtimestamp(self.clock.floor, UTC):%Y-%m-%d %H:%M:%S} UTC",
            )
        while True:
            if uncorrected and self.clock.trusted():
                uncorrected = not self._correct_times(self.clock.boot_wall_start())
            await asyncio.sleep(CLOCK_CHECK_S)
            change = self.clock.check()
            if change is None:
                continue
            if change.kind == TRUSTED:
                log.info("the wall clock was set (moved %+.1f s)", change.step_s)
                self.health.event("clock_synced", "agent", step_s=change.step_s)
                uncorrected = True
            elif change.kind == UNTRUSTED:
                log.warning(
                    "the wall clock went back %.1f s, before its trust floor: readings keep "
                    "boot-relative times until it is set",
                    -change.step_s,
                )
                self.health.event("clock_unsynced", "agent", step_s=change.step_s)
            else:
                log.warning("the wall clock jumped %+.1f s", change.step_s)
                self.health.event("clock_jumped", "agent", step_s=change.step_s)

    def _correct_times(self, boot_wall_start: float) -> bool:
        """Correct the spool's boot-relative times; False when the spool failed (retried)."""
        try:
            corrected = self.spool.correct_times(boot_wall_start)
        except SpoolError as exc:
            log.error("spool: %s (boot-relative times are corrected at the next check)", exc)
            return False
        if corrected:
            log.info("%d spooled reading(s) now have wall-clock times", corrected)
        return True

    def _flush(self) -> None:
        try:
            self.spool.commit()
            if self.clock.trusted() and self.spool.pack_ready(
                self.config.spool.batch_max_readings, self.packer, partial=True
            ):
                self.sender.wake()
        except SpoolError as exc:
            log.error("spool at shutdown: %s", exc)


async def _first_set(*events: asyncio.Event) -> None:
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


class PlaintextRefused(Exception):
    """The config asks for plaintext MQTT and the development flag was not given."""


PLAINTEXT_FLAG = "--insecure-plaintext-for-development"


def run_service(config: Config, *, allow_plaintext: bool = False) -> int:
    """Run until SIGTERM/SIGINT (0) or until an update asks for a restart (EXIT_RESTART).

    Raises IdentityError before starting anything if the identity is unfit."""
    if not config.broker.tls:
        if not allow_plaintext:
            raise PlaintextRefused(
                f"{config.source}: broker.tls = false asks for plaintext MQTT, which is refused: "
                f"set tls = true, or for a development bench start with {PLAINTEXT_FLAG}"
            )
        log.error(
            "INSECURE: plaintext MQTT to %s:%d (development flag %s); telemetry is still "
            "signed but the link is neither encrypted nor authenticated. Never in the field.",
            config.broker.host,
            config.broker.port,
            PLAINTEXT_FLAG,
        )
    paths = config.identity
    recovered = recover_identity(paths.key, paths.cert)  # a swap a power cut interrupted
    if recovered is not None:
        log.warning("%s", recovered)
    identity = load_identity(paths.key, paths.cert, paths.ca, early_clock_ok=True)

    async def main() -> int:
        current = identity
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        notifier = Notifier.from_environment()
        try:
            while True:
                service = Service(config, current)
                await service.run(stop, notifier)
                if stop.is_set():
                    return 0
                if service.ota.restart.is_set():
                    return EXIT_RESTART
                if not service.rotation.staged.is_set():
                    return 0
                current = await adopt_staged(config)
        finally:
            notifier.close()

    return asyncio.run(main())
