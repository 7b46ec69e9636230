-- Each time a site's online total beats its previous peak, one row. peak = argMax(at, online).
CREATE TABLE IF NOT EXISTS {table:peaks} {on_cluster}
(
    site LowCardinality(String),
    online UInt64,
    at DateTime64(3, 'UTC')
)
ENGINE = {engine:peaks}
ORDER BY (site, at)
