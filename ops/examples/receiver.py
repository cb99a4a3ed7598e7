#!/usr/bin/env python3
"""An example receiver of Entitle's platform events, with nothing but the
Python standard library: it verifies the Standard Webhooks signature,
refuses stale or replayed timestamps, drops duplicates by webhook-id, and
prints each new event as one JSON line. Answer 2xx only once an event is
safely handled; anything else makes Entitle send it again later.

    ENTITLE_EVENTS_SECRET=whsec_... python3 ops/examples/receiver.py 8787

Then point an endpoint at http://127.0.0.1:8787/entitle/events (the admin
API, `entitlectl endpoint create`, or `[[platform.endpoints]]`).
"""

import base64
import hashlib
import hmac
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TOLERANCE_SECS = 300


def secrets():
    # Several, comma-separated, while a rotation overlaps.
    raw = os.environ["ENTITLE_EVENTS_SECRET"]
    return [base64.b64decode(s.strip().removeprefix("whsec_")) for s in raw.split(",")]


def verified(headers, body, keys):
    msg_id = headers.get("webhook-id", "")
    timestamp = headers.get("webhook-timestamp", "")
    signatures = headers.get("webhook-signature", "").split()
    if not msg_id or not timestamp.isdigit():
        return False
    if abs(time.time() - int(timestamp)) > TOLERANCE_SECS:
        return False
    signed = f"{msg_id}.{timestamp}.".encode() + body
    for key in keys:
        expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
        for signature in signatures:
            version, _, value = signature.partition(",")
            if version == "v1" and hmac.compare_digest(value, expected):
                return True
    return False


class Receiver(BaseHTTPRequestHandler):
    keys = secrets()
    seen = set()  # a real receiver keeps these in its database
    lock = threading.Lock()  # events arrive on several connections at once

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        if not verified(self.headers, body, self.keys):
            self.send_response(400)
            self.end_headers()
            return
        event_id = self.headers["webhook-id"]
        with self.lock:
            if event_id not in self.seen:
                self.seen.add(event_id)
                event = json.loads(body)
                # Apply it here: a code's events arrive in order (`seq` grows).
                sys.stdout.write(json.dumps(event) + "\n")
                sys.stdout.flush()
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8787
    ThreadingHTTPServer(("127.0.0.1", port), Receiver).serve_forever()
