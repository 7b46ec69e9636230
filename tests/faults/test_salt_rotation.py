"""The visitor key rotates (a salt period of 8 s here instead of a day) while visitors are
active: each stays one visitor, online and in their visit, across several rotations, on a
topic of several partitions, through two ingest processes."""

from __future__ import annotations

import clickhouse_connect
import pytest

from tests.faults.conftest import Deployment, assert_counter
from tests.faults.load import Plan, Sender
from tests.support.chdb_http import ChdbHttpServer

pytestmark = pytest.mark.faults

PERIOD = 8


def test_salt_rotation_in_the_middle_of_the_traffic(
    shared_deployment: Deployment, clickhouse: ChdbHttpServer
) -> None:
    d = shared_deployment
    rotation = {
        "VISITORSTATS_SALT_PERIOD_SECONDS": str(PERIOD),
        "VISITORSTATS_SALT_LINK_SECONDS": str(PERIOD),
    }
    ingests = [d.ingest(**rotation), d.ingest(**rotation)]
    aggregate = d.aggregate()
    # every visitor is active for 12-17 s (events 2.5 s apart): across one or two rotations;
    # a bot sends one beacon (bots are tallied per key)
    plan = Plan.generate(2_400, seed=17, per_visitor=(6, 8), bot_events=(1, 1))
    Sender([i.url for i in ingests], plan, threads=350, spacing=2.5).start().join()
    assert_counter(aggregate.url, plan)

    # the rotation did happen to the visitors counted once above: their events carry several
    # keys, linked to the first one
    client = clickhouse_connect.get_client(dsn=clickhouse.dsn)
    try:
        linked, keys = client.query(
            "SELECT uniqExactIf(visitor, visitor != visitor_key), uniqExact(visitor_key) "
            "FROM events WHERE NOT bot"
        ).result_rows[0]
    finally:
        client.close()
    humans = sum(not v.bot for v in plan.visitors)
    assert linked > humans * 0.9, (linked, humans)
    assert keys > humans * 1.9, (keys, humans)
