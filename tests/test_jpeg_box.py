"""jpeg_box decodes only a crop's box, and must give exactly the pixels of that box of the
whole decoded file; where it cannot be built, the fast path decodes whole files instead."""
import io
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
import torch
from PIL import Image

from data import fast_decode, jpeg_box
from common.errors import FastJpegRequired


@pytest.fixture(scope="module")
def decoder():
    """Built, but not vetted by jpeg_box.check: a broken decoder must fail these tests, not
    be quietly replaced by whole-file decoding."""
    try:
        return jpeg_box.BoxDecoder(jpeg_box.build(jpeg_box.cache_folder()))
    except jpeg_box.Unavailable as exc:
        pytest.skip(f"jpeg_box cannot be built on this machine: {exc}")


def noise_jpeg(height: int, width: int, subsampling: str, seed: int = 0) -> bytes:
    """Noise over a gradient: every 8x8 block differs, so a misplaced block shows."""
    rng = np.random.default_rng(seed)
    gradient = np.linspace(0, 160, width)[None, :, None] + np.linspace(0, 60, height)[:, None, None]
    image = np.clip(gradient + rng.integers(0, 90, (height, width, 3)), 0, 255).astype(np.uint8)
    if subsampling == "progressive":
        out = io.BytesIO()
        Image.fromarray(image).save(out, "JPEG", quality=85, progressive=True)
        return out.getvalue()
    if subsampling == "Gray":
        return simplejpeg.encode_jpeg(image[..., :1].copy(), quality=85, colorspace="GRAY", colorsubsampling="Gray")
    return simplejpeg.encode_jpeg(image, quality=85, colorsubsampling=subsampling)


@pytest.mark.parametrize("subsampling", ["420", "422", "444", "Gray", "progressive"])
def test_a_box_is_those_pixels_of_the_whole_decoded_file(decoder, subsampling):
    jpeg = noise_jpeg(203, 301, subsampling)  # odd sizes: partial iMCUs at the right and bottom edges
    rng = random.Random(subsampling)
    for scale in (1, 2, 4, 8):
        height, width = -(-203 // scale), -(-301 // scale)
        whole = simplejpeg.decode_jpeg(jpeg, "RGB", fastdct=True, fastupsample=True, min_height=height,
                                       min_width=width)
        assert whole.shape == (height, width, 3)
        boxes = [(0, 0, height, width), (height - 1, width - 1, 1, 1), (0, width - 1, height, 1)]
        for _ in range(25):
            box_height, box_width = rng.randint(1, height), rng.randint(1, width)
            boxes.append((rng.randint(0, height - box_height), rng.randint(0, width - box_width), box_height, box_width))
        for top, left, box_height, box_width in boxes:
            box = decoder.decode(jpeg, scale, top, left, box_height, box_width, width)
            assert box.shape == (box_height, box_width, 3)
            assert np.array_equal(box, whole[top:top + box_height, left:left + box_width]), (scale, top, left)


def test_damaged_files_and_bad_boxes_raise_value_errors(decoder):
    jpeg = noise_jpeg(160, 200, "420")
    truncated = jpeg[: len(jpeg) // 2]
    with pytest.raises(ValueError, match="[Pp]remature end"):  # libjpeg's warning, an error here as in simplejpeg
        decoder.decode(truncated, 1, 100, 0, 60, 200, 200)
    with pytest.raises(ValueError, match="[Nn]ot a JPEG"):
        decoder.decode(b"\x89PNG\r\n\x1a\n" + jpeg[8:], 1, 0, 0, 10, 10, 200)
    with pytest.raises(ValueError, match="outside the 160x200 image"):
        decoder.decode(jpeg, 1, 150, 0, 20, 10, 200)
    assert decoder.decode(jpeg, 1, 0, 0, 10, 10, 200).shape == (10, 10, 3)  # still usable after failures


def test_the_fast_path_gives_the_same_pixels_with_or_without_it(decoder, tmp_path, monkeypatch):
    """decode_region's box arithmetic (scales, clamping at the edges) is the same for both
    ways of decoding, so using jpeg_box changes speed only."""
    paths = []
    for index, (height, width) in enumerate([(375, 500), (333, 500), (1100, 1500), (2300, 2100)]):
        paths.append(tmp_path / f"{index}.JPEG")
        paths[-1].write_bytes(noise_jpeg(height, width, "420", seed=index))
    transform = fast_decode.FastRandomResizedCrop(96, (0.08, 1.0), (3 / 4, 4 / 3), ["bilinear"], hflip=0)
    scales = set()

    def decode_all():
        random.seed(7)
        return [transform.decode(path.read_bytes()) for path in paths for _ in range(20)]

    monkeypatch.setattr(fast_decode, "box_decoder", lambda: decoder)
    with_box = decode_all()
    monkeypatch.setattr(fast_decode, "box_decoder", lambda: None)
    whole = decode_all()
    assert all(torch.equal(a, b) for a, b in zip(with_box, whole))
    random.seed(7)
    for path in paths:  # the crops covered every DCT scale
        for _ in range(20):
            height, width = Image.open(path).size[::-1]
            shrink = min(transform._box(height, width)[2:]) / 96
            scales.add(8 if shrink >= 8 else 4 if shrink >= 4 else 2 if shrink >= 2 else 1)
    assert scales == {1, 2, 4, 8}


def test_a_decoder_that_gets_boxes_wrong_is_refused(decoder):
    class OffByOneColumn:
        def decode(self, data, scale, top, left, height, width, image_width):
            shifted = min(left + 1, image_width - width)
            return decoder.decode(data, scale, top, shifted, height, width, image_width)

    with pytest.raises(jpeg_box.Unavailable, match="differently from the same box"):
        jpeg_box.check(OffByOneColumn())


@pytest.fixture
def fresh_build(tmp_path, monkeypatch):
    """box_decoder() from scratch, with its cache in tmp_path; the real one afterwards."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    jpeg_box.box_decoder.cache_clear()
    yield tmp_path / "cspresnet"
    jpeg_box.box_decoder.cache_clear()


def test_it_is_built_once_and_cached(decoder, fresh_build):
    assert jpeg_box.box_decoder() is not None
    library, = fresh_build.glob("jpeg_box-*.so")
    built_at = library.stat().st_mtime_ns
    assert jpeg_box.build(fresh_build) == library and library.stat().st_mtime_ns == built_at
    assert not list(fresh_build.glob("*.partial"))


@pytest.mark.parametrize("compiler, reason", [("/no/such/cc", "could not run the C compiler '/no/such/cc'"),
                                              ("false", "false could not build jpeg_box.c: exit code 1")])
def test_without_a_working_compiler_whole_files_are_decoded_after_a_warning(fresh_build, monkeypatch, caplog,
                                                                           compiler, reason):
    monkeypatch.setenv("CC", compiler)
    assert jpeg_box.box_decoder() is None
    assert caplog.text.count("decoding whole JPEGs, not only the crops") == 1
    assert reason in caplog.text and "apt install gcc libjpeg-dev" in caplog.text
    assert jpeg_box.status().startswith("simplejpeg decoding whole files (the box decoder is unavailable") and \
        reason in jpeg_box.status()
    assert not list(fresh_build.glob("*"))
    jpeg = noise_jpeg(90, 120, "420")
    assert fast_decode._decode_box(jpeg, 1, 90, 120, 5, 7, 30, 40).shape == (30, 40, 3)


def test_an_unwritable_cache_means_whole_files_after_a_warning(fresh_build, caplog):
    fresh_build.write_text("a file where the build folder should be")
    assert jpeg_box.box_decoder() is None
    assert "cannot create the build folder" in caplog.text


def test_the_switch_turns_it_off_quietly(fresh_build, monkeypatch, caplog):
    monkeypatch.setenv(jpeg_box.SWITCH, "0")
    assert jpeg_box.box_decoder() is None
    assert caplog.text == "" and jpeg_box.status() == f"simplejpeg decoding whole files ({jpeg_box.SWITCH}=0)"


def test_the_switch_can_require_it(fresh_build, monkeypatch):
    """On a cluster a whole-file fallback is a slower run nobody asked for: make it an error."""
    monkeypatch.setenv(jpeg_box.SWITCH, "require")
    monkeypatch.setenv("CC", "/no/such/cc")
    with pytest.raises(FastJpegRequired, match="CSPRESNET_JPEG_BOX=require, but the box decoder is unavailable: "
                                                "could not run the C compiler"):
        jpeg_box.box_decoder()


def test_the_build_is_keyed_by_the_libjpeg_version(decoder, fresh_build, monkeypatch):
    library = jpeg_box.build(fresh_build)
    assert jpeg_box.box_decoder().version == jpeg_box.libjpeg_version("cc") != ""
    monkeypatch.setattr(jpeg_box, "libjpeg_version", lambda compiler: "9.9.9")  # as after an upgrade
    assert jpeg_box.build(fresh_build) != library and len(list(fresh_build.glob("jpeg_box-*.so"))) == 2


@pytest.mark.slow
def test_corrupted_files_raise_or_decode_but_never_crash_the_process(decoder):
    """Flipped bytes and cut files at random boxes, in a child process, so that a crash in
    the C code fails this test instead of killing pytest. Each must decode or raise
    ValueError (which sends the file to Pillow)."""
    script = """
import json, random
import numpy as np
from data import jpeg_box
from tests.test_jpeg_box import noise_jpeg
decoder = jpeg_box.BoxDecoder(jpeg_box.build(jpeg_box.cache_folder()))
rng = random.Random(0)
originals = [noise_jpeg(120, 160, kind, seed) for kind in ("420", "444", "progressive") for seed in range(3)]
outcomes = {"decoded": 0, "ValueError": 0}
for _ in range(400):
    jpeg = bytearray(rng.choice(originals))
    if rng.random() < 0.3:
        jpeg = jpeg[:rng.randrange(len(jpeg))]
    for _ in range(rng.randint(1, 20)):
        if jpeg:
            jpeg[rng.randrange(len(jpeg))] = rng.randrange(256)
    scale = rng.choice([1, 2, 4, 8])
    height, width = -(-120 // scale), -(-160 // scale)
    box_height, box_width = rng.randint(1, height), rng.randint(1, width)
    try:
        decoder.decode(bytes(jpeg), scale, rng.randint(0, height - box_height), rng.randint(0, width - box_width),
                       box_height, box_width, width)
        outcomes["decoded"] += 1
    except ValueError:
        outcomes["ValueError"] += 1
print(json.dumps(outcomes))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    outcomes = json.loads(done.stdout.strip().splitlines()[-1])
    assert outcomes["decoded"] > 20 and outcomes["ValueError"] > 20, outcomes  # both ways were exercised
