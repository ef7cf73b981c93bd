"""The one decoding function: reduced decoding of large images, bounded cost, safe file reading."""

from __future__ import annotations

import io
import os
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.decoding import ImageDecodeError, load_image, read_image_file, reduced_min_side, storage_bytes
from models.preprocessing import Preprocessing, preprocess_batch

HYMENOPTERA = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "hymenoptera"
LITE0 = Preprocessing(image_size=224, resize="squash", mean=(0.5,) * 3, std=(0.5,) * 3, decode="reduced")
PHONE = (4032, 3024)


def _jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _smooth(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """A photo-like image: smooth gradients plus mild noise (JPEG-compressible, not flat)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)


def test_reduced_decode_keeps_twice_the_network_side():
    assert reduced_min_side(LITE0) == 448
    crop = Preprocessing(image_size=224, resize="shorter_side_crop", crop_pct=0.875, mean=(0,) * 3, std=(1,) * 3)
    assert reduced_min_side(crop) == 2 * 256
    image = load_image(_jpeg(_smooth(PHONE)), preprocessing=LITE0)
    assert min(image.size) >= 448 and min(image.size) < 2 * 448  # DCT scaling 1/4: 1008x756
    assert image.size == (1008, 756) and image.mode == "RGB"


def test_full_decode_is_kept_for_older_artifacts():
    full = LITE0.model_copy(update={"decode": "full"})
    assert load_image(_jpeg(_smooth(PHONE)), preprocessing=full).size == PHONE
    assert load_image(_jpeg(_smooth(PHONE))).size == PHONE


def test_small_images_are_not_reduced():
    source = _smooth((500, 375))
    assert load_image(_jpeg(source), preprocessing=LITE0).size == (500, 375)
    assert load_image(_png(source), preprocessing=LITE0).size == (500, 375)


def test_png_is_box_reduced_after_decoding():
    image = load_image(_png(_smooth((2000, 1000))), preprocessing=LITE0)
    assert image.size == (1000, 500)  # factor 2: 1000 // 448


def test_reduced_pixels_match_full_decoding_closely():
    """The network input from a reduced decode is within a few grey levels of the full decode's."""
    data = _jpeg(_smooth(PHONE, seed=3), quality=95)
    full = preprocess_batch([load_image(data)], LITE0)
    reduced = preprocess_batch([load_image(data, preprocessing=LITE0)], LITE0)
    assert np.abs(full - reduced).mean() < 0.02  # normalised units: 0.02 = 2.5 grey levels of 255


def test_sixteen_bit_png_is_scaled_without_a_float_copy():
    array = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
    image = load_image(_png(Image.fromarray(array)))
    assert image.mode == "RGB"
    assert np.asarray(image)[..., 0].max() == 255 and np.asarray(image)[0, 0, 0] == 0


def test_storage_bytes_count_mode():
    assert storage_bytes("L", (100, 100)) == 10_000
    assert storage_bytes("I;16", (100, 100)) == 20_000
    assert storage_bytes("RGB", (100, 100)) == 40_000  # stored as RGBX
    assert storage_bytes("RGBA", (100, 100)) == 40_000


def test_decoded_bytes_limit_is_checked_before_decoding():
    """What a decode holds at once is counted, not the file's mode: a full-size RGBA decode also holds its RGB
    composite and the alpha channel it is pasted through (4 + 4 + 1 bytes a pixel)."""
    data = _png(Image.new("RGBA", (300, 300)))
    with pytest.raises(ImageDecodeError, match="bytes decoded"):
        load_image(data, max_decoded_bytes=300 * 300 * 4)
    assert load_image(data, max_decoded_bytes=300 * 300 * 9).size == (300, 300)


def test_draft_reduction_counts_toward_the_decoded_bytes_not_the_declared_size():
    """A 6000x6000 JPEG costs its reduced size when decoded reduced, so a tight byte budget still passes."""
    data = _jpeg(Image.new("RGB", (6000, 6000), (90, 120, 200)), quality=50)
    image = load_image(data, preprocessing=LITE0, max_decoded_bytes=1024 * 1024 * 4)
    assert image.size == (750, 750)
    with pytest.raises(ImageDecodeError, match="bytes decoded"):
        load_image(data, max_decoded_bytes=1024 * 1024 * 4)


def test_regular_files_are_read(tmp_path: Path):
    path = tmp_path / "a.png"
    path.write_bytes(_png(Image.new("RGB", (10, 10))))
    assert load_image(path).size == (10, 10)
    with pytest.raises(ImageDecodeError, match="over the limit"):
        read_image_file(path, max_bytes=10)


def test_a_fifo_is_refused_without_blocking(tmp_path: Path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    result: list[BaseException] = []
    worker = threading.Thread(target=lambda: _capture(result, fifo), daemon=True)
    worker.start()
    worker.join(timeout=10)
    assert not worker.is_alive(), "decoding a FIFO blocked"
    assert isinstance(result[0], ImageDecodeError) and "FIFO" in str(result[0])


def _capture(result: list[BaseException], path: Path) -> None:
    try:
        load_image(path)
    except BaseException as exc:  # noqa: BLE001 - the test inspects it
        result.append(exc)


def test_devices_sockets_and_folders_are_refused(tmp_path: Path):
    link = tmp_path / "zero.jpg"
    link.symlink_to("/dev/zero")
    with pytest.raises(ImageDecodeError, match="character device"):
        load_image(link)
    with pytest.raises(ImageDecodeError, match="folder"):
        load_image(tmp_path)
    sock_path = tmp_path / "s.png"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(sock_path))
        with pytest.raises(ImageDecodeError, match="socket|cannot open"):
            load_image(sock_path)


def test_unknown_file_is_sniffed_not_read_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = tmp_path / "notes.jpg"
    path.write_bytes(b"hello, this is not an image" * 100)
    with pytest.raises(ImageDecodeError, match="not an image"):
        load_image(path)
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail("whole file read"))
    with pytest.raises(ImageDecodeError, match="not an image"):
        load_image(path)


def _hymenoptera_photos(count: int) -> list[Path]:
    if not HYMENOPTERA.is_dir():
        pytest.skip(f"real photos not present at {HYMENOPTERA} (the shared hymenoptera dataset)")
    return sorted(HYMENOPTERA.glob("val/*/*.jpg"))[:count]


@pytest.mark.slow
def test_reduced_decoding_keeps_top1_on_real_photos_at_phone_size():
    """Real photos enlarged to 12 MP: the ImageNet lite0's top-1 from the reduced decode agrees with the full
    decode on nearly every photo."""
    import torch

    from models.registry import get_spec

    photos = _hymenoptera_photos(24)
    spec = get_spec("efficientnet_lite0")
    model = spec.build_imagenet_model()
    model.load_state_dict(spec.load_imagenet_state_dict())
    model.eval()
    full_pre = LITE0.model_copy(update={"decode": "full"})
    agree = 0
    for path in photos:
        with Image.open(path) as photo:
            data = _jpeg(photo.convert("RGB").resize(PHONE, Image.Resampling.BICUBIC), quality=92)
        batch = np.concatenate([
            preprocess_batch([load_image(data, preprocessing=full_pre)], LITE0),
            preprocess_batch([load_image(data, preprocessing=LITE0)], LITE0),
        ])
        with torch.inference_mode():
            top1 = model(torch.from_numpy(batch)).argmax(1)
        agree += int(top1[0] == top1[1])
    assert agree >= len(photos) - 1, f"top-1 agreed on {agree} of {len(photos)} photos"
