#!/usr/bin/env python3
"""A tiny OTLP/HTTP receiver for tests: accepts POST /v1/traces (protobuf or JSON),
answers 200, and appends each body to OUT_FILE. Prints "listening on PORT" first.

usage: otlp_receiver.py OUT_FILE
"""
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

OUT = sys.argv[1]


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        if self.path != "/v1/traces":
            self.send_response(404)
            self.end_headers()
            return
        with open(OUT, "ab") as f:
            f.write(body)
        self.send_response(200)
        self.send_header("content-type", self.headers.get("content-type") or "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(f"listening on {server.server_address[1]}", flush=True)
server.serve_forever()
