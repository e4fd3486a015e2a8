// Validates an AsyncAPI document with the official parser (@asyncapi/parser), then checks every
// message example against its payload schema with Ajv (the parser's v3 rules do not).
// Exits 1 on any error, and on any warning/info/hint whose rule is not allow-listed below.
// Usage: node validate.mjs docs/asyncapi.yaml
import { readFile } from "node:fs/promises";
import { createRequire } from "node:module";
import { resolve } from "node:path";

// Both packages ship CommonJS; load them through require so Node resolves their `main`.
const require = createRequire(import.meta.url);
const { Parser, DiagnosticSeverity } = require("@asyncapi/parser");
const Ajv = require("ajv");

// Diagnostics accepted on purpose: rule code -> why. Errors are never allowed. Keep it short.
const ALLOWED = new Map([
  // The contract is written for AsyncAPI 3.0.0 (what our readers and tools target); 3.1 only
  // adds optional fields, so staying on 3.0 loses nothing.
  ["asyncapi-latest-version", "contract targets AsyncAPI 3.0.0 on purpose"],
]);

const SEVERITY = ["error", "warning", "info", "hint"];

function reportDiagnostics(file, diagnostics) {
  let failures = 0;
  for (const d of diagnostics) {
    const where = d.path && d.path.length ? d.path.join(".") : "(document)";
    const line = d.range ? `${d.range.start.line + 1}:${d.range.start.character + 1}` : "?";
    const level = SEVERITY[d.severity] ?? String(d.severity);
    const allowed = d.severity !== DiagnosticSeverity.Error && ALLOWED.has(d.code);
    if (!allowed) failures += 1;
    const verdict = allowed ? `allowed: ${ALLOWED.get(d.code)}` : "FAIL";
    console.log(`${file}:${line} ${level} ${d.code}: ${d.message} at ${where} [${verdict}]`);
  }
  return failures;
}

function checkExamples(file, document) {
  // Draft-07 semantics, as AsyncAPI 3.0 schemas are; `strict: false` lets documentation-only
  // keywords (examples, x-…) through without complaint.
  const ajv = new Ajv({ strict: false, allErrors: true });
  let failures = 0;
  let checked = 0;
  for (const message of document.allMessages()) {
    const name = message.id();
    const payload = message.payload();
    const examples = message.examples().all();
    if (!payload) {
      console.log(`${file}: message ${name} has no payload schema [FAIL]`);
      failures += 1;
      continue;
    }
    if (examples.length === 0) {
      console.log(`${file}: message ${name} has no example [FAIL]`);
      failures += 1;
      continue;
    }
    const validate = ajv.compile(payload.json());
    for (const example of examples) {
      checked += 1;
      if (!validate(example.payload())) {
        failures += 1;
        const label = `${name}/${example.name() ?? "?"}`;
        for (const e of validate.errors) {
          console.log(`${file}: example ${label}: ${e.instancePath || "/"} ${e.message} [FAIL]`);
        }
      }
    }
  }
  return { failures, checked };
}

async function main() {
  const file = process.argv[2];
  if (!file) {
    console.error("usage: node validate.mjs docs/asyncapi.yaml");
    return 2;
  }
  const source = resolve(file);
  const text = await readFile(source, "utf8");
  const { document, diagnostics } = await new Parser().parse(text, { source });
  let failures = reportDiagnostics(file, diagnostics);
  if (!document) {
    console.log(`${file}: not a valid AsyncAPI document`);
    return 1;
  }
  const examples = checkExamples(file, document);
  failures += examples.failures;
  const summary =
    `AsyncAPI ${document.version()}, ${document.allOperations().length} operations, ` +
    `${document.allMessages().length} messages, ${examples.checked} examples checked`;
  if (failures) {
    console.log(`${file}: INVALID (${failures} problem(s)); ${summary}`);
    return 1;
  }
  console.log(`${file}: valid; ${summary}`);
  return 0;
}

main().then(
  (code) => process.exit(code),
  (err) => {
    console.error(err);
    process.exit(1);
  },
);
