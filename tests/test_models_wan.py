"""Wan adapter contract: step-by-step equals WanPipeline (multistep UniPC
history kept per request), batched equals unbatched, interleaved and parked
requests are undisturbed, and a saved tiny preset loads back."""
from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch

from genserve.models.base import GenParams
from genserve.models.registry import build_model
from genserve.models.wan import save_wan


@pytest.fixture(scope="module")
def model():
    return build_model("wan-tiny")


def params(prompt="a cat walking", guidance=5.0, seed=7, steps=5, size=64, frames=9, negative="static"):
    return GenParams(prompt, negative, size, size, frames, steps, guidance, seed)


def start(model, p):
    return model.prepare(p, model.encode_prompt(p))


def run(model, state):
    while not state.done:
        model.denoise_step([state])
    return state


def reference_pipe(model):
    from diffusers import WanPipeline

    pipe = WanPipeline(tokenizer=None, text_encoder=None, transformer=model.transformer, vae=model.vae,
                       scheduler=copy.deepcopy(model.scheduler_template))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_steps_equal_pipeline(model, guidance):
    p = params(guidance=guidance)
    state = run(model, start(model, p))
    video = model.decode(state)
    kwargs = dict(prompt_embeds=state.cond.embeds, negative_prompt_embeds=state.cond.neg_embeds, height=64,
                  width=64, num_frames=9, num_inference_steps=p.num_steps, guidance_scale=guidance)
    pipe = reference_pipe(model)
    latents = pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(p.seed), output_type="latent").frames
    ref = pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(p.seed), output_type="np").frames[0]
    # the pipeline runs cond and uncond as two passes, we batch them: float noise
    torch.testing.assert_close(state.latents, latents, atol=1e-5, rtol=0)
    assert video.shape == (9, 64, 64, 3) and video.dtype == np.uint8
    assert np.abs(np.round(ref * 255).astype(int) - video.astype(int)).max() <= 1


def test_batched_equals_unbatched_at_different_steps(model):
    specs = [params(seed=1), params(guidance=1.0, seed=2), params(seed=3, prompt="a dog running"),
             params(seed=4, frames=5), params(guidance=1.0, seed=5, size=48, frames=5)]
    states = [start(model, p) for p in specs]
    for i, st in enumerate(states):  # stagger: request i has done i steps (UniPC warm-up differs)
        for _ in range(i % 4):
            model.denoise_step([st])
    alone = copy.deepcopy(states)
    model.denoise_step(states)
    for st in alone:
        model.denoise_step([st])
    for a, b in zip(states, alone):
        assert a.step_index == b.step_index == a.extra["scheduler"].step_index
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
    assert model.scheduler_template.step_index is None  # the shared template is never stepped


def test_deterministic_and_seed_dependent(model):
    one, two = run(model, start(model, params())), run(model, start(model, params()))
    assert torch.equal(one.latents, two.latents)
    other = run(model, start(model, params(seed=8)))
    assert not torch.allclose(one.latents, other.latents)


def test_parked_and_pickled_state_resumes_identically(model):
    solo = run(model, start(model, params()))
    st = start(model, params())
    model.denoise_step([st])
    model.denoise_step([st])  # UniPC now holds model-output history
    st.to("cpu")
    st = pickle.loads(pickle.dumps(st))
    run(model, st)
    assert torch.equal(st.latents, solo.latents)


def test_a_moved_state_keeps_its_sigmas_on_the_host_as_diffusers_does(model):
    """Moving a state to a device (here "meta", which any torch build has)
    moves its latents, prompt and the scheduler's history, but not the sigmas
    the noise scheduler keeps on the CPU to compute its coefficients there:
    a sender's and a receiver's copies must step identically."""
    st = start(model, params())
    model.denoise_step([st])
    model.denoise_step([st])
    sched = st.extra["scheduler"]
    assert sched.sigmas.device.type == "cpu"  # diffusers' own choice
    st.to("meta")
    assert st.latents.device.type == "meta" and st.cond.embeds.device.type == "meta"
    assert all(t.device.type == "meta" for t in sched.model_outputs if t is not None)
    assert st.sigmas.device.type == "cpu" and sched.sigmas.device.type == "cpu"


def test_shape_validation(model):
    with pytest.raises(ValueError, match="4k\\+1"):
        start(model, params(frames=8))
    with pytest.raises(ValueError, match="multiples"):
        start(model, params(size=40))


def test_save_and_load_directory_round_trip(model, tmp_path):
    from diffusers import WanPipeline

    save_wan(model, str(tmp_path))
    loaded = build_model(f"mine={tmp_path}")
    assert loaded.name == "mine" and loaded.limits == model.limits and loaded.task == "video"
    p = params(prompt="  a cat &amp;\n a dog ", steps=4)
    mine, theirs = start(model, p), start(loaded, p)
    torch.testing.assert_close(mine.cond.embeds, theirs.cond.embeds, atol=1e-6, rtol=0)
    torch.testing.assert_close(mine.cond.neg_embeds, theirs.cond.neg_embeds, atol=1e-6, rtol=0)
    video = model.decode(run(model, mine))
    assert np.array_equal(video, loaded.decode(run(loaded, theirs)))
    pipe = WanPipeline.from_pretrained(str(tmp_path), local_files_only=True, transformer=loaded.transformer)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(prompt=p.prompt, negative_prompt=p.negative_prompt, height=64, width=64, num_frames=9,
               num_inference_steps=4, guidance_scale=p.guidance_scale, max_sequence_length=64,
               output_type="np", generator=torch.Generator("cpu").manual_seed(p.seed)).frames[0]
    assert np.abs(np.round(ref * 255).astype(int) - video.astype(int)).max() <= 1
