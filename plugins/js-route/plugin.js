// Routes JSON events by severity: those at or above a threshold go to the `alarms`
// output, the rest to `events`, each with a `route` header saying which. A value
// that is not a JSON object with a numeric severity fails (dead-letter topic).
//
// Params: `field` (default "severity"), `threshold` (default 3).
import { log } from "weir:plugin/host@0.1.0";

let field = "severity";
let threshold = 3;
const decoder = new TextDecoder();
const encoder = new TextEncoder();

export function init(params) {
  for (const [key, value] of params) {
    if (key === "field") {
      field = value;
    } else if (key === "threshold") {
      threshold = Number(value);
      if (!Number.isFinite(threshold)) {
        throw `param \`threshold\` must be a number, not ${JSON.stringify(value)}`;
      }
    } else {
      throw `unknown param \`${key}\` (known: field, threshold)`;
    }
  }
  log("info", `js-route: ${field} >= ${threshold} is an alarm`);
}

export function process(source, records) {
  const outputs = [];
  const failures = [];
  records.forEach((record, input) => {
    let event;
    try {
      event = JSON.parse(decoder.decode(record.value ?? new Uint8Array()));
    } catch (e) {
      failures.push({ input, reason: `not JSON: ${e.message}` });
      return;
    }
    const level = event === null || typeof event !== "object" ? undefined : event[field];
    if (typeof level !== "number") {
      failures.push({ input, reason: `no numeric ${field}` });
      return;
    }
    const target = level >= threshold ? "alarms" : "events";
    event.source = `${source.topic}/${source.partition}/${record.offset}`;
    outputs.push({
      input,
      target,
      key: record.key,
      value: encoder.encode(JSON.stringify(event)),
      headers: [...record.headers, { key: "route", value: encoder.encode(target) }],
    });
  });
  return { outputs, failures };
}
