"""Registry and presets: names, limits, specs, build and request timing."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from genserve.models.base import IMAGE, VIDEO, GenParams
from genserve.models.registry import build_model, parse_spec


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_parse_spec():
    assert parse_spec("sd3-tiny") == ("sd3-tiny", None)
    assert parse_spec("big=/models/a=b") == ("big", "/models/a=b")
    with pytest.raises(ValueError):
        parse_spec("=/x")


def test_unknown_names_and_dirs(tmp_path):
    with pytest.raises(ValueError, match="unknown model"):
        build_model("nope")
    with pytest.raises(FileNotFoundError):
        build_model(f"x={tmp_path}")
    (tmp_path / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    with pytest.raises(ValueError, match="not supported"):
        build_model(f"x={tmp_path}")


def test_a_bad_checkpoint_path_is_named_with_its_model(tmp_path):
    """Each way a --model path can be wrong names the model and the path or
    file at fault (they were a bare KeyError '_class_name', JSON's own
    message, or 'no model_index.json' for a file)."""
    from genserve.models.registry import model_family

    index = tmp_path / "model_index.json"
    cases = [
        (tmp_path / "missing", FileNotFoundError, f"model 'm': {tmp_path / 'missing'} does not exist"),
        (index, NotADirectoryError, f"model 'm': {index} is not a folder"),
        (tmp_path, FileNotFoundError, "(no model_index.json)"),
        ('{"_class_name": "WanPipeline",\n "x": "a\tb"}', ValueError,
         f"model 'm': {index} is not valid JSON: Invalid control character"),
        ('{"_diffusers_version": "0.35"}', ValueError, f"model 'm': {index} names no pipeline class"),
        ('["WanPipeline"]', ValueError, "names no pipeline class"),
        ('{"_class_name": "FluxPipeline"}', ValueError, "model 'm': " + str(tmp_path) + ": pipeline 'FluxPipeline'"),
    ]
    for target, error, message in cases:
        if isinstance(target, str):
            index.write_text(target)
            target = tmp_path
        elif target == index:
            index.write_text("{}")
        with pytest.raises(error) as err:
            model_family(f"m={target}")
        assert message in str(err.value), str(err.value)
        index.unlink(missing_ok=True)
    index.write_text('{"_class_name": "WanPipeline"}')
    assert model_family(f"m={tmp_path}") == "wan" and model_family("sd3-tiny") == "preset"


def generate(model, **overrides):
    lim = model.limits
    p = GenParams("a lighthouse at dusk", "", lim.default_width, lim.default_height, lim.default_frames,
                  lim.default_steps, lim.default_guidance_scale, 0)
    p = GenParams(**{**{f: getattr(p, f) for f in GenParams.__slots__}, **overrides})
    state = model.prepare(p, model.encode_prompt(p))
    while not state.done:
        model.denoise_step([state])
    return model.decode(state)


@pytest.mark.parametrize("name,task,shape,budget_s", [
    ("sd3-tiny", IMAGE, (1, 64, 64, 3), 1.0),
    ("wan-tiny", VIDEO, (9, 64, 64, 3), 3.0),
])
def test_presets_build_fast_and_generate_defaults(one_thread, name, task, shape, budget_s):
    build_model(name)  # first build pays the diffusers / transformers imports
    t0 = time.perf_counter()
    model = build_model(name, device="cpu", dtype="float32")
    assert time.perf_counter() - t0 < 1.0
    assert model.name == name and model.task == task
    generate(model, num_steps=1)  # warm-up
    t0 = time.perf_counter()
    out = generate(model)
    assert time.perf_counter() - t0 < budget_s
    assert out.shape == shape


def test_preset_limits():
    image, video = build_model("sd3-tiny").limits, build_model("wan-tiny").limits
    assert (image.default_width, image.max_width, image.default_steps, image.max_frames) == (64, 256, 10, 1)
    assert (video.default_frames, video.max_frames, video.frame_multiple) == (9, 33, 4)
    assert video.max_width == 256 and video.size_multiple == image.size_multiple == 16


def test_max_sizes_run(one_thread):
    model = build_model("sd3-tiny")
    assert generate(model, width=256, height=256, num_steps=1).shape == (1, 256, 256, 3)
    assert generate(model, width=256, height=64, num_steps=1).shape == (1, 64, 256, 3)


def test_bfloat16_builds_and_steps():
    model = build_model("wan-tiny", dtype=torch.bfloat16)
    assert model.transformer.dtype == torch.bfloat16
    assert model.transformer.scale_shift_table.dtype == torch.float32  # kept in fp32 as upstream
    assert generate(model, num_steps=2, num_frames=5).shape == (5, 64, 64, 3)


def test_concurrent_first_builds_in_threads():
    """Workers run as threads in tests; diffusers' lazy imports race on first
    use unless builds are serialised. Needs a fresh interpreter."""
    code = (
        "import threading\n"
        "from genserve.models.registry import build_model\n"
        "errors = []\n"
        "def go(name):\n"
        "    try:\n"
        "        build_model(name)\n"
        "    except Exception as exc:\n"
        "        errors.append(repr(exc))\n"
        "threads = [threading.Thread(target=go, args=(n,)) for n in ('sd3-tiny', 'wan-tiny', 'sd3-tiny')]\n"
        "[t.start() for t in threads]\n"
        "[t.join() for t in threads]\n"
        "assert not errors, errors\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
