"""Decode only the box that a crop keeps (jpeg_box.c), built on first use with $CC and cached (docs/performance.md)."""
import ctypes
import functools
import hashlib
import logging
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import simplejpeg

from common.errors import FastJpegRequired
from common.files import write_atomically

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("jpeg_box.c")
SWITCH = "CSPRESNET_JPEG_BOX"  # "0": whole files (benchmarks.loader --whole-jpeg compares the two); "require"
FLAGS = ["-O2", "-shared", "-fPIC"]
_why_not = ""  # why box_decoder() returned None


class Unavailable(RuntimeError):
    """The box decoder cannot be built, loaded or trusted here; the message says why."""


def run_compiler(compiler: str, arguments: list, timeout: int, stdin: Optional[str] = None) -> str:
    """Its standard output; Unavailable with its first error line where it fails."""
    try:
        done = subprocess.run([compiler, *arguments], input=stdin, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise Unavailable(f"could not run the C compiler {compiler!r}: {exc}") from None
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or [f"exit code {done.returncode}"]
        reason = next((line for line in lines if "error" in line), lines[-1])
        raise Unavailable(f"{compiler} could not build {SOURCE.name}: {reason.strip()}")
    return done.stdout


def libjpeg_version(compiler: str) -> str:
    """The libjpeg(-turbo) version the build compiles against, from its headers' macros."""
    output = run_compiler(compiler, ["-E", "-dM", "-x", "c", "-"], 60, "#include <stdio.h>\n#include <jpeglib.h>\n")
    lines = [line.split(None, 2) for line in output.splitlines()]  # "#define NAME VALUE"
    macros = {parts[1]: parts[2] for parts in lines if len(parts) == 3}
    return macros.get("LIBJPEG_TURBO_VERSION", f"libjpeg {macros.get('JPEG_LIB_VERSION', '?')}")


def cache_folder() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cspresnet"


def build(folder: Path) -> Path:
    """The compiled library, built once per version of jpeg_box.c, compiler and libjpeg."""
    compiler = os.environ.get("CC", "cc")
    identity = " ".join([compiler, *FLAGS, libjpeg_version(compiler)])
    key = hashlib.sha256(SOURCE.read_bytes() + identity.encode()).hexdigest()[:16]
    library = folder / f"jpeg_box-{key}.so"
    if library.is_file():
        return library
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise Unavailable(f"cannot create the build folder: {exc}") from None
    with tempfile.TemporaryDirectory() as scratch:
        built = Path(scratch) / library.name
        run_compiler(compiler, [*FLAGS, "-o", str(built), str(SOURCE), "-ljpeg"], 120)
        write_atomically(library, built.read_bytes())  # processes building at once each see a whole library
    return library


class BoxDecoder:
    """ctypes front of decode_box(): RGB uint8, libjpeg-turbo's fast IDCT and upsampling."""

    def __init__(self, library: Path, version: str = ""):
        self.version = version  # of the libjpeg it was built against
        self.decode_box = ctypes.CDLL(str(library)).decode_box
        c_int, c_ulong, c_int_p = ctypes.c_int, ctypes.c_ulong, ctypes.POINTER(ctypes.c_int)
        self.decode_box.argtypes = [ctypes.c_char_p, c_ulong, c_int, c_int, c_int, c_int, c_int, ctypes.c_void_p,
                                    c_ulong, c_int_p, c_int_p, ctypes.c_char_p, c_int]
        self.buffer = np.empty(0, dtype=np.uint8)  # reused: a fresh array a call costs page faults
        self.row_width, self.box_column = ctypes.c_int(), ctypes.c_int()
        self.message = ctypes.create_string_buffer(256)

    def decode(self, data: bytes, scale: int, top: int, left: int, height: int, width: int, image_width: int):
        """The box of the image decoded at 1/scale: a view of a buffer the next call reuses. ValueError if bad."""
        if self.buffer.size < height * image_width * 3:
            self.buffer = np.empty(height * image_width * 3, dtype=np.uint8)
        failed = self.decode_box(data, len(data), scale, top, left, height, width, self.buffer.ctypes.data,
                                 self.buffer.size, self.row_width, self.box_column, self.message, len(self.message))
        if failed:
            raise ValueError(self.message.value.decode(errors="replace"))
        row_width, column = self.row_width.value, self.box_column.value
        return self.buffer[:height * row_width * 3].reshape(height, row_width, 3)[:, column:column + width]


def check(decoder: BoxDecoder) -> None:
    """Boxes must be those pixels of the whole image: libjpeg-turbo's row skipping had bugs in some releases."""
    image = np.random.default_rng(0).integers(0, 256, (75, 93, 3), dtype=np.uint8)  # odd sizes, 4:2:0: edge iMCUs
    jpeg = simplejpeg.encode_jpeg(image, quality=90, colorsubsampling="420")
    for scale in (1, 2):
        height, width = -(-75 // scale), -(-93 // scale)
        try:
            whole = decoder.decode(jpeg, scale, 0, 0, height, width, width).copy()
            for top, left, box_height, box_width in [(1, 3, 30, 41), (17, 17, 20, 29), (33, 40, 4, 5),
                                                     (height - 1, width - 1, 1, 1), (9, 0, height - 9, width)]:
                box = decoder.decode(jpeg, scale, top, left, box_height, box_width, width)
                if not np.array_equal(box, whole[top:top + box_height, left:left + box_width]):
                    raise Unavailable(f"this libjpeg-turbo decodes box {(top, left, box_height, box_width)} at "
                                      f"1/{scale} differently from the same box of the whole image")
        except ValueError as exc:
            raise Unavailable(f"the box decoder failed on a test image: {exc}") from None


@functools.lru_cache(maxsize=None)
def box_decoder() -> Optional[BoxDecoder]:
    """The decoder (built on the first call), or None after a warning saying why not."""
    global _why_not
    switch = os.environ.get(SWITCH, "1")
    if switch == "0":
        _why_not = f"{SWITCH}=0"
        return None
    try:
        decoder = BoxDecoder(build(cache_folder()), libjpeg_version(os.environ.get("CC", "cc")))
        check(decoder)
        return decoder
    except (Unavailable, OSError) as exc:  # OSError: the library did not load
        _why_not = (f"the box decoder is unavailable: {exc}. It needs a C compiler and libjpeg-turbo's headers "
                    f"(Debian/Ubuntu: apt install gcc libjpeg-dev)")
        if switch == "require":
            raise FastJpegRequired(f"{SWITCH}=require, but {_why_not}") from None
        log.warning("decoding whole JPEGs, not only the crops: %s", _why_not)
        return None


def status() -> str:
    """Which JPEG path the fast decode runs, for the start-up line."""
    decoder = box_decoder()
    if decoder is not None:
        return f"libjpeg-turbo ({decoder.version}) decoding only each crop's box ({SOURCE.name})"
    return f"simplejpeg decoding whole files ({_why_not})"
