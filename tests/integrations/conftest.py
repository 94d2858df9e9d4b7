"""Ultralytics offline: settings in a throw-away folder, no update/requirement checks, and every test
here fails if anything tries to reach the network."""
import atexit
import os
import shutil
import socket
import sys
import tempfile
import traceback

import pytest

sys.path.insert(0, os.path.dirname(__file__))

_CONFIG_DIR = tempfile.mkdtemp(prefix="structprune-yolo-config-")
atexit.register(shutil.rmtree, _CONFIG_DIR, True)
os.environ.setdefault("YOLO_OFFLINE", "1")  # ultralytics' is_online() answers False without a DNS lookup
os.environ.setdefault("ULTRALYTICS_SKIP_REQUIREMENTS_CHECKS", "1")  # never pip-installs during export
os.environ["YOLO_CONFIG_DIR"] = _CONFIG_DIR  # its settings.json goes here, not into the user's home


def _font_in_place() -> None:
    """Every dataset check asks for Arial.ttf and downloads it when missing: give it matplotlib's DejaVu."""
    import matplotlib

    font = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "fonts", "ttf", "DejaVuSans.ttf")
    target = os.path.join(_CONFIG_DIR, "Ultralytics")
    os.makedirs(target, exist_ok=True)
    shutil.copyfile(font, os.path.join(target, "Arial.ttf"))


_font_in_place()


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
