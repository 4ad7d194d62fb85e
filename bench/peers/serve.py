"""The request loop the suite's Python peers share.

A peer reads one JSON request per line on standard input, `{"cmd": NAME, ...}`, runs the
handler registered for NAME and answers one JSON line: the handler's result with
`"ok": true`, or `{"ok": false, "error": ...}` when it raised, so that the suite can
report the failure instead of losing the peer.
"""

import json
import sys


def serve(handlers):
    """Answers requests from standard input until it closes; `handlers` maps command
    names to functions of the request returning a dict."""
    for line in sys.stdin:
        try:
            req = json.loads(line)
            cmd = req["cmd"]
            if cmd not in handlers:
                raise ValueError(f"unknown command {cmd}")
            out = handlers[cmd](req)
            out["ok"] = True
        except Exception as e:  # answered to the suite, which reports it
            out = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        print(json.dumps(out), flush=True)
