#!/usr/bin/env python3
"""Send the same requests to two ComfyUI servers and diff what comes back.

    python3 scripts/fidelity/diff.py --a http://127.0.0.1:8190 --b http://127.0.0.1:8188 \
        [--label-a double] [--label-b real] [--only SCENARIO ...] [--json OUT.json]

A is meant to be the test double (examples/fake_comfyui.rs), B a real ComfyUI
(scripts/fidelity/setup-real-comfyui.sh). Each scenario below runs against A, then
against B; every observation (HTTP status, JSON body, websocket event sequence, ...) is
normalized (prompt and client ids become P1/C1..., timestamps, random filename parts,
uuids and absolute paths become placeholders) and printed side by side: `=` where both
servers agree, `!` with the JSON paths that differ where they do not. Exits 0 whatever
the diff says (it is a report, not a test); 2 when a server cannot be reached.

Only the Python standard library and `websocket-client` (import name `websocket`).
Every connection goes to the two URLs given; every request has a timeout and every wait
is bounded.
"""

import argparse
import difflib
import io
import json
import re
import struct
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import zlib

try:
    import websocket  # websocket-client
except ImportError:  # pragma: no cover
    sys.exit("diff.py needs websocket-client: pip install websocket-client")

HTTP_TIMEOUT = 30.0
PROMPT_TIMEOUT = 60.0  # one prompt of model-free nodes, start to `executing` null
SETTLE = 0.5  # after the last event, for trailing broadcasts


# --------------------------------------------------------------------------- helpers


def png_bytes(width=8, height=8, rgb=(200, 30, 30)):
    """A valid RGB PNG, stdlib only."""

    def chunk(kind, data):
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    row = b"\x00" + bytes(rgb) * width
    raw = row * height
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


class Normalizer:
    """Replaces what differs between runs (not between servers) by stable names."""

    UUID = re.compile(r"[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}")
    TEMP = re.compile(r"_temp_[a-z]{5}_")
    ABS_PATH = re.compile(r"(?<![\w.])/(?:[\w.@+-]+/)+[\w.@+ ()-]*")

    SETS = ("executed", "current_outputs", "dependent_outputs")

    def __init__(self):
        self.names = {}  # token -> placeholder
        self.counts = {}

    def name(self, token, kind):
        if token not in self.names:
            self.counts[kind] = self.counts.get(kind, 0) + 1
            self.names[token] = f"<{kind}{self.counts[kind]}>"
        return self.names[token]

    def text(self, s):
        # Longest first: a prompt id may contain a shorter token.
        for token in sorted(self.names, key=len, reverse=True):
            if token in s:
                s = s.replace(token, self.names[token])
        s = self.TEMP.sub("_temp_<rnd>_", s)
        s = self.UUID.sub("<uuid>", s)
        s = self.ABS_PATH.sub("<path>", s)
        return s

    def value(self, v, key=None):
        if key in ("timestamp", "ram_free", "ram_total", "vram_free", "vram_total",
                   "torch_vram_free", "torch_vram_total"):
            return f"<{type(v).__name__}>"
        if key == "number" and isinstance(v, (int, float)):
            return "<number>"
        if key in self.SETS and isinstance(v, list) and all(isinstance(x, str) for x in v):
            # Python sets in ComfyUI: their order follows string hashing, new each start.
            return sorted(self.text(x) for x in v)
        if key == "traceback" and isinstance(v, list):
            return f"<{len(v) and 'non-empty ' or ''}list>"
        if isinstance(v, dict):
            return {self.text(k): self.value(x, k) for k, x in v.items()}
        if isinstance(v, list):
            return [self.value(x) for x in v]
        if isinstance(v, str):
            return self.text(v)
        return v


def shape(v, depth=0, max_depth=6):
    """Keys and types, not values: for bodies whose values are the machine's own."""
    if depth >= max_depth:
        return type(v).__name__
    if isinstance(v, dict):
        return {k: shape(x, depth + 1, max_depth) for k, x in sorted(v.items())}
    if isinstance(v, list):
        return [shape(x, depth + 1, max_depth) for x in v[:3]] + (["..."] if len(v) > 3 else [])
    if v is None:
        return "null"
    return type(v).__name__


class Http:
    def __init__(self, base):
        self.base = base.rstrip("/")

    def request(self, method, path, body=None, headers=None):
        """(status, content-type, bytes); status 0 when nothing came back."""
        data = body
        hdrs = dict(headers or {})
        if isinstance(body, (dict, list)):
            data = json.dumps(body).encode()
            hdrs.setdefault("Content-Type", "application/json")
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=hdrs)
        try:
            with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT) as r:
                return r.status, r.headers.get("Content-Type", ""), r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.headers.get("Content-Type", ""), e.read()
        except (urllib.error.URLError, OSError) as e:
            return 0, "", f"no answer: {e}".encode()

    def multipart(self, path, fields):
        """fields: [(name, filename or None, bytes)]."""
        boundary = "fidelity" + uuid.uuid4().hex
        out = io.BytesIO()
        for name, filename, data in fields:
            out.write(f"--{boundary}\r\n".encode())
            disp = f'form-data; name="{name}"'
            if filename is not None:
                disp += f'; filename="{filename}"'
            out.write(f"Content-Disposition: {disp}\r\n".encode())
            if filename is not None:
                out.write(b"Content-Type: image/png\r\n")
            out.write(b"\r\n" + data + b"\r\n")
        out.write(f"--{boundary}--\r\n".encode())
        return self.request("POST", path, out.getvalue(),
                            {"Content-Type": f"multipart/form-data; boundary={boundary}"})


def body_of(status, ctype, raw):
    """A response as one comparable value: JSON when it parses, else a description."""
    if status == 0:
        return {"status": 0, "body": raw.decode(errors="replace")[:200]}
    try:
        parsed = json.loads(raw) if raw else None
    except ValueError:
        parsed = None
    if parsed is not None:
        return {"status": status, "json": parsed}
    kind = "png" if raw[:8] == b"\x89PNG\r\n\x1a\n" else ("empty" if not raw else "bytes")
    return {"status": status, "body": kind, "content_type": ctype.split(";")[0]}


class Socket:
    """One `/ws?clientId=` connection, read on a thread until closed or `deadline`."""

    def __init__(self, base, client_id, deadline=180.0):
        url = base.replace("http://", "ws://", 1).rstrip("/") + "/ws"
        if client_id is not None:
            url += "?clientId=" + client_id
        self.frames = []  # ("text", dict) | ("binary", type int, length)
        self.lock = threading.Lock()
        self.closed = threading.Event()
        self.ws = websocket.create_connection(url, timeout=10)
        self.ws.settimeout(0.25)
        self.until = time.monotonic() + deadline
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        while not self.closed.is_set() and time.monotonic() < self.until:
            try:
                opcode, data = self.ws.recv_data()
            except websocket.WebSocketTimeoutException:
                continue
            except Exception:
                break
            with self.lock:
                if opcode == websocket.ABNF.OPCODE_TEXT:
                    try:
                        self.frames.append(("text", json.loads(data)))
                    except ValueError:
                        self.frames.append(("text", {"type": "<not json>"}))
                elif opcode == websocket.ABNF.OPCODE_BINARY:
                    kind = struct.unpack(">I", data[:4])[0] if len(data) >= 4 else -1
                    self.frames.append(("binary", kind, len(data)))
                elif opcode == websocket.ABNF.OPCODE_CLOSE:
                    break
        self.closed.set()

    def snapshot(self):
        with self.lock:
            return list(self.frames)

    def wait_for(self, pred, timeout):
        """Until pred(frames) holds, the socket closes, or timeout; pred's last value."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if pred(self.snapshot()):
                return True
            if self.closed.is_set():
                break
            time.sleep(0.05)
        return pred(self.snapshot())

    def send(self, msg):
        self.ws.send(json.dumps(msg))

    def close(self):
        self.closed.set()
        try:
            self.ws.close(timeout=2)
        except Exception:
            pass
        self.thread.join(timeout=3)


def done_with(prompt_id):
    def pred(frames):
        for f in frames:
            if f[0] != "text":
                continue
            d = f[1].get("data") or {}
            if f[1].get("type") == "executing" and d.get("node") is None and d.get("prompt_id") == prompt_id:
                return True
        return False

    return pred


def event_line(frame, n):
    """One websocket frame as `type key=value ...` (normalized)."""
    if frame[0] == "binary":
        return f"<binary type={frame[1]}>"
    msg = frame[1]
    kind = msg.get("type")
    d = msg.get("data") if isinstance(msg.get("data"), dict) else {}
    dn = n.value(d)
    if kind == "status":
        q = ((d.get("status") or {}).get("exec_info") or {}).get("queue_remaining")
        return f"status queue_remaining={q}" + (f" sid={n.text(d['sid'])}" if "sid" in d else "")
    if kind == "execution_cached":
        return f"execution_cached nodes={sorted(d.get('nodes') or [])}"
    if kind == "executing":
        return f"executing node={d.get('node')}" + (
            f" display_node={d.get('display_node')}" if "display_node" in d else "")
    if kind == "progress":
        return f"progress {d.get('value')}/{d.get('max')} node={d.get('node')}"
    if kind == "progress_state":
        nodes = d.get("nodes") or {}
        states = ",".join(f"{k}:{(v or {}).get('state')}" for k, v in sorted(nodes.items()))
        return f"progress_state {{{states}}}"
    if kind == "executed":
        out = dn.get("output") or {}
        summary = {k: ([f"{i.get('type')}:{i.get('subfolder')!r}:{i.get('filename')}" for i in v]
                       if isinstance(v, list) and v and isinstance(v[0], dict) else v)
                   for k, v in sorted(out.items())}
        return f"executed node={d.get('node')} output={json.dumps(summary, sort_keys=True)}"
    if kind in ("execution_error", "execution_interrupted"):
        extra = ""
        if kind == "execution_error":
            msg_ = dn.get("exception_message", "")
            extra = f" {dn.get('exception_type')}: {msg_.strip().splitlines()[0][:70] if msg_ else ''}"
        return f"{kind} node={d.get('node_id')} {d.get('node_type')} executed={sorted(d.get('executed') or [])}{extra}"
    if kind in ("execution_start", "execution_success"):
        return kind
    return f"{kind} keys={sorted(d)}"


def data_keys(frames):
    """Event type -> sorted keys of its `data` (the union over the frames)."""
    keys = {}
    for f in frames:
        if f[0] != "text":
            continue
        d = f[1].get("data")
        ks = keys.setdefault(f[1].get("type"), set())
        if isinstance(d, dict):
            ks.update(d)
    return {k: sorted(v) for k, v in sorted(keys.items())}


def for_prompt(frames, prompt_id):
    """The frames of one prompt: its events, broadcasts between them, and binary frames."""
    out = []
    for f in frames:
        if f[0] == "text":
            d = f[1].get("data") if isinstance(f[1].get("data"), dict) else {}
            if "prompt_id" in d and d["prompt_id"] != prompt_id:
                continue
        out.append(f)
    return out


# --------------------------------------------------------------------------- scenarios


class Run:
    """One server's answers, by observation name."""

    def __init__(self, base, tag):
        self.http = Http(base)
        self.base = base
        self.n = Normalizer()
        self.obs = {}  # name -> value (normalized), insertion ordered
        self.rand = tag  # a prefix unique to this run: output and upload names
        self.n.name(tag, "rnd")

    def put(self, name, value, normalize=True):
        self.obs[name] = self.n.value(value) if normalize else value

    def req(self, name, method, path, body=None, headers=None):
        status, ctype, raw = self.http.request(method, path, body, headers)
        b = body_of(status, ctype, raw)
        pid = b.get("json", {}).get("prompt_id") if isinstance(b.get("json"), dict) else None
        if isinstance(pid, str):
            self.n.name(pid, "S")  # an id the server chose (ours are named when made)
        self.put(name, b)
        return b

    def new_prompt_id(self):
        pid = str(uuid.uuid4())
        self.n.name(pid, "P")
        return pid

    def new_client_id(self):
        cid = "fidelity-client-" + uuid.uuid4().hex[:12]
        self.n.name(cid, "C")
        return cid


def graph_save(prefix, color=0):
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": color}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}},
    }


def graph_preview():
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": 1, "color": 255}},
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
    }


def run_prompt(r, label, graph, client=None, sockets=None):
    """POST a prompt with a chosen prompt_id, collect its events, then /history and /view."""
    own = sockets is None
    cid = client or r.new_client_id()
    if own:
        sockets = [Socket(r.base, cid)]
    for s in sockets:
        s.wait_for(lambda fr: len(fr) > 0, 10)  # the hello `status`
    # What each socket gets from here on (a socket of our own: from its hello on).
    starts = [0 if own else len(s.snapshot()) for s in sockets]
    pid = r.new_prompt_id()
    b = r.req(f"{label}: POST /prompt", "POST", "/prompt",
              {"prompt": graph, "client_id": cid, "prompt_id": pid})
    ok = b.get("status") == 200
    if ok:
        # Until the last socket (the one expected to get the events) sees the prompt's end,
        # or /history has the prompt (a socket may get nothing at all), bounded.
        end = time.monotonic() + PROMPT_TIMEOUT
        while time.monotonic() < end:
            if sockets[-1].wait_for(done_with(pid), 0.5):
                break
            if json.loads(r.http.request("GET", f"/history/{pid}")[2] or b"{}"):
                time.sleep(1.0)  # the events after the history entry
                break
        time.sleep(SETTLE)
    for i, s in enumerate(sockets):
        frames = for_prompt(s.snapshot()[starts[i]:], pid)
        suffix = "" if len(sockets) == 1 else f" (socket {i + 1} of {len(sockets)})"
        r.put(f"{label}: ws events{suffix}", [event_line(f, r.n) for f in frames], normalize=False)
        if i == len(sockets) - 1:
            r.put(f"{label}: ws data keys by type{suffix}", data_keys(frames), normalize=False)
    if own:
        for s in sockets:
            s.close()
    if not ok:
        return pid, None
    # History: the entry (the prompt ends before `executing` null is sent, so it is there).
    hist = None
    for _ in range(20):
        st, ct, raw = r.http.request("GET", f"/history/{pid}")
        try:
            hist = json.loads(raw)
        except ValueError:
            hist = None
        if hist:
            break
        time.sleep(0.25)
    entry = (hist or {}).get(pid)
    if isinstance(entry, dict) and isinstance(entry.get("prompt"), list) and entry["prompt"]:
        entry["prompt"][0] = "<number>"  # the queue number: how many prompts came before
        if len(entry["prompt"]) > 4 and isinstance(entry["prompt"][4], list):
            entry["prompt"][4] = sorted(entry["prompt"][4])  # outputs to execute: a set
    r.put(f"{label}: GET /history/{{id}}", {"status": st, "json": hist})
    outputs = ((hist or {}).get(pid) or {}).get("outputs") or {}
    for node, out in sorted(outputs.items()):
        for i, img in enumerate(out.get("images") or []):
            q = urllib.parse.urlencode({"filename": img.get("filename", ""),
                                        "subfolder": img.get("subfolder", ""),
                                        "type": img.get("type", "")})
            r.req(f"{label}: GET /view of node {node} image {i}", "GET", f"/view?{q}")
    return pid, hist


def s_valid(r):
    """A valid prompt EmptyImage -> ImageInvert -> SaveImage, then the same graph again."""
    graph = graph_save(f"fid_{r.rand}")
    run_prompt(r, "valid", graph)
    # The same graph again: ComfyUI caches every node (execution_cached lists them) and
    # replays the output node's `executed` from its cache.
    run_prompt(r, "same again", graph)


def s_preview(r):
    """PreviewImage: a temp output."""
    run_prompt(r, "preview", graph_preview())


def s_prompt_errors(r):
    """POST /prompt validation errors."""
    cid = r.new_client_id()

    def post(label, body):
        r.req(f"{label}: POST /prompt", "POST", "/prompt", body)

    post("no prompt", {"client_id": cid})
    post("unknown class_type", {"client_id": cid, "prompt": {
        "1": {"class_type": "NoSuchNodeClass", "inputs": {}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}}}})
    post("node without class_type", {"client_id": cid, "prompt": {"1": {"inputs": {}}}})
    post("no output node", {"client_id": cid, "prompt": {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}}}})
    post("missing required input", {"client_id": cid, "prompt": {
        "1": {"class_type": "EmptyImage", "inputs": {"height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}}}})
    post("model not in list", {"client_id": cid, "prompt": {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "no-such-model.safetensors"}},
        "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "3": {"class_type": "VAEDecode", "inputs": {"samples": ["2", 0], "vae": ["1", 2]}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "x"}}}})
    post("LoadImage of a missing file", {"client_id": cid, "prompt": {
        "1": {"class_type": "LoadImage", "inputs": {"image": f"missing_{r.rand}.png"}},
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}})
    post("link to a missing node", {"client_id": cid, "prompt": {
        "2": {"class_type": "SaveImage", "inputs": {"images": ["99", 0], "filename_prefix": "x"}}}})


def s_upload(r):
    """POST /upload/image: names, renames, paths."""
    name = f"up_{r.rand}.png"
    a, b = png_bytes(rgb=(10, 20, 30)), png_bytes(rgb=(40, 50, 60))
    up = lambda label, fields: r.put(f"{label}: POST /upload/image",
                                     body_of(*r.http.multipart("/upload/image", fields)))
    up("upload", [("image", name, a)])
    up("same name, other bytes (rename)", [("image", name, b)])
    up("same name, same bytes", [("image", name, a)])
    up("filename with ../", [("image", f"../esc_{r.rand}.png", a)])
    up("no image part", [("subfolder", None, b"")])
    up("image part without filename", [("image", "", a)])
    up("subfolder", [("image", name, a), ("subfolder", None, f"sub_{r.rand}".encode())])
    up("subfolder with ..", [("image", name, a), ("subfolder", None, b"../esc")])
    up("type temp", [("image", name, a), ("type", None, b"temp")])
    q = urllib.parse.urlencode({"filename": name, "type": "input", "subfolder": ""})
    r.req("view the upload: GET /view", "GET", f"/view?{q}")
    # An uploaded image feeds LoadImage.
    run_prompt(r, "LoadImage of the upload", {
        "1": {"class_type": "LoadImage", "inputs": {"image": name}},
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}})
    # A file that is not an image: accepted by the upload, fails in LoadImage at run time.
    bad = f"notimg_{r.rand}.png"
    up("upload of bytes that are not an image", [("image", bad, b"not an image at all")])
    run_prompt(r, "LoadImage of a non-image", {
        "1": {"class_type": "LoadImage", "inputs": {"image": bad}},
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}})


def s_interrupt(r):
    """POST /interrupt while idle."""
    r.req("interrupt a prompt_id not running", "POST", "/interrupt", {"prompt_id": str(uuid.uuid4())})
    r.req("interrupt with {}", "POST", "/interrupt", {})
    r.req("interrupt without a body", "POST", "/interrupt")
    r.req("queue delete of an unknown id", "POST", "/queue", {"delete": [str(uuid.uuid4())]})


def s_two_sockets(r):
    """Two websockets with one clientId: which gets the prompt's events."""
    cid = r.new_client_id()
    first = Socket(r.base, cid)
    first.wait_for(lambda fr: len(fr) > 0, 10)
    second = Socket(r.base, cid)
    run_prompt(r, "two sockets", graph_save(f"two_{r.rand}", color=77), client=cid,
               sockets=[first, second])
    # Close the first: in ComfyUI its cleanup drops the clientId's entry, the second's.
    first.close()
    time.sleep(SETTLE)
    run_prompt(r, "after closing the first", graph_save(f"two_{r.rand}", color=78), client=cid,
               sockets=[second])
    second.close()


def s_idle(r):
    """Shapes of the idle endpoints."""
    st, ct, raw = r.http.request("GET", "/queue")
    r.put("GET /queue (idle)", body_of(st, ct, raw))
    st, ct, raw = r.http.request("GET", "/system_stats")
    b = body_of(st, ct, raw)
    r.put("GET /system_stats shape", {"status": b["status"], "shape": shape(b.get("json"))}, normalize=False)
    st, ct, raw = r.http.request("GET", "/prompt")
    r.put("GET /prompt (idle)", body_of(st, ct, raw))
    r.req("GET /history/{unknown}", "GET", f"/history/{uuid.uuid4()}")
    r.req("GET /view of a missing file", "GET", "/view?filename=nope_missing.png&type=output")
    r.req("GET /view with .. in filename", "GET", "/view?filename=../etc/passwd&type=output")
    r.req("GET /view with .. in subfolder", "GET", "/view?filename=x.png&subfolder=../..&type=output")
    r.req("GET /view without filename", "GET", "/view")
    # A first text message `feature_flags` is answered with the server's flags.
    sock = Socket(r.base, r.new_client_id())
    sock.wait_for(lambda fr: len(fr) > 0, 10)
    sock.send({"type": "feature_flags", "data": {"supports_preview_metadata": True}})
    sock.wait_for(lambda fr: len(fr) > 1, 5)
    time.sleep(SETTLE)
    r.put("ws feature_flags reply", [f[1] if f[0] == "text" else f"<binary {f[1]}>" for f in sock.snapshot()[1:]])
    sock.close()
    st, ct, raw = r.http.request("GET", "/features")
    r.put("GET /features", body_of(st, ct, raw))
    st, ct, raw = r.http.request("GET", "/object_info/SaveImage")
    b = body_of(st, ct, raw)
    r.put("GET /object_info/SaveImage shape", {"status": b["status"], "shape": shape(b.get("json"), max_depth=2)}, normalize=False)


SCENARIOS = [
    ("valid", s_valid),
    ("preview", s_preview),
    ("prompt_errors", s_prompt_errors),
    ("upload", s_upload),
    ("interrupt", s_interrupt),
    ("two_sockets", s_two_sockets),
    ("idle", s_idle),
]


# --------------------------------------------------------------------------- report


def json_paths(a, b, path="$"):
    """Where two JSON values differ, as `path: A | B` lines."""
    if type(a) is not type(b):
        return [(path, a, b)]
    if isinstance(a, dict):
        out = []
        for k in list(a) + [k for k in b if k not in a]:
            p = f"{path}.{k}"
            if k not in a:
                out.append((p, "<absent>", b[k]))
            elif k not in b:
                out.append((p, a[k], "<absent>"))
            else:
                out += json_paths(a[k], b[k], p)
        return out
    if isinstance(a, list):
        if len(a) != len(b) and not all(isinstance(x, (dict, list)) for x in a + b):
            return [(path, a, b)]
        out = []
        for i, (x, y) in enumerate(zip(a, b)):
            out += json_paths(x, y, f"{path}[{i}]")
        for i in range(len(b), len(a)):
            out.append((f"{path}[{i}]", a[i], "<absent>"))
        for i in range(len(a), len(b)):
            out.append((f"{path}[{i}]", "<absent>", b[i]))
        return out
    return [] if a == b else [(path, a, b)]


def short(v, width=200):
    s = v if isinstance(v, str) else json.dumps(v, sort_keys=True)
    return s if len(s) <= width else s[: width - 3] + "..."


def side_by_side(a, b, la, lb, width=62):
    """Two lists of lines aligned by difflib: `=` same line, `!` changed, `<`/`>` only one."""
    out = [f"      {la[:width]:<{width}} | {lb}"]
    sm = difflib.SequenceMatcher(a=a, b=b, autojunk=False)
    for op, i1, i2, j1, j2 in sm.get_opcodes():
        if op == "equal":
            for x in a[i1:i2]:
                out.append(f"    = {x[:width]:<{width}} | {x[:width]}")
            continue
        left, right = a[i1:i2], b[j1:j2]
        for k in range(max(len(left), len(right))):
            x = left[k] if k < len(left) else ""
            y = right[k] if k < len(right) else ""
            mark = "!" if x and y else ("<" if x else ">")
            out.append(f"    {mark} {x[:width]:<{width}} | {y}")
    return out


def report(runs, la, lb):
    a, b = runs
    lines, differing, total = [], [], 0
    for scen, names in order_of(a, b):
        lines.append("")
        lines.append(f"== {scen}")
        for name in names:
            total += 1
            va, vb = a.obs.get(name, "<not observed>"), b.obs.get(name, "<not observed>")
            if va == vb:
                if isinstance(va, list) and va and all(isinstance(x, str) for x in va):
                    lines.append(f"  = {name}:")  # an event sequence: in full
                    lines += [f"      {x}" for x in va]
                else:
                    lines.append(f"  = {name}: {short(va, 150)}")
                continue
            differing.append(f"{scen} / {name}")
            lines.append(f"  ! {name}")
            if isinstance(va, list) and isinstance(vb, list) and all(isinstance(x, str) for x in va + vb):
                lines += side_by_side(va, vb, la, lb)
            else:
                for p, x, y in json_paths(va, vb):
                    lines.append(f"      {p}")
                    lines.append(f"        {la}: {short(x)}")
                    lines.append(f"        {lb}: {short(y)}")
    head = [f"A = {la}: {a.base}", f"B = {lb}: {b.base}",
            f"{total} observations, {total - len(differing)} the same, {len(differing)} differ"]
    tail = ["", f"== differing ({len(differing)})"] + [f"  ! {d}" for d in differing]
    return "\n".join(head + lines + tail) + "\n"


def order_of(a, b):
    """Observation names by scenario, in the order they were made (A's, then B's extras)."""
    out = []
    for scen, _ in SCENARIOS:
        names = [n for n in a.scen.get(scen, [])]
        names += [n for n in b.scen.get(scen, []) if n not in names]
        if names:
            out.append((scen, names))
    return out


def run_all(base, only, tag):
    r = Run(base, tag)
    r.scen = {}
    for scen, fn in SCENARIOS:
        if only and scen not in only:
            continue
        before = set(r.obs)
        t0 = time.monotonic()
        try:
            fn(r)
        except Exception as e:  # a scenario that broke: record it, go on
            r.put(f"{scen}: scenario raised", f"{type(e).__name__}: {e}")
        r.scen[scen] = [n for n in r.obs if n not in before]
        print(f"  {base} {scen}: {time.monotonic() - t0:.1f}s", file=sys.stderr)
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", required=True, help="base URL of server A (the double)")
    ap.add_argument("--b", required=True, help="base URL of server B (the real ComfyUI)")
    ap.add_argument("--label-a", default="double")
    ap.add_argument("--label-b", default="real")
    ap.add_argument("--only", nargs="*", choices=[s for s, _ in SCENARIOS])
    ap.add_argument("--json", help="also write both runs' normalized observations here")
    args = ap.parse_args()
    for base in (args.a, args.b):
        st, _, raw = Http(base).request("GET", "/system_stats")
        if st != 200:
            print(f"{base}: /system_stats answered {st}: {raw[:200]!r}", file=sys.stderr)
            return 2
    runs = []
    for base in (args.a, args.b):
        # One random part per server: files from an earlier run never collide, and the
        # normalizer names it <rnd1> on both sides.
        runs.append(run_all(base, args.only, uuid.uuid4().hex[:8]))
    sys.stdout.write(report(runs, args.label_a, args.label_b))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({args.label_a: runs[0].obs, args.label_b: runs[1].obs}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
