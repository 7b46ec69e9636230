-- Who is online, per partition and site: the aggregate process owning a partition computes it
-- from its counting state (services/aggregate/counting.py) and writes a row with each flush
-- (after that flush's events are stored and checked) and when time alone changed it. The
-- counter sums, over the partitions of its topic, the row of each (partition, site) with the
-- greatest version = (next_offset << 64 | at in ms): a new owner resumes at or after every
-- offset a former owner stored, so a fenced former owner's late row never overrides it. The
-- replacing merges keep that row only.
CREATE TABLE IF NOT EXISTS {table:online_now} {on_cluster}
(
    topic LowCardinality(String),
    kafka_partition UInt32,
    site LowCardinality(String),
    guests UInt64,
    members UInt64,
    bots UInt64,
    next_offset UInt64,
    at DateTime64(3, 'UTC'),
    version UInt128
)
ENGINE = {engine:online_now:Replacing(version)}
ORDER BY (topic, kafka_partition, site)
