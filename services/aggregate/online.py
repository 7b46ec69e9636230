"""Who is online, as one query over the stored rows: the rules the consumers' per-partition
tallies follow (``counting.PartitionState``, written to ``online_now``), kept as the oracle of
the tests and the bench. Over the rows of the last ``L`` seconds (``L`` = the longest window of
all sites), per (site, visitor), the latest row by ``(ts, micros, kafka_offset)``; online when
that row is within the site's window and not a ``leave``; a bot when any of those rows is a bot,
else a member when the latest row says so, else a guest.

The service never runs it: its cost follows the rows of the window, where the tallies cost the
changes."""

from __future__ import annotations

# Parameters: since (ms, now - L), now (ms), sites, windows (ms, in the order of sites).
ONLINE_BY_QUERY = """
SELECT site,
       countIf(NOT bot AND latest != 'leave' AND NOT member),
       countIf(NOT bot AND latest != 'leave' AND member),
       countIf(bot AND latest != 'leave')
FROM (
    SELECT site, visitor,
           argMax(type, (ts, micros, kafka_offset)) AS latest,
           argMax(member, (ts, micros, kafka_offset)) AS member,
           max(bot) AS bot,
           max(ts) AS last_ts
    FROM events
    WHERE ts >= fromUnixTimestamp64Milli({since:Int64}, 'UTC')
      AND site IN {sites:Array(String)}
    GROUP BY site, visitor
)
WHERE toUnixTimestamp64Milli(last_ts)
      >= {now:Int64} - transform(site, {sites:Array(String)}, {windows:Array(Int64)}, toInt64(0))
GROUP BY site
"""
