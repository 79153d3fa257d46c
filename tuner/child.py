"""A spawned process that serves requests over a pipe: the benchmark worker (tuner.worker) and each
process of the compile pool (tuner.compile_pool) are one.

The protocol both share: the child builds its handler (importing torch, making a CUDA context),
then says ('ready', pid), or ('fatal', one line) if that failed; it then hands every request, a
tuple whose first item names it, to the handler, which sends its own replies, until the pipe
closes or ('stop',) comes.
"""
from __future__ import annotations

import os
import signal
import sys
from multiprocessing.connection import Connection
from typing import Any, Callable

from ..db.errors import first_line

START_TIMEOUT_S = 300.0  # importing torch and creating a CUDA context

Handler = Callable[[tuple[Any, ...]], None]


def serve(conn: Connection, make_handler: Callable[..., Handler], args: tuple[Any, ...]) -> None:
    """The child's main loop: `make_handler(conn, *args)`, then each request to it until EOF or 'stop'."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle, between requests
    # Triton prints a whole PTX listing to stdout when ptxas fails: it would corrupt `tune --json`
    # and bury the progress bar. A trial keeps ptxas's own message as its error text.
    sys.stdout.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)
    try:
        handle = make_handler(conn, *args)
    except Exception as error:  # noqa: BLE001 - reported to the parent, which fails the run or turns the pool off
        conn.send(("fatal", first_line(error)))
        return
    conn.send(("ready", os.getpid()))
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return
        if request[0] == "stop":
            return
        handle(request)


class Child:
    """A spawned daemon process named `name` that runs `serve` with `make_handler(conn, *args)`.

    `conn` is the parent's end of the pipe; `ready` whether the child said so (the owner sets it
    when it reads the 'ready' message). `make_handler` must be importable by name: spawn pickles
    it by reference.
    """

    def __init__(self, ctx: Any, name: str, make_handler: Callable[..., Handler], *args: Any) -> None:
        parent, child = ctx.Pipe()
        self.proc = ctx.Process(target=serve, args=(child, make_handler, args), name=name, daemon=True)
        self.proc.start()
        child.close()
        self.conn: Connection = parent
        self.ready = False

    def kill(self) -> None:
        """Close the pipe, kill the process if it still runs and reap it."""
        self.conn.close()
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(timeout=30)
