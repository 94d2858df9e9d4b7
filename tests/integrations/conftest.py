"""Ultralytics offline (see yolo_data.offline_ultralytics), and every test here fails if anything tries to
reach the network."""
import atexit
import os
import shutil
import socket
import sys
import tempfile
import traceback

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from yolo_data import offline_ultralytics  # noqa: E402

_CONFIG_DIR = tempfile.mkdtemp(prefix="structprune-yolo-config-")
atexit.register(shutil.rmtree, _CONFIG_DIR, True)
offline_ultralytics(_CONFIG_DIR)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Record and refuse every DNS lookup and connection; a test that tried one fails."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append((args[:2], "".join(traceback.format_stack(limit=8))))
        raise OSError("network access is disabled in structprune's integration tests")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", lambda self, *args: refuse(*args))
    yield
    assert not attempts, f"the test tried to reach the network: {attempts}"
