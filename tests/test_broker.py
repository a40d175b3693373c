"""The lab broker: its ACL text and the one-line hint when mosquitto is missing."""

from __future__ import annotations

import shutil

import pytest

from provisioning.broker import MOSQUITTO_HINT, BrokerError, acl_text, find_mosquitto


def test_missing_mosquitto_gives_one_line_on_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(shutil, "which", lambda *args, **kwargs: None)
    with pytest.raises(BrokerError) as caught:
        find_mosquitto()
    assert str(caught.value) == MOSQUITTO_HINT
    assert "apt-get install mosquitto" in MOSQUITTO_HINT
    assert "\n" not in MOSQUITTO_HINT


def test_mosquitto_is_found_on_this_machine() -> None:
    assert find_mosquitto().endswith("mosquitto")
    assert shutil.which("mosquitto", path="/usr/sbin:/usr/bin") is not None


def test_acl_confines_gateways_to_their_own_subtree_and_lets_readers_read_all() -> None:
    text = acl_text("citygate", ["verifier"])
    assert "user verifier\ntopic read citygate/#" in text
    assert "pattern write citygate/%u/#" in text
    assert "pattern read citygate/%u/cmd/#" in text
    assert "topic write" not in text


def test_acl_lets_operators_write_every_gateways_commands_and_offers_and_nothing_else() -> None:
    text = acl_text("citygate", ["verifier"], operators=["operator"])
    section = text.split("user operator\n", 1)[1].split("\n\n", 1)[0]
    assert section.splitlines() == [
        "topic write citygate/+/cmd/#",
        "topic write citygate/+/ota/offer",
    ]
    assert "topic read" not in section
