"""Fork server of the reliability tests (see ``relkit.ForkServer``).

Reads one JSON request per line on stdin and answers one JSON line on stdout:
``spawn`` forks a worker that runs a job from ``relkit.JOBS`` and ends with
``os._exit`` (never returning here); ``wait`` reaps a worker and reports its exit
code, or minus the signal that killed it.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import relkit  # noqa: E402  (imports numpy and gpusaver once, before any fork)


def _worker(job: dict) -> None:
    code = 1
    try:
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        os.dup2(devnull, 1)
        code = relkit.run_job(job)
    except BaseException:  # noqa: BLE001 - reported on stderr, exit status 1
        traceback.print_exc()
        sys.stderr.flush()
    finally:
        os._exit(code)


def main() -> None:
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    for line in stdin:
        request = json.loads(line)
        op = request["op"]
        if op == "ping":
            reply: dict = {"ok": True}
        elif op == "spawn":
            stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                _worker(request["job"])
            reply = {"pid": pid}
        elif op == "wait":
            _, status = os.waitpid(request["pid"], 0)
            reply = {"code": os.waitstatus_to_exitcode(status)}
        elif op == "exit":
            return
        else:
            reply = {"error": f"unknown op {op!r}"}
        stdout.write((json.dumps(reply) + "\n").encode())
        stdout.flush()


if __name__ == "__main__":
    main()
