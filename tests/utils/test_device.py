"""One device resolver and one bf16 check for every entry point: clear errors for devices this machine lacks."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import src.eval
import src.metrics.fidelity.compute
import src.sample
from src.utils.precision import resolve_precision

SRC = Path(__file__).resolve().parents[2] / "src"


def files_with(pattern: str) -> list[str]:
    return sorted(str(p.relative_to(SRC.parent)) for p in SRC.rglob("*.py") if re.search(pattern, p.read_text()))


def test_one_resolver_and_one_bf16_check_in_src():
    assert files_with(r"def resolve_device\b") == ["src/utils/device.py"]
    assert files_with(r"is_bf16_supported|_is_mkldnn_bf16_supported") == ["src/utils/device.py"]
    import src.utils.distributed

    # src.sample and src.eval resolve their device through start_processes
    assert src.utils.distributed.resolve_device is src.metrics.fidelity.compute.resolve_device


def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


@pytest.mark.parametrize(("name", "message"), [
    ("cuda", r"device=cuda but this machine has no CUDA GPU \(torch.cuda.is_available\(\) is False\): "
             r"use device=auto or device=cpu"),
    ("cuda:1", "device=cuda:1 but this machine has no CUDA GPU"),
    ("mps", r"device=mps but this machine has no Apple MPS device \(torch.backends.mps.is_available\(\) is False\)"),
    ("gpu0", r"device='gpu0' is not a device: use one of auto .*cpu, cuda, cuda:<index>, mps"),
    ("cuda:x", "device='cuda:x' is not a device"),
    ("meta", "this project runs on auto"),
])
def test_missing_or_malformed_devices_name_the_key(monkeypatch, name, message):
    from src.utils.device import resolve_device

    no_gpu(monkeypatch)
    with pytest.raises(ValueError, match=message):
        resolve_device(name)


def test_cuda_index_beyond_the_gpus_and_what_resolves(monkeypatch):
    from src.utils.device import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match=r"callbacks.x.device=cuda:2 but this machine has 2 CUDA GPUs .*indices 0 "
                                         r"to 1.*cuda:<index below 2>"):
        resolve_device("cuda:2", key="callbacks.x.device")
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    assert resolve_device("auto") == torch.device("cuda")
    no_gpu(monkeypatch)
    cpu = torch.device("cpu")
    assert resolve_device("auto") == resolve_device(" cpu ") == resolve_device(cpu) == cpu


@pytest.mark.parametrize("entry", ["sample", "eval"])
def test_entry_points_refuse_a_missing_gpu_before_reading_the_checkpoint(monkeypatch, tmp_path, entry):
    from tests.helpers import compose_config

    no_gpu(monkeypatch)
    cfg = compose_config([f"ckpt_path={tmp_path / 'absent.ckpt'}", "device=cuda"], tmp_path / "out",
                         config_name=entry)
    run = src.sample.sample if entry == "sample" else src.eval.evaluate
    with pytest.raises(ValueError, match="device=cuda but this machine has no CUDA GPU"):
        run(cfg)


@pytest.mark.parametrize("native", [True, False])
def test_bench_defaults_use_bf16_exactly_where_sampling_does(monkeypatch, native):
    """``src.bench`` times ours "as it runs by default": precision=auto of src.sample, the same check."""
    from src.bench.run import resolve_precisions

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native)
    cpu = torch.device("cpu")
    cfg = OmegaConf.create({"precision": "auto", "defaults_precision": "auto"})
    precisions = resolve_precisions(cfg, cpu)
    assert precisions["defaults"]["ours"] == resolve_precision("auto", cpu) == ("bf16" if native else "fp32")
    assert precisions["same_precision"]["ours"] == "fp32"  # the CPU compares in fp32
