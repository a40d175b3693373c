"""The doctor's broker checks, one step at a time: DNS, TCP, TLS, MQTT.

Each step runs only when the one before it passed, so the first failing line
is the place to look: a name that does not resolve (DNS or the mobile link),
a port nobody answers on (broker down, firewall), a broker certificate that is
not from our CA or does not name the host (TLS), or a broker that will not
accept this gateway's certificate (no CONNACK). The TLS step verifies the
broker exactly as the agent does (agent.tls: TLS >= 1.2, our CA only, host
name checked); the MQTT step logs in with the gateway's own certificate
through `agent.mqtt.Session` and disconnects at once, publishing nothing.

The broker takes the certificate's CN as the client id, so logging in while
the agent is connected would take over the agent's session. When the agent
runs, the MQTT step therefore looks at the agent's own connection instead
(`procscan`), and logs in itself only when the agent has none.

Trust: the CA bundle is the only trust anchor, as for the agent.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID

from agent.config import Config
from agent.identity import Identity
from agent.mqtt import ConnectFailed, Session, SessionSettings
from agent.tls import client_context
from provisioning.doctor_checks import Check, Status
from provisioning.procscan import Process, connected_to_port

_X509_HOSTNAME_MISMATCH = 62
_X509_EXPIRED = 10
_X509_NOT_YET_VALID = 9
_X509_UNKNOWN_ISSUER = (2, 19, 20, 21)


def _server_only_context(ca: Path) -> ssl.SSLContext:
    """Verifies the broker like agent.tls does, without presenting a client certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_verify_locations(cafile=str(ca))
    return context


async def _dns(host: str, port: int, step_s: float) -> Check:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return Check("broker dns", Status.OK, f"{host} is an IP address: no lookup needed")
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(step_s):
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, TimeoutError) as exc:
        reason = "no answer in time" if isinstance(exc, TimeoutError) else str(exc)
        return Check(
            "broker dns",
            Status.FAIL,
            f"cannot resolve {host} ({reason})",
            "check broker.host in the config, the mobile/network link, and the DNS "
            "server (/etc/resolv.conf)",
        )
    addresses = sorted({str(info[4][0]) for info in infos})
    return Check("broker dns", Status.OK, f"{host} is {', '.join(addresses)}")


def _tcp(host: str, port: int, step_s: float) -> Check:
    try:
        socket.create_connection((host, port), timeout=step_s).close()
    except ConnectionRefusedError:
        return Check(
            "broker tcp",
            Status.FAIL,
            f"{host}:{port} refused the connection",
            "the broker is down or listens on another port: check broker.port in the "
            "config, and ask operations whether the broker is running",
        )
    except TimeoutError:
        return Check(
            "broker tcp",
            Status.FAIL,
            f"no answer from {host}:{port} within {step_s:g} s",
            f"a firewall or the network link drops the traffic: check the link and that "
            f"port {port} is open towards the broker",
        )
    except OSError as exc:
        return Check(
            "broker tcp",
            Status.FAIL,
            f"cannot connect to {host}:{port} ({exc.strerror or exc})",
            "check the network link (cable, SIM, Wi-Fi) and the route to the broker",
        )
    return Check("broker tcp", Status.OK, f"{host}:{port} accepts connections")


def _tls_failure(host: str, ca: Path, exc: ssl.SSLError) -> Check:
    if isinstance(exc, ssl.SSLCertVerificationError):
        code = exc.verify_code
        if code == _X509_HOSTNAME_MISMATCH:
            message = f"the broker's certificate does not name {host}"
            hint = "set broker.host to the name in the broker's certificate (ask operations)"
        elif code in (_X509_EXPIRED, _X509_NOT_YET_VALID):
            message = f"the broker's certificate is not valid now ({exc.verify_message})"
            hint = "check the gateway clock; if it is right, tell operations"
        elif code in _X509_UNKNOWN_ISSUER:
            message = f"the broker's certificate is not from the CA in {ca}"
            hint = "install the fleet's CA bundle as identity.ca, or check broker.host"
        else:
            message = f"the broker's certificate was refused ({exc.verify_message})"
            hint = "tell operations, with this line"
    else:
        message = f"TLS handshake failed ({exc.reason or exc})"
        hint = "check that broker.port is the broker's TLS port (usually 8883)"
    return Check("broker tls", Status.FAIL, message, hint)


def _tls(host: str, port: int, context: ssl.SSLContext, ca: Path, step_s: float) -> Check:
    try:
        with (
            socket.create_connection((host, port), timeout=step_s) as raw,
            context.wrap_socket(raw, server_hostname=host) as tls,
        ):
            version = tls.version()
            der = tls.getpeercert(binary_form=True)
    except ssl.SSLError as exc:
        return _tls_failure(host, ca, exc)
    except TimeoutError:
        return Check(
            "broker tls",
            Status.FAIL,
            f"no TLS answer from {host}:{port} within {step_s:g} s",
            "check that broker.port is the broker's TLS port (usually 8883)",
        )
    except OSError as exc:
        return Check(
            "broker tls",
            Status.FAIL,
            f"the connection broke during the TLS handshake ({exc.strerror or exc})",
            "check that broker.port is the broker's TLS port (usually 8883)",
        )
    name = "?"
    if der:
        names = x509.load_der_x509_certificate(der).subject.get_attributes_for_oid(
            NameOID.COMMON_NAME
        )
        name = str(names[0].value) if names else "?"
    return Check(
        "broker tls",
        Status.OK,
        f"{version} with the broker's certificate (CN={name}), issued by our CA, names {host}",
    )


def _agent_connection(agents: list[Process], port: int) -> Check | None:
    """The running agent's own connection, if it has one; None when we may log in."""
    for agent in agents:
        connected = connected_to_port(agent.pid, port)
        if connected:
            return Check(
                "broker mqtt",
                Status.OK,
                f"the running agent (pid {agent.pid}) is connected to the broker "
                "(not logging in as well: that would take over its session)",
            )
        if connected is None:
            return Check(
                "broker mqtt",
                Status.SKIP,
                f"the agent runs (pid {agent.pid}); cannot see its connections",
                "run the doctor as root to see whether the agent is connected",
            )
    return None


async def _mqtt(config: Config, identity: Identity, step_s: float, agents: list[Process]) -> Check:
    broker = config.broker
    if (seen := _agent_connection(agents, broker.port)) is not None:
        return seen
    settings = SessionSettings(
        host=broker.host,
        port=broker.port,
        client_id=identity.gateway_id,
        tls=client_context(identity),
        keepalive_s=broker.keepalive_s,
        connect_timeout_s=step_s,
    )
    try:
        session = await Session.open(settings)
    except ConnectFailed as exc:
        return Check(
            "broker mqtt",
            Status.FAIL,
            f"logging in as {identity.gateway_id} failed: {exc}",
            "the broker does not accept this gateway's certificate: ask operations to "
            f"check that gateway {identity.gateway_id} is registered and its certificate "
            "is from the broker's CA and not revoked",
        )
    await session.close()
    return Check(
        "broker mqtt",
        Status.OK,
        f"the broker accepted gateway {identity.gateway_id} (CONNACK) and we disconnected",
    )


async def check_broker(
    config: Config, identity: Identity | None, step_s: float, agents: list[Process]
) -> list[Check]:
    host, port, ca = config.broker.host, config.broker.port, config.identity.ca
    checks = [await _dns(host, port, step_s)]
    if checks[-1].status is Status.OK:
        checks.append(await asyncio.to_thread(_tcp, host, port, step_s))
    if checks[-1].status is Status.OK:
        try:
            context = client_context(identity) if identity else _server_only_context(ca)
        except (OSError, ssl.SSLError) as exc:
            checks.append(
                Check("broker tls", Status.FAIL, f"cannot use {ca} as the CA bundle ({exc})")
            )
        else:
            checks.append(await asyncio.to_thread(_tls, host, port, context, ca, step_s))
    if checks[-1].status is Status.OK:
        if identity is None:
            checks.append(
                Check(
                    "broker mqtt",
                    Status.SKIP,
                    "not logging in: the identity is not usable",
                    "fix the identity line above first",
                )
            )
        else:
            checks.append(await _mqtt(config, identity, step_s, agents))
    steps = ("broker dns", "broker tcp", "broker tls", "broker mqtt")
    checks.extend(
        Check(step, Status.SKIP, "not tried: the step above failed")
        for step in steps[len(checks) :]
    )
    return checks
