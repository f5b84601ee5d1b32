#!/usr/bin/env python3
"""Runs examples/linux_device against a real `ddp serve` and checks, end to end: the reload
arrives, a REST write arrives, a device write is visible over REST, the device's ack shows in
GET /devices/{id}/sync, a command arrives, and after the server restarts (with a change made
while the device was away) the device reconnects and gets a fresh reload. Usage: live_test.py DDP_BINARY LINUX_DEVICE_BINARY.
Exits 77 (skipped) when the ddp binary is missing."""
import json, os, queue, secrets, shutil, string, subprocess, sys, tempfile, threading, time, urllib.request

ddp_bin, device_bin = sys.argv[1], sys.argv[2]
if not os.path.exists(ddp_bin):
    print(f"no {ddp_bin} (cargo build first): skipped")
    sys.exit(77)

admin = "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(32))
data = tempfile.mkdtemp(prefix="ddp-c-live-")


def start(http="127.0.0.1:0", mqtt="127.0.0.1:0"):
    return subprocess.Popen([ddp_bin, "serve", "--data-dir", data, "--http-listen", http,
                             "--mqtt-listen", mqtt, "--admin-key", admin, "--log-format", "json"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def listeners(proc, want):
    """The addresses `proc` says it listens on, by transport, once all of `want` are known."""
    found = {}
    deadline = time.time() + 30
    while not want <= found.keys() and time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("message") == "listening" and rec.get("transport") in want:
            found[rec["transport"]] = rec["addr"]
    if not want <= found.keys():
        fail(f"the server did not report its listeners: {found}")
    threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
    return found


def stop(proc):
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()


server = start()
device = None

def fail(msg):
    print("FAIL:", msg)
    sys.exit(1)

try:
    addrs = listeners(server, {"http", "mqtt"})
    base = "http://" + addrs["http"]
    mqtt_host, mqtt_port = addrs["mqtt"].rsplit(":", 1)

    def rest(method, path, body=None, token=admin):
        req = urllib.request.Request(base + path, method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Authorization": "ModeCloud " + token, "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            text = r.read().decode()
            return r.status, (json.loads(text) if text else None)

    _, dev = rest("POST", "/devices", {"name": "c-sdk-live"})
    did, dkey = dev["id"], dev["apiKey"]
    rest("PUT", f"/devices/{did}/kv/greeting", {"value": "hello"})

    device = subprocess.Popen([device_bin, mqtt_host, mqtt_port, str(did), dkey], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, bufsize=1)
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(l.rstrip("\n")) for l in device.stdout], daemon=True).start()

    def expect(prefix, timeout=10):
        end = time.time() + timeout
        while time.time() < end:
            try:
                l = lines.get(timeout=0.2)
            except queue.Empty:
                continue
            print("device:", l)
            if l.startswith(prefix):
                return l
        fail(f"the device never printed {prefix!r}")

    def poll(what, check, timeout=10):
        end = time.time() + timeout
        while time.time() < end:
            got = check()
            if got:
                return got
            time.sleep(0.1)
        fail(what)

    expect('change greeting "hello" 1')
    expect("reload 1")
    print("ok: the reload arrived")

    rest("PUT", f"/devices/{did}/kv/temp", {"value": 21.5})
    expect("change temp 21.5 2")
    print("ok: a REST write arrived")

    device.stdin.write('set fromdevice {"a": [1, 2]}\n')
    device.stdin.flush()
    expect("result set DDP_OK")
    def device_write_visible():
        try:
            return rest("GET", f"/devices/{did}/kv/fromdevice")[1]["value"] == {"a": [1, 2]}
        except urllib.error.HTTPError:
            return False
    poll("the device's write never showed over REST", device_write_visible)
    expect('change fromdevice {"a":[1,2]} 3')
    print("ok: a device write is visible over REST")

    poll("the ack never showed in /sync", lambda: rest("GET", f"/devices/{did}/sync")[1].get("appliedRev") == 3)
    print("ok: the ack shows in GET /devices/{id}/sync")

    rest("PUT", f"/devices/{did}/command", {"action": "blink", "parameters": {"n": 3}})
    expect('command blink {"n":3}')
    print("ok: a command arrived")

    # The server restarts; while the device is away (MQTT off) a key changes; with MQTT back on
    # the same port the device reconnects, subscribes again and gets a fresh reload holding it.
    stop(server)
    server = start(http=addrs["http"], mqtt="off")
    listeners(server, {"http"})
    rest("PUT", f"/devices/{did}/kv/temp", {"value": 19.0})
    stop(server)
    server = start(http=addrs["http"], mqtt=addrs["mqtt"])
    listeners(server, {"http", "mqtt"})
    expect("reload 4", timeout=30)
    device.stdin.write("print\n")
    device.stdin.flush()
    expect("  temp = 19.0")
    print("ok: after a server restart the device got a fresh reload")

    device.stdin.write("quit\n")
    device.stdin.flush()
    device.wait(timeout=10)
    print("PASS")
finally:
    if device and device.poll() is None:
        device.kill()
    stop(server)
    shutil.rmtree(data, ignore_errors=True)
