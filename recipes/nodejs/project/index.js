// A small service's code path: its configuration parsed with js-yaml, version
// ranges checked with semver, and a report computed with lodash. Requiring it
// loads the three libraries (lodash alone is half a megabyte of source) from disk.
const yaml = require("js-yaml");
const semver = require("semver");
const _ = require("lodash");

const config = yaml.load("service: orders\nrequires:\n  node: '>=18'\ncountries: [DE, FR, US, JP, BR]\n");

/** Orders by country, deterministic for a given n. */
function run(n) {
  const countries = config.countries;
  const orders = _.range(1, n + 1).map((i) => ({ id: i, country: countries[i % 5], cents: 100 + ((i * 104729) % 50000) }));
  const byCountry = _.mapValues(_.groupBy(orders, "country"), (list) => _.sumBy(list, "cents"));
  return { service: config.service, nodeOk: semver.satisfies("20.0.0", config.requires.node), orders: orders.length, byCountry };
}

module.exports = { run };
