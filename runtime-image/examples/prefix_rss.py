"""The prefix cache's memory and speed on SmolLM2 (runtime-image/README.md, Prefix cache).

Starts `kandle-runtime serve` on a free port, sends the 407-token bench prompt of
smollm2_reference.json, then three requests of the same prompt with a short question after it
(each `max_tokens: 1`), and prints each request's time and prompt tokens and the server's peak
RSS (VmHWM) at the end. With the prefix cache on, the three are continued from the kept prompt.

    python3 runtime-image/examples/prefix_rss.py BIN GGUF FIXTURES [serve args...]
    # e.g. ... --prefix-cache-tokens 0   for the same without the cache
"""
import json
import socket
import subprocess
import sys
import time
import urllib.request

binary, gguf, fixtures, extra = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
prompt = json.load(open(fixtures + "/smollm2_reference.json"))["bench_prompt"]
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
    timings = []
    for question in ["", " What year was it?", " Who led it?", " Where did it end?"]:
        body = json.dumps({"model": model, "prompt": prompt + question, "max_tokens": 1})
        request = urllib.request.Request(
            base + "/v1/completions", body.encode(), {"Content-Type": "application/json"}
        )
        t = time.perf_counter()
        answer = json.load(urllib.request.urlopen(request))
        ms = (time.perf_counter() - t) * 1000
        timings.append(f"{ms:.0f} ms ({answer['usage']['prompt_tokens']} tokens)")
    status = open(f"/proc/{server.pid}/status").read().splitlines()
    hwm = next(line.split()[1] for line in status if line.startswith("VmHWM"))
    print("requests:", ", ".join(timings), f"; peak RSS {int(hwm) / 1024:.1f} MiB")
finally:
    server.terminate()
    server.wait()
