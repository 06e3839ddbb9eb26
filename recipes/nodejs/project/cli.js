// The cold way: a new Node process that requires the project and runs it.

process.stdout.write(`${JSON.stringify(require("./index.js").run(Number(process.argv[2] || 10000)))}\n`);
