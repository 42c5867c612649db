"""Stand-ins for sbatch, srun, sacct and scontrol, enough for submitit to run one single-task job on this machine
and for that job to meet its time limit the way SLURM handles it.

`sbatch` starts a controller in the background and prints the job id. The controller runs the batch script with the
SLURM variables of a one-task job. In the first attempt, once a file matching $FAKE_SLURM_SIGNAL_WHEN exists, it sends
the signal that the script's `#SBATCH --signal=<SIG>@<seconds>` line asks for (SLURM sends it that many seconds before
the time limit). If the job then runs `scontrol requeue`, the controller stops the attempt as SLURM does (SIGTERM, then
SIGKILL) and runs the script again with SLURM_RESTART_COUNT=1. `sacct` reports the state the controller last wrote.

State lives in $FAKE_SLURM_DIR. $FAKE_SLURM_ATTEMPT_ENV is a JSON list of extra environment variables per attempt.
Usage: python fake_slurm.py <sbatch|srun|sacct|scontrol|controller> [args...]
"""

from __future__ import annotations

import glob
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

JOB_ID = "4242"
STATE = Path(os.environ.get("FAKE_SLURM_DIR", "."))


def wait_until(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def sbatch(script: str) -> None:
    text = Path(script).read_text()
    (STATE / "job.sbatch").write_text(text)
    (STATE / "state").write_text("PENDING")
    with open(STATE / "controller.log", "ab") as log:
        controller = subprocess.Popen([sys.executable, __file__, "controller", str(STATE / "job.sbatch")],
                                      stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    (STATE / "controller.pid").write_text(str(controller.pid))
    print(f"Submitted batch job {JOB_ID}")


def slurm_env(script_text: str, attempt: int) -> dict[str, str]:
    name = re.search(r"^#SBATCH --job-name=(\S+)", script_text, re.M).group(1)
    env = {**os.environ, "SLURM_JOB_ID": JOB_ID, "SLURM_JOB_NAME": name, "SLURM_NTASKS": "1",
           "SLURM_NTASKS_PER_NODE": "1", "SLURM_JOB_NUM_NODES": "1", "SLURM_NNODES": "1", "SLURM_PROCID": "0",
           "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost", "SLURM_JOB_NODELIST": "localhost"}
    if attempt:
        env["SLURM_RESTART_COUNT"] = str(attempt)
    extra = json.loads(os.environ.get("FAKE_SLURM_ATTEMPT_ENV", "[]"))
    if attempt < len(extra):
        env.update(extra[attempt])
    return env


def run_attempt(script: str, attempt: int) -> int:
    """Run the batch script once; in the first attempt, signal the task near its "time limit" and stop it if it
    asks to be requeued. Returns the script's exit status."""
    text = Path(script).read_text()
    batch = subprocess.Popen(["bash", script], env=slurm_env(text, attempt))
    pattern = os.environ.get("FAKE_SLURM_SIGNAL_WHEN")
    if attempt > 0 or not pattern:
        return batch.wait()
    wait_until(lambda: glob.glob(pattern) or batch.poll() is not None, timeout=300)
    time.sleep(0.3)  # the signal comes at some point of training, not inside the save that announced it
    if batch.poll() is not None:
        return batch.wait()
    signal_name = re.search(r"^#SBATCH --signal=(?:B:)?(\w+)@\d+", text, re.M).group(1)
    task_pid = int((STATE / "task.pid").read_text())
    print(f"time limit near: SIG{signal_name} to task {task_pid}", flush=True)
    os.kill(task_pid, getattr(signal, f"SIG{signal_name}"))
    wait_until(lambda: (STATE / "requeue").exists() or batch.poll() is not None, timeout=120)
    if (STATE / "requeue").exists() and batch.poll() is None:
        print("requeued: SIGTERM to the task", flush=True)
        os.kill(task_pid, signal.SIGTERM)
        if not wait_until(lambda: batch.poll() is not None, timeout=60):
            os.kill(task_pid, signal.SIGKILL)
    return batch.wait()


def controller(script: str) -> None:
    attempt = 0
    while True:
        (STATE / "state").write_text("RUNNING")
        returncode = run_attempt(script, attempt)
        print(f"attempt {attempt} ended with {returncode}", flush=True)
        if not (STATE / "requeue").exists():
            break
        (STATE / "requeue").unlink()
        attempt += 1
    (STATE / "state").write_text("COMPLETED" if returncode == 0 else "FAILED")


def srun(args: list[str]) -> None:
    """`srun --unbuffered --output <file> --error <file> <command...>` for the single task of the job."""
    files = {}
    while args and args[0].startswith("--"):
        option = args.pop(0)
        if option in ("--output", "--error"):
            files[option] = args.pop(0).replace("%j", os.environ["SLURM_JOB_ID"]).replace("%t", "0")
    (STATE / "task.pid").write_text(str(os.getpid()))
    for option, fd in (("--output", 1), ("--error", 2)):
        if option in files:
            out = os.open(files[option], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            os.dup2(out, fd)
    os.execvp(args[0], args)


def main() -> None:
    command, args = sys.argv[1], sys.argv[2:]
    if command == "sbatch":
        sbatch(args[-1])
    elif command == "controller":
        controller(args[0])
    elif command == "srun":
        srun(args)
    elif command == "sacct":
        state = (STATE / "state").read_text() if (STATE / "state").exists() else "PENDING"
        print(f"JobID|State|NodeList\n{JOB_ID}|{state}|localhost")
    elif command == "scontrol":
        with open(STATE / "scontrol.log", "a") as f:
            f.write(" ".join(args) + "\n")
        if args[:1] == ["requeue"]:
            (STATE / "requeue").touch()
    else:
        raise SystemExit(f"fake_slurm: unknown command {command}")


if __name__ == "__main__":
    main()
