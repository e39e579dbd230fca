"""`genserve profile` on the tiny models: two CPU workers, a chosen grid."""
from __future__ import annotations

import subprocess
import sys

import pytest

from genserve.scheduler import LatencyModel, load_profile

pytestmark = pytest.mark.slow


def test_profile_measures_the_grid_it_is_given(tmp_path):
    out = tmp_path / "p.json"
    done = subprocess.run(
        [sys.executable, "-m", "genserve", "profile", "--out", str(out), "--name", "test", "--steps", "3",
         "--repeats", "1", "--max-batch", "2", "--threads-per-worker", "1",
         "--image-sizes", "64,128", "--video-shapes", "64x64x9"],
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    prof = load_profile(out)
    by_name = {m.name: m for m in prof.models}
    image, video = by_name["sd3-tiny"], by_name["wan-tiny"]
    assert {(p.width, p.batch_size) for p in image.steps} == {(64, 1), (64, 2), (128, 1), (128, 2)}
    assert {(p.width, p.height, p.num_frames, p.sp_degree) for p in video.steps} == {(64, 64, 9, 1), (64, 64, 9, 2)}
    assert all(p.step_ms > 0 for p in image.steps + video.steps)
    assert image.encode_ms > 0 and video.encode_ms > 0 and prof.dispatch_ms >= 0
    cost = LatencyModel(prof)  # it serves from what was measured
    for p in image.steps:
        assert cost.step_ms("sd3-tiny", p.width, p.height, 1, 1, p.batch_size) == pytest.approx(p.step_ms)


@pytest.mark.parametrize("flag,value", [("--image-sizes", "64,big"), ("--video-shapes", "64x64")])
def test_profile_rejects_a_malformed_grid(flag, value):
    done = subprocess.run([sys.executable, "-m", "genserve", "profile", "--out", "x.json", flag, value],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "expected" in done.stderr and "Traceback" not in done.stderr


def test_profile_refuses_a_size_the_model_cannot_take_before_measuring(tmp_path):
    out = tmp_path / "p.json"
    done = subprocess.run([sys.executable, "-m", "genserve", "profile", "--out", str(out), "--num-workers", "1",
                           "--threads-per-worker", "1", "--image-sizes", "64,1024", "--video-shapes", "64x64x10"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last == ("error: --image-sizes: sd3-tiny cannot take 1024x1024 (width: 1024 exceeds the maximum "
                    "of 256) (and 1 more)")
    assert "sp=" not in done.stdout + done.stderr and not out.exists()  # nothing was measured


def test_a_worker_dying_while_measured_ends_the_measurement_at_once():
    """Before, a death was ignored and the measurement waited out its hour."""
    from genserve.models.base import ModelLimits
    from genserve.profile import Profiler
    from genserve.workers import protocol as P
    from genserve.workers.executor import WorkerDied

    class DiesAtOnce:
        num_devices = 2

        def send(self, device_id, msg):
            return True

        def wait(self, timeout_s):
            return [(1, WorkerDied(1, -9))]

    card = P.ModelCard("v", "video", ModelLimits(64, 64, 64, 64, 4, 4, default_frames=9, max_frames=9))
    with pytest.raises(RuntimeError, match=r"profiling v: worker 1 died \(exit code -9\)"):
        Profiler(DiesAtOnce(), {"v": card}).measure("v", 64, 64, 9, (0, 1), 1, 3)
