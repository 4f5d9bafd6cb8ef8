-- 004: plans, price sheets and subscriptions as data in ClickHouse (DESIGN §5, §6), so that the
-- tier P&L and the what-if replay are plain SQL over them.
--
-- Plans and prices are loaded from files (`spendstream analytics load-plans`, `load-prices`) as
-- whole snapshots: each load gets a new `version` under its `scenario` ('current' is the plan
-- catalog in force; a what-if loads its alternative under another scenario id). The *_latest
-- views keep only the newest snapshot of each scenario, so a plan removed from the file
-- disappears with the next load instead of lingering as a stale row.
CREATE TABLE IF NOT EXISTS ${db}.plans (
    scenario LowCardinality(String),
    version UInt64,
    plan_id String,
    name String,
    monthly_price Decimal(38, 24),
    source String,
    loaded_at DateTime64(6, 'UTC')
) ENGINE = ReplacingMergeTree
ORDER BY (scenario, version, plan_id);

-- One row per metered window of a plan. action: block | downgrade | overage. hours is 0 for
-- fixed windows. overage_unit_price / ceiling_usd are set only for action = 'overage'.
CREATE TABLE IF NOT EXISTS ${db}.plan_windows (
    scenario LowCardinality(String),
    version UInt64,
    plan_id String,
    window String,
    kind LowCardinality(String),
    unit LowCardinality(String),
    allowance Decimal(38, 24),
    hours UInt32,
    thresholds Array(UInt16),
    action LowCardinality(String),
    downgrade_model String,
    overage_unit_price Nullable(Decimal(38, 24)),
    ceiling_usd Nullable(Decimal(38, 24)),
    exempt_models Array(String)
) ENGINE = ReplacingMergeTree
ORDER BY (scenario, version, plan_id, window);

-- Per-token prices of a price sheet (LiteLLM field names), per scenario. Used by the what-if to
-- re-price stored tokens and to price a downgrade target.
CREATE TABLE IF NOT EXISTS ${db}.model_prices (
    scenario LowCardinality(String),
    version UInt64,
    model String,
    input_cost_per_token Decimal(38, 24),
    cache_read_input_token_cost Decimal(38, 24),
    cache_creation_input_token_cost Decimal(38, 24),
    output_cost_per_token Decimal(38, 24),
    output_cost_per_reasoning_token Decimal(38, 24)
) ENGINE = ReplacingMergeTree
ORDER BY (scenario, version, model);

CREATE VIEW IF NOT EXISTS ${db}.plans_latest AS
SELECT * FROM ${db}.plans FINAL
WHERE (scenario, version) IN (SELECT scenario, max(version) FROM ${db}.plans GROUP BY scenario);

CREATE VIEW IF NOT EXISTS ${db}.plan_windows_latest AS
SELECT * FROM ${db}.plan_windows FINAL
WHERE (scenario, version) IN (SELECT scenario, max(version) FROM ${db}.plans GROUP BY scenario);

CREATE VIEW IF NOT EXISTS ${db}.model_prices_latest AS
SELECT * FROM ${db}.model_prices FINAL
WHERE (scenario, version) IN (SELECT scenario, max(version) FROM ${db}.model_prices GROUP BY scenario);

-- The compacted subscriptions topic, landed by the sink: one row per record, the user's whole
-- plan schedule as parallel arrays (plan_ids[i] in force from effective_ats[i] on). Compaction
-- keeps the latest record per user; so does this table: ReplacingMergeTree keyed by user, the
-- newest received_at wins (the sink decodes records in offset order). Read with FINAL.
CREATE TABLE IF NOT EXISTS ${db}.subscriptions (
    user_id String,
    org_id LowCardinality(String),
    timezone LowCardinality(String),
    billing_anchor DateTime64(6, 'UTC'),
    plan_ids Array(String),
    effective_ats Array(DateTime64(6, 'UTC')),
    received_at DateTime64(6, 'UTC')
) ENGINE = ReplacingMergeTree(received_at)
ORDER BY user_id
SETTINGS non_replicated_deduplication_window = 1000;

-- The schedule flattened to periods [period_start, period_end); the last period is open
-- (period_end NULL): subscriptions have no end date in the data model.
CREATE VIEW IF NOT EXISTS ${db}.subscription_periods AS
SELECT
    user_id,
    toString(org_id) AS org_id,
    toString(timezone) AS timezone,
    billing_anchor,
    plan_ids[i] AS plan_id,
    effective_ats[i] AS period_start,
    if(i < length(plan_ids), toNullable(effective_ats[i + 1]), NULL) AS period_end
FROM ${db}.subscriptions FINAL
ARRAY JOIN arrayEnumerate(plan_ids) AS i;

-- Each period cut into UTC calendar months: active_s of month_s seconds (proration is exact to
-- the second). Open periods run to the later of now and the newest priced event, so the
-- current month counts a continuing subscriber in full.
CREATE VIEW IF NOT EXISTS ${db}.subscription_months AS
SELECT
    user_id,
    org_id,
    plan_id,
    month,
    dateDiff(
        'second',
        greatest(period_start, toDateTime64(month, 6, 'UTC')),
        least(
            coalesce(period_end, addMonths(toDateTime64(month, 6, 'UTC'), 1)),
            addMonths(toDateTime64(month, 6, 'UTC'), 1)
        )
    ) AS active_s,
    dateDiff(
        'second', toDateTime64(month, 6, 'UTC'), addMonths(toDateTime64(month, 6, 'UTC'), 1)
    ) AS month_s
FROM (
    SELECT
        p.*,
        (SELECT greatest(now64(6, 'UTC'), max(occurred_at)) FROM ${db}.priced_events) AS horizon
    FROM ${db}.subscription_periods AS p
)
ARRAY JOIN arrayMap(
    k -> addMonths(toStartOfMonth(period_start), k),
    range(toUInt32(greatest(0, dateDiff(
        'month', toStartOfMonth(period_start), toStartOfMonth(coalesce(period_end, horizon))
    ) + 1)))
) AS month
WHERE active_s > 0;
