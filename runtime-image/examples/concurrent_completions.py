#!/usr/bin/env python3
"""Aggregate tok/s of 1 and N concurrent /v1/completions requests against a running
kandle-runtime server (standard library only). The README's through-the-server figure for
the f32 llama of examples/bench_f32_llama.rs was taken with it:

    kandle-runtime serve --model /tmp/kandle-bench-f32-llama --port 18081 --threads 2 &
    python3 runtime-image/examples/concurrent_completions.py --url http://127.0.0.1:18081

Each request asks for --tokens greedy tokens with ignore_eos, so every request generates the
same number of tokens; the prompt is processed inside the timed window.
"""
import argparse
import json
import threading
import time
import urllib.request


def served_model(url):
    with urllib.request.urlopen(f"{url}/v1/models") as r:
        return json.load(r)["data"][0]["id"]


def complete(url, model, prompt, tokens):
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": tokens,
                       "temperature": 0, "ignore_eos": True}).encode()
    req = urllib.request.Request(f"{url}/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req) as r:
        return json.load(r)["usage"]["completion_tokens"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--concurrent", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    model = served_model(args.url)
    prompt = "hello world " * 10
    for rnd in range(args.rounds):
        for n in (1, args.concurrent):
            done, errors = [], []

            def one():
                try:
                    done.append(complete(args.url, model, prompt, args.tokens))
                except Exception as e:  # noqa: BLE001 - reported below
                    errors.append(e)

            threads = [threading.Thread(target=one) for _ in range(n)]
            t0 = time.time()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            dt = time.time() - t0
            if errors:
                raise SystemExit(f"{len(errors)} request(s) failed: {errors[0]}")
            print(f"round {rnd}: {n} concurrent: {sum(done)} tokens in {dt:.2f} s = "
                  f"{sum(done) / dt:.1f} tok/s")


if __name__ == "__main__":
    main()
