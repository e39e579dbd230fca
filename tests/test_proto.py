"""The committed gRPC code is exactly what protos/ generates."""
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_regenerating_changes_nothing(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "protos" / "generate.py"), "--out", str(tmp_path)], check=True)
    generated = sorted((tmp_path / "genserve" / "v1").glob("genserve_pb2*"))
    assert [p.name for p in generated] == ["genserve_pb2.py", "genserve_pb2.pyi", "genserve_pb2_grpc.py"]
    for path in generated:
        committed = ROOT / "genserve" / "v1" / path.name
        assert committed.read_text() == path.read_text(), f"{committed} is stale: run make proto"


def test_contract_names():
    from genserve.v1 import genserve_pb2 as pb

    service = pb.DESCRIPTOR.services_by_name["GenServe"]
    assert {m.name for m in service.methods} >= {"Generate", "GenerateStream", "Cancel", "ListModels"}
    assert service.methods_by_name["GenerateStream"].server_streaming
    fields = set(pb.GenerateRequest.DESCRIPTOR.fields_by_name)
    assert fields >= {"request_id", "model", "task", "prompt", "negative_prompt", "width", "height",
                      "num_frames", "fps", "num_inference_steps", "guidance_scale", "seed", "slo_ms",
                      "output_format"}
    types = set(pb.GenerateEvent.Type.keys())
    assert types >= {"QUEUED", "STARTED", "STEP", "PREEMPTED", "RESUMED", "RESHARDED", "COMPLETED",
                     "FAILED", "CANCELLED"}
