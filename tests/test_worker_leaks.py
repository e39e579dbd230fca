"""A worker killed with SIGKILL (a crash, a hung worker) leaves nothing for
the server's multiprocessing resource tracker to clean up: no "leaked
semaphore objects" warning when the server exits."""
from __future__ import annotations

import subprocess
import sys
import textwrap

SERVER = textwrap.dedent("""
    import sys, time
    from genserve.workers.executor import MultiprocessExecutor, WorkerDied, make_worker_specs

    def main():
        executor = MultiprocessExecutor(make_worker_specs("cpu", 1, (f"m={sys.argv[1]}",), num_threads=1))
        try:
            executor.start(timeout_s=300)
            executor.kill([0])
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if any(isinstance(msg, WorkerDied) for _, msg in executor.wait(1.0)):
                    print("died")
                    break
        finally:
            executor.shutdown(timeout_s=5)

    if __name__ == "__main__":
        main()
""")


def test_a_killed_worker_leaks_no_semaphore(tmp_path):
    from genserve.models.presets import build_sd3_tiny
    from genserve.models.sd3 import save_sd3

    save_sd3(build_sd3_tiny(), str(tmp_path / "sd3"))  # loaded through diffusers: its progress bars
    (tmp_path / "server.py").write_text(SERVER)
    done = subprocess.run([sys.executable, str(tmp_path / "server.py"), str(tmp_path / "sd3")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout == "died\n", done.stderr[-2000:]
    assert "leaked semaphore" not in done.stderr
