"""DDP against FSDP2 with 2 processes on the CPU (gloo), through the trainer itself (issue 18's numbers).

configs/shapes.yaml's model (the UNet trains, sharded under FSDP; the text encoder frozen, as FSDP2 here requires),
fp32, EMA on, each engine run `--repeats` times alternately:
- step time: the trainer's own step_time in metrics.jsonl, median over the steps after the first 5;
- training state per process: the bytes of its checkpoint files (weights, optimizer, EMA: whole on each DDP
  process; each FSDP process writes only its shards), read from the last checkpoint;
- peak memory: the largest resident set of any of the launch's processes (getrusage of the children), which
  includes the ~0.5 GB that Python, torch and the libraries take in every process.
FSDP on the CPU runs with tests/faults/sitecustomize.py's FINETUNE_TEST_FSDP_ON_CPU (accelerate enables FSDP for
accelerator devices only).

    python benchmarks/bench_fsdp.py [--steps 30] [--repeats 2] [--json benchmarks/results/fsdp-cpu-2core-DATE.json]
"""

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def launch(engine: str, out: Path, steps: int, batch: int) -> dict:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    flags = ["--use_fsdp", "--fsdp_version", "2"] if engine == "fsdp" else ["--multi_gpu"]
    command = [sys.executable, "-m", "accelerate.commands.launch", *flags, "--num_processes", "2", "--num_machines",
               "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
               str(ROOT / "finetune" / "train.py"), "--config", str(ROOT / "configs" / "shapes.yaml"),
               f"train.output_dir={out}", f"train.max_train_steps={steps}", f"train.checkpointing_steps={steps}",
               f"train.train_batch_size={batch}", "train.use_ema=true", "model.train_text_encoder=false",
               "validation.validation_steps=0", "train.logging_steps=1", "data.num_samples=2000"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "",
           "FINETUNE_CACHE": str(out.parent / "cache"), "FINETUNE_TEST_FSDP_ON_CPU": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "tests" / "faults"), os.environ.get("PYTHONPATH")]))}
    rss = out.parent / f"{out.name}.maxrss"  # written by a fresh Python whose only children are this launch's
    wrapper = [sys.executable, "-c", "import resource, subprocess, sys; "
               "code = subprocess.run(sys.argv[2:]).returncode; "
               "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)); "
               "sys.exit(code)", str(rss)]
    result = subprocess.run([*wrapper, *command], env=env, capture_output=True, text=True, cwd=out.parent)
    if result.returncode:
        raise SystemExit(result.stderr[-3000:])
    peak_kib = int(rss.read_text())
    times = [json.loads(line)["step_time"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if '"step_time"' in line]
    checkpoint = out / f"checkpoint-{steps}"
    state = {rank: sum(p.stat().st_size for p in checkpoint.iterdir()
                       if p.name.startswith(f"shard-{rank}.") or (engine == "ddp" and p.name in (
                           "model.safetensors", "optimizer.bin", "ema_0.safetensors")))
             for rank in (0, 1)}
    return {"engine": engine, "step_time_s_median": statistics.median(times[5:]),
            "images_per_s": 2 * batch / statistics.median(times[5:]),
            "state_bytes_per_process": state,
            "peak_rss_mib_largest_process": round(peak_kib / 1024, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=16, help="per process")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for engine in ("ddp", "fsdp"):
                runs.append({"repeat": repeat, **launch(engine, Path(tmp) / f"{engine}-{repeat}", args.steps,
                                                        args.batch)})
                print(json.dumps(runs[-1]), flush=True)
    summary = {engine: {"step_time_s_median": statistics.median(r["step_time_s_median"] for r in runs
                                                                if r["engine"] == engine),
                        "state_bytes_per_process": next(r for r in runs if r["engine"] == engine)[
                            "state_bytes_per_process"]}
               for engine in ("ddp", "fsdp")}
    report = {"what": "DDP vs FSDP2, 2 gloo processes, configs/shapes.yaml model, UNet trained, fp32, EMA",
              "machine": f"{platform.machine()}, {os.cpu_count()} cores", "torch": torch.__version__,
              "steps": args.steps, "batch_per_process": args.batch, "runs": runs, "summary": summary}
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
