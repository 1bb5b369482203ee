"""A Weir plugin in Python: removes fields from JSON records (e.g. personal data
before records leave the gateway).

Params: `fields`, a comma-separated list of field names to remove.
Records whose value is not a JSON object go to the dead-letter topic.
"""
import json

import wit_world
from wit_world.imports import host, types
from componentize_py_types import Err

REMOVE: list[str] = []


class WitWorld(wit_world.WitWorld):
    def init(self, params):
        global REMOVE
        settings = dict(params)
        if "fields" not in settings:
            raise Err("param `fields` is required")
        REMOVE = [f.strip() for f in settings["fields"].split(",") if f.strip()]
        host.log(types.Level.INFO, f"redacting {REMOVE}")

    def process(self, source, records):
        outputs, failures = [], []
        for i, record in enumerate(records):
            try:
                value = json.loads(record.value or b"")
                if not isinstance(value, dict):
                    raise ValueError("not a JSON object")
            except ValueError as e:
                failures.append(types.Failure(input=i, reason=f"not JSON: {e}"))
                continue
            for field in REMOVE:
                value.pop(field, None)
            outputs.append(types.OutputRecord(
                input=i,
                target="out",
                key=record.key,
                value=json.dumps(value, separators=(",", ":")).encode(),
                headers=record.headers,
            ))
        return types.BatchResult(outputs=outputs, failures=failures)
