-- 005: tier profitability (DESIGN §1 (d)): per UTC calendar month, tier and user, then per tier.
--
-- Everything reads the deduplicated sources (FINAL): priced_events (cost, list value, savings;
-- each event once), overages (record = 'overage' is billed overage revenue; 'credit_draw' is
-- prepaid credit consumed), alerts and enforcement_changes (cap outcomes), and the plans of
-- scenario 'current' with the subscriptions (subscription revenue). Plain views, recomputed on
-- read, so they cannot double count whatever the sink replays (see 002).
--
-- Revenue of a user in a month = monthly_price x active_s / month_s of each plan period
-- (prorated to the second, truncated at 24 decimals) + overage billed + credits drawn. Credit
-- revenue is credits DRAWN: the pipeline has no top-up topic, so the prepaid money received
-- is not in the data; drawn credit is the revenue recognised when the credit is used.
-- A user is counted in the tier of the event / subscription period (plan_id), so a user who
-- changed plans mid-month appears in both tiers with the share that belongs to each.
CREATE VIEW IF NOT EXISTS ${db}.user_month_pnl AS
WITH
subs AS (
    SELECT
        s.month AS month,
        s.org_id AS org_id,
        s.plan_id AS plan_id,
        s.user_id AS user_id,
        sum(s.active_s) AS active_s,
        max(s.month_s) AS month_s,
        sum(toDecimal128(pl.monthly_price * s.active_s / s.month_s, 24)) AS subscription_revenue
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
        sum(cost) AS cost,
        sum(list_value) AS list_value,
        sum(saved_prompt_cache) AS saved_prompt_cache,
        sum(saved_semantic_cache) AS saved_semantic_cache,
        sum(saved_routing) AS saved_routing
    FROM ${db}.priced_events FINAL
    GROUP BY month, org_id, plan_id, user_id
),
billing AS (
    SELECT
        toStartOfMonth(event_time) AS month,
        toString(org_id) AS org_id,
        toString(plan_id) AS plan_id,
        user_id,
        sumIf(amount, record = 'overage') AS overage_revenue,
        sumIf(amount, record = 'credit_draw') AS credit_revenue,
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

-- Per month and tier. Parameterised by org: tier_pnl(org = '') for all organisations,
-- tier_pnl(org = 'acme') for one. Percentages are truncated to 4 decimals; margin_pct is NULL
-- for a tier without revenue. Cost percentiles are exact nearest-rank values (quantileExact)
-- over the tier's users, subscribers without usage included at 0; the top 1 % are the
-- ceil(users / 100) costliest users.
CREATE VIEW IF NOT EXISTS ${db}.tier_pnl AS
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
    if(revenue = 0, NULL,
        toDecimal128(divideDecimal(gross_margin * 100, revenue, 4), 4)) AS margin_pct,
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
