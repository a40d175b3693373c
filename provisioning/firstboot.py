"""The cloud-init seed of one gateway, made from its checked site file. Pure: no I/O.

`render_seed(site)` returns the three files of a NoCloud seed, which a
technician copies onto the card's boot partition (images/firstboot/README.md):

- `meta-data`: the instance id (from the gateway id) and the host name.
- `network-config`: netplan v2 for NetworkManager. Ethernet (DHCP, optional)
  always; Wi-Fi as `wifis` with the country's regulatory domain and the WPA2
  key derived from the passphrase (IEEE 802.11i PBKDF2), not the passphrase:
  cloud-init logs the network config it applies (cloud-init.log, root:adm),
  and a passphrase is often used elsewhere too; the key opens this network
  only. A cellular
  modem is not here: netplan's `modems` names one modem's interface, and
  cloud-init without netplan stops at it ("No handler found for command
  'modems'", cloud-init 22.4); `user-data` writes a NetworkManager profile for
  the APN instead, which any modem that ModemManager drives will use.
- `user-data` (#cloud-config): host name, time zone, NTP; the first-boot script
  and its unit (`provisioning.firstboot_files`); the gateway config, the CA
  bundle, the update repository's TUF root (if the site ships one), the token
  and the claim certificate and key staged in a root-only directory; runcmd
  enables and starts the unit, which installs the package from the boot
  partition, writes the config, makes the key, enrolls and starts the agent,
  and repeats until it has succeeded.

The YAML is written by hand, as data: every scalar from the site file is a
double-quoted YAML string, every file a literal block.

Trust: `Site` values are checked already (`provisioning.site`). `user-data` holds
the token and the claim key, `network-config` the Wi-Fi key: `Seed` keeps them
out of its repr; the caller writes both files readable by their owner only.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from provisioning import firstboot_files as files
from provisioning.site import Cellular, Site, Wifi

SECRET_MODE = 0o600
PUBLIC_MODE = 0o644
ETHERNET = "eth0"
WIFI = "wlan0"
NTP_CLIENT = "systemd-timesyncd"  # what Raspberry Pi OS runs; nothing to install at boot
_HEX_KEY = re.compile(r"[0-9A-Fa-f]{64}")


@dataclass(frozen=True, slots=True)
class Seed:
    """The three files of a NoCloud seed, by name; the two with secrets hide them."""

    user_data: str = field(repr=False)
    network_config: str = field(repr=False)
    meta_data: str

    def files(self) -> dict[str, tuple[str, int]]:
        """name -> (text, file mode): what to write into the seed directory."""
        return {
            "user-data": (self.user_data, SECRET_MODE),
            "network-config": (self.network_config, SECRET_MODE),
            "meta-data": (self.meta_data, PUBLIC_MODE),
        }


# -- YAML, written as data -------------------------------------------------------------


def _printable(char: str) -> bool:
    """What YAML 1.1 (PyYAML, which cloud-init uses) keeps as it is inside a scalar.

    Not NEL, LS and PS (U+0085, U+2028, U+2029): YAML reads them as line breaks.
    """
    code = ord(char)
    return (
        char in "\t\n"
        or 0x20 <= code <= 0x7E
        or (0xA0 <= code <= 0xD7FF and code not in (0x2028, 0x2029))
        or 0xE000 <= code <= 0xFFFD
        or code >= 0x10000
    )


def quoted(text: str) -> str:
    """A YAML double-quoted scalar for any string."""
    out = []
    for char in text:
        if char in '"\\':
            out.append("\\" + char)
        elif char == "\n":
            out.append("\\n")
        elif char == "\t":
            out.append("\\t")
        elif not _printable(char):
            out.append(f"\\u{ord(char):04x}" if ord(char) <= 0xFFFF else f"\\U{ord(char):08x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def literal(text: str, indent: int) -> str:
    """A YAML literal block scalar (`|`) holding `text`, which ends with one newline."""
    lines = text.split("\n")
    if not text.endswith("\n") or text.endswith("\n\n") or text.startswith((" ", "\n")):
        raise ValueError("a literal block needs text that ends with one newline, not blank-led")
    if not all(_printable(char) for char in text):
        raise ValueError("a literal block cannot hold control characters")
    pad = " " * indent
    return "|\n" + "".join(f"{pad}{line}\n" if line else "\n" for line in lines[:-1])


def _flow(items: list[str]) -> str:
    return "[" + ", ".join(quoted(item) for item in items) + "]"


# -- the three files -------------------------------------------------------------------


def _meta_data(site: Site) -> str:
    return (
        f"# cloud-init meta-data for gateway {site.gateway_id} (citygate provision seed)\n"
        f"instance-id: {quoted('citygate-' + site.gateway_id)}\n"
        f"local-hostname: {quoted(site.hostname)}\n"
    )


def wpa_psk(passphrase: str, ssid: str) -> str:
    """The WPA2 pre-shared key of a passphrase (IEEE 802.11i: PBKDF2-HMAC-SHA1, 4096 rounds)."""
    if _HEX_KEY.fullmatch(passphrase):
        return passphrase.lower()  # the key itself already
    key = hashlib.pbkdf2_hmac("sha1", passphrase.encode(), ssid.encode(), 4096, 32)
    return key.hex()


def _network_config(site: Site) -> str:
    lines = [
        f"# network-config for gateway {site.gateway_id} (citygate provision seed): netplan v2,",
        "# rendered by NetworkManager. Ethernet (DHCP) works whenever a cable is plugged in.",
    ]
    if isinstance(site.network, Wifi):
        lines.append("# It holds the Wi-Fi network's WPA2 key (not its passphrase): keep it safe.")
    else:
        lines += [
            "# The cellular link is a NetworkManager profile that user-data writes",
            f"# ({files.CELLULAR_PROFILE}): netplan's `modems` is not used.",
        ]
    lines += [
        "network:",
        "  version: 2",
        "  renderer: NetworkManager",
        "  ethernets:",
        f"    {ETHERNET}:",
        "      dhcp4: true",
        "      optional: true",
    ]
    if isinstance(site.network, Wifi):
        wifi = site.network
        lines += [
            "  wifis:",
            f"    {WIFI}:",
            "      dhcp4: true",
            "      optional: true",
            f"      regulatory-domain: {quoted(wifi.country)}",
            "      access-points:",
            f"        {quoted(wifi.ssid)}:",
            f"          password: {quoted(wpa_psk(wifi.passphrase, wifi.ssid))}",
        ]
    return "\n".join(lines) + "\n"


def _keyfile_value(text: str) -> str:
    """A value in a NetworkManager keyfile (GKeyFile): backslashes escaped."""
    return text.replace("\\", "\\\\")


def cellular_profile(site: Site, cellular: Cellular) -> str:
    """The NetworkManager keyfile of the modem's connection (type gsm: any modem)."""
    profile_id = uuid.uuid5(uuid.NAMESPACE_URL, f"citygate:cellular:{site.gateway_id}")
    gsm = [f"apn={cellular.apn}"]
    if cellular.username:
        gsm.append(f"username={_keyfile_value(cellular.username)}")
    if cellular.password:
        gsm.append(f"password={_keyfile_value(cellular.password)}")
    if cellular.pin:
        gsm.append(f"pin={cellular.pin}")
    return "\n".join(
        [
            "[connection]",
            "id=citygate-cellular",
            f"uuid={profile_id}",
            "type=gsm",
            "autoconnect=true",
            "",
            "[gsm]",
            *gsm,
            "",
            "[ipv4]",
            "method=auto",
            "",
            "[ipv6]",
            "method=auto",
            "",
        ]
    )


def _write_file(path: PurePosixPath, text: str, mode: int) -> list[str]:
    return [
        f"  - path: {quoted(str(path))}",
        f"    permissions: {quoted(f'0{mode:o}')}",
        f"    content: {literal(text, 6)}".rstrip("\n"),
    ]


def _staged_files(site: Site) -> list[tuple[PurePosixPath, str, int]]:
    stage = files.STAGE_DIR
    staged = [
        (files.SCRIPT_PATH, files.script(), 0o755),
        (files.UNIT_PATH, files.unit(), PUBLIC_MODE),
        (stage / "gateway-id", site.gateway_id + "\n", PUBLIC_MODE),
        (stage / "gateway.toml", site.gateway_toml, SECRET_MODE),
        (stage / "ca.crt", site.ca_pem, PUBLIC_MODE),
        (stage / "token", site.token + "\n", SECRET_MODE),
        (stage / "claim.crt", site.claim_cert_pem, PUBLIC_MODE),
        (stage / "claim.key", site.claim_key_pem, SECRET_MODE),
    ]
    if site.enroll_port is not None:
        staged.append((stage / "enroll-port", f"{site.enroll_port}\n", PUBLIC_MODE))
    if site.update_root_json is not None:
        staged.append((stage / "update-root.json", site.update_root_json, PUBLIC_MODE))
    if isinstance(site.network, Cellular):
        staged.append((files.CELLULAR_PROFILE, cellular_profile(site, site.network), SECRET_MODE))
    return staged


def _user_data(site: Site) -> str:
    lines = [
        "#cloud-config",
        f"# citygate first boot for gateway {site.gateway_id}, from {site.source.name}",
        "# (citygate provision seed). It holds the one-time enrollment token: keep it as safe",
        "# as the token until the gateway is enrolled. images/firstboot/README.md explains it.",
        f"hostname: {quoted(site.hostname)}",
        "preserve_hostname: false",
        "manage_etc_hosts: true",
    ]
    if site.timezone:
        lines.append(f"timezone: {quoted(site.timezone)}")
    if site.ntp_servers:
        lines += [
            "ntp:",
            "  enabled: true",
            f"  ntp_client: {quoted(NTP_CLIENT)}",
            f"  servers: {_flow(list(site.ntp_servers))}",
        ]
    lines += [
        "# every boot, before write_files: the staging directory exists and is root's alone;",
        "# and a first boot that a power cut interrupted is taken up again",
        "bootcmd:",
        f"  - {_flow(['install', '-d', '-m', '0700', str(files.STAGE_DIR)])}",
        f"  - {_flow(['sh', '-c', files.resume_command()])}",
        "write_files:",
    ]
    for path, text, mode in _staged_files(site):
        lines += _write_file(path, text, mode)
    lines += [
        "# once: the unit runs the first-boot script now, and again until it has succeeded",
        "runcmd:",
        f"  - {_flow(['systemctl', 'daemon-reload'])}",
        f"  - {_flow(['systemctl', 'enable', files.UNIT_NAME])}",
        f"  - {_flow(['systemctl', 'start', '--no-block', files.UNIT_NAME])}",
    ]
    return "\n".join(lines) + "\n"


def render_seed(site: Site) -> Seed:
    """The NoCloud seed (user-data, network-config, meta-data) for the gateway of `site`."""
    return Seed(
        user_data=_user_data(site),
        network_config=_network_config(site),
        meta_data=_meta_data(site),
    )
