#!/usr/bin/env python
"""Start the embedded stack (web, Celery workers, engine supervisor) in the foreground; Ctrl-C stops all of it."""
import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", default="8000")
    args = parser.parse_args()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "platform"), str(ROOT)]), PYTHONUNBUFFERED="1")
    py = sys.executable
    queue = os.environ.get("GATEHOUSE_DEFAULT_QUEUE", "default")
    training_queue = os.environ.get("GATEHOUSE_TRAINING_QUEUE", "gpu")
    worker = [py, "-m", "celery", "-A", "gatehouse", "worker", "--pool", "solo", "--loglevel", "INFO",
              "--without-gossip", "--without-mingle", "--without-heartbeat"]
    commands = {
        # Short tasks (verification) and the periodic reaper of stale training runs (-B: embedded beat).
        "worker": worker + ["-Q", queue, "-B", "-n", f"default-{os.getpid()}@%h"],
        # Training runs get their own worker, as GPU workers do in production, so uploads never wait on them.
        "training-worker": worker + ["-Q", training_queue, "-n", f"training-{os.getpid()}@%h"],
        "web": [py, str(ROOT / "manage.py"), "runserver", f"{args.host}:{args.port}", "--noreload"],
        # One engine process per local inference backend, restarted when it exits.
        "engines": [py, str(ROOT / "manage.py"), "serve_engines"],
    }
    processes = {name: subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True)
                 for name, cmd in commands.items()}

    def stop(*_):
        for proc in processes.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.time() + 10
        for proc in processes.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)

    def interrupted(signum, frame):
        raise KeyboardInterrupt

    # Installed explicitly: a shell that starts us in the background leaves SIGINT ignored otherwise.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, interrupted)
    print(f"\nGatehouse is running at http://{args.host}:{args.port}/  (API docs: /api/docs/, admin: /admin/)"
          "\nPress Ctrl-C to stop the web server, the workers and the engines.\n", flush=True)
    try:
        while True:
            for name, proc in processes.items():
                if proc.poll() is not None:
                    print(f"{name} exited with status {proc.returncode}; stopping.", file=sys.stderr)
                    stop()
                    return 1
            time.sleep(0.5)
    except KeyboardInterrupt:
        stop()
        print("Stopped.", flush=True)
        return 0


if __name__ == "__main__":
    sys.exit(main())
