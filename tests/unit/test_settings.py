"""Settings from the environment: the publishing mode and its linger."""

from __future__ import annotations

import pytest

from services.settings import Settings


def test_publish_ack_defaults_to_the_spool() -> None:
    s = Settings.from_env({})
    assert (s.publish_ack, s.publish_linger_seconds) == ("spool", None)


def test_publish_ack_broker_and_a_linger() -> None:
    s = Settings.from_env(
        {"VISITORSTATS_PUBLISH_ACK": " Broker ", "VISITORSTATS_PUBLISH_LINGER_SECONDS": "0.05"}
    )
    assert (s.publish_ack, s.publish_linger_seconds) == ("broker", 0.05)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("VISITORSTATS_PUBLISH_ACK", "disk", "must be one of spool, broker"),
        ("VISITORSTATS_PUBLISH_LINGER_SECONDS", "soon", "must be a number"),
    ],
)
def test_a_bad_value_names_its_variable(name: str, value: str, message: str) -> None:
    with pytest.raises(SystemExit) as e:
        Settings.from_env({name: value})
    assert str(e.value).startswith(f"{name} {message}")
