#!/usr/bin/env python3
"""A minimal OTLP/HTTP trace sink for benchmarks: accepts `POST /v1/traces` (protobuf), answers
200 with an empty ExportTraceServiceResponse, and counts spans per service.name without
decoding span bodies (a few varints per message). `GET /stats` returns the counts, and the sink's own CPU seconds, as JSON.

    python3 bench/otlp_sink.py PORT_FILE     # writes the port it listens on to PORT_FILE
"""

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

lock = threading.Lock()
counts = {"requests": 0, "bytes": 0, "spans": {}}


def varint(buf, i):
    shift = value = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


def fields(buf, start=0, end=None):
    """Yields (field number, wire type, value or (start, end) of a length-delimited field)."""
    i, end = start, len(buf) if end is None else end
    while i < end:
        key, i = varint(buf, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            v, i = varint(buf, i)
            yield num, wire, v
        elif wire == 1:
            i += 8
        elif wire == 2:
            n, i = varint(buf, i)
            yield num, wire, (i, i + n)
            i += n
        elif wire == 5:
            i += 4
        else:
            raise ValueError(f"wire type {wire}")


def service_name(buf, start, end):
    # Resource.attributes (1) -> KeyValue {key (1), value (2) -> AnyValue.string_value (1)}
    for num, wire, span in fields(buf, start, end):
        if num != 1 or wire != 2:
            continue
        key = value = None
        for n, w, s in fields(buf, *span):
            if n == 1 and w == 2:
                key = bytes(buf[s[0]:s[1]]).decode()
            elif n == 2 and w == 2:
                for n2, w2, s2 in fields(buf, *s):
                    if n2 == 1 and w2 == 2:
                        value = bytes(buf[s2[0]:s2[1]]).decode()
        if key == "service.name":
            return value
    return "?"


def count(body):
    found = {}
    # ExportTraceServiceRequest.resource_spans (1) -> ResourceSpans {resource (1), scope_spans (2)}
    for num, wire, rs in fields(body):
        if num != 1 or wire != 2:
            continue
        service, n = "?", 0
        for n1, w1, s1 in fields(body, *rs):
            if n1 == 1 and w1 == 2:
                service = service_name(body, *s1)
            elif n1 == 2 and w1 == 2:
                # ScopeSpans.spans (2)
                n += sum(1 for n2, w2, _ in fields(body, *s1) if n2 == 2 and w2 == 2)
        found[service] = found.get(service, 0) + n
    return found


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        body = memoryview(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        try:
            found = count(body)
        except (ValueError, IndexError, UnicodeDecodeError):
            found = {"undecodable": 1}
        with lock:
            counts["requests"] += 1
            counts["bytes"] += len(body)
            for k, v in found.items():
                counts["spans"][k] = counts["spans"].get(k, 0) + v
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self):
        with lock:
            out = json.dumps({**counts, "cpu_s": time.process_time()}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    with open(sys.argv[1], "w") as f:
        f.write(str(server.server_address[1]))
    server.serve_forever()
