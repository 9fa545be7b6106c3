"""The server's peak memory under many short concurrent requests (runtime-image/README.md).

Starts `kandle-runtime serve` on a free port, sends 32 short completions at once (a one-line
prompt each, 16 greedy tokens), and prints the server's peak RSS (VmHWM): what each running
sequence's KV cache costs when sequences are short.

    python3 runtime-image/examples/concurrent_rss.py BIN GGUF
"""
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request

binary, gguf = sys.argv[1], sys.argv[2]
s = socket.socket()
s.bind(("127.0.0.1", 0))
port = s.getsockname()[1]
s.close()
base = f"http://127.0.0.1:{port}"
server = subprocess.Popen(
    [binary, "serve", "--model", gguf, "--host", "127.0.0.1", "--port", str(port),
     "--max-batch-size", "32"],
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

    def complete(i):
        body = json.dumps({"model": model, "prompt": f"Question {i}: name a colour.",
                           "max_tokens": 16, "temperature": 0})
        request = urllib.request.Request(
            base + "/v1/completions", body.encode(), {"Content-Type": "application/json"}
        )
        urllib.request.urlopen(request).read()

    threads = [threading.Thread(target=complete, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    status = open(f"/proc/{server.pid}/status").read().splitlines()
    hwm = next(line.split()[1] for line in status if line.startswith("VmHWM"))
    print(f"32 concurrent short requests: peak RSS {int(hwm) / 1024:.1f} MiB")
finally:
    server.terminate()
    server.wait()
