"""Deterministic portal traffic with its ground truth computed independently of the product."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from tests.support.procs import send_beacon

BOT_UA = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"


@dataclass
class Truth:
    visits: int = 0
    pageviews: int = 0
    last: dict[str, tuple[str, bool]] = field(default_factory=dict)  # client -> (type, member)
    bots: set[str] = field(default_factory=set)

    @property
    def online(self) -> dict[str, int]:
        live = [m for t, m in self.last.values() if t != "leave"]
        members = sum(live)
        return {
            "guests": len(live) - members,
            "members": members,
            "total": len(live),
            "bots": len(self.bots),
        }


def portal_traffic(base: str, site: str, clients: int = 12) -> Truth:
    """Each client: a pageview, a heartbeat, a second pageview; every third client is a member;
    every fourth leaves; each beacon with an event_id is also sent a second time; two bots;
    some bad beacons. Every accepted beacon is counted by the truth below."""
    truth = Truth()
    for i in range(clients):
        client = f"203.0.113.{i + 1}"
        member = i % 3 == 0
        seen_before = False
        steps: list[tuple[str, dict[str, Any]]] = [
            ("pageview", {"url": f"https://portal.example.vn/news/{i}", "title": f"Tin {i}"}),
            ("heartbeat", {"url": f"https://portal.example.vn/news/{i}"}),
            ("pageview", {"url": f"https://portal.example.vn/news/{i}/more", "referrer": ""}),
        ]
        if i % 4 == 0:
            steps.append(("leave", {"url": f"https://portal.example.vn/news/{i}/more"}))
        for kind, extra in steps:
            event_id = str(uuid.uuid4())
            for _ in range(2):  # resent with the same event_id: counted once
                status = send_beacon(
                    base, site, client=client, type=kind, member=member, event_id=event_id, **extra
                )
                assert status == 202, status
            if kind == "pageview":
                truth.pageviews += 1
                if not seen_before:
                    truth.visits += 1
            seen_before = True
            truth.last[client] = (kind, member)
    for j in range(2):
        client = f"198.51.100.{j + 1}"
        assert send_beacon(base, site, client=client, user_agent=BOT_UA) == 202
        truth.bots.add(client)
    # refused beacons change nothing
    assert send_beacon(base, site, client="203.0.113.250", url="javascript:alert(1)") == 400
    assert send_beacon(base, "nosuchsite", client="203.0.113.250") == 403
    assert send_beacon(base, site, client="203.0.113.250", type="bogus") == 400
    assert send_beacon(base, site, client="203.0.113.250", event_id="not-a-uuid") == 400
    return truth
