"""SD3 adapter contract: step-by-step equals the diffusers pipeline, batched
equals unbatched, interleaved and parked requests are undisturbed, and a
saved tiny preset loads back as a real checkpoint directory."""
from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch

from genserve.models.base import GenParams
from genserve.models.registry import build_model
from genserve.models.sd3 import load_sd3, save_sd3


@pytest.fixture(scope="module")
def model():
    return build_model("sd3-tiny")


def params(prompt="a red cube", guidance=5.0, seed=7, steps=6, size=64, negative="blurry"):
    return GenParams(prompt, negative, size, size, 1, steps, guidance, seed)


def start(model, p):
    return model.prepare(p, model.encode_prompt(p))


def run(model, state):
    while not state.done:
        model.denoise_step([state])
    return state


def reference_pipe(model):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline(
        transformer=model.transformer, vae=model.vae,
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(model.scheduler_config),
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
        text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_steps_equal_pipeline(model, guidance):
    p = params(guidance=guidance, size=80)
    state = run(model, start(model, p))
    image = model.decode(state)
    c = state.cond
    kwargs = dict(prompt_embeds=c.embeds, pooled_prompt_embeds=c.pooled, negative_prompt_embeds=c.neg_embeds,
                  negative_pooled_prompt_embeds=c.neg_pooled, height=80, width=80,
                  num_inference_steps=p.num_steps, guidance_scale=guidance)
    pipe = reference_pipe(model)
    latents = pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(p.seed), output_type="latent").images
    ref = pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(p.seed), output_type="np").images
    torch.testing.assert_close(state.latents, latents, atol=1e-6, rtol=0)
    assert image.shape == (1, 80, 80, 3) and image.dtype == np.uint8
    assert np.abs(np.round(ref * 255).astype(int) - image.astype(int)).max() <= 1
    assert (c.neg_embeds is None) == (guidance <= 1.0)


def test_dynamic_shifting_schedule_matches_pipeline(model):
    from diffusers import FlowMatchEulerDiscreteScheduler

    cfg = dict(model.scheduler_config, use_dynamic_shifting=True)
    shifted = type(model)("dyn", model.transformer, model.vae, cfg, model.text, model.limits)
    p = params(size=128)
    timesteps, sigmas = shifted.schedule(p)
    ref = FlowMatchEulerDiscreteScheduler.from_config(cfg)
    mu = 0.5 + (1.16 - 0.5) / (4096 - 256) * (64 - 256)  # 128px -> 8x8 patches = 64 tokens
    ref.set_timesteps(p.num_steps, mu=mu)
    torch.testing.assert_close(timesteps, ref.timesteps)
    torch.testing.assert_close(sigmas, ref.sigmas)


def test_batched_equals_unbatched_at_different_steps(model):
    specs = [params(seed=1), params(guidance=1.0, seed=2), params(seed=3, prompt="a blue sphere"),
             params(seed=4, size=96), params(guidance=1.0, seed=5, size=96)]
    states = [start(model, p) for p in specs]
    for i, st in enumerate(states):  # stagger: request i has done i steps
        for _ in range(i):
            model.denoise_step([st])
    alone = copy.deepcopy(states)
    model.denoise_step(states)
    for st in alone:
        model.denoise_step([st])
    for a, b in zip(states, alone):
        assert a.step_index == b.step_index
        torch.testing.assert_close(a.latents, b.latents, atol=1e-5, rtol=0)


def test_interleaved_requests_do_not_disturb_each_other(model):
    pa, pb = params(seed=11), params(seed=12, guidance=1.0, steps=4)
    solo_a, solo_b = run(model, start(model, pa)), run(model, start(model, pb))
    a, b = start(model, pa), start(model, pb)
    model.denoise_step([a])
    model.denoise_step([a, b])
    model.denoise_step([b])
    model.denoise_step([b, a])
    run(model, b)
    run(model, a)
    torch.testing.assert_close(a.latents, solo_a.latents, atol=1e-5, rtol=0)
    torch.testing.assert_close(b.latents, solo_b.latents, atol=1e-5, rtol=0)


def test_deterministic_and_seed_dependent(model):
    one, two = run(model, start(model, params())), run(model, start(model, params()))
    assert torch.equal(one.latents, two.latents)
    assert np.array_equal(model.decode(one), model.decode(two))
    other = run(model, start(model, params(seed=8)))
    assert not torch.allclose(one.latents, other.latents)
    prompt = run(model, start(model, params(prompt="a green cone")))
    assert not torch.allclose(one.latents, prompt.latents)


def test_parked_and_pickled_state_resumes_identically(model):
    solo = run(model, start(model, params()))
    st = start(model, params())
    model.denoise_step([st])
    st.to("cpu")  # park in host memory
    st = pickle.loads(pickle.dumps(st))  # or move to another process
    run(model, st)
    assert torch.equal(st.latents, solo.latents)


def test_finished_state_is_rejected(model):
    st = run(model, start(model, params(steps=1)))
    with pytest.raises(ValueError):
        model.denoise_step([st])


def test_build_ignores_global_rng():
    torch.manual_seed(123)
    a = build_model("sd3-tiny").transformer.state_dict()
    torch.rand(10)
    b = build_model("sd3-tiny").transformer.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_save_and_load_directory_round_trip(model, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    save_sd3(model, str(tmp_path))
    loaded = build_model(f"mine={tmp_path}")
    assert loaded.name == "mine" and loaded.limits == model.limits and loaded.task == "image"
    p = params(prompt="  a cat &amp; a dog ", steps=4)
    mine, theirs = start(model, p), start(loaded, p)
    for x, y in [("embeds", "embeds"), ("pooled", "pooled"), ("neg_embeds", "neg_embeds")]:
        torch.testing.assert_close(getattr(mine.cond, x), getattr(theirs.cond, y), atol=1e-6, rtol=0)
    image = model.decode(run(model, mine))
    assert np.array_equal(image, loaded.decode(run(loaded, theirs)))
    # the whole diffusers pipeline, text encoders included, from the same directory
    pipe = StableDiffusion3Pipeline.from_pretrained(str(tmp_path), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(prompt=p.prompt, negative_prompt=p.negative_prompt, height=64, width=64, num_inference_steps=4,
               guidance_scale=p.guidance_scale, max_sequence_length=32, output_type="np",
               generator=torch.Generator("cpu").manual_seed(p.seed)).images
    assert np.abs(np.round(ref * 255).astype(int) - image.astype(int)).max() <= 1


def test_a_checkpoint_saved_without_t5_loads_and_generates(model, tmp_path):
    """diffusers' drop-T5 layout (``text_encoder_3: [null, null]``): the CLIP
    encoders alone condition, as in the pipeline loaded the same way."""
    import json
    import shutil

    from diffusers import StableDiffusion3Pipeline

    full, no_t5 = tmp_path / "full", tmp_path / "no-t5"
    save_sd3(model, str(full))
    pipe = StableDiffusion3Pipeline.from_pretrained(str(full), local_files_only=True,
                                                    text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(str(no_t5))
    shutil.copy(full / "genserve_limits.json", no_t5)
    index = json.loads((no_t5 / "model_index.json").read_text())
    assert index["text_encoder_3"] == index["tokenizer_3"] == [None, None]
    assert not (no_t5 / "text_encoder_3").exists()

    loaded = build_model(f"clip-only={no_t5}")
    p = params(steps=3)
    image = loaded.decode(run(loaded, start(loaded, p)))
    assert image.shape == (1, 64, 64, 3) and image.dtype == np.uint8
    ref = pipe(prompt=p.prompt, negative_prompt=p.negative_prompt, height=64, width=64, num_inference_steps=3,
               guidance_scale=p.guidance_scale, output_type="np",
               generator=torch.Generator("cpu").manual_seed(p.seed)).images
    assert np.abs(np.round(ref * 255).astype(int) - image.astype(int)).max() <= 1


def test_load_sd3_defaults_limits_from_config(model, tmp_path):
    save_sd3(model, str(tmp_path))
    (tmp_path / "genserve_limits.json").unlink()
    loaded = load_sd3(str(tmp_path))
    assert (loaded.limits.default_width, loaded.limits.max_width, loaded.limits.size_multiple) == (64, 256, 16)


def test_shape_validation(model):
    with pytest.raises(ValueError, match="multiples of 16"):
        start(model, params(size=72))
