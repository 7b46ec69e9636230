-- Every consumed, non-duplicate event, with what the counting rules made of it.
-- One INSERT per partition per flush = one part = atomic; the (topic, partition, offset) columns
-- make the table its own record of consumer progress. The deduplication window (10000 inserts,
-- minutes at full speed) is how long an insert's token fences a late duplicate of it.
-- The aggregate projections are written inside each part, so daily counts and progress can
-- never disagree with the rows.
CREATE TABLE IF NOT EXISTS {table:events} {on_cluster}
(
    site LowCardinality(String),
    event_id UUID,
    type LowCardinality(String),
    ts DateTime64(3, 'UTC'),
    day Date,
    visitor String,
    visitor_key String,
    member UInt8,
    bot UInt8,
    starts_visit UInt8,
    pageview UInt8,
    url String,
    referrer String,
    title String,
    topic LowCardinality(String),
    kafka_partition UInt32,
    kafka_offset UInt64,
    PROJECTION daily
    (
        SELECT site, day, sum(starts_visit), sum(pageview) GROUP BY site, day
    ),
    PROJECTION progress
    (
        SELECT topic, kafka_partition, max(kafka_offset), max(ts) GROUP BY topic, kafka_partition
    )
)
ENGINE = {engine:events}
ORDER BY (site, ts)
SETTINGS {dedup_window_setting} = 10000
