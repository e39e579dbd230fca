"""Each video model keeps to its own SP limit on a live server: a Wan
checkpoint whose 3 attention heads split over no SP group, served beside
wan-tiny (8 heads), leaves wan-tiny its SP 2 on 2 workers."""
from __future__ import annotations

import pytest

from conftest import ServerProcess

pytestmark = pytest.mark.slow


def save_three_head_wan(path) -> None:
    from genserve.models.presets import build_wan_tiny
    from genserve.models.wan import save_wan

    save_wan(build_wan_tiny(name="wan3", heads=3), str(path))


def test_a_model_with_fewer_heads_does_not_cap_the_others(tmp_path):
    from genserve.client import Client

    save_three_head_wan(tmp_path / "wan3")
    srv = ServerProcess("--num-workers", "2", "--model", "sd3-tiny", "--model", "wan-tiny",
                        "--model", f"wan3={tmp_path / 'wan3'}")
    try:
        with Client(srv.target) as client:
            limits = {m.name: m.max_sp_degree for m in client.models(timeout_s=30)}
            assert limits == {"sd3-tiny": 1, "wan-tiny": 2, "wan3": 1}
            # a deadline only SP could meet: the 3-head model still runs on one device
            resp = client.generate("a river", task="video", model="wan3", width=64, height=64,
                                   num_frames=9, steps=3, slo_ms=1, seed=1, output_format="raw")
            assert resp.media.num_frames == 9 and set(resp.sp_degrees) == {1}
    finally:
        srv.stop()
    assert "model wan3: its attention heads split evenly over at most 1 devices" in srv.output
