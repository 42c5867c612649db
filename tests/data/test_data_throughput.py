"""benchmarks/data_throughput.py at a tiny size (--smoke), so that it cannot rot: every reader and the torchvision
baseline deliver the requested images, training-ready, and the report holds the rates, ratios and GPU context. No
timing is asserted (the machine may be shared)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.helpers import ROOT

READERS = {"image_folder", "shards", "lsun_mixed", "lsun_jpeg"}
SMOKE = {"images": 24, "size": 32, "batch_size": 8, "rounds": 2}


def test_the_data_throughput_benchmark_measures_every_reader_against_torchvision(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "benchmarks/data_throughput.py", "--smoke", "--out", str(tmp_path)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((tmp_path / "data_throughput.json").read_text())
    assert not (tmp_path / "data").exists()  # the generated data is removed unless --keep-data
    settings = report["settings"]
    assert {k: settings[k] for k in SMOKE} == SMOKE
    n, size, batch = SMOKE["images"], SMOKE["size"], SMOKE["batch_size"]
    readers = report["readers"]
    assert set(readers) == READERS
    assert report["data"]["lsun_mixed"]["formats"] == {"WEBP": n // 2, "JPEG": n // 2}  # the generator alternates
    assert report["data"]["lsun_jpeg"]["formats"] == {"JPEG": n}
    for name, entry in readers.items():
        ours, baseline = entry["ours"], entry["baseline"]
        for side in (ours, baseline):
            assert side["images_per_s"] > 0 and side["images_per_cpu_s"] > 0
            # every round delivered the requested images (whole batches of 8: 24 exactly)
            assert side["delivered"] == [n] * SMOKE["rounds"] and side["requested"] == n
        assert ours["images_per_s_with_to_model_batch"] > 0 and ours["to_model_batch_images_per_s"] > 0
        assert entry["ratio"] == ours["images_per_s"] / baseline["images_per_s"]
        assert entry["ratio_cpu_time"] > 0 and entry["ratio_with_to_model_batch"] > 0
        assert entry["met"] == (entry["ratio"] >= entry["target"])
        # ours: uint8 pixels from the loader, float32 in [-1, 1] after to_model_batch
        assert ours["batch"]["loader"]["shape"] == [batch, 3, size, size], name
        assert ours["batch"]["loader"]["dtype"] == "uint8"
        assert 0 <= ours["batch"]["loader"]["min"] <= ours["batch"]["loader"]["max"] <= 255
        assert ours["batch"]["model"]["shape"] == [batch, 3, size, size]
        assert ours["batch"]["model"]["dtype"] == "float32"
        assert -1 <= ours["batch"]["model"]["min"] <= ours["batch"]["model"]["max"] <= 1
        # the baseline: float32 in [-1, 1] from the loader itself
        assert baseline["batch"]["loader"]["shape"] == [batch, 3, size, size]
        assert baseline["batch"]["loader"]["dtype"] == "float32"
        assert -1 <= baseline["batch"]["loader"]["min"] <= baseline["batch"]["loader"]["max"] <= 1
        workers = entry["workers_2"]
        assert workers["ours_images_per_s"] > 0 and workers["baseline_images_per_s"] > 0
        assert workers["ours"]["delivered"] == [n] and workers["baseline"]["delivered"] == [n]
    assert readers["shards"]["baseline"] == readers["image_folder"]["baseline"]  # one baseline on the same JPEGs
    gpu = report["gpu"]
    assert gpu["params"] == 113_673_219  # the paper's 256x256 U-Net, whatever size the readers ran at
    assert gpu["train_flops_per_image"] == 3 * gpu["forward_flops_per_image"] > 0
    assert set(gpu["gpus"]) == {"H100", "A100"}
    for figures in gpu["gpus"].values():
        assert figures["images_per_s"] > 0
        assert set(figures["cores_for_8_gpus"]) == READERS
        for cores in figures["cores_for_8_gpus"].values():
            assert cores["ours"] > 0 and cores["baseline"] > 0
    assert "ratio" in result.stdout and "images/s per GPU" in result.stdout
