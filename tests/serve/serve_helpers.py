"""Helpers for the server tests (a unique module name: every test folder has its own conftest.py).

make_text: a small corpus for the test tokenizer; LiveServer / start_server: uvicorn in a background thread
on a free loopback port, stopped with should_exit (signal handlers off, since it is not the main thread).
"""
import random
import socket
import threading
import time

WORDS = ("the cat sat on a mat and the dog ran to the park while birds sang in old trees near green "
         "hills under blue sky where people walk each day with friends who talk about time work life "
         "one two three four five six seven eight nine ten yes no maybe hello world").split()


def make_text(n_lines: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) + rng.choice([".", "!", "?"])
            for _ in range(n_lines)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn in a background thread on 127.0.0.1:<free port>."""

    def __init__(self, app, aengine):
        import uvicorn

        self.app, self.aengine = app, aengine
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.server.config.install_signal_handlers = False  # not the main thread
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self, timeout: float = 20.0) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the test server did not stop"

    def stats(self) -> dict:
        return self.aengine.engine.stats()

    def wait_idle(self, timeout: float = 10.0) -> dict:
        """Engine stats once nothing runs or waits (bounded wait)."""
        deadline = time.monotonic() + timeout
        while True:
            s = self.stats()
            if (s["running"] == 0 and s["waiting"] == 0) or time.monotonic() > deadline:
                return s
            time.sleep(0.02)


def start_server(model_dir, **config_kwargs) -> LiveServer:
    from lmstack.serve.commands import build_app
    from lmstack.serve.engine_bridge import ServerConfig

    engine_kwargs = config_kwargs.pop("engine", {})
    config = ServerConfig(model_name="tiny-llama", **config_kwargs)
    app, aengine = build_app(str(model_dir), config, **{"max_num_seqs": 8, **engine_kwargs})
    return LiveServer(app, aengine).start()
