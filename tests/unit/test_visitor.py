from __future__ import annotations

import hmac
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.ingest.service import link_seconds
from services.ingest.visitor import (
    KEY_CACHE_SIZE,
    KeyedSha256,
    VisitorHasher,
    make_member_token,
    verify_member_token,
)
from services.settings import Settings, database_of, redact
from services.sites import BEACON_HEARTBEAT_SECONDS, Registry, RegistryError

DAY_MS = 86_400_000


def test_visitor_key_rotates_daily_and_carries_the_previous_key_for_a_while() -> None:
    h = VisitorHasher(b"secret", 86400, 3600)
    # a key is (visitor, visitor_prev, shard)
    day1, _, shard1 = h.key("s", "1.2.3.4", "UA", 5 * DAY_MS + 20 * 3_600_000)
    day2_early, prev2_early, shard2_early = h.key("s", "1.2.3.4", "UA", 6 * DAY_MS + 10 * 60_000)
    day2_late, prev2_late, shard2_late = h.key("s", "1.2.3.4", "UA", 6 * DAY_MS + 2 * 3_600_000)
    assert day1 != day2_early
    assert prev2_early == day1
    assert day2_late == day2_early and prev2_late is None
    assert shard1 == shard2_early == shard2_late  # one partition across rotation
    assert len(day1) == 32 and "1.2.3.4" not in day1
    assert h.key("other", "1.2.3.4", "UA", 5 * DAY_MS)[0] != day1
    assert h.key("s", "1.2.3.5", "UA", 5 * DAY_MS + 20 * 3_600_000)[0] != day1


@pytest.mark.parametrize(
    ("windows", "link", "period", "expected"),
    [
        ((300,), 3600, 86400, 3600),  # the setting
        ((300, 7200), 3600, 86400, 7200),  # a site's window longer than the setting
        ((300,), 600, 86400, 1800),  # never shorter than the visit timeout
        ((86400,), 3600, 86400, 86400),  # at most the whole period
        ((60,), 3600, 8, 8),
    ],
)
def test_the_link_covers_the_longest_window_and_the_visit_timeout(
    windows: tuple[int, ...], link: int, period: int, expected: int
) -> None:
    """A reader seen before a rotation and back after it, still in a site's online window (an
    outside audit: a 2-hour window counted them twice online from 01:00 UTC on)."""
    registry = Registry.parse(
        "".join(f"[sites.s{i}]\nonline_window_seconds = {w}\n" for i, w in enumerate(windows))
    )
    settings = Settings(salt_link_seconds=link, salt_period_seconds=period)
    assert link_seconds(settings, registry) == expected
    h = VisitorHasher(b"secret", 86400, link_seconds(settings, registry))
    before = h.key("s", "1.2.3.4", "UA", 5 * DAY_MS + 23 * 3_600_000)[0]
    after = h.key("s", "1.2.3.4", "UA", 6 * DAY_MS + (expected - 1) * 1000)
    assert after[1] == before != after[0]


def test_portal_visitor_ids_are_hashed_and_stable() -> None:
    h = VisitorHasher(b"secret", 86400, 3600)
    a, b = h.portal_key("s", "user-42"), h.portal_key("s", "user-42")
    visitor, visitor_prev, _ = a
    assert a == b and visitor_prev is None and "user-42" not in visitor
    assert VisitorHasher(b"other", 86400, 3600).portal_key("s", "user-42") != a


def test_member_tokens() -> None:
    token = make_member_token("s", b"k", 2_000_000_000)
    assert verify_member_token(token, "s", b"k", 1_900_000_000)
    assert not verify_member_token(token, "s", b"k", 2_000_000_001)  # expired
    assert not verify_member_token(token, "t", b"k", 1_900_000_000)  # other site
    assert not verify_member_token(token, "s", b"x", 1_900_000_000)  # other secret
    assert not verify_member_token(token[:-1] + "0", "s", b"k", 1_900_000_000)
    assert not verify_member_token("garbage", "s", b"k", 0)


def test_registry_rejects_bad_entries_naming_the_field() -> None:
    ok = Registry.parse('[sites.a-1]\ntimezone = "UTC"\n')
    assert ok.get("a-1") is not None and ok.get("a-1").timezone == "UTC"  # type: ignore[union-attr]
    for text, needle in (
        ('[sites.Bad]\ntimezone = "UTC"', "site id"),
        ('[sites.a]\ntimezone = "Mars/Olympus"', "timezone"),
        ("[sites.a]\nonline_window_seconds = 1", "online_window_seconds"),
        ('[sites.a]\nbaseline_visits = "many"', "baseline_visits"),
        ("[sites.a]\nbaseline_visits = -1", "baselines"),
        ("[sites.a\n", "sites.toml"),
        # a typo would silently lose what it sets (a legacy baseline)
        ("[sites.a]\nbaselne_visits = 100", "sites.a.baselne_visits: unknown key"),
        ('[site.a]\ntimezone = "UTC"', "unknown key 'site'"),
        ('[sites.a]\norigins = ["not a url"]', "origins: 'not a url': an origin is"),
        ('[sites.a]\norigins = ["https://a.example/path/"]', "without a path"),
        ('[sites.a]\norigins = ["ftp://a.example"]', "an origin is http"),
        ('[sites.a]\norigins = ["https://a.example:99999"]', "port"),
        ('[sites.a]\norigins = ["https://user@a.example"]', "an origin is"),
    ):
        with pytest.raises(RegistryError, match=needle):
            Registry.parse(text)
    fine = Registry.parse(
        '[sites.a]\norigins = ["https://A.example:443/", "http://b.example:8080"]\n'
    ).get("a")
    assert fine is not None and fine.origins == {"https://a.example", "http://b.example:8080"}


def test_a_site_without_a_timezone_is_utc_and_said(caplog: pytest.LogCaptureFixture) -> None:
    registry = Registry.parse('[sites.a]\n[sites.b]\ntimezone = "Asia/Ho_Chi_Minh"\n')
    assert [s.timezone for s in registry] == ["UTC", "Asia/Ho_Chi_Minh"]
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert said == [
        "sites.a has no timezone: its days, weeks and months are UTC's "
        '(timezone = "Asia/Ho_Chi_Minh" for Việt Nam)'
    ]
    caplog.clear()
    Registry.parse("".join(f"[sites.s{i}]\n" for i in range(2000)))
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert said == [  # one line for a registry of many (not 2,000)
        "sites.s0, sites.s1, sites.s2, sites.s3, sites.s4 and 1995 more have no timezone: "
        'their days, weeks and months are UTC\'s (timezone = "Asia/Ho_Chi_Minh" for Việt Nam)'
    ]


def test_sites_whose_window_a_heartbeat_does_not_fit_twice_are_said_in_one_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A visible page beats every 60 s (beacon.js's default data-heartbeat): with a window of
    20 s its reader is offline 40 s of every minute, and the beacon cannot learn the window
    (its POSTs are no-cors: the answer is opaque). So the start says it, once."""
    beacon = (Path(__file__).parents[2] / "services/ingest/static/beacon.js").read_text()
    assert f'getAttribute("data-heartbeat")) || {BEACON_HEARTBEAT_SECONDS},' in beacon
    text = "".join(
        f'[sites.{sid}]\ntimezone = "UTC"\nonline_window_seconds = {window}\n'
        for sid, window in (("a", 20), ("b", 300), ("c", 119), ("d", 120))
    )
    Registry.parse(text)
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert said == [
        "sites.a (20 s), sites.c (119 s) have an online_window_seconds under twice beacon.js's "
        "default heartbeat (60 s): a reader with a visible page drops offline between its "
        "heartbeats; set data-heartbeat on their pages to at most half the window"
    ]
    caplog.clear()
    Registry.parse("".join(f"[sites.s{i}]\nonline_window_seconds = 30\n" for i in range(7)))
    said = [r.getMessage() for r in caplog.records if "heartbeat" in r.getMessage()]
    assert said == [
        "sites.s0 (30 s), sites.s1 (30 s), sites.s2 (30 s), sites.s3 (30 s), sites.s4 (30 s) "
        "and 2 more have an online_window_seconds under twice beacon.js's default heartbeat "
        "(60 s): a reader with a visible page drops offline between its heartbeats; set "
        "data-heartbeat on their pages to at most half the window"
    ]
    caplog.clear()
    Registry.parse('[sites.a]\ntimezone = "UTC"\nonline_window_seconds = 60\n')
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert said == [
        "sites.a (60 s) has an online_window_seconds under twice beacon.js's default heartbeat "
        "(60 s): a reader with a visible page drops offline between its heartbeats; set "
        "data-heartbeat on its pages to at most half the window"
    ]


def test_registry_errors_name_the_file_they_are_in(tmp_path: Path) -> None:
    path = tmp_path / "registry" / "portal.toml"
    path.parent.mkdir()
    path.write_text("[sites.a\n", encoding="utf-8")
    with pytest.raises(RegistryError, match=re.escape(str(path))):
        Registry.load(path)
    path.write_text('[sites.a]\ntimezone = "Mars/Olympus"\n', encoding="utf-8")
    with pytest.raises(RegistryError, match=re.escape(f"{path}: sites.a.timezone")):
        Registry.load(path)
    with pytest.raises(RegistryError, match="cannot read"):
        Registry.load(tmp_path)  # a directory


def test_settings_from_the_environment() -> None:
    s = Settings.from_env(
        {
            "VISITORSTATS_PORT": "9000",
            "VISITORSTATS_KAFKA_BOOTSTRAP": "k:9092",
            "VISITORSTATS_TRUSTED_PROXIES": "10.0.0.0/8, ::1",
        }
    )
    assert (s.port, s.kafka_bootstrap, s.kafka_topic) == (9000, "k:9092", "pageviews")
    assert [str(n) for n in s.trusted_proxies] == ["10.0.0.0/8", "::1/128"]
    assert Settings.from_env({}).clickhouse_url == "chdb://./data/clickhouse"
    # set but empty is unset, as for the numbers
    empty = Settings.from_env(
        {f"VISITORSTATS_{k}": "" for k in ("SITES", "KAFKA_TOPIC", "DATA_DIR", "PORT")}
    )
    assert empty == Settings.from_env({})
    with pytest.raises(SystemExit, match="VISITORSTATS_PORT"):
        Settings.from_env({"VISITORSTATS_PORT": "eighty"})


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"VISITORSTATS_PORT": "70000"}, "VISITORSTATS_PORT must be from 1 to 65535, got 70000"),
        ({"VISITORSTATS_PORT": "-1"}, "VISITORSTATS_PORT must be from 1 to 65535"),
        ({"VISITORSTATS_PORT": "0"}, "VISITORSTATS_PORT must be from 1 to 65535"),
        ({"VISITORSTATS_WORKERS": "0"}, "VISITORSTATS_WORKERS must be from 1 to 64, got 0"),
        ({"VISITORSTATS_WORKERS": "1000"}, "VISITORSTATS_WORKERS must be from 1 to 64"),
        ({"VISITORSTATS_CLICKHOUSE_URL": "garbage"}, "VISITORSTATS_CLICKHOUSE_URL must be"),
        ({"VISITORSTATS_CLICKHOUSE_URL": "ftp://x/y"}, "VISITORSTATS_CLICKHOUSE_URL must be"),
        ({"VISITORSTATS_CLICKHOUSE_URL": "http://"}, "VISITORSTATS_CLICKHOUSE_URL names no host"),
        ({"VISITORSTATS_CLICKHOUSE_URL": "http://h:notaport/db"}, "port that is not a number"),
        ({"VISITORSTATS_CLICKHOUSE_URL": "http://h/db/x"}, "more than a database name"),
        ({"VISITORSTATS_HOST": " "}, "VISITORSTATS_HOST"),
        ({"VISITORSTATS_KAFKA_TOPIC": "bad topic!"}, "VISITORSTATS_KAFKA_TOPIC must be a Kafka"),
        ({"VISITORSTATS_KAFKA_DLQ_TOPIC": "x" * 250}, "VISITORSTATS_KAFKA_DLQ_TOPIC must be"),
    ],
)
def test_settings_that_cannot_work_are_refused_naming_the_variable(
    env: dict[str, str], message: str
) -> None:
    with pytest.raises(SystemExit, match=re.escape(message)):
        Settings.from_env(env).check()


def test_messages_never_show_the_clickhouse_password() -> None:
    url = "http://writer:s3cr3t@ch.example:8123/x/y"
    with pytest.raises(SystemExit) as e:
        Settings.from_env({"VISITORSTATS_CLICKHOUSE_URL": url}).check()
    assert "s3cr3t" not in str(e.value) and "writer:***@ch.example:8123" in str(e.value)
    assert redact("https://u:p@h:8443/db") == "https://u:***@h:8443/db"
    assert redact("chdb://./data/clickhouse") == "chdb://./data/clickhouse"
    for fine in ("chdb://./data/clickhouse", "https://u:p@h:8443/stats", "http://h"):
        Settings.from_env({"VISITORSTATS_CLICKHOUSE_URL": fine}).check()
    assert database_of("https://u:p@h:8443/stats") == "stats"
    assert database_of("http://h:8123") == database_of("chdb://./x") == "default"


@given(key=st.binary(max_size=200), message=st.binary(max_size=300))
def test_keyed_sha256_is_hmac_sha256(key: bytes, message: bytes) -> None:
    assert KeyedSha256(key)(message) == hmac.digest(key, message, "sha256")


def test_visitor_keys_are_the_documented_hmacs() -> None:
    """Keys made before the hashing got cheaper stay the same: the README's recipe, by hand."""
    secret, now_ms = b"a secret longer than one sha-256 block" * 2, 6 * DAY_MS + 600_000
    material = b"s\x001.2.3.4\x00UA"

    def mac(key: bytes, message: bytes) -> bytes:
        return hmac.digest(key, message, "sha256")

    visitor, visitor_prev, shard = VisitorHasher(secret, 86400, 3600).key(
        "s", "1.2.3.4", "UA", now_ms
    )
    assert visitor == mac(mac(secret, b"salt:6"), material)[:16].hex()
    assert visitor_prev == mac(mac(secret, b"salt:5"), material)[:16].hex()
    assert shard == int.from_bytes(mac(secret, b"shard\0" + material)[:4], "big")
    portal = VisitorHasher(secret, 86400, 3600).portal_key("s", "user-42")
    assert portal[0] == mac(secret, b"s\0portal\0user-42")[:16].hex()


def test_a_full_key_cache_forgets_its_oldest_sixteenth_and_keys_stay_the_same() -> None:
    h = VisitorHasher(b"secret", 86400, 3600)
    now = 5 * DAY_MS + 20 * 3_600_000
    first = h.key("s", "10.0.0.0", "UA", now)
    for i in range(1, KEY_CACHE_SIZE):
        h.key("s", f"10.0.{i // 256}.{i % 256}", "UA", now)
    assert len(h._keys) == KEY_CACHE_SIZE  # full, nothing dropped yet
    newest = h.key("s", "10.1.0.0", "UA", now)  # one more: the oldest sixteenth goes
    assert len(h._keys) == KEY_CACHE_SIZE - KEY_CACHE_SIZE // 16 + 1
    cached = {key[1] for key in h._keys}
    assert "10.0.0.0" not in cached and "10.0.15.255" not in cached  # the 4,096 oldest
    assert "10.0.16.0" in cached and "10.1.0.0" in cached
    assert h.key("s", "10.0.0.0", "UA", now) == first  # made again, the same
    assert h.key("s", "10.1.0.0", "UA", now) == newest
    h.key("s", "10.0.0.0", "UA", now + DAY_MS)  # a new salt period empties it
    assert len(h._keys) == 1


def test_a_long_user_agent_is_hashed_and_not_kept() -> None:
    h = VisitorHasher(b"secret", 86400, 3600)
    long = "Mozilla/5.0 " + "x" * 8000
    first = h.key("s", "1.2.3.4", long, 5 * DAY_MS)
    assert h.key("s", "1.2.3.4", long, 5 * DAY_MS) == first  # the same key, made again
    assert not [k for k in h._keys if k[2] == long]
    h.key("s", "1.2.3.4", "Mozilla/5.0 short", 5 * DAY_MS)
    assert [k for k in h._keys if k[2] == "Mozilla/5.0 short"]
