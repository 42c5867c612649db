"""The README is the contract: every `python -m src.…` and `make …` line of its code blocks runs as written, from the
root of a fresh copy of the repository, with no DDPM_ROOT and no hydra.run.dir / hydra.sweep.dir.

Only size-shrinking overrides are appended (steps, T, sample counts, widths); `<placeholders>` and `...` are filled
from tiny runs of the README's own training lines. Lines that need a GPU, the network or a cluster are listed in
``NOT_HERE`` with the reason, and checked as far as they go offline. A README line that does not work fails here.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from src.data.synthetic import write_image_folder, write_lsun_lmdb
from tests.helpers import ROOT, write_fake_cifar10

pytestmark = pytest.mark.slow

ENTRY_POINTS = ("python -m src.", "make ")


@dataclass
class Line:
    text: str  # as in the README
    section: str
    env: dict[str, str] = field(default_factory=dict)
    argv: list[str] = field(default_factory=list)  # the command without its environment assignments


def readme_lines() -> list[Line]:
    """Every command line of the README's bash blocks that calls an entry point or make (continuations joined)."""
    lines, section = [], ""
    in_block, pending = False, ""
    for raw in (ROOT / "README.md").read_text().splitlines():
        if not in_block and raw.startswith("#"):
            section = raw.lstrip("#").strip()
        if raw.startswith("```"):
            in_block = raw.strip() in ("```bash", "```sh") if not in_block else False
            continue
        if not in_block:
            continue
        text = (pending + " " + raw.strip()).strip() if pending else raw.strip()
        if text.endswith("\\"):
            pending = text[:-1].rstrip()
            continue
        pending = ""
        words = shlex.split(text, comments=True)
        env = {}
        while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
            key, value = words.pop(0).split("=", 1)
            env[key] = value
        command = " ".join(words)
        if command.startswith(ENTRY_POINTS):
            lines.append(Line(text, section, env, words))
    return lines


# README lines that cannot run here as written, how each is checked instead, and why.
NOT_HERE = {  # the first pattern a line holds decides
    "make test": ("dry run", "runs this very test suite (CI runs it through .ci/run)"),
    "hydra/launcher=slurm": ("compose", "submits jobs to a SLURM cluster"),
    "experiment=cifar10": ("gpu", "trains the paper's CIFAR-10 model on a GPU on the downloaded data: without a GPU it "
                                  "must stop at once saying how to train on the CPU; with one, it is composed only"),
    "s3://": ("compose", "writes to an object store"),
    "experiment=lsun_": ("gpu", "trains the paper's 256x256 model on 8 GPUs: stops at once without a GPU"),
    "experiment=celebahq256": ("gpu", "trains the paper's 256x256 model on 8 GPUs: stops at once without a GPU"),
}
# Offline stand-ins (not size changes) that a line needs here, and why.
OFFLINE = {
    "metric=fid": "the Inception weights are a download: a random-weights file of the same format stands in",
    "ddpm-cifar10-32.ckpt metric=fid": "CIFAR-10 is a download: a generated cifar-10-batches-py stands in",
    "logger=wandb": "no network: W&B logs offline (WANDB_MODE=offline, as CI sets it)",
}

SHRINK = {
    "src.train": ["trainer.max_steps=2", "diffusion.num_timesteps=100", "callbacks.sample_grid.num_samples=4",
                  "hydra.sweeper.n_trials=2"],
    "src.sample": ["num_samples=4", "batch_size=4"],
    "src.eval": ["num_samples=8", "sample_batch_size=8", "num_batches=1", "batch_size=8", "figure.rows=2",
                 "fid.max_reference=8", "fid.batch_size=8", "nfe_curve.nfe=[2,4]"],
    "src.bench": ["batch_size=2", "sample_steps=3", "ddim_steps=2", "dpmpp_steps=2", "repeats=1", "warmup=0",
                  "model.ch=32", "device=cpu", "cpu_memory=false"],
    "src.convert": [],
    "src.data.prepare": ["num_workers=1"],
}
# the image-folder example trains the paper-size U-Net at 64x64: narrower, and small batches
IMAGE_FOLDER = ["model.ch=32", "data.batch_size=4", "data.num_workers=0"]
# Optuna optimizes val/loss: epochs of two batches, so that the two steps end with a validation
OPTUNA = ["trainer.limit_train_batches=2", "trainer.check_val_every_n_epoch=1", "trainer.limit_val_batches=1"]
# a converted paper model samples with T=1000: a respaced chain of a few steps
CONVERTED = ["sampler.steps=5"]


def with_overrides(argv: list[str], extra: list[str]) -> list[str]:
    """``argv`` with each ``key=value`` of ``extra`` replacing the line's own value of that key, or appended (a
    multirun key is left as the line has it: the sweep is what the line is about)."""
    out = list(argv)
    for override in extra:
        key = override.split("=", 1)[0]
        same = [i for i, a in enumerate(out) if a.split("=", 1)[0].lstrip("+") == key]
        if not same:
            out.append(override if key != "hydra.sweeper.n_trials" or "+sweep=optuna" in out else "")
        elif "," not in out[same[0]].split("=", 1)[1]:
            out[same[0]] = override
    return [a for a in out if a]


class Copy:
    """A fresh copy of the repository (tracked files and untracked ones git does not ignore) and its tiny runs."""

    def __init__(self, root: Path):
        self.root = root
        files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                               capture_output=True).stdout.decode().split("\0")
        for name in filter(None, files):
            source = ROOT / name
            if source.is_file():
                (root / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, root / name)
        (root / ".venv").symlink_to(Path(sys.prefix))  # the installed environment, as after `make` on this machine
        self.runs: dict[str, Path] = {}
        self.stand_ins: dict[str, Path] = {}  # README placeholders of data folders -> generated data
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("DDPM_", "PYTEST_"))}
        self.env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{self.env.get('PATH', '')}"  # `python`

    def run(self, argv: list[str], env: dict[str, str] | None = None,
            timeout: int = 900) -> subprocess.CompletedProcess:
        if argv[0] == "python":
            argv = [sys.executable, *argv[1:]]
        return subprocess.run(argv, cwd=self.root, env={**self.env, **(env or {})}, capture_output=True, text=True,
                              timeout=timeout)

    def newest_run(self, task: str = "train") -> Path:
        return max((self.root / "outputs" / task / "runs").iterdir(), key=lambda p: p.stat().st_mtime)


def describe(line: Line, result: subprocess.CompletedProcess) -> str:
    return f"README line failed: {line.text}\n(section {line.section!r}, rc {result.returncode})\n" \
           f"{result.stdout[-2000:]}\n{result.stderr[-4000:]}"


def prepared_argv(copy: Copy, line: Line, images: Path, inception: Path) -> tuple[list[str], dict[str, str]]:
    """The line's command with placeholders filled and the shrinking (and offline stand-in) overrides added."""
    argv, env = list(line.argv), dict(line.env)
    text = " ".join(argv)
    if text.startswith("make train"):
        overrides = " ".join(SHRINK["src.train"][:3])
        return ["make", "-o", ".venv/.installed", *argv[1:], f"ARGS={overrides}"], env
    module = argv[2]
    ckpt = copy.runs.get("digits", copy.root)
    if "metric=swd" in text:
        ckpt = copy.runs["toy2d"]
    elif line.section.startswith("Class-conditional"):
        ckpt = copy.runs["digits_cond"]
    filled = []
    for arg in argv:
        arg = arg.replace("outputs/train/runs/<run>", str(ckpt.relative_to(copy.root)))
        arg = arg.replace("/path/to/images", str(images)).replace("<partition>", "debug")
        for placeholder, stand_in in copy.stand_ins.items():
            arg = arg.replace(placeholder, str(stand_in))
        if arg == "ckpt_path=...":
            arg = f"ckpt_path={ckpt / 'checkpoints' / 'last.ckpt'}"
        filled.append(arg)
    extra = list(SHRINK[module])
    if "data=image_folder" in text:
        extra += IMAGE_FOLDER
    if "+sweep=optuna" in text:
        extra += OPTUNA
    if "ddpm-cifar10-32.ckpt" in text:
        extra += CONVERTED
    if "metric=fid" in text:
        extra += [f"fid.weights_path={inception}", "fid.feature=64"]
    if "ddpm-cifar10-32.ckpt metric=fid" in text:
        extra += ["+data_overrides.download=false", "+data_overrides.verify_checksums=false",
                  f"+data_overrides.data_dir={copy.root / 'data' / 'cifar10'}"]
    if "logger=wandb" in text or "experiment=cifar10" in text:
        env.setdefault("WANDB_MODE", "offline")
    return with_overrides(filled, extra), env


def check_not_here(copy: Copy, line: Line, how: str) -> None:
    argv = line.argv[:3] + [a.replace("<partition>", "debug").replace("<run>", "run") for a in line.argv[3:]
                            if a != "-m"]
    # a multirun line is composed with the first value of each swept key
    argv = [a.split("=", 1)[0] + "=" + a.split("=", 1)[1].split(",")[0] if "=" in a and "[" not in a else a
            for a in argv]
    if how == "dry run":
        result = copy.run(["make", "-n", *argv[1:]])
        assert result.returncode == 0 and "pytest" in result.stdout, describe(line, result)
        return
    if how == "gpu" and not torch.cuda.is_available():
        result = copy.run(with_overrides(argv, SHRINK["src.train"][:2]), env={"WANDB_MODE": "offline", **line.env},
                          timeout=300)
        assert result.returncode != 0 and "trainer=cpu" in result.stderr, describe(line, result)
        return
    result = copy.run([*argv, "--cfg", "all", "--resolve"], env={"WANDB_MODE": "offline", **line.env}, timeout=300)
    assert result.returncode == 0, describe(line, result)


@pytest.fixture(scope="module")
def fresh_copy(tmp_path_factory) -> Copy:
    return Copy(tmp_path_factory.mktemp("clone"))


@pytest.mark.timeout(2400)  # some 50 commands, two at a time: 8-10 minutes on a quiet 2-core machine
def test_every_readme_command_works_as_written(fresh_copy, tmp_path):
    from src.metrics.fidelity import make_random_inception_weights

    copy = fresh_copy
    lines = readme_lines()
    assert len(lines) > 30, "the README's commands were not found"
    for pattern in list(NOT_HERE) + list(OFFLINE):
        assert any(pattern in line.text for line in lines), f"{pattern!r} is no longer in the README: update the test"
    # the README's own training lines make the runs the other lines use
    for name, text in (("digits", "python -m src.train"), ("digits_cond", "python -m src.train experiment=digits_cond"),
                       ("toy2d", "python -m src.train experiment=toy2d data.dataset=two_moons")):
        line = next(ln for ln in lines if " ".join(ln.argv) == text)
        result = copy.run(with_overrides(line.argv, SHRINK["src.train"]))
        assert result.returncode == 0, describe(line, result)
        copy.runs[name] = copy.newest_run()
        lines.remove(line)
    images = tmp_path / "images"
    make_images(images)
    inception = make_random_inception_weights(tmp_path / "inception.pth")
    write_fake_cifar10(copy.root / "data" / "cifar10")
    # the 256x256 data, generated in the real layouts (the placeholders are longest first: one is a prefix)
    copy.stand_ins = {
        "/path/to/church_outdoor_train_lmdb": write_lsun_lmdb(tmp_path / "lsun", "church_outdoor", count=12, corrupt=1),
        "/path/to/celebahq": write_image_folder(tmp_path / "celebahq", count=6, size=300),
        "/path/to/shards": copy.root / "shards"}
    make_diffusers_folder(copy.root / "ddpm-cifar10-32")
    # the conversion before the lines that use its output
    convert = [ln for ln in lines if "src.convert" in ln.text]
    for line in convert:
        result = copy.run(line.argv)
        assert result.returncode == 0, describe(line, result)
    # a command the README shows twice (in two sections) runs once
    rest = list({tuple(ln.argv) + tuple(sorted(ln.env.items())): ln for ln in lines if ln not in convert}.values())

    def check(line: Line) -> str | None:
        how = next((mode for pattern, (mode, _) in NOT_HERE.items() if pattern in line.text), None)
        try:
            if how is not None:
                check_not_here(copy, line, how)
            else:
                argv, env = prepared_argv(copy, line, images, inception)
                result = copy.run(argv, env={"OMP_NUM_THREADS": "1", **env})  # two at a time on a small machine
                assert result.returncode == 0, describe(line, result)
        except AssertionError as err:
            return str(err)
        return None

    with ThreadPoolExecutor(max_workers=2) as pool:
        failures = [f for f in pool.map(check, rest) if f]
    assert not failures, "\n\n".join(failures)
    # nothing was written outside the copy's outputs (the runs found their root without DDPM_ROOT)
    assert (copy.root / "outputs" / "train" / "multiruns").is_dir()
    assert (copy.root / "outputs" / "sample" / "runs").is_dir() and (copy.root / "outputs" / "eval" / "runs").is_dir()


def make_images(folder: Path, n: int = 12, size: int = 80) -> None:
    from PIL import Image

    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        pixels = torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i:03d}.png")


def make_diffusers_folder(folder: Path) -> None:
    """What `hf download google/ddpm-cifar10-32` gives, at a small size: a UNet2DModel folder and its scheduler."""
    import json

    from tests.entry_points.test_convert import CIFAR10_SCHEDULER, TINY_UNET, make_diffusers_unet

    make_diffusers_unet(TINY_UNET).save_pretrained(folder, safe_serialization=True)
    (folder / "scheduler_config.json").write_text(json.dumps(CIFAR10_SCHEDULER))


def readme_python_block(after_heading: str) -> str:
    """The first python code block below the README heading ``after_heading``."""
    text = (ROOT / "README.md").read_text()
    section = text.split(f"## {after_heading}\n", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_adding_a_dataset_example_trains(tmp_path, monkeypatch):
    """The README's example data module, as written there, plugs into training through its yaml node."""
    import math
    import types

    from omegaconf import OmegaConf
    from torch.utils.data import TensorDataset

    from src.data.base import UNLABELED, BaseDataModule, TransformedSubset, split_indices
    from src.train import train
    from src.utils.validate import check_int
    from tests.helpers import TINY, compose_config

    module = types.ModuleType("readme_rings")
    module.__dict__.update(math=math, torch=torch, TensorDataset=TensorDataset, BaseDataModule=BaseDataModule,
                           TransformedSubset=TransformedSubset, split_indices=split_indices, UNLABELED=UNLABELED,
                           check_int=check_int)
    exec(readme_python_block("Adding a dataset"), module.__dict__)  # noqa: S102 - the README's own example
    monkeypatch.setitem(sys.modules, "readme_rings", module)
    cfg = compose_config([*TINY, "model=mlp", "callbacks.sample_grid.num_samples=8"], tmp_path / "run")
    cfg.data = OmegaConf.create({"_target_": "readme_rings.RingsDataModule", "batch_size": 64, "num_samples": 500})
    objects = train(cfg)
    assert objects["module"].data_shape == (2,) and objects["trainer"].global_step == 4
    assert objects["run_config"]["model"]["data_dim"] == 2
