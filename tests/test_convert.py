"""Edge validation: every bad field is refused with INVALID_ARGUMENT naming it."""
import re

import pytest

from genserve.client import build_request
from genserve.config import Limits, ServerConfig
from genserve.convert import Validator, card_to_pb
from genserve.models.base import ModelLimits
from genserve.types import RequestError
from genserve.v1 import genserve_pb2 as pb
from genserve.workers.protocol import ModelCard

IMG = ModelCard("img", "image", ModelLimits(64, 64, 256, 256, 8, 50, default_guidance_scale=1.0))
VID = ModelCard("vid", "video", ModelLimits(64, 64, 128, 128, 6, 50, default_frames=9, max_frames=33,
                                            frame_multiple=4))


@pytest.fixture
def v():
    return Validator({"img": IMG, "vid": VID}, Limits(max_prompt_chars=100))


def test_defaults(v):
    r = v.request(build_request("a cat", task="image"))
    assert (r.model, r.task, r.output_format) == ("img", "image", "png")
    assert (r.params.width, r.params.height, r.params.num_frames, r.params.num_steps) == (64, 64, 1, 8)
    assert r.req_id and 0 <= r.params.seed < 2**32  # all the bits the noise generator uses
    r = v.request(build_request("a cat", task="video", seed=0, request_id="mine"))
    assert (r.model, r.params.num_frames, r.output_format, r.params.seed, r.req_id) == ("vid", 9, "mp4", 0, "mine")
    r = v.request(build_request("a cat", task="", model="vid"))  # task follows the model
    assert r.task == "video"


@pytest.mark.parametrize("fields, field", [
    (dict(width=0), "width"), (dict(height=0), "height"),
    (dict(width=70), "width"), (dict(height=33), "height"),
    (dict(width=512), "width"), (dict(height=4096), "height"),
    (dict(steps=0), "num_inference_steps"), (dict(steps=51), "num_inference_steps"),
    (dict(num_frames=3), "num_frames"),
    (dict(guidance_scale=-1.0), "guidance_scale"), (dict(guidance_scale=float("nan")), "guidance_scale"),
    (dict(model="nope"), "model"), (dict(model="vid", task="image"), "task"),
    (dict(output_format="mp4"), "output_format"), (dict(task=""), "task"),
])
def test_bad_image_fields(v, fields, field):
    fields.setdefault("task", "image")
    with pytest.raises(RequestError) as err:
        v.request(build_request("a cat", **fields))
    assert err.value.status == "INVALID_ARGUMENT"
    assert err.value.message.startswith(field + ":"), err.value.message


@pytest.mark.parametrize("fields, field", [
    (dict(num_frames=0), "num_frames"), (dict(num_frames=10), "num_frames"), (dict(num_frames=37), "num_frames"),
    (dict(output_format="png"), "output_format"), (dict(fps=0), "fps"), (dict(fps=1000), "fps"),
])
def test_bad_video_fields(v, fields, field):
    with pytest.raises(RequestError) as err:
        v.request(build_request("a cat", task="video", **fields))
    assert err.value.message.startswith(field + ":"), err.value.message


def test_fps_is_for_videos_only(v):
    assert v.request(build_request("a cat", task="image", fps=1000)).fps == 8  # ignored: the default
    assert v.request(build_request("a boat", task="video", fps=24)).fps == 24


def test_prompt_and_enum_values(v):
    for prompt in ("", "   ", "x" * 101):
        with pytest.raises(RequestError, match="^prompt:"):
            v.request(build_request(prompt, task="image"))
    with pytest.raises(RequestError, match="^negative_prompt: longer than the limit of 100 characters"):
        v.request(build_request("a cat", task="image", negative_prompt="x" * 101))
    with pytest.raises(RequestError, match="^output_format: MP4 is not an image format"):
        v.request(build_request("a cat", task="image", output_format="mp4"))
    with pytest.raises(RequestError, match="^output_format: PNG is not a video format"):
        v.request(build_request("a cat", task="video", output_format="png"))
    msg = build_request("a cat", task="image")
    msg.output_format = 99  # open enum: unknown numbers arrive as ints
    with pytest.raises(RequestError, match="^output_format:"):
        v.request(msg)
    msg = build_request("a cat")
    msg.task = 42
    with pytest.raises(RequestError, match="^task:"):
        v.request(msg)
    for bad_id in ("x" * 200, "   ", "a\nb"):
        with pytest.raises(RequestError, match="^request_id:"):
            v.request(build_request("a cat", task="image", request_id=bad_id))


def test_server_caps_lower_model_limits():
    v = Validator({"img": IMG, "vid": VID}, Limits(max_width=128, max_steps=10, max_frames=17))
    assert v.request(build_request("a", task="image", width=128)).params.width == 128
    with pytest.raises(RequestError, match="^width: 144 exceeds the maximum of 128"):
        v.request(build_request("a", task="image", width=144))
    with pytest.raises(RequestError, match="^num_inference_steps: 11 is outside 1..10"):
        v.request(build_request("a", task="image", steps=11))
    with pytest.raises(RequestError, match="^num_frames: 21 is outside 1..17"):
        v.request(build_request("a", task="video", num_frames=21))


def test_caps_are_published_and_defaults_follow_them():
    """ListModels (``card_to_pb`` of the validator's cards) tells the capped
    limits, and a request that leaves fields unset gets defaults lowered to
    them instead of the model's own (64x64, 9 frames, 8 steps) or a refusal."""
    v = Validator({"img": IMG, "vid": VID}, Limits(max_width=32, max_frames=5, max_steps=5))
    info = card_to_pb(v.cards["vid"], True)
    assert (info.max_width, info.max_height, info.max_num_frames, info.max_steps) == (32, 128, 5, 5)
    assert (info.default_width, info.default_height, info.default_num_frames, info.default_steps) == (32, 64, 5, 5)
    r = v.request(build_request("a", task="image"))
    assert (r.params.width, r.params.height, r.params.num_steps) == (32, 64, 5)
    r = v.request(build_request("a", task="video"))
    assert (r.params.width, r.params.num_frames, r.params.num_steps) == (32, 5, 5)


def test_caps_round_down_to_a_value_the_model_takes():
    v = Validator({"img": IMG, "vid": VID}, Limits(max_width=40, max_frames=12, max_steps=100))
    assert (v.cards["img"].limits.max_width, v.cards["vid"].limits.max_frames) == (32, 9)
    assert v.cards["img"].limits.max_steps == 50  # a cap never raises a model's own maximum
    with pytest.raises(RequestError, match="^width: 48 exceeds the maximum of 32"):
        v.request(build_request("a", task="image", width=48))


@pytest.mark.parametrize("limits, message", [
    (Limits(max_width=8), "--max-width 8 leaves model 'img' no valid width (the smallest it takes is 16)"),
    (Limits(max_height=15), "--max-height 15 leaves model 'img' no valid height"),
])
def test_cap_that_leaves_no_valid_value_is_refused(limits, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        Validator({"img": IMG, "vid": VID}, limits)


def test_server_config_refuses_preset_caps_before_workers():
    """Built-in presets are checked by ``ServerConfig.validate``, which
    ``serve`` runs before it starts any worker; other models' caps pass."""
    with pytest.raises(ValueError, match="--max-width 8 leaves model 'wan-tiny' no valid width"):
        ServerConfig(models=("wan-tiny",), limits=Limits(max_width=8)).validate()
    ServerConfig(models=("sd3-tiny", "wan-tiny"), limits=Limits(max_width=32, max_frames=5, max_steps=1)).validate()


def test_served_cards_log_lowered_defaults(caplog):
    from genserve.app import served_cards

    with caplog.at_level("INFO", logger="genserve"):
        cards = served_cards([IMG, VID], Limits(max_steps=7))
    assert (cards["img"].limits.default_steps, cards["vid"].limits.default_steps) == (7, 6)
    assert "model img: default num_inference_steps lowered from 8 to 7 by --max-steps 7" in caplog.text
    assert "model vid" not in caplog.text


@pytest.mark.parametrize("fields, message", [
    (dict(width=-5), "width must be in 0..4294967295, got -5"),
    (dict(num_frames=2**32), "num_frames must be in 0..4294967295"),
    (dict(slo_ms=-1), "slo_ms must be in 0.."),
    (dict(task="audio"), "task must be one of image, video, got 'audio'"),
    (dict(output_format="bmp"), "output_format must be one of png, jpeg"),
])
def test_client_refuses_fields_it_cannot_send(fields, message):
    """What the request cannot carry is a clear ValueError in the caller, not
    protobuf's; what it can carry the server judges (above)."""
    with pytest.raises(ValueError, match=message.replace(".", r"\.").replace("(", r"\(")):
        build_request("a cat", **fields)
