"""Starts a private mongod for the tests and benchmarks.

FiftyOne reuses a database service that is already running on the machine,
whatever ``FIFTYONE_DATABASE_DIR`` says, so pointing that variable at a
temporary folder does not isolate a run. Starting our own ``mongod`` (FiftyOne's
binary) on a free port and exporting ``FIFTYONE_DATABASE_URI`` does. This
module must not import fiftyone: the URI has to be set before FiftyOne reads
its config.
"""

import atexit
import importlib.util
import os
import pathlib
import socket
import subprocess
import time

#: The mongod processes started by :func:`start`, e.g. to read their CPU time
started = []


def _mongod_path():
    spec = importlib.util.find_spec("fiftyone")
    root = pathlib.Path(list(spec.submodule_search_locations)[0])
    return root / "db" / "bin" / "mongod"


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(dbpath):
    """Starts mongod on ``dbpath`` and returns its URI; it is stopped when
    this process exits."""
    dbpath = pathlib.Path(dbpath)
    dbpath.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    proc = subprocess.Popen(
        [str(_mongod_path()), "--dbpath", str(dbpath), "--port", str(port),
         "--bind_ip", "127.0.0.1", "--nounixsocket",
         "--logpath", str(dbpath / "mongod.log")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )

    def stop():
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()

    atexit.register(stop)
    started.append(proc)
    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("mongod exited; see %s" % (dbpath / "mongod.log"))
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return "mongodb://127.0.0.1:%d" % port
        except OSError:
            time.sleep(0.2)

    raise RuntimeError("mongod did not start; see %s" % (dbpath / "mongod.log"))


def isolate(tmpdir):
    """Points FiftyOne at a private mongod unless FIFTYONE_DATABASE_URI is
    already set (then the caller's own database name keeps it apart)."""
    if not os.environ.get("FIFTYONE_DATABASE_URI"):
        os.environ["FIFTYONE_DATABASE_URI"] = start(pathlib.Path(tmpdir) / "db")
    os.environ["FIFTYONE_DATABASE_DIR"] = str(pathlib.Path(tmpdir) / "unused-db")
