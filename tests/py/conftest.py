"""Shared pytest fixtures for the Python test suites.

- ``roony_bin``: path of the ``roony`` binary from ``$ROONY_BIN`` (the run fails with a
  clear message when it is missing; nothing is skipped).
- ``spawn``: start ``roony`` with arguments and wait for its ``listening on http://…``
  line on stderr; returns ``(proc, base_url)``. Processes are stopped at teardown.
- ``spawn_module``: the same, shared by all tests of one module.
"""

import os
import queue
import re
import subprocess
import threading
import time

import pytest

LISTENING = re.compile(r"listening on (https?://[^\s\x1b]+)")
STARTUP_TIMEOUT_S = 30.0


class Spawner:
    """Starts ``roony`` processes and stops them again."""

    def __init__(self, binary):
        self.binary = binary
        self.running = []

    def spawn(self, args, env=None, timeout=STARTUP_TIMEOUT_S):
        """Run ``roony *args``; return ``(proc, base_url)`` once it is listening.

        Both output streams are drained by threads for the life of the process (so it
        never blocks on a full pipe); the captured lines are kept on ``proc.output``.
        """
        full_env = dict(os.environ)
        if env:
            full_env.update(env)
        proc = subprocess.Popen(
            [self.binary, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            errors="replace",
            env=full_env,
        )
        self.running.append(proc)
        proc.output = []
        found = queue.Queue()

        def drain(stream, watch):
            for line in stream:
                proc.output.append(line.rstrip("\n"))
                if watch:
                    match = LISTENING.search(line)
                    if match:
                        found.put(match.group(1).rstrip("/"))
            stream.close()

        threading.Thread(target=drain, args=(proc.stderr, True), daemon=True).start()
        threading.Thread(target=drain, args=(proc.stdout, False), daemon=True).start()

        deadline = time.monotonic() + timeout
        while True:
            try:
                return proc, found.get(timeout=0.1)
            except queue.Empty:
                pass
            if proc.poll() is not None:
                time.sleep(0.2)  # let the drain threads catch the last lines
                pytest.fail(
                    f"{self.binary} {' '.join(args)} exited with {proc.returncode} before "
                    "printing 'listening on http://…'. Output:\n" + "\n".join(proc.output)
                )
            if time.monotonic() > deadline:
                self.stop(proc)
                pytest.fail(
                    f"{self.binary} {' '.join(args)} did not print 'listening on http://…' "
                    f"within {timeout:.0f}s. Output:\n" + "\n".join(proc.output)
                )

    @staticmethod
    def stop(proc):
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)

    def close(self):
        for proc in self.running:
            self.stop(proc)
        self.running.clear()


@pytest.fixture(scope="session")
def roony_bin():
    path = os.environ.get("ROONY_BIN")
    if not path:
        pytest.fail(
            "ROONY_BIN is not set: point it at the roony binary, e.g. "
            "ROONY_BIN=$CARGO_TARGET_DIR/debug/roony (build it with `cargo build --bin roony`)."
        )
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        pytest.fail(f"ROONY_BIN={path!r} is not an executable file.")
    return path


@pytest.fixture
def spawn(roony_bin):
    spawner = Spawner(roony_bin)
    yield spawner.spawn
    spawner.close()


@pytest.fixture(scope="module")
def spawn_module(roony_bin):
    spawner = Spawner(roony_bin)
    yield spawner.spawn
    spawner.close()


SIDECAR_LISTENING = re.compile(r"sidecar listening on (https?://[^\s\x1b]+)")

# Every local port `roony dev` opens, on 127.0.0.1:0 so that test runs never collide.
DEV_PORT_FLAGS = [
    "--sidecar-listen",
    "127.0.0.1:0",
    "--emulator-listen",
    "127.0.0.1:0",
    "--control-plane-listen",
    "127.0.0.1:0",
]


def start_dev(spawn, data_dir, agent_key, env=None, timeout=STARTUP_TIMEOUT_S):
    """Start ``roony dev`` (emulator + sidecar) and return ``(proc, sidecar_base_url)``.

    The emulator's line is printed first, so this waits for the sidecar's own line.
    """
    proc, _ = spawn(
        ["dev", *DEV_PORT_FLAGS, "--data-dir", str(data_dir)],
        env={"ROONY_DEV_AGENT_KEY": agent_key, "NO_COLOR": "1", **(env or {})},
        timeout=timeout,
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in list(proc.output):
            match = SIDECAR_LISTENING.search(line)
            if match:
                return proc, match.group(1).rstrip("/")
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    pytest.fail("roony dev did not print 'sidecar listening on …'. Output:\n" + "\n".join(proc.output))
