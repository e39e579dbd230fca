"""LatencyModel and profiles: interpolation, calibration, JSON round trip."""
import json
import math

import pytest

from genserve.scheduler import (LatencyModel, Profile, ProfileError, StepSample,
                                DecodeSample, load_profile)
from genserve.scheduler.profile import POINT_KINDS

FLUX, WAN = "flux.1-dev", "wan2.1-t2v-1.3b"


@pytest.fixture(scope="module")
def ref():
    return load_profile("reference-h100")


def test_reference_profile_models_and_defaults(ref):
    assert ref.default_model("image") == FLUX
    assert ref.default_model("video") == WAN
    assert ref.model(FLUX).default_steps == 28 and ref.model(WAN).default_steps == 50


def test_reference_profile_labels_every_entry(ref):
    published = {(p.width, p.height, p.num_frames, p.sp_degree) for m in ref.models
                 for p in m.steps if p.kind == "published"}
    assert published == {(832, 480, 81, 1)}  # the one figure taken as is
    for m in ref.models:
        for p in (*m.steps, *m.decodes):
            assert p.kind in POINT_KINDS
            assert p.note, f"{m.name} {p} has no derivation note"
        assert any(p.batch_size > 1 and p.kind == "model" for p in m.steps) == (m.task == "image")


def test_reference_matches_published_totals(ref):
    lm = LatencyModel(ref)
    # FLUX.1-dev 1024^2, 28 steps: 6.71 s on 1 GPU, 4.38 / 4.24 s with Ulysses-2 / -4
    for degree, total_ms in ((1, 6710), (2, 4380), (4, 4240)):
        got = (lm.encode_ms(FLUX) + 28 * lm.step_ms(FLUX, 1024, 1024, 1, degree, 1)
               + lm.decode_ms(FLUX, 1024, 1024, 1, degree))
        assert got == pytest.approx(total_ms, rel=0.01)
    assert lm.step_ms(WAN, 832, 480, 81, 1, 1) == pytest.approx(1040)


def test_interpolation_is_monotone_and_sane(ref):
    lm = LatencyModel(ref)
    sizes = [256, 512, 640, 768, 896, 1024, 1280]
    times = [lm.step_ms(FLUX, s, s, 1, 1, 1) for s in sizes]
    assert times == sorted(times)
    batch = [lm.step_ms(FLUX, 512, 512, 1, 1, b) for b in range(1, 33)]
    assert batch == sorted(batch)
    assert batch[1] < 2 * batch[0]  # batching amortises (modelled)
    # video SP scales, and an unknown degree falls back without a speed-up
    wan = [lm.step_ms(WAN, 832, 480, 81, k, 1) for k in (1, 2, 4, 8)]
    assert wan == sorted(wan, reverse=True)
    assert lm.step_ms(WAN, 832, 480, 49, 2, 1) < lm.step_ms(WAN, 832, 480, 81, 2, 1)


def test_degree_and_batch_fallbacks():
    prof = Profile.from_measurements("t", [
        StepSample("m", "image", 64, 64, 1, 2, 1, 10.0),
        StepSample("m", "image", 128, 128, 1, 2, 1, 30.0)])
    lm = LatencyModel(prof)
    assert lm.step_ms("m", 64, 64, 1, 4, 1) == pytest.approx(10.0)  # no speed-up assumed
    assert lm.step_ms("m", 64, 64, 1, 1, 1) == pytest.approx(20.0)  # k0 / k slower
    assert lm.step_ms("m", 64, 64, 1, 2, 3) == pytest.approx(30.0)  # b x step(1)
    assert lm.step_ms("m", 96, 96, 1, 2, 1) == pytest.approx(10 * (96 / 64) ** (2 * math.log(3) / math.log(4)), rel=1e-6)


def test_isolated_latency_uses_best_allowed_degree(ref):
    lm = LatencyModel(ref)
    one = lm.isolated_latency_ms(WAN, 832, 480, 81, 50, "video", 1)
    eight = lm.isolated_latency_ms(WAN, 832, 480, 81, 50, "video", 8)
    assert eight < one / 4
    assert lm.isolated_latency_ms(WAN, 832, 480, 81, 50, None, 6) == lm.isolated_latency_ms(
        WAN, 832, 480, 81, 50, None, 4)
    with pytest.raises(ProfileError):
        lm.isolated_latency_ms(WAN, 832, 480, 81, 50, "image", 1)


def test_calibration_converges_and_is_bounded(ref):
    lm = LatencyModel(ref, ewma_alpha=0.3)
    base = lm.step_ms(FLUX, 512, 512, 1, 1, 1)
    for _ in range(40):
        lm.observe_step(FLUX, 512, 512, 1, 1, 1, 1.5 * base)
    assert lm.step_ms(FLUX, 512, 512, 1, 1, 1) == pytest.approx(1.5 * base, rel=0.01)
    # a shape never measured follows its model's level
    other = LatencyModel(ref).step_ms(FLUX, 1024, 1024, 1, 2, 1)
    assert lm.step_ms(FLUX, 1024, 1024, 1, 2, 1) == pytest.approx(1.5 * other, rel=0.05)
    assert abs(lm.last_rel_error) < 0.01
    for _ in range(100):
        lm.observe_step(FLUX, 512, 512, 1, 1, 1, 1000 * base)  # outliers: clamped
    assert lm.step_ms(FLUX, 512, 512, 1, 1, 1) <= 4.0 * base + 1e-9
    lm.observe_step(FLUX, 512, 512, 1, 1, 1, float("nan"))  # ignored
    stats = {(e.model, e.kind, e.width): e for e in lm.prediction_error()}
    e = stats[(FLUX, "step", 512)]
    assert e.count == 140 and e.mean_abs_rel_error > 0 and e.calibration_ratio == pytest.approx(4.0)


def test_save_load_round_trip_keeps_calibration(tmp_path, ref):
    lm = LatencyModel(ref)
    for _ in range(10):
        lm.observe_step(WAN, 832, 480, 33, 4, 1, 120.0)
    path = tmp_path / "calibrated.json"
    lm.save(path)
    again = LatencyModel.load(path)
    assert again.step_ms(WAN, 832, 480, 33, 4, 1) == pytest.approx(lm.step_ms(WAN, 832, 480, 33, 4, 1))
    assert json.loads(path.read_text())["schema_version"] == 1
    assert LatencyModel(again.profile).fresh().step_ms(WAN, 832, 480, 33, 4, 1) == pytest.approx(
        LatencyModel(ref).step_ms(WAN, 832, 480, 33, 4, 1))


def test_from_measurements_takes_medians_and_validates():
    steps = [StepSample("tiny-img", "image", 64, 64, 1, 1, 1, ms) for ms in (9.0, 10.0, 50.0)]
    steps += [StepSample("tiny-vid", "video", 64, 64, 9, 1, 1, 40.0)]
    prof = Profile.from_measurements(
        "cpu", steps, [DecodeSample("tiny-vid", 64, 64, 9, 1, 30.0)], {"tiny-img": 5.0},
        default_models={"image": "tiny-img", "video": "tiny-vid"})
    lm = LatencyModel(prof)
    assert lm.step_ms("tiny-img", 64, 64, 1, 1, 1) == pytest.approx(10.0)
    assert lm.decode_ms("tiny-vid", 64, 64, 9, 1) == pytest.approx(30.0)
    assert lm.encode_ms("tiny-img") == 5.0 and lm.default_steps("tiny-vid") == 50
    with pytest.raises(ProfileError):
        Profile.from_dict({"models": {"x": {"task": "audio", "steps": []}}})
    with pytest.raises(ProfileError):
        Profile.from_measurements("bad", steps, default_models={"image": "tiny-vid"})
    with pytest.raises(ProfileError):
        load_profile("/no/such/profile.json")
    with pytest.raises(ProfileError):
        lm.step_ms("unknown", 64, 64, 1, 1, 1)


def test_dispatch_overhead_from_profile_calibrated_and_saved(tmp_path, ref):
    """The per-dispatch overhead is the profile's figure, then an EWMA of
    measured ones (bounded, never negative); save keeps the calibrated one."""
    from dataclasses import replace
    assert LatencyModel(ref).dispatch_ms() == 0.0
    lm = LatencyModel(replace(ref, dispatch_ms=2.0))
    assert lm.dispatch_ms() == 2.0
    for _ in range(60):
        lm.observe_dispatch(5.0)
    assert lm.dispatch_ms() == pytest.approx(5.0, abs=0.01)
    for bad in (-1.0, math.nan, math.inf):
        lm.observe_dispatch(bad)
    assert lm.dispatch_ms() == pytest.approx(5.0, abs=0.01)
    lm.observe_dispatch(1e9)  # a stall is clipped, not believed
    assert lm.dispatch_ms() < 0.3 * 1e3
    assert lm.fresh().dispatch_ms() == 2.0
    path = tmp_path / "p.json"
    lm.save(path)
    assert LatencyModel.load(path).dispatch_ms() == pytest.approx(lm.dispatch_ms())
    data = json.loads(path.read_text())
    data["dispatch_ms"] = -1
    with pytest.raises(ProfileError, match="dispatch_ms"):
        Profile.from_dict(data)


def _set(path, value):
    """A mutation of the reference profile's JSON: ``value`` at ``path``."""
    def mutate(data):
        *parents, last = path
        for key in parents:
            data = data[key]
        data[last] = value
    return mutate


@pytest.mark.parametrize("mutate, message", [
    # NaN and infinities passed `value <= 0`; then a simulation never ended
    (_set(("models", FLUX, "steps", 0, "step_ms"), math.nan),
     f"model '{FLUX}': steps[0]: step_ms must be a finite number > 0, got nan"),
    (_set(("models", FLUX, "steps", 0, "step_ms"), math.inf), "step_ms must be a finite number > 0, got inf"),
    (_set(("models", WAN, "decode", 1, "decode_ms"), math.nan),
     f"model '{WAN}': decode[1]: decode_ms must be a finite number > 0, got nan"),
    (_set(("models", FLUX, "encode_ms"), math.nan), f"model '{FLUX}': encode_ms must be a finite number >= 0, got nan"),
    (_set(("models", FLUX, "encode_ms"), -1.0), "encode_ms must be a finite number >= 0, got -1.0"),
    (_set(("models", WAN, "move_ms"), -math.inf), f"model '{WAN}': move_ms must be a finite number >= 0, got -inf"),
    (_set(("dispatch_ms",), math.nan), "dispatch_ms must be a finite number >= 0, got nan"),
    # a missing field was "KeyError: 'height'"
    (lambda data: data.pop("models"), "missing field 'models'"),
    (lambda data: data["models"][FLUX]["steps"][0].pop("height"),
     f"model '{FLUX}': steps[0]: missing field 'height'"),
    (lambda data: data["models"][WAN]["decode"][0].pop("decode_ms"),
     f"model '{WAN}': decode[0]: missing field 'decode_ms'"),
    # finite, but a simulation then reported latencies of 10^298 seconds
    (_set(("models", FLUX, "steps", 0, "step_ms"), 1e300),
     f"model '{FLUX}': steps[0]: step_ms must be at most 1e+08 ms, got 1e+300"),
    (_set(("models", WAN, "encode_ms"), 2e8), f"model '{WAN}': encode_ms must be at most 1e+08 ms, got 200000000.0"),
    # int() raised OverflowError on these, or truncated them
    (_set(("models", FLUX, "steps", 0, "width"), math.inf),
     f"model '{FLUX}': steps[0]: width must be a whole number in 1..4294967295, got inf"),
    (_set(("models", FLUX, "steps", 0, "batch_size"), 1.5), "batch_size must be a whole number in 1..4294967295"),
    (_set(("models", WAN, "decode", 0, "num_frames"), True), "num_frames must be a whole number in 1..4294967295"),
    # a simulation failed a plan check (num_steps 1 not in 1..0)
    (_set(("models", FLUX, "default_steps"), 0), f"model '{FLUX}': default_steps must be a whole number in 1..10000, got 0"),
    (_set(("models", FLUX, "default_steps"), -5), "default_steps must be a whole number in 1..10000, got -5"),
    (_set(("models", WAN, "default_steps"), 4_000_000_000), "default_steps must be a whole number in 1..10000"),
    # calibration rows were only unpacked by LatencyModel (serve: after the workers load)
    (_set(("calibration",), [["x"]]), "calibration[0] must be [model, kind, width, height, frames, sp_degree, "
                                      "batch_size, ratio], got ['x']"),
    (_set(("calibration",), 5), "calibration must be a list of rows, got 5"),
    (_set(("calibration",), [[FLUX, "step", 512, 512, 1, 1, 1, 1.0], [FLUX, "steps", 512, 512, 1, 1, 1, 1.0]]),
     "calibration[1]: needs a model name and a kind in step, decode, encode, got 'flux.1-dev', 'steps'"),
    (_set(("calibration",), [[FLUX, "step", "512", 512, 1, 1, 1, 1.0]]),
     "calibration[0]: width must be a whole number in 0..4294967295, got '512'"),
    (_set(("calibration",), [[FLUX, "step", 512, 512, 1, 1, 1, math.nan]]),
     "calibration[0]: ratio must be a finite number > 0, got nan"),
])
def test_profile_numbers_are_checked_when_loaded(ref, tmp_path, mutate, message):
    """Every number of a profile is finite (and positive, or whole, where it
    must be), refused with one error naming the model, the field and the value."""
    data = ref.to_dict()
    mutate(data)
    with pytest.raises(ProfileError) as err:
        Profile.from_dict(data)
    assert message in str(err.value)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))  # NaN, Infinity: what json writes for them
    with pytest.raises(ProfileError, match="bad.json' is not a valid profile: ") as err:
        load_profile(path)
    assert message in str(err.value)


def test_profile_files_json_cannot_parse_are_one_error(ref, tmp_path):
    """OverflowError and RecursionError from the parser were tracebacks; a
    byte-order mark is allowed, and a saved calibration still loads."""
    path = tmp_path / "p.json"
    path.write_text("[" * 100_000)
    with pytest.raises(ProfileError, match="is not a valid profile: RecursionError"):
        load_profile(path)
    data = ref.to_dict()
    data["calibration"] = [[FLUX, "step", 512, 512, 1, 1, 1, 1.5], [FLUX, "encode", 0, 0, 0, 1, 1, 2.0]]
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(data).encode())
    lm = LatencyModel(load_profile(path))
    assert lm.step_ms(FLUX, 512, 512, 1, 1, 1) == pytest.approx(1.5 * LatencyModel(ref).step_ms(FLUX, 512, 512, 1, 1, 1))
    assert lm.encode_ms(FLUX) == pytest.approx(2.0 * ref.model(FLUX).encode_ms)
