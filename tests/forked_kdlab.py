"""`python -m kdlab`, imported once and forked per run, with markers a test can kill at.

tests/test_reliability.py kills about a dozen kdlab processes with SIGKILL. Importing torch
costs seconds of CPU on a small machine, so this script imports kdlab once, then reads
requests on stdin, one JSON line each: {"argv": [...], "write_pause": seconds}. For each it
forks a child, a process of its own that runs `kdlab.cli.main(argv)` exactly as
`python -m kdlab` does, and that dies by SIGKILL like any other. Marker lines on stdout:

  @ ready              waiting for a request
  @ child PID          a child started
  @ epoch N            epoch N begins
  @ step               a training step begins
  @ validate           validation begins
  @ write NAME         half of a checkpoint's bytes are in the file NAME; the rest follows after
                       `write_pause` seconds, so a kill in between lands inside the write
  @ saved N            epoch N's checkpoint is complete under its final name
  @ exit PID CODE      the child ended (CODE -9: killed by SIGKILL)
"""
import json
import os
import pathlib
import sys
import time
import traceback

import kdlab.checkpoints
import kdlab.data
import kdlab.train
from kdlab.cli import main

write_pause = 0.0


def mark(*words) -> None:
    print("@", *words, flush=True)


def before(owner, name: str, announce) -> None:
    """Make `owner.name` call `announce` with its arguments first."""
    real = getattr(owner, name)

    def announced(*args, **kwargs):
        announce(*args, **kwargs)
        return real(*args, **kwargs)

    setattr(owner, name, announced)


def slow_write_bytes(path: pathlib.Path, data) -> int:
    """kdlab writes checkpoint bytes with Path.write_bytes; this one stops halfway for a while."""
    view = memoryview(data).cast("B")
    half = len(view) // 2
    with open(path, "wb") as fh:
        fh.write(view[:half])
        fh.flush()
        mark("write", path.name)
        time.sleep(write_pause)
        fh.write(view[half:])
    return len(view)


def announce_saved(real):
    def save_last(self, state):
        real(self, state)
        mark("saved", state["epoch"])
    return save_last


before(kdlab.data.DeviceLoader, "epoch", lambda loader, epoch: mark("epoch", epoch + 1))
before(kdlab.train, "train_step", lambda *args: mark("step"))
before(kdlab.train, "evaluate", lambda *args: mark("validate"))
kdlab.checkpoints.RunFiles.save_last = announce_saved(kdlab.checkpoints.RunFiles.save_last)
pathlib.Path.write_bytes = slow_write_bytes

mark("ready")
for line in sys.stdin:
    request = json.loads(line)
    write_pause = request["write_pause"]
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            mark("child", os.getpid())
            code = main(request["argv"])
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    mark("exit", pid, os.waitstatus_to_exitcode(status))
