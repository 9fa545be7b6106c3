"""The server's peak memory (VmHWM) on SmolLM2 under two loads (runtime-image/README.md).

Starts `kandle-runtime serve` on a free port, sends the requests of the chosen load, prints
the figures, and stops the server.

  prefix      the 407-token bench prompt of smollm2_reference.json, then three requests of the
              same prompt with a short question after it (`max_tokens: 1` each): with the
              prefix cache on, the three are continued from the kept prompt (Prefix cache).
              Prints each request's time and prompt tokens.
  concurrent  32 short completions at once (a one-line prompt, 16 greedy tokens each): what
              each running sequence's KV cache costs when sequences are short (Engine).

    python3 runtime-image/examples/server_rss.py prefix BIN GGUF FIXTURES [serve args...]
    python3 runtime-image/examples/server_rss.py concurrent BIN GGUF [serve args...]
"""
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request


def complete(base, body):
    """One `/v1/completions` request; its answer."""
    request = urllib.request.Request(
        base + "/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    return json.load(urllib.request.urlopen(request))


def prefix_load(base, model, fixtures):
    prompt = json.load(open(fixtures + "/smollm2_reference.json"))["bench_prompt"]
    timings = []
    for question in ["", " What year was it?", " Who led it?", " Where did it end?"]:
        t = time.perf_counter()
        answer = complete(base, {"model": model, "prompt": prompt + question, "max_tokens": 1})
        ms = (time.perf_counter() - t) * 1000
        timings.append(f"{ms:.0f} ms ({answer['usage']['prompt_tokens']} tokens)")
    print("requests:", ", ".join(timings))


def concurrent_load(base, model):
    bodies = [
        {"model": model, "prompt": f"Question {i}: name a colour.", "max_tokens": 16,
         "temperature": 0}
        for i in range(32)
    ]
    threads = [threading.Thread(target=complete, args=(base, b)) for b in bodies]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print("32 concurrent short requests done")


def main():
    mode, binary, gguf = sys.argv[1:4]
    if mode == "prefix":
        fixtures, extra = sys.argv[4], sys.argv[5:]
    elif mode == "concurrent":
        fixtures, extra = None, ["--max-batch-size", "32"] + sys.argv[4:]
    else:
        sys.exit(f"unknown load {mode!r}: prefix or concurrent")
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [binary, "serve", "--model", gguf, "--host", "127.0.0.1", "--port", str(port)] + extra,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(400):
            try:
                urllib.request.urlopen(base + "/ready")
                break
            except Exception:
                time.sleep(0.05)
        else:
            sys.exit("the server did not become ready")
        model = json.load(urllib.request.urlopen(base + "/v1/models"))["data"][0]["id"]
        if mode == "prefix":
            prefix_load(base, model, fixtures)
        else:
            concurrent_load(base, model)
        status = open(f"/proc/{server.pid}/status").read().splitlines()
        hwm = next(line.split()[1] for line in status if line.startswith("VmHWM"))
        print(f"peak RSS {int(hwm) / 1024:.1f} MiB")
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
