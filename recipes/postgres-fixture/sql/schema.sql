CREATE TABLE customers (
  id integer PRIMARY KEY,
  name text NOT NULL,
  country text NOT NULL
);
CREATE TABLE orders (
  id integer PRIMARY KEY,
  customer_id integer NOT NULL REFERENCES customers (id),
  amount_cents integer NOT NULL CHECK (amount_cents > 0),
  placed_at timestamptz NOT NULL
);
CREATE INDEX orders_customer ON orders (customer_id);
