"""The first-boot seed: site files checked, cloud-init seeds made, validated and booted.

- Site files: good ones (Wi-Fi, cellular, images/firstboot/site.example.toml) give a
  seed whose gateway config the agent's own `load_config` accepts; bad ones give one
  FILE:LINE: KEY: MESSAGE line per problem, secrets never repeated.
- The seed against cloud-init (Debian package `cloud-init`, 22.4 on Debian 12):
  user-data passes `cloud-init schema --config-file`. That version has no schema for
  network-config, so the Wi-Fi network-config is rendered by netplan itself
  (`netplan generate --root-dir`, Debian package `netplan.io`) and the cellular one by
  cloud-init's own converter without netplan (`cloud-init devel net-convert`).
- The command: `citygate provision seed` through `register_seed` in process, and
  through the real command line once provisioning/cli.py registers it.
- Booted: a throw-away copy of this machine's root boots under systemd-nspawn (private
  network) with the seed as its NoCloud seed and a stand-in citygate package on
  /boot/firmware. cloud-init runs the seed; the first-boot unit installs the package,
  writes the config, makes the key and enrolls; the registrar fails once, then the power
  is cut in the middle of the second enrollment; the second boot finishes the job.
"""

from __future__ import annotations

import argparse
import configparser
import json
import os
import re
import shutil
import stat
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tuf.api.metadata import Metadata, Root

from agent.config import ConfigError, load_config
from drivers import family_names
from images.repo import Repository
from provisioning import firstboot_files
from provisioning.firstboot import literal, quoted, render_seed, wpa_psk
from provisioning.pki import LabFiles
from provisioning.seed import register_seed
from provisioning.site import (
    UPDATE_ROOT_PATH,
    Cellular,
    Site,
    Wifi,
    hostname_for,
    read_site,
)
from provisioning.tomlwrite import TomlLines
from tests.agentrig import citygate

ROOT = Path(__file__).resolve().parent.parent
SYSTEM_PYTHON = "/usr/bin/python3"
CLOUD_SCHEMA = Path("/usr/lib/python3/dist-packages/cloudinit/config/schemas")
TOKEN = "tok-3f9a1c0e7d-ONE-TIME"
PASSPHRASE = "correct horse battery"

needs_cloud_init = pytest.mark.skipif(
    shutil.which("cloud-init") is None, reason="needs cloud-init (Debian package cloud-init)"
)
needs_netplan = pytest.mark.skipif(
    shutil.which("netplan") is None, reason="needs netplan (Debian package netplan.io)"
)

WIFI_SITE = f"""\
[gateway]
id = "gw-a"
timezone = "Europe/Berlin"
ntp_servers = ["ntp1.example.city", "192.0.2.123"]

[network.wifi]
country = "DE"
ssid = "city \\"iot\\" ü"
passphrase = "{PASSPHRASE}"

[broker]
host = "mqtt.example.city"
port = 8883
ca = "ca.crt"

[enrollment]
token = "{TOKEN}"
claim_cert = "claim.crt"
claim_key = "claim.key"
port = 8884

[sensors.air_1]
driver = "pms5003"
port = "/dev/ttyAMA0"

[sensors.bin_7]
driver = "maxbotix"
port = "/dev/ttyUSB0"
model = "hrxl"
bin = {{ empty_distance_m = 1.2, full_distance_m = 0.25 }}
"""

CELLULAR_SITE = f"""\
[gateway]
id = "gw-a"
hostname = "bin-street-7"

[network.cellular]
apn = "iot.provider.example"
pin = "0042"
username = "iot"
password = 'se\\cret'

[broker]
host = "mqtt.example.city"
ca = "ca.crt"

[enrollment]
token = "{TOKEN}"
claim_cert = "claim.crt"
claim_key = "claim.key"
"""


@pytest.fixture
def site_dir(tmp_path: Path, lab: LabFiles) -> Path:
    """A directory with the CA bundle and gw-a's claim certificate and key, as operations give."""
    directory = tmp_path / "site"
    directory.mkdir()
    shutil.copy(lab.ca_cert, directory / "ca.crt")
    cert, key = lab.clients["gw-a"]
    shutil.copy(cert, directory / "claim.crt")
    shutil.copy(key, directory / "claim.key")
    other_key = lab.clients["gw-b"][1]
    shutil.copy(other_key, directory / "other.key")
    return directory


def _site(directory: Path, text: str, name: str = "site.toml") -> Path:
    path = directory / name
    path.write_text(text)
    return path


@pytest.fixture
def wifi_site(site_dir: Path) -> Site:
    return read_site(_site(site_dir, WIFI_SITE))


@pytest.fixture
def cellular_site(site_dir: Path) -> Site:
    return read_site(_site(site_dir, CELLULAR_SITE))


_LOAD_YAML = "import json, sys, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)"


def _yaml(text: str) -> Any:
    """Load YAML as cloud-init does: PyYAML's safe_load, under the system Python."""
    loaded = subprocess.run(
        [SYSTEM_PYTHON, "-c", _LOAD_YAML], input=text, capture_output=True, text=True, check=True
    )
    return json.loads(loaded.stdout)


# -- good site files --------------------------------------------------------------------


def test_a_wifi_site_gives_a_gateway_config_the_agent_accepts(
    wifi_site: Site, tmp_path: Path
) -> None:
    config_path = tmp_path / "gateway.toml"
    config_path.write_text(wifi_site.gateway_toml)
    config = load_config(config_path)
    assert config.broker.host == "mqtt.example.city"
    assert config.broker.port == 8883
    assert str(config.identity.key) == "/etc/citygate/identity/gateway.key"
    assert str(config.identity.ca) == "/etc/citygate/identity/ca.crt"
    assert [(s.sensor_id, s.driver) for s in config.sensors] == [
        ("air_1", "pms5003"),
        ("bin_7", "maxbotix"),
    ]
    bin_7 = config.sensors[1].bin
    assert bin_7 is not None
    assert (bin_7.empty_distance_m, bin_7.full_distance_m) == (1.2, 0.25)
    assert wifi_site.gateway_id == "gw-a"
    assert wifi_site.hostname == "gw-a"
    assert wifi_site.network == Wifi("DE", 'city "iot" ü', PASSPHRASE)
    assert wifi_site.ntp_servers == ("ntp1.example.city", "192.0.2.123")
    assert wifi_site.enroll_port == 8884


def test_a_cellular_site_keeps_its_apn_and_credentials(cellular_site: Site) -> None:
    assert cellular_site.network == Cellular("iot.provider.example", "0042", "iot", "se\\cret")
    assert cellular_site.hostname == "bin-street-7"
    assert cellular_site.timezone is None
    assert cellular_site.enroll_port is None


def test_the_example_site_file_is_valid(site_dir: Path) -> None:
    example = ROOT / "images/firstboot/site.example.toml"
    shutil.copy(site_dir / "ca.crt", site_dir / "city-iot-ca.crt")
    shutil.copy(site_dir / "claim.crt", site_dir / "gw-0042-claim.crt")
    shutil.copy(site_dir / "claim.key", site_dir / "gw-0042-claim.key")
    text = example.read_text().replace('id = "gw-0042"', 'id = "gw-a"')  # the lab's claim CN
    site = read_site(_site(site_dir, text))
    assert isinstance(site.network, Wifi)
    assert site.timezone == "Europe/Berlin"
    assert "[sensors.bin_7]" in site.gateway_toml


@pytest.mark.parametrize(
    ("gateway_id", "hostname"),
    [
        ("gw-a", "gw-a"),
        ("GW_a.7", "gw-a-7"),
        ("-x-", "x"),
        ("___", "citygate"),
        ("a" * 64, "a" * 63),
    ],
)
def test_a_gateway_id_makes_a_valid_host_name(gateway_id: str, hostname: str) -> None:
    assert hostname_for(gateway_id) == hostname


def test_secrets_stay_out_of_reprs(wifi_site: Site, cellular_site: Site) -> None:
    for shown in (repr(wifi_site), repr(render_seed(wifi_site)), repr(cellular_site)):
        assert TOKEN not in shown
        assert PASSPHRASE not in shown
        assert "PRIVATE KEY" not in shown
        assert "0042" not in shown.replace("gw-", "")
        assert "se\\\\cret" not in shown


# -- bad site files ------------------------------------------------------------------------

BASE = """\
[gateway]
id = "gw-a"
[network.wifi]
country = "DE"
ssid = "city-iot"
passphrase = "correct horse battery"
[broker]
host = "mqtt.example.city"
ca = "ca.crt"
[enrollment]
token = "tok-0123456789abcdef"
claim_cert = "claim.crt"
claim_key = "claim.key"
"""

BAD_SITES = {
    "missing_tables": (
        '[gateway]\nid = "gw-a"\n',
        [
            "{site}:1: network: missing required table [network]",
            "{site}:1: broker: missing required table [broker]",
            "{site}:1: enrollment: missing required table [enrollment]",
        ],
    ),
    "bad_values": (
        BASE.replace('"gw-a"', '"gw/a"')
        .replace('"DE"', '"de"')
        .replace('"correct horse battery"', '"short"')
        .replace('ca = "ca.crt"', 'port = "8883"\nca = "ca.crt"')
        .replace('"tok-0123456789abcdef"', '"has spaces in it"'),
        [
            "{site}:2: gateway.id: must be 1 to 64 characters of A-Z a-z 0-9 . _ - "
            "(it becomes the certificate's CN)",
            "{site}:4: network.wifi.country: must be the two-letter country code in capitals "
            "(ISO 3166-1) where the gateway stands, like 'DE'; got 'de'",
            "{site}:6: network.wifi.passphrase: must be 8 to 63 printable ASCII characters "
            "(WPA2-PSK), or 64 hex digits",
            "{site}:9: broker.port: expected an integer, got string",
            "{site}:12: enrollment.token: must be 8 to 1024 printable ASCII characters without "
            "spaces, as operations gave it",
            "{site}:13: enrollment.claim_cert: is the claim certificate of gateway gw-a, "
            "not of gw/a (gateway.id)",
        ],
    ),
    "both_links_unknown_keys_and_tables": (
        BASE.replace('id = "gw-a"', 'id = "gw-a"\ncolour = "blue"').replace(
            "[broker]", '[network.cellular]\napn = "iot.example"\n[broker]'
        )
        + "[extra]\nx = 1\n",
        [
            "{site}:3: gateway.colour: unknown key; expected one of: id, hostname, timezone, "
            "ntp_servers",
            "{site}:8: network.cellular: give [network.wifi] or [network.cellular], not both",
            "{site}:17: extra: unknown table; expected one of: gateway, network, broker, "
            "enrollment, ota, sensors",
        ],
    ),
    "sensor_problems_point_at_the_site_file": (
        BASE
        + '[sensors.air_1]\ndriver = "pms5003"\n'
        + '[sensors.bin_7]\ndriver = "nosuch"\n'
        + '[sensors."bad id"]\ndriver = "pms5003"\nport = "/dev/ttyS0"\n',
        [
            "{site}:14: sensors.air_1.port: missing: the serial device the sensor is wired to",
            "{site}:17: sensors.bin_7.driver: unknown driver 'nosuch'; known: {drivers}",
            '{site}:18: sensors."bad id": sensor id must be 1 to 32 characters of A-Z a-z 0-9 _ -',
        ],
    ),
    "broker_url_and_missing_ca_file": (
        BASE.replace('"mqtt.example.city"', '"mqtts://mqtt.example.city"').replace(
            '"ca.crt"', '"nowhere/ca.crt"'
        ),
        [
            "{site}:8: broker.host: expected a host name, not a URL: 'mqtts://mqtt.example.city'",
            "{site}:9: broker.ca: no such file {dir}/nowhere/ca.crt",
        ],
    ),
    "a_ca_bundle_with_a_private_key_is_refused": (
        BASE.replace(
            'ca = "ca.crt"',
            'ca = """\n-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n'
            '-----END PRIVATE KEY-----\n"""',
        ),
        [
            "{site}:9: broker.ca: holds a private key: give certificates only "
            "(a CA's key never goes on a card)",
        ],
    ),
    "a_claim_key_of_another_gateway": (
        BASE.replace('claim_key = "claim.key"', 'claim_key = "other.key"'),
        ["{site}:13: enrollment.claim_key: is not the key of claim_cert (its first certificate)"],
    ),
    "no_claim_certificate_and_no_link": (
        BASE.replace('claim_cert = "claim.crt"\n', "").replace(
            '[network.wifi]\ncountry = "DE"\nssid = "city-iot"\n'
            'passphrase = "correct horse battery"\n',
            "[network]\n",
        ),
        [
            "{site}:3: network: add a [network.wifi] or a [network.cellular] table",
            "{site}:7: enrollment.claim_cert: missing required key",
        ],
    ),
    "toml_syntax": ("[gateway\nid = 1\n", ["{site}:1: syntax: Expected ']' at the end of a table "
                                           "declaration (column 9)"]),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD_SITES))
def test_a_bad_site_file_names_file_line_and_key_of_every_problem(
    case: str, site_dir: Path
) -> None:
    text, expected = BAD_SITES[case]
    path = _site(site_dir, text)
    with pytest.raises(ConfigError) as raised:
        read_site(path)
    drivers = ", ".join(family_names())
    wanted = [line.format(site=path, dir=site_dir, drivers=drivers) for line in expected]
    assert str(raised.value).splitlines() == wanted
    assert "short" not in str(raised.value)  # the bad passphrase is not repeated
    assert "has spaces in it" not in str(raised.value)  # nor the bad token


def test_a_missing_site_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as raised:
        read_site(tmp_path / "nope.toml")
    assert str(raised.value) == f"{tmp_path / 'nope.toml'}:0: file: no such file"


# -- the update repository and its trusted root ----------------------------------------------

OTA_TABLE = """
[ota]
repo = "https://updates.example.city/citygate"
trusted_root = "update/metadata/1.root.json"
channel = "beta"
hardware = "rpi4"
"""


@pytest.fixture
def update_repo(site_dir: Path) -> Path:
    """A real TUF repository (images.repo) in the site directory, as operations would give it."""
    Repository.create(site_dir / "update")
    return site_dir / "update"


def test_a_site_with_an_update_repository_ships_its_root_and_names_it_in_the_config(
    site_dir: Path, update_repo: Path, tmp_path: Path
) -> None:
    site = read_site(_site(site_dir, BASE + OTA_TABLE))
    shipped = (update_repo / "metadata/1.root.json").read_text()
    assert site.update_root_json == shipped.rstrip("\n") + "\n"
    config_path = tmp_path / "gateway.toml"
    config_path.write_text(site.gateway_toml)
    ota = load_config(config_path).ota
    assert ota.repo == "https://updates.example.city/citygate"
    assert ota.trusted_root == UPDATE_ROOT_PATH == Path("/etc/citygate/update-root.json")
    assert (ota.channel, ota.hardware) == ("beta", "rpi4")
    # what the gateway's TUF client bootstraps from: the shipped text loads as trusted root
    assert Metadata[Root].from_bytes(site.update_root_json.encode()).signed.version == 1


def test_a_site_without_an_update_repository_ships_no_root(wifi_site: Site) -> None:
    assert wifi_site.update_root_json is None
    assert "[ota]" not in wifi_site.gateway_toml


@needs_cloud_init
def test_user_data_stages_the_update_root_public_for_the_first_boot_script(
    site_dir: Path, update_repo: Path
) -> None:
    site = read_site(_site(site_dir, BASE + OTA_TABLE))
    user_data = _yaml(render_seed(site).user_data)
    files = {entry["path"]: entry for entry in user_data["write_files"]}
    staged = files[f"{firstboot_files.STAGE_DIR}/update-root.json"]
    assert (staged["permissions"], staged["content"]) == ("0644", site.update_root_json)
    script = firstboot_files.script()
    assert f"UPDATE_ROOT={UPDATE_ROOT_PATH}\n" in script
    assert 'install -o root -g root -m 0644 "$STAGE/update-root.json"' in script


def _tampered_root(repo: Path) -> str:
    """1.root.json with a changed expiry: no longer the text its root keys signed."""
    document = json.loads((repo / "metadata/1.root.json").read_text())
    document["signed"]["expires"] = "2099-01-01T00:00:00Z"
    (repo / "tampered.root.json").write_text(json.dumps(document))
    return "update/tampered.root.json"


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("no_root", "{site}:16: ota.repo: needs trusted_root: the repository's TUF root metadata "
         "(metadata/1.root.json from `python -m images.repo init`), which the gateway starts "
         "trusting from"),
        ("targets", "{site}:17: ota.trusted_root: {dir}/update/metadata/1.targets.json is targets "
         "metadata; give the repository's root metadata (metadata/N.root.json)"),
        ("tampered", "{site}:17: ota.trusted_root: {dir}/update/tampered.root.json is not signed "
         "by a threshold of its own root keys: root was signed by 0/2 keys"),
        ("pem", "{site}:17: ota.trusted_root: {dir}/ca.crt is not TUF metadata ("),
        ("http", "{site}:16: ota.repo: expected an https:// URL or an absolute directory, got "
         "'http://updates.example.city/citygate'"),
    ],
)  # fmt: skip
def test_a_bad_update_repository_or_root_names_the_site_line(
    case: str, expected: str, site_dir: Path, update_repo: Path
) -> None:
    root = "update/metadata/1.root.json"
    table = {
        "no_root": OTA_TABLE.replace(f'trusted_root = "{root}"\n', ""),
        "targets": OTA_TABLE.replace(root, "update/metadata/1.targets.json"),
        "tampered": OTA_TABLE.replace(root, _tampered_root(update_repo)),
        "pem": OTA_TABLE.replace(root, "ca.crt"),
        "http": OTA_TABLE.replace("https://", "http://"),
    }[case]
    path = _site(site_dir, BASE + table)
    with pytest.raises(ConfigError) as raised:
        read_site(path)
    (line,) = str(raised.value).splitlines()
    assert line.startswith(expected.format(site=path, dir=site_dir)), line


# -- what the seed holds ------------------------------------------------------------------


def test_meta_data_names_the_instance_and_the_host_after_the_gateway(
    cellular_site: Site,
) -> None:
    lines = render_seed(cellular_site).meta_data.splitlines()
    assert 'instance-id: "citygate-gw-a"' in lines
    assert 'local-hostname: "bin-street-7"' in lines


@needs_cloud_init
def test_user_data_stages_every_file_root_only_and_runs_the_unit(wifi_site: Site) -> None:
    user_data = _yaml(render_seed(wifi_site).user_data)
    stage = str(firstboot_files.STAGE_DIR)
    files = {entry["path"]: entry for entry in user_data["write_files"]}
    assert {path: entry["permissions"] for path, entry in files.items()} == {
        "/usr/local/sbin/citygate-firstboot": "0755",
        "/etc/systemd/system/citygate-firstboot.service": "0644",
        f"{stage}/gateway-id": "0644",
        f"{stage}/gateway.toml": "0600",
        f"{stage}/ca.crt": "0644",
        f"{stage}/token": "0600",
        f"{stage}/claim.crt": "0644",
        f"{stage}/claim.key": "0600",
        f"{stage}/enroll-port": "0644",
    }
    assert files[f"{stage}/token"]["content"] == TOKEN + "\n"
    assert files[f"{stage}/gateway.toml"]["content"] == wifi_site.gateway_toml
    assert files[f"{stage}/ca.crt"]["content"] == wifi_site.ca_pem
    assert files[f"{stage}/claim.key"]["content"] == wifi_site.claim_key_pem
    assert files[f"{stage}/enroll-port"]["content"] == "8884\n"
    assert files["/usr/local/sbin/citygate-firstboot"]["content"] == firstboot_files.script()
    assert files["/etc/systemd/system/citygate-firstboot.service"]["content"] == (
        firstboot_files.unit()
    )
    # the stage directory is root's alone before write_files puts the token in it
    assert user_data["bootcmd"][0] == ["install", "-d", "-m", "0700", stage]
    assert user_data["runcmd"] == [
        ["systemctl", "daemon-reload"],
        ["systemctl", "enable", "citygate-firstboot.service"],
        ["systemctl", "start", "--no-block", "citygate-firstboot.service"],
    ]
    assert (user_data["hostname"], user_data["timezone"]) == ("gw-a", "Europe/Berlin")
    assert user_data["ntp"]["servers"] == ["ntp1.example.city", "192.0.2.123"]
    assert TOKEN not in json.dumps(user_data["runcmd"] + user_data["bootcmd"])


def _cloud_config_keys() -> set[str]:
    """Every top-level key some module of the installed cloud-init's schema defines."""
    schema = json.loads((CLOUD_SCHEMA / "schema-cloud-config-v1.json").read_text())
    keys: set[str] = set()
    for definition in schema["$defs"].values():
        keys.update(definition.get("properties", {}))
    return keys


@needs_cloud_init
@pytest.mark.parametrize("kind", ["wifi", "cellular"])
def test_every_user_data_key_belongs_to_a_cloud_init_module(
    kind: str, wifi_site: Site, cellular_site: Site
) -> None:
    # cloud-init 22.4's schema lets unknown top-level keys pass: a typo would be ignored
    site = wifi_site if kind == "wifi" else cellular_site
    keys = set(_yaml(render_seed(site).user_data))
    assert keys - _cloud_config_keys() == set()


def _schema(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["cloud-init", "schema", "--config-file", str(path)],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip


@pytest.mark.integration
@needs_cloud_init
@pytest.mark.parametrize("kind", ["wifi", "cellular"])
def test_cloud_init_accepts_the_user_data(
    kind: str, wifi_site: Site, cellular_site: Site, tmp_path: Path
) -> None:
    site = wifi_site if kind == "wifi" else cellular_site
    path = tmp_path / "user-data"
    path.write_text(render_seed(site).user_data)
    result = _schema(path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Valid cloud-config" in result.stdout


@pytest.mark.integration
@needs_cloud_init
def test_the_schema_check_would_catch_a_broken_user_data(wifi_site: Site, tmp_path: Path) -> None:
    broken = render_seed(wifi_site).user_data.replace('permissions: "0600"', "permissions: [6]", 1)
    path = tmp_path / "user-data"
    path.write_text(broken)
    result = _schema(path)
    assert result.returncode != 0
    assert "permissions" in result.stdout + result.stderr


@pytest.mark.integration
@needs_netplan
def test_netplan_renders_the_wifi_network_config_for_network_manager(
    wifi_site: Site, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    (root / "etc/netplan").mkdir(parents=True)
    config = root / "etc/netplan/50-cloud-init.yaml"
    config.write_text(render_seed(wifi_site).network_config)
    config.chmod(0o600)
    result = subprocess.run(
        ["netplan", "generate", "--root-dir", str(root)],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    connections = root / "run/NetworkManager/system-connections"
    wifi = configparser.ConfigParser(interpolation=None)
    wifi.read(next(connections.glob("netplan-wlan0-*.nmconnection")), encoding="utf-8")
    assert wifi["connection"]["type"] == "wifi"
    assert wifi["wifi"]["ssid"] == 'city "iot" ü'
    assert wifi["wifi-security"]["key-mgmt"] == "wpa-psk"
    assert wifi["wifi-security"]["psk"] == wpa_psk(PASSPHRASE, 'city "iot" ü')
    assert (connections / "netplan-eth0.nmconnection").exists()
    regdom = (root / "run/systemd/system/netplan-regdom.service").read_text()
    assert "DE" in regdom


@pytest.mark.integration
@needs_cloud_init
def test_cloud_init_without_netplan_reads_the_cellular_network_config(
    cellular_site: Site, tmp_path: Path
) -> None:
    # netplan's `modems` would stop this converter; the seed uses a NetworkManager profile
    source = tmp_path / "network-config"
    source.write_text(render_seed(cellular_site).network_config)
    assert "modems" not in _yaml(source.read_text())["network"]
    result = subprocess.run(
        ["cloud-init", "devel", "net-convert", "--network-data", str(source), "--kind", "yaml",
         "--distro", "debian", "--output-kind", "network-manager", "--directory",
         str(tmp_path / "out")],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rendered = list((tmp_path / "out").rglob("*.nmconnection"))
    assert [path.name for path in rendered] == ["cloud-init-eth0.nmconnection"]


@needs_cloud_init
def test_the_cellular_seed_writes_a_network_manager_profile_for_any_modem(
    cellular_site: Site,
) -> None:
    user_data = _yaml(render_seed(cellular_site).user_data)
    files = {entry["path"]: entry for entry in user_data["write_files"]}
    entry = files[str(firstboot_files.CELLULAR_PROFILE)]
    assert entry["permissions"] == "0600"  # NetworkManager ignores a profile others can read
    profile = configparser.ConfigParser(interpolation=None)
    profile.read_string(entry["content"])
    assert profile["connection"]["type"] == "gsm"
    assert "interface-name" not in profile["connection"]  # whichever modem ModemManager finds
    assert dict(profile["gsm"]) == {
        "apn": "iot.provider.example",
        "username": "iot",
        "password": "se\\\\cret",  # GKeyFile escapes the backslash
        "pin": "0042",
    }


@pytest.mark.parametrize(
    ("passphrase", "ssid", "psk"),
    [  # IEEE 802.11i-2004, Annex H.4 (the passphrase-to-PSK test vectors)
        ("password", "IEEE", "f42c6fc52df0ebef9ebb4b90b38a5f902e83fe1b135a70e23aed762e9710a12e"),
        ("ThisIsAPassword", "ThisIsASSID",
         "0dc0d6eb90555ed6419756b9a15ec3e3209b63df707dd508d14581f8982721af"),
        ("0DC0D6EB90555ED6419756B9A15EC3E3209B63DF707DD508D14581F8982721AF", "any",
         "0dc0d6eb90555ed6419756b9a15ec3e3209b63df707dd508d14581f8982721af"),
    ],
)  # fmt: skip
def test_the_wifi_key_on_the_card_is_the_wpa2_psk_not_the_passphrase(
    passphrase: str, ssid: str, psk: str
) -> None:
    assert wpa_psk(passphrase, ssid) == psk


def test_the_network_config_holds_the_wifi_key_but_not_the_passphrase(wifi_site: Site) -> None:
    network_config = render_seed(wifi_site).network_config
    assert wpa_psk(PASSPHRASE, 'city "iot" ü') in network_config
    assert PASSPHRASE not in network_config
    assert PASSPHRASE not in render_seed(wifi_site).user_data


def test_yaml_scalars_are_quoted_so_cloud_init_reads_them_back() -> None:
    awkward = [
        "", "yes", "0700", "~", "- item", "key: value", "#not a comment", "*anchor", "tab\there",
        'say "hi"', "back\\slash", "line\nbreak", "del\x7f", "nel\x85", "bom\ufeff", "emoji 😀",
        "ssid ü", "\u2028", "\x00",
    ]  # fmt: skip
    document = "".join(f"- {quoted(text)}\n" for text in awkward)
    if shutil.which("cloud-init") is None:
        pytest.skip("needs PyYAML of the system Python (a dependency of cloud-init)")
    assert _yaml(document) == awkward


def test_literal_blocks_refuse_text_they_cannot_hold() -> None:
    assert literal("a\n\nb\n", 2) == "|\n  a\n\n  b\n"
    for text in ("no newline", "two newlines\n\n", " leading space\n", "bell\a\n"):
        with pytest.raises(ValueError, match="literal block"):
            literal(text, 2)


_TOML_SCALARS = (
    st.text()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False)
    | st.booleans()
)
_TOML_VALUES = st.recursive(
    _TOML_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


@given(st.dictionaries(st.text(min_size=1), _TOML_VALUES, max_size=6))
def test_sensor_tables_copied_into_the_gateway_config_keep_their_values(
    table: dict[str, object],
) -> None:
    out = TomlLines()
    out.table(("sensors", "s 1"))
    for key, value in table.items():
        out.value(("sensors", "s 1", key), value)
    assert tomllib.loads(out.text()) == {"sensors": {"s 1": table}}


def test_the_first_boot_script_passes_shellcheck(tmp_path: Path) -> None:
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed")
    script = tmp_path / "citygate-firstboot"
    script.write_text(firstboot_files.script())
    result = subprocess.run(
        ["shellcheck", "--shell=sh", str(script)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout


def test_the_first_boot_script_never_echoes_the_token() -> None:
    lines = firstboot_files.script().splitlines()
    printing = [line for line in lines if re.search(r"\b(say|echo|printf|report|fail)\b", line)]
    assert printing
    assert not [line for line in printing if "token" in line and "$token" in line]
    assert "set -x" not in firstboot_files.script()


# -- the command -----------------------------------------------------------------------------


def _seed_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="citygate provision")
    register_seed(parser.add_subparsers(dest="action", required=True))
    return parser


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_provision_seed_writes_the_seed_with_secrets_owner_only(
    site_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site = _site(site_dir, WIFI_SITE)
    deb = tmp_path / "citygate_0.1.0_arm64.deb"
    deb.write_bytes(b"!<arch>\n")
    out = tmp_path / "seed"
    args = _seed_parser().parse_args(["seed", str(site), "--out", str(out), "--deb", str(deb)])
    assert args.handler(args) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["user-data", "network-config", "meta-data", deb.name]
    )
    assert (_mode(out / "user-data"), _mode(out / "network-config")) == (0o600, 0o600)
    assert _mode(out / "meta-data") == 0o644
    assert (out / "user-data").read_text() == render_seed(read_site(site)).user_data
    printed = capsys.readouterr()
    assert "gw-a" in printed.out
    assert TOKEN not in printed.out + printed.err
    assert PASSPHRASE not in printed.out + printed.err


def test_provision_seed_replaces_existing_seed_files_only_when_forced(
    site_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site = _site(site_dir, WIFI_SITE)
    out = tmp_path / "bootfs"
    out.mkdir()
    (out / "user-data").write_text("#cloud-config\n# the image's own\n")
    args = _seed_parser().parse_args(["seed", str(site), "--out", str(out)])
    assert args.handler(args) == 1
    assert "already holds user-data: pass --force" in capsys.readouterr().err
    assert (out / "user-data").read_text() == "#cloud-config\n# the image's own\n"
    forced = _seed_parser().parse_args(["seed", str(site), "--out", str(out), "--force"])
    assert forced.handler(forced) == 0
    assert (out / "user-data").read_text().startswith("#cloud-config\n# citygate first boot")


def test_provision_seed_refuses_a_package_the_gateway_would_not_find(
    site_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site = _site(site_dir, WIFI_SITE)
    deb = tmp_path / "citygate.deb"
    deb.write_bytes(b"!<arch>\n")
    args = _seed_parser().parse_args(
        ["seed", str(site), "--out", str(tmp_path / "seed"), "--deb", str(deb)]
    )
    assert args.handler(args) == 1
    assert "citygate_<version>_<arch>.deb" in capsys.readouterr().err


def test_provision_seed_writes_nothing_for_a_bad_site_file(site_dir: Path, tmp_path: Path) -> None:
    site = _site(site_dir, BASE.replace('"DE"', '"de"'))
    out = tmp_path / "seed"
    args = _seed_parser().parse_args(["seed", str(site), "--out", str(out)])
    with pytest.raises(ConfigError, match=r"network\.wifi\.country"):
        args.handler(args)
    assert not out.exists()


_WIRED = "register_seed" in (ROOT / "provisioning/cli.py").read_text()
needs_wiring = pytest.mark.skipif(
    not _WIRED, reason="`citygate provision seed` is not registered in provisioning/cli.py yet"
)


@pytest.mark.integration
@needs_wiring
def test_citygate_provision_seed_on_the_command_line(site_dir: Path, tmp_path: Path) -> None:
    site = _site(site_dir, WIFI_SITE)
    out = tmp_path / "seed"
    result = citygate("provision", "seed", str(site), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert (out / "user-data").read_text() == render_seed(read_site(site)).user_data
    assert TOKEN not in result.stdout + result.stderr

    bad = _site(site_dir, BASE.replace('"DE"', '"de"'), name="bad.toml")
    failed = citygate("provision", "seed", str(bad), "--out", str(tmp_path / "other"))
    assert failed.returncode == 1
    assert failed.stderr.splitlines() == [
        f"{bad}:4: network.wifi.country: must be the two-letter country code in capitals "
        "(ISO 3166-1) where the gateway stands, like 'DE'; got 'de'"
    ]


# -- booted: cloud-init runs the seed under systemd --------------------------------------------

needs_boot = pytest.mark.skipif(
    os.geteuid() != 0
    or shutil.which("unshare") is None
    or shutil.which("systemd-nspawn") is None
    or shutil.which("cloud-init") is None
    or shutil.which("dpkg-deb") is None,
    reason="booting a throw-away root needs root, unshare, systemd-nspawn, cloud-init, dpkg-deb",
)

#: the stand-in for the citygate command: records what the first-boot script asks of it
_STUB_CITYGATE = r"""#!/bin/sh
set -eu
log=/var/log/citygate-stub.log
case "$1 ${2:-}" in
"provision keygen")
    echo "keygen $*" >> "$log"
    umask 077
    echo "stand-in key" > /etc/citygate/identity/gateway.key
    chown citygate:citygate /etc/citygate/identity/gateway.key
    ;;
"provision enroll")
    shift 2
    n=$(( $(cat /var/lib/citygate-stub.enrolls 2>/dev/null || echo 0) + 1 ))
    echo "$n" > /var/lib/citygate-stub.enrolls
    sync
    args=""
    while [ $# -gt 0 ]; do
        case $1 in
        --token) printf '%s\n' "$2" > "/out/token-seen-$n"; args="$args --token <hidden>"; shift ;;
        *) args="$args $1" ;;
        esac
        shift
    done
    echo "enroll $n:$args" >> "$log"
    case $n in
    1) echo "no answer from the registrar" >&2; exit 1 ;;
    2)  # the power cut, in the middle of it (in a container, reboot(2) returns: wait for the end)
        sync
        systemctl poweroff --force --force
        sleep 60
        exit 1
        ;;
    *) echo "stand-in certificate" > /etc/citygate/identity/gateway.crt ;;
    esac
    ;;
"run --config") exec sleep infinity ;;
*) echo "unexpected: $*" >> "$log"; exit 2 ;;
esac
"""

_STUB_POSTINST = r"""#!/bin/sh
set -e
if [ "$1" = configure ]; then
    getent passwd citygate > /dev/null ||
        adduser --quiet --system --group --no-create-home --home /var/lib/citygate citygate
    install -d -o citygate -g citygate -m 0700 /etc/citygate/identity
fi
"""

_STUB_UNIT = """\
[Unit]
Description=stand-in for the citygate agent
[Service]
User=citygate
ExecStart=/usr/bin/citygate run --config /etc/citygate/gateway.toml
[Install]
WantedBy=multi-user.target
"""

#: in the booted root: wait for the first boot to finish, note what is there, power off
_RUNNER = r"""#!/bin/sh
out=/out
i=0
while [ ! -e /var/lib/citygate-firstboot/done ] && [ "$i" -lt 900 ]; do
    sleep 0.2; i=$((i + 1))
done
while systemctl -q is-active citygate-firstboot.service && [ "$i" -lt 1000 ]; do
    sleep 0.2; i=$((i + 1))
done
echo "$(cat /proc/sys/kernel/random/boot_id)" >> "$out/boots-seen-by-runner"
systemctl is-active citygate.service > "$out/agent-active"
systemctl is-enabled citygate.service > "$out/agent-enabled"
systemctl is-enabled citygate-firstboot.service > "$out/firstboot-enabled"
stat -c '%n %U:%G %a' /etc/citygate/gateway.toml /etc/citygate/identity/ca.crt \
    /etc/citygate/identity/gateway.key /etc/citygate/update-root.json \
    /var/lib/citygate-firstboot > "$out/modes"
cp /etc/citygate/update-root.json "$out/update-root.json"
ls -A /var/lib/citygate-firstboot > "$out/stage-left"
cp /etc/citygate/gateway.toml "$out/gateway.toml"
cp /etc/citygate/identity/ca.crt "$out/ca.crt"
cp /boot/firmware/citygate-firstboot.txt "$out/report" 2> /dev/null
hostname > "$out/hostname"
readlink /etc/localtime > "$out/localtime"
echo done > "$out/runner.done"
systemctl poweroff
"""

_RUNNER_UNIT = """\
[Unit]
Description=first-boot test: collect the results, then power off
[Service]
Type=exec
ExecStart=/bin/sh /seedtest/run.sh
[Install]
WantedBy=multi-user.target
"""

#: the unit as the seed writes it, with a short retry delay so that the test takes seconds
_FAST_RETRY = "[Service]\nRestartSec=1s\n"

_BOOT = r"""
set -eu
base=$1 out=$2 seed=$3 deb=$4 runner=$5
mount --make-rprivate /
mount -t tmpfs -o mode=0755 tmpfs "$base"
mkdir "$base/lower" "$base/upper" "$base/work" "$base/root"
mount --bind / "$base/lower"
mount -t overlay overlay \
    -o "lowerdir=$base/lower,upperdir=$base/upper,workdir=$base/work" "$base/root"
R=$base/root
# a fresh card: no cloud-init state, the seed where NoCloud looks, the package on the boot partition
rm -rf "$R/var/lib/cloud" "$R/etc/cloud/cloud-init.disabled" "$R/usr/sbin/policy-rc.d"
mkdir -p "$R/var/lib/cloud/seed/nocloud" "$R/boot/firmware" "$R/seedtest" "$R/var/log/journal"
cp "$seed/user-data" "$seed/network-config" "$seed/meta-data" "$R/var/lib/cloud/seed/nocloud/"
cp "$seed/meta-data" "$deb" "$R/boot/firmware/"
cp "$runner/run.sh" "$R/seedtest/"
cp "$runner/seedtest.service" "$R/etc/systemd/system/"
ln -sf /etc/systemd/system/seedtest.service "$R/etc/systemd/system/multi-user.target.wants/"
mkdir -p "$R/etc/systemd/system/citygate-firstboot.service.d"
cp "$runner/fast-retry.conf" "$R/etc/systemd/system/citygate-firstboot.service.d/"
# no NTP in a container (systemd-timesyncd skips itself there): nothing to wait for
ln -sf /dev/null "$R/etc/systemd/system/systemd-timesyncd.service"
boot() {
    timeout 150 systemd-nspawn --quiet --register=no --keep-unit --private-network --timezone=off \
        --directory="$R" --bind="$out:/out" --boot > "$out/console-$1.log" 2>&1 || true
}
boot 1
boot 2
# what the booted root logged, read from outside
journalctl --directory="$R/var/log/journal" --no-pager -o cat -u citygate-firstboot.service \
    > "$out/firstboot.journal" 2>&1 || true
journalctl --directory="$R/var/log/journal" --no-pager -o cat > "$out/all.journal" 2>&1 || true
cp "$R/var/log/cloud-init.log" "$R/var/log/cloud-init-output.log" "$out/" || true
cp "$R/var/log/citygate-stub.log" "$out/stub.log" || true
grep -c ' status installed citygate:[a-z0-9]* 0.0.1~stub$' "$R/var/log/dpkg.log" \
    > "$out/installs" || true
"""


def _stub_package(tmp_path: Path) -> Path:
    """A package named citygate (this machine's architecture) whose command is the stand-in."""
    arch = subprocess.run(
        ["dpkg", "--print-architecture"], capture_output=True, text=True, check=True
    ).stdout.strip()
    tree = tmp_path / "stub"
    for name, text, mode in (
        ("DEBIAN/control", "Package: citygate\nVersion: 0.0.1~stub\nArchitecture: "
         f"{arch}\nMaintainer: tests <tests@example.invalid>\nDepends: adduser\n"
         "Description: stand-in for citygate in the first-boot test\n", 0o644),
        ("DEBIAN/postinst", _STUB_POSTINST, 0o755),
        ("DEBIAN/conffiles", "/etc/citygate/gateway.toml\n", 0o644),
        ("etc/citygate/gateway.toml", "# the package's sample config\n", 0o644),
        ("usr/bin/citygate", _STUB_CITYGATE, 0o755),
        ("lib/systemd/system/citygate.service", _STUB_UNIT, 0o644),
    ):  # fmt: skip
        path = tree / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(mode)
    deb = tmp_path / f"citygate_0.0.1~stub_{arch}.deb"
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", "--build", str(tree), str(deb)],
        capture_output=True, check=True,
    )  # fmt: skip
    return deb


@pytest.mark.integration
@needs_boot
@pytest.mark.timeout(400)
def test_first_boot_installs_configures_enrolls_and_survives_a_power_cut(
    site_dir: Path, update_repo: Path, tmp_path: Path
) -> None:
    no_ntp = WIFI_SITE.replace('ntp_servers = ["ntp1.example.city", "192.0.2.123"]\n', "")
    site = read_site(_site(site_dir, no_ntp + OTA_TABLE))
    assert site.update_root_json is not None
    seed_dir = tmp_path / "seed"
    seed_dir.mkdir()
    for name, (text, _) in render_seed(site).files().items():
        (seed_dir / name).write_text(text)
    runner = tmp_path / "runner"
    runner.mkdir()
    (runner / "run.sh").write_text(_RUNNER)
    (runner / "seedtest.service").write_text(_RUNNER_UNIT)
    (runner / "fast-retry.conf").write_text(_FAST_RETRY)
    deb = _stub_package(tmp_path)
    base, out = tmp_path / "overlay", tmp_path / "out"
    base.mkdir()
    out.mkdir()
    result = subprocess.run(
        ["unshare", "--mount", "sh", "-c", _BOOT, "sh", str(base), str(out), str(seed_dir),
         str(deb), str(runner)],
        capture_output=True, text=True, check=False, timeout=380,
    )  # fmt: skip

    def read(name: str) -> str:
        path = out / name
        return path.read_text(errors="replace") if path.exists() else f"<no {name}>"

    context = "\n".join(
        [
            result.stderr,
            read("firstboot.journal"),
            read("cloud-init-output.log"),
            read("console-2.log"),
        ]
    )
    assert result.returncode == 0, context
    assert read("runner.done") == "done\n", context
    # the first boot failed once (registrar), was cut off in the second try, the next boot finished
    assert read("stub.log").splitlines() == [
        "keygen provision keygen --config /etc/citygate/gateway.toml",
        "enroll 1: --config /etc/citygate/gateway.toml --claim-cert "
        "/var/lib/citygate-firstboot/claim.crt --claim-key /var/lib/citygate-firstboot/claim.key "
        "--port 8884 --token <hidden>",
        *[
            f"enroll {n}: --config /etc/citygate/gateway.toml --claim-cert "
            "/var/lib/citygate-firstboot/claim.crt --claim-key "
            "/var/lib/citygate-firstboot/claim.key --port 8884 --token <hidden>"
            for n in (2, 3)
        ],
    ], context
    assert [read(f"token-seen-{n}") for n in (1, 2, 3)] == [TOKEN + "\n"] * 3
    assert read("installs").strip() == "1"  # the package was installed once, not again
    assert len(read("boots-seen-by-runner").splitlines()) == 1  # only the second boot finished
    # what the gateway holds now
    assert read("gateway.toml") == site.gateway_toml
    assert read("ca.crt") == site.ca_pem
    assert read("modes").splitlines() == [
        "/etc/citygate/gateway.toml root:citygate 640",
        "/etc/citygate/identity/ca.crt citygate:citygate 644",
        "/etc/citygate/identity/gateway.key citygate:citygate 600",
        "/etc/citygate/update-root.json root:root 644",
        "/var/lib/citygate-firstboot root:root 700",
    ]
    assert read("update-root.json") == site.update_root_json
    assert sorted(read("stage-left").split()) == ["done", "gateway-id", "lock"]  # secrets gone
    assert read("agent-active").strip() == "active"
    assert read("agent-enabled").strip() == "enabled"
    assert read("firstboot-enabled").strip() == "disabled"
    assert re.fullmatch(
        r"\S+ done: gateway gw-a is enrolled and citygate.service runs\n", read("report")
    )
    assert read("hostname").strip() == "gw-a"
    assert read("localtime").endswith("Europe/Berlin\n")
    journal = read("firstboot.journal")
    assert "enrollment: citygate provision enroll failed" in journal
    # no secret in any log; cloud-init itself logs the network config it applies, so the
    # Wi-Fi key (not the passphrase) is in its cloud-init.log (root:adm 0640), nowhere else
    for log in ("all.journal", "cloud-init.log", "cloud-init-output.log", "firstboot.journal"):
        assert TOKEN not in read(log), log
        assert PASSPHRASE not in read(log), log
        assert "PRIVATE KEY" not in read(log), log
    wifi_key = wpa_psk(PASSPHRASE, 'city "iot" ü')
    assert wifi_key not in read("all.journal") + read("cloud-init-output.log")
