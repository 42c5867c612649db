"""FID inputs read an image at a time: ``samples.npz`` memory-mapped (ZIP64 included), folders of shards
``<start>-<stop>.npz``, the compressed-npz fallback, and peak memory that does not grow with the number of images."""

from __future__ import annotations

import json
import logging
import math
import os
import struct
import subprocess
import sys
import textwrap
import time
import zipfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest

from src.metrics.fidelity import (
    ArrayImages,
    MappedArray,
    ShardedArray,
    compute_fidelity,
    image_dataset,
    make_random_inception_weights,
    npy_info,
    open_npz,
)

pytestmark = pytest.mark.usefixtures("one_thread")

N, SIZE = 10, 32
QUICK = 64  # Inception width: the 2048-d layer costs ~10 s a FID on 2 busy cores
ROOT = Path(__file__).resolve().parents[2]


def random_images(n: int = N, size: int = SIZE, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def write_shards(folder: Path, images: np.ndarray, bounds: Iterable[tuple[int, int]]) -> Path:
    """One ``<start>-<stop>.npz`` per range, as a sharded sampling run writes them (labels beside)."""
    folder.mkdir(parents=True, exist_ok=True)
    for start, stop in bounds:
        np.savez(folder / f"{start:08d}-{stop:08d}.npz", samples=images[start:stop],
                 labels=np.arange(start, stop, dtype=np.int64))
    return folder


def write_npz_streamed(path: Path, chunks: Iterable[np.ndarray], shape: tuple[int, ...]) -> Path:
    """An npz written chunk by chunk through ``zipfile`` (ZIP64, stored), as one merges shards too big for memory."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("samples.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                                                     "fortran_order": False, "shape": shape})
            for chunk in chunks:
                f.write(np.ascontiguousarray(chunk, dtype=np.uint8).tobytes())
        zf.writestr("labels.npy", b"")  # a member after the samples, as labels would be
    return path


def has_zip64_local_header(path: Path) -> bool:
    """Whether the first member's local header carries a ZIP64 extra field (id 0x0001)."""
    with open(path, "rb") as f:
        header = f.read(30)
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        f.seek(30 + name_len)
        extra = f.read(extra_len)
    return len(extra) >= 4 and struct.unpack("<H", extra[:2])[0] == 0x0001


@pytest.fixture(scope="module")
def fid_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("fidelity-streaming")
    weights = make_random_inception_weights(root / "random-inception-NOT-FOR-SCORES.pth")
    grey = random_images(8, seed=1) // 8 + 112  # faint noise around grey: unlike the samples (uniform noise)
    return {"weights": weights, "cache": root / "cache", "reference": grey}


def quick_fid(samples, fid_env, **kwargs) -> float:
    return compute_fidelity(samples, fid_env["reference"], weights_path=fid_env["weights"],
                            cache_root=fid_env["cache"], device="cpu", feature=QUICK, **kwargs)["fid"]


def test_memmapped_npz_shards_and_array_give_the_same_fid(fid_env, tmp_path):
    images = random_images()
    run = tmp_path / "run"
    write_shards(run / "shards", images, [(0, 4), (4, 8), (8, 10)])  # the last shard shorter
    (run / "shards" / "manifest.json").write_text(json.dumps({"num_samples": N}))  # as src.sample writes it
    np.savez(tmp_path / "samples.npz", samples=images, labels=np.zeros(N, dtype=np.int64))
    npz, shards = image_dataset(tmp_path / "samples.npz"), image_dataset(run)
    assert isinstance(npz.source, ArrayImages) and isinstance(npz.source.array, MappedArray)
    assert isinstance(shards.source, ArrayImages) and isinstance(shards.source.array, ShardedArray)
    assert len(npz) == len(shards) == N
    assert shards.source.array._current is None  # len() opened no shard
    for i in (0, 3, 4, 9, 5):
        assert np.array_equal(shards[i].permute(1, 2, 0).numpy(), images[i])
        assert np.array_equal(npz[i].permute(1, 2, 0).numpy(), images[i])

    from_array = quick_fid(images, fid_env)
    assert from_array > 1.0
    assert quick_fid(str(tmp_path / "samples.npz"), fid_env) == pytest.approx(from_array, rel=1e-6)
    assert quick_fid(run, fid_env) == pytest.approx(from_array, rel=1e-6)  # <run>/shards
    assert quick_fid(run / "shards", fid_env) == pytest.approx(from_array, rel=1e-6)  # the shards folder itself


def test_memmap_window_moves_over_the_images(tmp_path):
    images = random_images()
    np.savez(tmp_path / "samples.npz", samples=images)
    info = npy_info(tmp_path / "samples.npz")
    array = MappedArray(tmp_path / "samples.npz", info, window_bytes=3 * SIZE * SIZE * 3 + 1)
    assert array.per_window == 3 and len(array) == N and array.shape == images.shape
    for i in (0, 2, 3, 9, -1, 5, 1):  # across windows, back and forth, the last one shorter
        assert np.array_equal(array[i], images[i])
    with pytest.raises(IndexError):
        array[N]


def test_merged_npz_is_preferred_over_shards(tmp_path):
    images = random_images()
    np.savez(tmp_path / "samples.npz", samples=images)
    write_shards(tmp_path / "shards", images, [(0, 4)])  # unfinished, but merged already
    dataset = image_dataset(tmp_path)
    assert isinstance(dataset.source.array, MappedArray) and len(dataset) == N
    (tmp_path / "shards" / "00000000-00000004.npz").unlink()  # src.sample removes them once merged
    with pytest.raises(ValueError, match=r"they were merged into .*samples\.npz'"):
        image_dataset(tmp_path / "shards")


def test_png_folder_still_works(tmp_path):
    from PIL import Image

    images = random_images(3)
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / f"{i:06d}.png")
    dataset = image_dataset(tmp_path)
    assert len(dataset) == 3 and np.array_equal(dataset[2].permute(1, 2, 0).numpy(), images[2])


@pytest.mark.parametrize(("bounds", "total", "message"), [
    ([(0, 4), (6, 10)], None, r"images 4 to 5 \(00000004-00000006\.npz after 00000000-00000004\.npz\) are missing"),
    ([(4, 10)], None, r"images 0 to 3 \(00000000-00000004\.npz\) are missing"),
    ([(0, 4), (4, 8)], 10, r"images 8 to 9 \(00000008-00000010\.npz after 00000004-00000008\.npz, of the 10 in "
                           r"manifest\.json\) are missing"),
    ([], None, r"no <start>-<stop>\.npz shard yet"),
])
def test_shards_with_a_gap_are_refused(fid_env, tmp_path, bounds, total, message):
    folder = write_shards(tmp_path / "shards", random_images(), bounds)
    if total is not None:  # src.sample's manifest gives the number of samples: a missing last shard shows
        (folder / "manifest.json").write_text(json.dumps({"num_samples": total, "complete": False}))
    expected = message + r": the sampling run is incomplete; rerun the same `python -m src\.sample` command"
    with pytest.raises(ValueError, match=expected):
        image_dataset(tmp_path)
    with pytest.raises(ValueError, match=expected):
        quick_fid(folder, fid_env)


def test_overlapping_or_mislabelled_shards_are_refused(tmp_path):
    images = random_images()
    write_shards(tmp_path / "overlap", images, [(0, 6), (4, 10)])
    with pytest.raises(ValueError, match=r"00000000-00000006\.npz and 00000004-00000010\.npz overlap "
                                         r"\(images 4 to 5\)"):
        image_dataset(tmp_path / "overlap")
    folder = write_shards(tmp_path / "short", images, [(0, 4)])
    np.savez(folder / "00000004-00000010.npz", samples=images[4:9])  # five images for a range of six
    with pytest.raises(ValueError, match=r"00000004-00000010\.npz' holds \(5,\) images for its range of 6"):
        image_dataset(folder)
    # a shard cut short, as by a job killed while writing it
    data = (folder / "00000000-00000004.npz").read_bytes()
    (folder / "00000004-00000010.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"00000004-00000010\.npz' is not a readable \.npz.*delete it and rerun "
                                         r"the same `python -m src\.sample` command"):
        image_dataset(folder)


def test_zip64_npz_written_with_zipfile_is_memory_mapped(tmp_path):
    images = random_images()
    path = write_npz_streamed(tmp_path / "samples.npz", np.array_split(images, 3), images.shape)
    assert has_zip64_local_header(path)
    array = open_npz(path)
    assert isinstance(array, MappedArray)
    assert all(np.array_equal(array[i], images[i]) for i in range(N))
    # np.savez writes ZIP64 local headers as well
    np.savez(tmp_path / "savez.npz", samples=images)
    assert has_zip64_local_header(tmp_path / "savez.npz")
    assert np.array_equal(open_npz(tmp_path / "savez.npz")[7], images[7])


def test_compressed_npz_is_loaded_with_a_warning(fid_env, tmp_path, caplog):
    images = random_images()
    np.savez_compressed(tmp_path / "samples.npz", samples=images)
    (tmp_path / "run" / "shards").mkdir(parents=True)
    for start, stop in [(0, 5), (5, 10)]:
        np.savez_compressed(tmp_path / "run" / "shards" / f"{start:08d}-{stop:08d}.npz", samples=images[start:stop])
    with caplog.at_level(logging.WARNING, logger="src.metrics.fidelity.npz"):
        from_npz = quick_fid(tmp_path / "samples.npz", fid_env)
        from_shards = quick_fid(tmp_path / "run", fid_env)
    assert from_npz == pytest.approx(quick_fid(images, fid_env), rel=1e-6)
    assert from_shards == pytest.approx(from_npz, rel=1e-6)
    warnings = [r.getMessage() for r in caplog.records if "held in memory" in r.getMessage()]
    assert len(warnings) == 2 and "(one shard at a time)" in warnings[1], warnings  # one warning per input


# ------------------------------------------------------------------ memory
BIG = 1024  # Inception costs the same per image at any size (resized to 299): large images keep this test short
BIG_N, BIG_SHARD, BATCH = 60, 20, 5  # 180 MiB of images in shards of 60 MiB

# Peak RSS of a fresh process over one FID beyond the peak that torch, torch-fidelity, the Inception model and three
# batches of the same images through it (a warm-up FID: batches overlap in memory) already reached. Then, for the
# figures, the set loaded as image_dataset did before streaming (np.load, then a channels-first copy): the peak
# beyond the RSS before it (a peak beyond the earlier peak would hide what the earlier batches freed).
MEASURE = textwrap.dedent("""
    import json, os, resource, sys
    import numpy as np, torch
    torch.set_num_threads(1)
    from src.metrics.fidelity import compute_fidelity, image_dataset

    def peak():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def current():
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    path, warmup, weights, cache, batch, in_memory = sys.argv[1:]
    kwargs = dict(weights_path=weights, cache_root=cache, device="cpu", feature=64, batch_size=int(batch))
    reference = np.random.default_rng(1).integers(0, 256, (8, 64, 64, 3), dtype=np.uint8)
    compute_fidelity(warmup, reference, **kwargs)
    before = peak()
    fid = compute_fidelity(path, reference, **kwargs)["fid"]
    out = {"growth_mib": peak() - before, "peak_before_mib": before, "fid": fid}
    if in_memory == "1":
        before = current()
        dataset = image_dataset(np.load(path)["samples"])
        out["in_memory_mib"] = peak() - before
    print(json.dumps(out))
""")


def measure_fid_memory(path: Path, warmup: Path, fid_env: dict, in_memory: bool = False) -> dict[str, float]:
    command = [sys.executable, "-c", MEASURE, str(path), str(warmup), str(fid_env["weights"]), str(fid_env["cache"]),
               str(BATCH), str(int(in_memory))]
    # a fixed glibc mmap threshold returns freed batch buffers to the system at once: glibc's default keeps tens
    # to hundreds of MiB of them in its heap, varying from run to run, which would hide what the process holds
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": str(4 << 20)}
    start = time.monotonic()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "seconds": time.monotonic() - start}


def test_peak_memory_does_not_grow_with_the_number_of_images(fid_env, tmp_path):
    shape = (BIG_N, BIG, BIG, 3)
    set_mib = math.prod(shape) / 2**20
    shards = tmp_path / "run" / "shards"
    shards.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def chunks():  # a shard's images at a time, written as a shard and into the merged file: never the whole set
        for start in range(0, BIG_N, BIG_SHARD):
            chunk = np.frombuffer(rng.bytes(BIG_SHARD * BIG * BIG * 3), np.uint8).reshape(BIG_SHARD, BIG, BIG, 3)
            np.savez(shards / f"{start:08d}-{start + BIG_SHARD:08d}.npz", samples=chunk)
            yield chunk

    merged = write_npz_streamed(tmp_path / "samples.npz", chunks(), shape)
    warmup = tmp_path / "warmup.npz"
    np.savez(warmup, samples=random_images(3 * BATCH, BIG))

    npz = measure_fid_memory(merged, warmup, fid_env, in_memory=True)
    sharded = measure_fid_memory(tmp_path / "run", warmup, fid_env)
    print(f"\n{BIG_N} images {BIG}x{BIG}x3 = {set_mib:.0f} MiB; peak RSS growth over a warm-up FID: "
          f"samples.npz {npz['growth_mib']:.1f} MiB ({npz['seconds']:.1f} s), shards {sharded['growth_mib']:.1f} MiB "
          f"({sharded['seconds']:.1f} s); loaded in memory as before: {npz['in_memory_mib']:.1f} MiB")
    bound = set_mib / 3
    assert npz["growth_mib"] < bound and sharded["growth_mib"] < bound
    assert npz["in_memory_mib"] > set_mib  # the measurement sees a set held in memory
    assert sharded["fid"] == pytest.approx(npz["fid"], rel=1e-6)
