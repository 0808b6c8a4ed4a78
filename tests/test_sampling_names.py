"""One name per sampling knob at every door (SamplingParams' names, diffusers' where they exist); the old names are
still taken for one release and say they are deprecated. The pipeline's and HTTP's are tested beside them
(tests/test_pipeline.py, tests/test_serve_inputs.py)."""

from __future__ import annotations

import pytest

from jobs.generate import parse_args
from sdm.cli import build_parser
from sdm.client import SDMClient
from sdm.inference import sampling_overrides
from serve.app import AppArgs

NEW = ["--num-inference-steps", "7", "--guidance-scale", "2.5", "--sampler", "dpm++", "--eta", "0.5", "--cache-interval", "2"]
OLD = ["--steps", "7", "--guidance", "2.5", "--sampler", "dpm++", "--eta", "0.5", "--cache-interval", "2"]
OVERRIDES = {"num_inference_steps": 7, "guidance_scale": 2.5, "sampler": "dpm++", "eta": 0.5, "cache_interval": 2}


def test_sdm_sample_takes_the_sampling_params_names_and_the_old_flags_with_a_warning(capsys):
    common = ["sample", "--model", "m", "--labels", "a.png", "--out", "o"]
    assert sampling_overrides(build_parser().parse_args(common + NEW)) == OVERRIDES
    assert capsys.readouterr().err == ""
    assert sampling_overrides(build_parser().parse_args(common + OLD)) == OVERRIDES
    err = capsys.readouterr().err.splitlines()
    assert err == ["warning: --steps is deprecated and will be removed; use --num-inference-steps",
                   "warning: --guidance is deprecated and will be removed; use --guidance-scale"]
    assert sampling_overrides(build_parser().parse_args(common)) == {}  # unset: the model's defaults


def test_the_generation_job_takes_the_same_flags_into_one_spec(capsys):
    common = ["--model", "m", "--labels", "l", "--out", "o"]
    new, old = parse_args(common + NEW), parse_args(common + OLD)
    assert new == old and new.sampling == OVERRIDES
    assert "--steps is deprecated" in capsys.readouterr().err


def test_the_help_of_both_commands_marks_the_old_flags_deprecated(capsys):
    for argv in (["sample", "--help"], None):
        with pytest.raises(SystemExit):
            build_parser().parse_args(argv) if argv else parse_args(["--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "--steps NUM_INFERENCE_STEPS deprecated name of --num-inference-steps" in text
        assert "--guidance GUIDANCE_SCALE deprecated name of --guidance-scale" in text


class _Recorder:
    """A requests session that records what the client sends and answers with no images."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        self.headers: dict[str, str] = {}

    def request(self, method: str, url: str, json: dict, **kwargs: object) -> object:
        self.bodies.append(json)
        return type("Response", (), {"status_code": 200, "json": lambda self: {"images": []}})()


def test_the_client_sends_num_inference_steps_whichever_name_it_was_given(monkeypatch):
    client = SDMClient("http://nowhere")
    client.session = _Recorder()
    monkeypatch.setattr("sdm.client.np.stack", lambda images: images)
    client.generate(b"png", num_inference_steps=7, seed=1)
    with pytest.warns(DeprecationWarning, match="'num_steps' is deprecated and will be removed; use 'num_inference_steps'"):
        client.generate(b"png", num_steps=7, seed=1)
    with pytest.warns(DeprecationWarning, match="'num_steps'"):
        client.edit(b"png", b"png", b"png", num_steps=7, seed=1)
    new, old, edit = client.session.bodies
    assert new == old and new["num_inference_steps"] == 7 and "steps" not in new
    assert edit["num_inference_steps"] == 7


def test_the_serve_app_takes_fast_path_and_its_old_name_fast():
    assert AppArgs(model_uri="m").fast_path is True
    with pytest.warns(DeprecationWarning, match="'fast' is deprecated and will be removed; use 'fast_path'"):
        assert AppArgs.model_validate({"model_uri": "m", "fast": False}).fast_path is False
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="fast_path and its deprecated name fast disagree"):
        AppArgs.model_validate({"model_uri": "m", "fast": False, "fast_path": True})
