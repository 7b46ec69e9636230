-- Rows per site and 250 ms of ts, written inside each part (as the daily projection is): the
-- counter's online tally (services/aggregate/online.py) learns from these counts which stretches
-- of the window received rows since its last tick, reading a few rows per part instead of every
-- row of the window. The bucket expression is the one the query groups by, character for
-- character (BUCKET_MS there). Parts written before this migration get it here.
ALTER TABLE {table:events} {on_cluster}
    ADD PROJECTION IF NOT EXISTS buckets
    (
        SELECT site, intDiv(toUnixTimestamp64Milli(ts), 250), count()
        GROUP BY site, intDiv(toUnixTimestamp64Milli(ts), 250)
    );
ALTER TABLE {table:events} {on_cluster} MATERIALIZE PROJECTION buckets
    SETTINGS mutations_sync = 2
