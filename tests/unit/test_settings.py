"""Settings from the environment: the publishing mode and its linger."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.settings import Settings, log_level


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


@pytest.mark.parametrize(
    ("data_dir", "path"),
    [("/srv/stats", "/srv/stats/clickhouse"), ("data", "data/clickhouse"), ("", "data/clickhouse")],
)
def test_the_embedded_clickhouse_is_in_the_data_directory(
    data_dir: str, path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An absolute data directory keeps ClickHouse on it, not under the working directory
    (an outside audit found ``/mnt/data`` made ``chdb://.//mnt/data/clickhouse``)."""
    monkeypatch.chdir(tmp_path)
    url = Settings.from_env({"VISITORSTATS_DATA_DIR": data_dir} if data_dir else {}).clickhouse_url
    assert url.startswith("chdb://")
    assert Path(url[len("chdb://") :]).resolve() == tmp_path / path  # "/" + absolute: absolute


def test_a_variable_set_but_empty_is_its_default() -> None:
    empty = {
        name: ""
        for name in (
            "VISITORSTATS_HOST",
            "VISITORSTATS_PORT",
            "VISITORSTATS_TRUSTED_PROXIES",
            "VISITORSTATS_KAFKA_TOPIC",
            "VISITORSTATS_WORKERS",
        )
    }
    assert Settings.from_env(empty) == Settings.from_env({})
    assert log_level({"VISITORSTATS_LOG_LEVEL": ""}) == "INFO"


def test_no_proxy_is_trusted_when_told_none_and_blanks_are_a_mistake() -> None:
    assert Settings.from_env({}).trusted_proxies  # (loopback, by default)
    assert Settings.from_env({"VISITORSTATS_TRUSTED_PROXIES": "none"}).trusted_proxies == ()
    for blank in (" ", " , "):
        with pytest.raises(SystemExit) as e:
            Settings.from_env({"VISITORSTATS_TRUSTED_PROXIES": blank})
        assert str(e.value).startswith("VISITORSTATS_TRUSTED_PROXIES names no network"), blank


def test_the_log_level_is_one_of_the_standard_ones_in_any_case() -> None:
    assert log_level({"VISITORSTATS_LOG_LEVEL": "debug"}) == "DEBUG"
    with pytest.raises(SystemExit) as e:
        log_level({"VISITORSTATS_LOG_LEVEL": "loud"})
    assert str(e.value).startswith("VISITORSTATS_LOG_LEVEL must be one of DEBUG, INFO")


def test_the_disk_reserve_is_a_count_of_bytes_or_the_default() -> None:
    assert Settings.from_env({}).disk_reserve_bytes is None  # 256 MiB, at most a tenth
    assert Settings.from_env({"VISITORSTATS_DISK_RESERVE_BYTES": ""}).disk_reserve_bytes is None
    told = Settings.from_env({"VISITORSTATS_DISK_RESERVE_BYTES": "1048576"})
    assert told.disk_reserve_bytes == 1048576
    assert Settings.from_env({"VISITORSTATS_DISK_RESERVE_BYTES": "0"}).disk_reserve_bytes == 0
    with pytest.raises(SystemExit) as e:
        Settings.from_env({"VISITORSTATS_DISK_RESERVE_BYTES": "1G"})
    assert str(e.value) == "VISITORSTATS_DISK_RESERVE_BYTES must be an integer, got '1G'"


@pytest.mark.parametrize(
    ("name", "raw", "said"),
    [
        ("SALT_PERIOD_SECONDS", "0", "must be at least 1, got 0"),
        ("SALT_LINK_SECONDS", "-1", "must be at least 0, got -1"),
        ("SPOOL_MAX_BYTES", "0", "must be at least 65536, got 0"),
        ("FLUSH_MAX_EVENTS", "0", "must be at least 1, got 0"),
        ("FLUSH_INTERVAL_SECONDS", "-1", "must be more than 0, got -1.0"),
        ("COUNTER_INTERVAL_SECONDS", "0", "must be more than 0, got 0.0"),
        ("STREAM_KEEPALIVE_SECONDS", "0", "must be more than 0, got 0.0"),
        ("DEDUP_HORIZON_SECONDS", "-1", "must be at least 0, got -1"),
        ("RATE_LIMIT_PER_SECOND", "-1", "must be at least 0, got -1.0"),
        ("RATE_LIMIT_PER_SECOND", "nan", "must be a finite number, got 'nan'"),
        ("RATE_LIMIT_PER_SECOND", "inf", "must be a finite number, got 'inf'"),
        ("RATE_LIMIT_BURST", "0", "must be at least 1 while VISITORSTATS_RATE_LIMIT_PER_SECOND"),
        ("MAX_VISITORS", "0", "must be at least 1, got 0"),
        ("READ_TIMEOUT_SECONDS", "0", "must be more than 0, got 0.0"),
        ("MAX_CONNECTIONS", "0", "must be at least 1, got 0"),
        ("MAX_HEADER_BYTES", "100", "must be at least 1024, got 100"),
        ("MAX_HEADERS", "0", "must be at least 32, got 0"),
        ("RATE_LIMIT_MAX_CLIENTS", "0", "must be at least 1, got 0"),
        ("PUBLISH_LINGER_SECONDS", "-0.5", "must be at least 0, got -0.5"),
        ("DISK_RESERVE_BYTES", "-1", "must be at least 0, got -1"),
    ],
)
def test_a_number_that_cannot_work_stops_the_start_naming_its_variable(
    name: str, raw: str, said: str
) -> None:
    """Each of these started a service that refused every beacon, divided by zero on each, or
    miscounted (an outside audit: a salt period of 0, a burst of 0, at most 0 visitors)."""
    with pytest.raises(SystemExit) as e:
        Settings.from_env({f"VISITORSTATS_{name}": raw}).check()
    assert str(e.value).startswith(f"VISITORSTATS_{name} {said}"), str(e.value)


def test_the_limits_that_turn_things_off_are_taken() -> None:
    off = Settings.from_env(
        {
            "VISITORSTATS_RATE_LIMIT_PER_SECOND": "0",  # no rate limit: the burst is moot
            "VISITORSTATS_RATE_LIMIT_BURST": "0",
            "VISITORSTATS_DEDUP_HORIZON_SECONDS": "0",
            "VISITORSTATS_DISK_RESERVE_BYTES": "0",
            "VISITORSTATS_PUBLISH_LINGER_SECONDS": "0",
        }
    )
    off.check()
    assert off.rate_limit_per_second == 0 and off.disk_reserve_bytes == 0


def test_a_switch_is_on_or_off_and_nothing_else() -> None:
    for on in ("1", "true", "YES", " on "):
        assert Settings.from_env({"VISITORSTATS_ACCESS_LOG": on}).access_log is True
    for off in ("0", "false", "No", "off"):
        assert Settings.from_env({"VISITORSTATS_ACCESS_LOG": off}).access_log is False
    for bad in ("maybe", "enabled", "ture"):  # taken as off, silently, before
        with pytest.raises(SystemExit) as e:
            Settings.from_env({"VISITORSTATS_ACCESS_LOG": bad})
        assert str(e.value).startswith("VISITORSTATS_ACCESS_LOG must be one of 1, true"), bad
