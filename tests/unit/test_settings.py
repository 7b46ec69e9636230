"""Settings from the environment: the publishing mode and its linger."""

from __future__ import annotations

import pytest

from services.cli import publish_ack_warning
from services.settings import Settings


def test_publish_ack_defaults_to_the_broker() -> None:
    s = Settings.from_env({})
    assert (s.publish_ack, s.publish_linger_seconds) == ("broker", None)


def test_publish_ack_spool_and_a_linger() -> None:
    s = Settings.from_env(
        {"VISITORSTATS_PUBLISH_ACK": " Spool ", "VISITORSTATS_PUBLISH_LINGER_SECONDS": "0.05"}
    )
    assert (s.publish_ack, s.publish_linger_seconds) == ("spool", 0.05)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("VISITORSTATS_PUBLISH_ACK", "disk", "must be one of broker, spool"),
        ("VISITORSTATS_PUBLISH_LINGER_SECONDS", "soon", "must be a number"),
    ],
)
def test_a_bad_value_names_its_variable(name: str, value: str, message: str) -> None:
    with pytest.raises(SystemExit) as e:
        Settings.from_env({name: value})
    assert str(e.value).startswith(f"{name} {message}")


@pytest.mark.parametrize(
    ("env", "warned"),
    [
        ({"VISITORSTATS_PUBLISH_ACK": "spool", "VISITORSTATS_WORKERS": "2"}, True),
        ({"VISITORSTATS_PUBLISH_ACK": "spool", "VISITORSTATS_WORKERS": "1"}, False),
        ({"VISITORSTATS_PUBLISH_ACK": "broker", "VISITORSTATS_WORKERS": "2"}, False),
    ],
)
def test_spool_first_with_several_processes_is_warned_about(
    env: dict[str, str], warned: bool
) -> None:
    settings = Settings.from_env({"VISITORSTATS_KAFKA_BOOTSTRAP": "127.0.0.1:9092", **env})
    warning = publish_ack_warning(settings)
    assert (warning is not None) == warned
    if warning:
        assert "out of order" in warning and "2 processes" in warning
