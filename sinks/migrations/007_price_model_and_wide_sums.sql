-- 007: what a call's price depends on, stored with each priced event, and the usage and P&L
-- views of 002 and 005 re-created so that no money sum can wrap and the savings split has its
-- fourth cause (docs/DESIGN.md, "Exact money" and "Storage").
--
-- priced_events gains the contract's token classes (1-hour cache writes, audio and image
-- tokens), the service tier and web searches of the call, the saving of the service tier
-- (list value at standard tier minus the cost at the tier the call ran in, signed: priority
-- costs more) and whether the price was approximated (a rate the price map does not define for
-- the combination, priced at the closest one). Rows landed before keep the defaults: standard
-- tier, nothing approximated, no saving of that kind. The usage views also count batch and
-- approximated requests.
--
-- Money is stored as Decimal(38, 24). ClickHouse's sum() of a Decimal(38, 24) returns a
-- Decimal(38, 24) and wraps silently once the total leaves its 128-bit range (about
-- 1.7 * 10^14 USD), and so does a Decimal(38, 24) product (monthly_price * active_s wraps for
-- a plan above about 6 * 10^7 USD a month; gross_margin * 100 for a margin above about
-- 1.7 * 10^12 USD). One stored value stays in range (a priced event costs at most 2 * 10^6
-- USD), but sums of many do not. Every money sum and product here is therefore taken in
-- Decimal(76, 24) (toDecimal256(x, 24)): the same 24 decimals, so every value and every
-- truncation is what 002 and 005 compute where they did not wrap, with room for about
-- 5.7 * 10^51 USD, far beyond 2^64 events at the largest cost.
--
-- The outputs stay Decimal(76, 24), not narrowed back to Decimal(38, 24): a total above
-- 10^14 USD is a true total of valid events, and toDecimal128 would turn it into an error that
-- fails the whole query (every tier and month of a report or dashboard), while the OrNull /
-- OrZero conversions would lose it silently. Readers get exact decimals either way: chDB
-- results are JSON with decimals quoted as strings, clickhouse-connect returns Decimal.
--
-- Token sums stay UInt64: one call counts at most 10^8 tokens of each kind, so a group wraps
-- only after 1.8 * 10^11 calls of that size in one hour or day, plan and model. UInt128 would
-- reach JSON readers as an unquoted number past 64 bits, which some parse as a float.
--
-- Same view names, and the columns of 002 and 005 in their order (the service-tier saving
-- beside the other savings, the counts at the end); the reasoning of those files (plain views
-- over FINAL, never over rollups; revenue and tier definitions) is unchanged.
ALTER TABLE ${db}.priced_events
    ADD COLUMN IF NOT EXISTS cache_write_1h_tokens UInt64 DEFAULT 0 AFTER reasoning_tokens,
    ADD COLUMN IF NOT EXISTS input_audio_tokens UInt64 DEFAULT 0 AFTER cache_write_1h_tokens,
    ADD COLUMN IF NOT EXISTS input_image_tokens UInt64 DEFAULT 0 AFTER input_audio_tokens,
    ADD COLUMN IF NOT EXISTS output_audio_tokens UInt64 DEFAULT 0 AFTER input_image_tokens,
    ADD COLUMN IF NOT EXISTS output_image_tokens UInt64 DEFAULT 0 AFTER output_audio_tokens,
    ADD COLUMN IF NOT EXISTS service_tier LowCardinality(String) DEFAULT 'standard'
        AFTER output_image_tokens,
    ADD COLUMN IF NOT EXISTS web_search_requests UInt32 DEFAULT 0 AFTER service_tier,
    ADD COLUMN IF NOT EXISTS search_context_size LowCardinality(Nullable(String))
        AFTER web_search_requests,
    ADD COLUMN IF NOT EXISTS saved_service_tier Decimal(38, 24) DEFAULT 0 AFTER saved_routing,
    ADD COLUMN IF NOT EXISTS price_approximated Bool DEFAULT false AFTER unknown_model;

CREATE OR REPLACE VIEW ${db}.usage_hourly AS
SELECT
    toStartOfHour(occurred_at) AS hour,
    plan_id,
    served_model,
    count() AS requests,
    uniqExact(user_id) AS users,
    sum(input_tokens) AS input_tokens,
    sum(cached_input_tokens) AS cached_input_tokens,
    sum(cache_write_tokens) AS cache_write_tokens,
    sum(output_tokens) AS output_tokens,
    sum(reasoning_tokens) AS reasoning_tokens,
    countIf(semantic_cache_hit) AS semantic_cache_hits,
    sum(toDecimal256(cost, 24)) AS cost,
    sum(toDecimal256(list_value, 24)) AS list_value,
    sum(toDecimal256(saved_prompt_cache, 24)) AS saved_prompt_cache,
    sum(toDecimal256(saved_semantic_cache, 24)) AS saved_semantic_cache,
    sum(toDecimal256(saved_routing, 24)) AS saved_routing,
    sum(toDecimal256(saved_service_tier, 24)) AS saved_service_tier,
    countIf(service_tier = 'batch') AS batch_requests,
    countIf(price_approximated) AS approximated_requests
FROM ${db}.priced_events FINAL
GROUP BY hour, plan_id, served_model;

CREATE OR REPLACE VIEW ${db}.usage_daily AS
SELECT
    toDate(occurred_at) AS day,
    plan_id,
    served_model,
    count() AS requests,
    uniqExact(user_id) AS users,
    sum(input_tokens) AS input_tokens,
    sum(cached_input_tokens) AS cached_input_tokens,
    sum(cache_write_tokens) AS cache_write_tokens,
    sum(output_tokens) AS output_tokens,
    sum(reasoning_tokens) AS reasoning_tokens,
    countIf(semantic_cache_hit) AS semantic_cache_hits,
    sum(toDecimal256(cost, 24)) AS cost,
    sum(toDecimal256(list_value, 24)) AS list_value,
    sum(toDecimal256(saved_prompt_cache, 24)) AS saved_prompt_cache,
    sum(toDecimal256(saved_semantic_cache, 24)) AS saved_semantic_cache,
    sum(toDecimal256(saved_routing, 24)) AS saved_routing,
    sum(toDecimal256(saved_service_tier, 24)) AS saved_service_tier,
    countIf(service_tier = 'batch') AS batch_requests,
    countIf(price_approximated) AS approximated_requests
FROM ${db}.priced_events FINAL
GROUP BY day, plan_id, served_model;

-- Replaced before tier_pnl, which reads it: a view records its column types when created.
CREATE OR REPLACE VIEW ${db}.user_month_pnl AS
WITH
subs AS (
    SELECT
        s.month AS month,
        s.org_id AS org_id,
        s.plan_id AS plan_id,
        s.user_id AS user_id,
        sum(s.active_s) AS active_s,
        max(s.month_s) AS month_s,
        sum(toDecimal256(pl.monthly_price, 24) * s.active_s / s.month_s) AS subscription_revenue
    FROM ${db}.subscription_months AS s
    LEFT JOIN (
        SELECT plan_id, monthly_price FROM ${db}.plans_latest WHERE scenario = 'current'
    ) AS pl ON pl.plan_id = s.plan_id
    GROUP BY month, org_id, plan_id, user_id
),
usage AS (
    SELECT
        toStartOfMonth(occurred_at) AS month,
        toString(org_id) AS org_id,
        toString(plan_id) AS plan_id,
        user_id,
        count() AS requests,
        sum(toDecimal256(cost, 24)) AS cost,
        sum(toDecimal256(list_value, 24)) AS list_value,
        sum(toDecimal256(saved_prompt_cache, 24)) AS saved_prompt_cache,
        sum(toDecimal256(saved_semantic_cache, 24)) AS saved_semantic_cache,
        sum(toDecimal256(saved_routing, 24)) AS saved_routing,
        sum(toDecimal256(saved_service_tier, 24)) AS saved_service_tier
    FROM ${db}.priced_events FINAL
    GROUP BY month, org_id, plan_id, user_id
),
billing AS (
    SELECT
        toStartOfMonth(event_time) AS month,
        toString(org_id) AS org_id,
        toString(plan_id) AS plan_id,
        user_id,
        sumIf(toDecimal256(amount, 24), record = 'overage') AS overage_revenue,
        sumIf(toDecimal256(amount, 24), record = 'credit_draw') AS credit_revenue,
        countIf(record = 'overage') AS overage_events
    FROM ${db}.overages FINAL
    GROUP BY month, org_id, plan_id, user_id
),
alerted AS (
    SELECT
        toStartOfMonth(event_time) AS month,
        toString(org_id) AS org_id,
        toString(plan_id) AS plan_id,
        user_id,
        count() AS alerts,
        max(kind = 'threshold' AND threshold >= 100) AS reached_cap
    FROM ${db}.alerts FINAL
    GROUP BY month, org_id, plan_id, user_id
),
enforced AS (
    SELECT
        toStartOfMonth(as_of) AS month,
        toString(org_id) AS org_id,
        toString(plan_id) AS plan_id,
        user_id,
        max(state = 'blocked') AS blocked,
        max(state = 'downgrade') AS downgraded
    FROM ${db}.enforcement_changes FINAL
    GROUP BY month, org_id, plan_id, user_id
),
rerouted AS (
    -- Requests served on the downgrade model while the user's enforcement state (the latest
    -- change at or before the event) was 'downgrade'.
    SELECT
        toStartOfMonth(e.occurred_at) AS month,
        toString(e.org_id) AS org_id,
        toString(e.plan_id) AS plan_id,
        e.user_id AS user_id,
        count() AS requests_downgraded
    FROM (
        SELECT user_id, org_id, plan_id, occurred_at, toString(served_model) AS served_model
        FROM ${db}.priced_events FINAL
    ) AS e
    ASOF INNER JOIN (
        SELECT user_id, as_of, toString(state) AS state, toString(downgrade_to) AS downgrade_to
        FROM ${db}.enforcement_changes FINAL
    ) AS c ON e.user_id = c.user_id AND e.occurred_at >= c.as_of
    WHERE c.state = 'downgrade' AND e.served_model = c.downgrade_to
    GROUP BY month, org_id, plan_id, user_id
)
SELECT
    month,
    org_id,
    plan_id,
    user_id,
    toDecimal128(active_s, 24) / if(month_s = 0, 1, month_s) AS active_fraction,
    subscription_revenue,
    overage_revenue,
    credit_revenue,
    subscription_revenue + overage_revenue + credit_revenue AS revenue,
    requests,
    cost,
    list_value,
    saved_prompt_cache,
    saved_semantic_cache,
    saved_routing,
    saved_service_tier,
    revenue - cost AS margin,
    alerts,
    reached_cap OR blocked OR downgraded OR overage_events > 0 AS capped,
    blocked,
    downgraded,
    requests_downgraded,
    overage_events
FROM subs
FULL OUTER JOIN usage USING (month, org_id, plan_id, user_id)
FULL OUTER JOIN billing USING (month, org_id, plan_id, user_id)
FULL OUTER JOIN alerted USING (month, org_id, plan_id, user_id)
FULL OUTER JOIN enforced USING (month, org_id, plan_id, user_id)
FULL OUTER JOIN rerouted USING (month, org_id, plan_id, user_id);

-- The money columns of user_month_pnl are Decimal(76, 24) now, so their sums here are too.
-- active_subscribers stays a Decimal(38, 24) sum: each user adds at most 1.
-- margin_pct stays Decimal(76, 4): it has no lower bound (a tier earning 10^-24 USD against
-- 10^15 of cost is at -10^41 %), and narrowing it would fail the whole query. The two other
-- percentages lie between 0 and 100 and keep their Decimal(38, 4).
CREATE OR REPLACE VIEW ${db}.tier_pnl AS
SELECT
    month,
    plan_id AS tier,
    count() AS users,
    sum(active_fraction) AS active_subscribers,
    sum(subscription_revenue) AS subscription_revenue,
    sum(overage_revenue) AS overage_revenue,
    sum(credit_revenue) AS credit_revenue,
    sum(revenue) AS revenue,
    sum(requests) AS requests,
    sum(cost) AS inference_cost,
    sum(list_value) AS list_value,
    revenue - inference_cost AS gross_margin,
    if(revenue = 0, NULL, divideDecimal(gross_margin * 100, revenue, 4)) AS margin_pct,
    countIf(u_cost > u_revenue) AS users_cost_over_pay,
    toDecimal128(divideDecimal(toDecimal128(users_cost_over_pay * 100, 0),
        toDecimal128(users, 0), 4), 4) AS users_cost_over_pay_pct,
    quantileExact(0.5)(u_cost) AS cost_p50,
    quantileExact(0.9)(u_cost) AS cost_p90,
    quantileExact(0.99)(u_cost) AS cost_p99,
    if(inference_cost = 0, NULL, toDecimal128(divideDecimal(
        arraySum(arraySlice(arrayReverseSort(groupArray(u_cost)), 1, intDiv(users + 99, 100)))
            * 100,
        inference_cost, 4), 4)) AS top1pct_cost_share_pct,
    sum(saved_prompt_cache) AS saved_prompt_cache,
    sum(saved_semantic_cache) AS saved_semantic_cache,
    sum(saved_routing) AS saved_routing,
    sum(saved_service_tier) AS saved_service_tier,
    list_value - inference_cost AS saved_total,
    countIf(alerts > 0) AS users_alerted,
    countIf(capped) AS users_capped,
    countIf(blocked) AS users_blocked,
    countIf(downgraded) AS users_downgraded,
    sum(requests_downgraded) AS requests_downgraded,
    countIf(u_overage_events > 0) AS users_overage,
    sum(u_overage_events) AS overage_events
FROM (
    -- u_*: per-user values under names no output alias shadows
    SELECT *, revenue AS u_revenue, cost AS u_cost, overage_events AS u_overage_events
    FROM ${db}.user_month_pnl
    WHERE {org:String} = '' OR org_id = {org:String}
)
GROUP BY month, tier;
