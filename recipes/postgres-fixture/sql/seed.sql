-- Deterministic seed: 1,000 customers and 20,000 orders.
INSERT INTO customers
SELECT i, 'customer ' || i, (ARRAY['DE', 'FR', 'US', 'JP', 'BR'])[1 + i % 5]
FROM generate_series(1, 1000) AS i;
INSERT INTO orders
SELECT i, 1 + (i * 7919) % 1000, 100 + (i * 104729) % 50000, timestamptz '2026-01-01' + i * interval '13 minutes'
FROM generate_series(1, 20000) AS i;
ANALYZE;
