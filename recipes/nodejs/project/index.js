// A small service's code path: an express app with its routes, and a report
// computed with lodash. Requiring it loads express's ~60 modules from disk.

const express = require("express");
const _ = require("lodash");

const app = express();
app.get("/orders/:id", (req, res) => res.json({ id: Number(req.params.id) }));
app.get("/report", (_req, res) => res.json(run(1000)));

/** Orders by country, deterministic for a given n. */
function run(n) {
  const countries = ["DE", "FR", "US", "JP", "BR"];
  const orders = _.range(1, n + 1).map((i) => ({ id: i, country: countries[i % 5], cents: 100 + ((i * 104729) % 50000) }));
  const byCountry = _.mapValues(_.groupBy(orders, "country"), (list) => _.sumBy(list, "cents"));
  return { orders: orders.length, routes: app._router.stack.filter((l) => l.route).length, byCountry };
}

module.exports = { app, run };
