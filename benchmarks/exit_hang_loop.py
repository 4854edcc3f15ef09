"""Run `scripts/slurm/train.sbatch` again and again as tests/test_distributed.py runs it (two "nodes" on this machine,
srun and scontrol stood in for, gloo on the CPU; a job of 4 steps, then its requeue to 6) and count the launches
that do not exit: the hang at the end of a multi-process run (finetune/distributed.py `run_and_leave`). On a hang,
py-spy (when installed) dumps every process of the job into <work>/<i>/dump.txt, and the job is killed.

    python benchmarks/exit_hang_loop.py --jobs 25 [--timeout 120] [--work /tmp/exit-hang]

Results of 2026-12-06 are in results/exit-hang-loop-2026-12-06.txt.
"""

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import TINY_RUN  # noqa: E402
from tests.test_distributed import SRUN  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def dump(pid: int, path: Path) -> None:
    """Each process of the job's session: its command line and, with py-spy, its Python and native stacks."""
    pids = subprocess.run(["pgrep", "-s", str(os.getpgid(pid))], capture_output=True, text=True).stdout.split()
    with path.open("w") as out:
        for child in pids:
            args = subprocess.run(["ps", "-o", "args=", "-p", child], capture_output=True, text=True).stdout
            out.write(f"=== {child} {args}")
            if shutil.which("py-spy"):
                out.write(subprocess.run(["py-spy", "dump", "--native", "--pid", child], capture_output=True,
                                         text=True).stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=25, help="jobs of two launches each")
    parser.add_argument("--timeout", type=float, default=120, help="seconds before a launch counts as hung")
    parser.add_argument("--work", type=Path, default=Path("/tmp/exit-hang"))
    args = parser.parse_args()
    launches = hangs = 0
    for i in range(args.jobs):
        work = args.work / str(i)
        shutil.rmtree(work, ignore_errors=True)
        (work / "bin").mkdir(parents=True)
        (work / "bin" / "srun").write_text(SRUN)
        (work / "bin" / "scontrol").write_text("#!/bin/bash\necho 127.0.0.1\n")
        for stub in (work / "bin").iterdir():
            stub.chmod(0o755)
        env = {**os.environ, "FINETUNE_CACHE": str(work / "cache"), "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "",
               "ACCELERATE_USE_CPU": "1", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "node[0-1]", "GPUS_PER_NODE": "1",
               "PATH": f"{work / 'bin'}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
        for steps in (4, 6):
            env["MAIN_PROCESS_PORT"] = str(free_port())
            start = time.monotonic()
            with (work / f"out{steps}").open("w") as out, (work / f"err{steps}").open("w") as err:
                job = subprocess.Popen(["bash", str(ROOT / "scripts" / "slurm" / "train.sbatch"), "--config",
                                        str(ROOT / "configs" / "shapes.yaml"), *TINY_RUN, "data.num_samples=2000",
                                        "model.train_text_encoder=false", f"train.max_train_steps={steps}",
                                        "train.checkpointing_steps=2", f"train.output_dir={work / 'run'}"],
                                       cwd=ROOT, env=env, stdout=out, stderr=err, start_new_session=True)
                launches += 1
                try:
                    job.wait(timeout=args.timeout)
                    print(f"job {i}, {steps} steps: status {job.returncode} in {time.monotonic() - start:.0f} s",
                          flush=True)
                except subprocess.TimeoutExpired:
                    hangs += 1
                    print(f"job {i}, {steps} steps: HUNG (stacks in {work / 'dump.txt'})", flush=True)
                    dump(job.pid, work / "dump.txt")
                    os.killpg(job.pid, signal.SIGKILL)
                    job.wait()
                    break
    print(f"{hangs} hung of {launches} launches")
    return 1 if hangs else 0


if __name__ == "__main__":
    sys.exit(main())
