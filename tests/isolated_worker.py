"""Runs direct calls of myext's dispatcher ops for the tests, one per request, in a
process of its own, so that a call that crashes the process fails one test instead of
the whole suite (see the ``isolated`` fixture in conftest.py).

Reads JSON lines {"backend": ..., "device": ..., "setup": ..., "code": ...} from stdin;
runs the statements ``setup``, then evaluates the expression ``code``, with ``torch``,
``ops`` (the backend's dispatcher ops) and ``dev`` (the device) in scope; writes one
JSON line: {"outcome": "raised", "type": ..., "message": ...} or {"outcome":
"returned", "value": ...}. An exception in ``setup`` is {"outcome": "setup failed"}.
"""

import json
import sys

import torch

import myext

for line in sys.stdin:
    request = json.loads(line)
    scope = {"torch": torch, "ops": myext.backends.kernels(request["backend"]), "dev": request["device"]}
    try:
        exec(request["setup"], scope)
    except Exception as err:  # reported: the test's own set-up is wrong
        print(json.dumps({"outcome": "setup failed", "type": type(err).__name__, "message": str(err)}), flush=True)
        continue
    try:
        value = eval(request["code"], scope)
        if request["device"] == "cuda":
            torch.cuda.synchronize()
    except Exception as err:  # the outcome is reported, whatever it is
        reply = {"outcome": "raised", "type": type(err).__name__, "message": str(err)}
    else:
        reply = {"outcome": "returned", "value": repr(value)[:500]}
    print(json.dumps(reply), flush=True)
