"""The first-boot script and its systemd unit, as cloud-init writes them onto the gateway.

These are the static parts of the seed (`provisioning.firstboot` adds the
gateway's own files). They live here, as text, because the seed is made by
`citygate provision seed`, which must not import `images` (tests/test_layout.py);
images/firstboot/README.md describes what they do for the technician.

`script()` is the POSIX shell script that finishes the first boot. Each step
first looks whether it is done already, so a run cut short (a power cut, no
network yet, a registrar that does not answer) completes on a later run; the
unit runs it again a minute after a failure and at every boot until it succeeds.

Trust: the script trusts the files cloud-init wrote in STAGE_DIR (root only) and
the package on the boot partition (the technician put it there). It never prints
a secret; the token and the claim key are deleted once the gateway has its
certificate.
"""

from __future__ import annotations

from pathlib import PurePosixPath

from provisioning.site import CA_PATH, CERT_PATH, CONFIG_PATH, KEY_PATH, UPDATE_ROOT_PATH

STAGE_DIR = PurePosixPath("/var/lib/citygate-firstboot")
SCRIPT_PATH = PurePosixPath("/usr/local/sbin/citygate-firstboot")
UNIT_NAME = "citygate-firstboot.service"
UNIT_PATH = PurePosixPath("/etc/systemd/system") / UNIT_NAME
CELLULAR_PROFILE = PurePosixPath(
    "/etc/NetworkManager/system-connections/citygate-cellular.nmconnection"
)
#: how long the script waits for NTP before it enrolls anyway (a Pi has no battery clock)
CLOCK_WAIT_S = 300

_SCRIPT = r"""#!/bin/sh
# citygate-firstboot: finish the first boot of a gateway seeded by `citygate provision seed`.
#
# cloud-init wrote this script, the unit that runs it (@UNIT@),
# and the files it needs (in @STAGE@, root only). Each step first looks
# whether it is done already, so a run cut short (power cut, no network yet, registrar
# unreachable) completes on a later run: the unit runs this again a minute after a
# failure and at every boot until it succeeds. Nothing here prints a secret; the
# enrollment token and the claim key are deleted once the gateway has its certificate.
set -eu
umask 077
PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PATH

STAGE=@STAGE@
CONFIG=@CONFIG@
KEY=@KEY@
CERT=@CERT@
CA=@CA@
UPDATE_ROOT=@UPDATE_ROOT@
CELLULAR=@CELLULAR@
CLOCK_WAIT_S=@CLOCK_WAIT_S@
if [ -d /boot/firmware ]; then BOOT=/boot/firmware; else BOOT=/boot; fi

say() { echo "citygate-firstboot: $*"; }

# one line on the boot partition, for a technician who reads the card in a laptop;
# rewritten only when it changes (a retry a minute does not write the card a minute)
report() {
    file=$BOOT/citygate-firstboot.txt
    [ "$(cut -d ' ' -f 2- "$file" 2> /dev/null || true)" != "$*" ] || return 0
    printf '%s %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*" > "$file" 2> /dev/null || true
}

fail() {
    say "$*" >&2
    report "NOT DONE YET (tried again every minute): $*"
    exit 1
}

network() {
    [ -f "$CELLULAR" ] || return 0
    command -v mmcli > /dev/null 2>&1 ||
        say "network: ModemManager (mmcli) is not installed: the modem cannot connect"
    if command -v nmcli > /dev/null 2>&1; then
        # NetworkManager reads the profile cloud-init wrote only when asked to
        nmcli connection reload || say "network: nmcli connection reload failed"
    else
        say "network: NetworkManager (nmcli) is not installed: the modem cannot connect"
    fi
}

install_package() {
    # shellcheck disable=SC2016  # dpkg-query's own ${...} format, not the shell's
    status=$(dpkg-query -W -f='${db:Status-Status}' citygate 2> /dev/null || true)
    if [ "$status" = installed ]; then
        # shellcheck disable=SC2016
        say "package: citygate $(dpkg-query -W -f='${Version}' citygate) is installed"
        return 0
    fi
    arch=$(dpkg --print-architecture)
    deb=$(printf '%s\n' "$BOOT"/citygate_*_"$arch".deb | sort -V | tail -n 1)
    [ -f "$deb" ] ||
        fail "package: no citygate_*_$arch.deb in $BOOT: copy the package onto the boot partition"
    # a dpkg run that a power cut interrupted is finished first
    dpkg --configure -a || say "package: dpkg --configure -a failed; trying the install anyway"
    say "package: installing $deb"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        -o DPkg::Lock::Timeout=600 -o Dpkg::Options::=--force-confold "$deb" ||
        fail "package: apt-get could not install $deb (see the lines above)"
}

configure() {
    if [ ! -f "$STAGE/gateway.toml" ]; then
        say "config: written already"
        return 0
    fi
    # the update repository's TUF root, before the config that names it: public, and
    # root's (only a new root signed by the old root keys replaces it, in the agent's cache)
    if [ -f "$STAGE/update-root.json" ]; then
        install -o root -g root -m 0644 "$STAGE/update-root.json" "$UPDATE_ROOT.firstboot"
        mv -f "$UPDATE_ROOT.firstboot" "$UPDATE_ROOT"
        say "config: wrote the update repository's trusted root $UPDATE_ROOT"
    fi
    # after the package: it creates the group citygate, and owns the config as a conffile
    install -o root -g citygate -m 0640 "$STAGE/gateway.toml" "$CONFIG.firstboot"
    mv -f "$CONFIG.firstboot" "$CONFIG"
    install -o citygate -g citygate -m 0644 "$STAGE/ca.crt" "$CA.firstboot"
    mv -f "$CA.firstboot" "$CA"
    sync
    say "config: wrote $CONFIG and the CA bundle $CA"
}

make_key() {
    if [ -e "$KEY" ]; then
        say "key: $KEY exists"
        return 0
    fi
    citygate provision keygen --config "$CONFIG" ||
        fail "key: citygate provision keygen failed (see the lines above)"
}

wait_for_clock() {
    # once a boot: after a failed enrollment the next try does not wait again
    [ ! -e /run/citygate-firstboot.clock ] || return 0
    : > /run/citygate-firstboot.clock
    command -v timedatectl > /dev/null 2>&1 || return 0
    if [ "$(timedatectl show -p NTP --value 2> /dev/null || true)" != yes ]; then
        say "clock: NTP is not enabled; not waiting for it"
        return 0
    fi
    waited=0
    until [ "$(timedatectl show -p NTPSynchronized --value 2> /dev/null || true)" = yes ]; do
        if [ "$waited" -ge "$CLOCK_WAIT_S" ]; then
            say "clock: not synchronised after ${CLOCK_WAIT_S}s; enrolling at $(date -u +%FT%TZ)"
            return 0
        fi
        [ "$waited" -gt 0 ] ||
            say "clock: waiting up to ${CLOCK_WAIT_S}s for NTP (certificates need the date)"
        sleep 5
        waited=$((waited + 5))
    done
    say "clock: synchronised"
}

enroll() {
    if [ -e "$CERT" ]; then
        say "enrollment: $CERT is installed"
    else
        [ -s "$STAGE/token" ] ||
            fail "enrollment: no certificate and no token left: seed the card with a new token"
        set -- --config "$CONFIG" --claim-cert "$STAGE/claim.crt" --claim-key "$STAGE/claim.key"
        if [ -s "$STAGE/enroll-port" ]; then
            set -- "$@" --port "$(cat "$STAGE/enroll-port")"
        fi
        say "enrollment: asking the registrar for this gateway's certificate"
        token=$(cat "$STAGE/token")
        citygate provision enroll "$@" --token "$token" ||
            fail "enrollment: citygate provision enroll failed (see the lines above)"
        token=
        [ -e "$CERT" ] || fail "enrollment: enroll succeeded but left no certificate at $CERT"
    fi
    # spent, or no longer needed: the secrets go as soon as the certificate is here
    rm -f "$STAGE/token" "$STAGE/claim.key" "$STAGE/claim.crt" "$STAGE/enroll-port"
    sync
}

start_agent() {
    systemctl enable --now citygate.service ||
        fail "service: citygate.service did not start: see journalctl -u citygate"
    say "service: citygate.service is enabled and running"
}

if [ -e "$STAGE/done" ]; then
    say "done already"
    exit 0
fi
exec 9> "$STAGE/lock"
if ! flock -n 9; then
    say "another run is under way"
    exit 0
fi
network
install_package
configure
make_key
wait_for_clock
enroll
start_agent
: > "$STAGE/done"
sync
rm -f "$STAGE/gateway.toml" "$STAGE/ca.crt" "$STAGE/update-root.json"
systemctl disable @UNIT@ > /dev/null 2>&1 || true
report "done: gateway $(cat "$STAGE/gateway-id") is enrolled and citygate.service runs"
say "done: gateway $(cat "$STAGE/gateway-id") is enrolled and citygate.service runs"
"""

_UNIT = """\
# @UNIT@: written by cloud-init from the seed of `citygate provision seed`.
# Runs @SCRIPT@ until it succeeds: again a minute after each failure, and
# at every boot until @STAGE@/done exists.
[Unit]
Description=citygate first boot: install the package, configure, enroll, start the agent
Wants=network-online.target
After=network-online.target
ConditionPathExists=!@STAGE@/done
# no start limit: it retries for as long as it takes (no network yet, registrar down)
StartLimitIntervalSec=0

[Service]
# exec, not oneshot: the boot does not wait for the enrollment
Type=exec
ExecStart=@SCRIPT@
Restart=on-failure
RestartSec=60s
# a run that hangs (a stuck download, a registrar that never answers) is ended and retried
RuntimeMaxSec=30min
SyslogIdentifier=citygate-firstboot

[Install]
WantedBy=multi-user.target
"""


def _fill(template: str) -> str:
    values = {
        "@STAGE@": str(STAGE_DIR),
        "@SCRIPT@": str(SCRIPT_PATH),
        "@UNIT@": UNIT_NAME,
        "@CONFIG@": str(CONFIG_PATH),
        "@KEY@": str(KEY_PATH),
        "@CERT@": str(CERT_PATH),
        "@CA@": str(CA_PATH),
        "@UPDATE_ROOT@": str(UPDATE_ROOT_PATH),
        "@CELLULAR@": str(CELLULAR_PROFILE),
        "@CLOCK_WAIT_S@": str(CLOCK_WAIT_S),
    }
    for name, value in values.items():
        template = template.replace(name, value)
    return template


def script() -> str:
    """The first-boot script (/usr/local/sbin/citygate-firstboot)."""
    return _fill(_SCRIPT)


def unit() -> str:
    """The systemd unit that runs the script until it succeeds."""
    return _fill(_UNIT)


def resume_command() -> str:
    """A shell command for cloud-init's bootcmd (every boot): run the script if not yet done.

    It covers a power cut in the moment between cloud-init writing the files and its
    runcmd enabling the unit (cloud-init does not repeat a step it had started).
    """
    return (
        f"if [ -f {UNIT_PATH} ] && [ ! -e {STAGE_DIR}/done ]; then "
        f"systemctl enable {UNIT_NAME} && systemctl start --no-block {UNIT_NAME}; fi"
    )
