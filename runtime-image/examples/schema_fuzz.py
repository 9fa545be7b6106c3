#!/usr/bin/env python3
"""Random JSON schemas against a running kandle-runtime server's structured outputs: every
answer that ends by itself must be valid against its schema by the `jsonschema` package
(`pip install jsonschema`), every refusal a 400, and nothing a 5xx. The runtime README's
structured-outputs paragraph was checked with it:

    kandle-runtime serve --model SmolLM2-135M-Instruct.Q4_1.gguf --port 18811 &
    python3 runtime-image/examples/schema_fuzz.py --url http://127.0.0.1:18811 --seed 4

It prints the outcomes by kind: `valid` (ended, and the schema accepts it), `cut` (ended by
max_tokens, so not complete JSON), `refused` (a schema outside kandle's subset: 400), and
each failure in full. The schemas mix what kandle follows (types and type lists, nested
properties, items with minItems/maxItems, enum, const, anyOf of alternatives that start
differently, maps, string lengths, patterns and formats, number bounds, checked with jsonschema's format
checker: `pip install rfc3339-validator fqdn rfc3987 isoduration` for date-time and time,
hostname, uri and duration, which it otherwise passes unchecked) with what it refuses
(look-ahead patterns, unknown formats, multipleOf, oneOf alternatives that start alike, an
empty enum); anyOf alternatives that start alike (two objects, an integer or a number) are
followed.
"""
import argparse
import json
import random
import threading
import urllib.error
import urllib.request
from collections import Counter

import jsonschema


def leaf(r):
    return r.choice([
        {"type": "string"}, {"type": "integer"}, {"type": "number"}, {"type": "boolean"},
        {"type": "null"}, {}, True, {"enum": ["a", "b", 1, None, True]}, {"const": "x"},
        {"type": ["string", "null"]}, {"anyOf": [{"type": "integer"}, {"type": "null"}]},
        {"type": "string", "pattern": "x"}, {"enum": []}, {"type": "array"},
        {"type": "string", "minLength": 2, "maxLength": 5}, {"type": "string", "maxLength": 0},
        {"type": "string", "pattern": "^[A-Z]{2}[0-9]{2,4}$"}, {"type": "string", "pattern": "b+c"},
        {"type": "string", "pattern": "^(yes|no)\\.$"}, {"type": "string", "pattern": "a(?=b)"},
        {"type": "string", "format": "date"}, {"type": "string", "format": "date-time"},
        {"type": "string", "format": "time"}, {"type": "string", "format": "uuid"},
        {"type": "string", "format": "email"}, {"type": "string", "format": "ipv4"},
        {"type": "string", "format": "hostname"}, {"type": "string", "format": "ipv6"},
        {"type": "string", "format": "uri"}, {"type": "string", "format": "duration"},
        {"type": "string", "format": "iri"}, {"type": ["string", "null"], "maxLength": 3},
        {"type": "integer", "minimum": 0}, {"type": "integer", "minimum": -3, "maximum": 7},
        {"type": "number", "exclusiveMinimum": 0, "maximum": 1}, {"type": "integer", "maximum": -100},
        {"type": "number", "minimum": 2.5, "maximum": 2.75}, {"type": "integer", "multipleOf": 2},
        {"type": "object"}, {"enum": ["é", "東京", "\"q\""]}, {"type": ["integer", "number"]},
        {"oneOf": [{"type": "string"}, {"type": "array", "items": {}}]},
        {"type": "object", "additionalProperties": {"type": "integer"}},
        {"type": "object", "additionalProperties": False},
        {"anyOf": [{"type": "object", "properties": {"k": {"const": "a"}, "n": {"type": "integer"}},
                    "required": ["k", "n"]},
                   {"type": "object", "properties": {"k": {"const": "b"}, "s": {"type": "string"}},
                    "required": ["k", "s"]}]},
        {"anyOf": [{"type": "integer", "minimum": 5}, {"type": "number", "maximum": 0}]},
        {"oneOf": [{"type": "integer"}, {"type": "number"}]},
        {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}], "items": False},
        {"type": "array", "prefixItems": [{"type": "boolean"}], "items": {"type": "null"},
         "minItems": 1},
    ])


def schema(r, depth=0):
    k = r.random()
    if depth > 3 or k < 0.3:
        return leaf(r)
    if k < 0.6:
        keys = ["a", "b", "c", "é", "a b", "\"", "\\", ""]
        props = {r.choice(keys): schema(r, depth + 1) for _ in range(r.randint(0, 4))}
        s = {"type": "object", "properties": props}
        if r.random() < 0.5:
            # All of them (OpenAI's strict mode), or some: the others may be left out.
            s["required"] = r.choice([list(props), r.sample(list(props), r.randint(0, len(props)))])
        if r.random() < 0.3:
            s["additionalProperties"] = r.choice([False, True, {"type": "integer"}])
        return s
    s = {"type": "array", "items": schema(r, depth + 1)}
    if r.random() < 0.4:
        s["minItems"] = r.randint(0, 2)
    if r.random() < 0.4:
        s["maxItems"] = r.randint(0, 3)
    return s


def one(url, model, r, seed):
    sc = schema(r)
    body = {
        "model": model, "messages": [{"role": "user", "content": "Give data."}],
        "max_tokens": 60, "temperature": 1.0, "seed": seed,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": sc}},
    }
    req = urllib.request.Request(f"{url}/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            answer = json.load(resp)
    except urllib.error.HTTPError as e:
        return "refused" if e.code == 400 else ("http", e.code, sc, e.read()[:300])
    choice = answer["choices"][0]
    if choice["finish_reason"] != "stop":
        return "cut"
    text = choice["message"]["content"]
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        return ("not JSON", sc, text, str(e))
    try:
        jsonschema.validate(value, {} if sc is True else sc,
                            format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    except jsonschema.ValidationError as e:
        return ("invalid", sc, text, e.message)
    return "valid"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:18811")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--requests", type=int, default=240)
    p.add_argument("--threads", type=int, default=4)
    a = p.parse_args()
    with urllib.request.urlopen(f"{a.url}/v1/models") as r:
        model = json.load(r)["data"][0]["id"]
    results = []

    def worker(k):
        r = random.Random(a.seed * 1000 + k)
        for i in range(k, a.requests, a.threads):
            results.append(one(a.url, model, r, i))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(a.threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(dict(Counter(x if isinstance(x, str) else x[0] for x in results)))
    failures = [x for x in results if not isinstance(x, str)]
    for f in failures:
        print(f)
    raise SystemExit(1 if failures else 0)


if __name__ == "__main__":
    main()
