"""AUTOMATIC1111's built-in always-on scripts in alwayson_scripts (Seed, Sampler, Refiner, Comments, Extra options,
Hypertile): accepted where their values are the request's own (AUTOMATIC1111's API never runs them), a difference
refused naming both."""

from __future__ import annotations

import pytest

from kiln import schemas
from kiln.errors import InputError
from orchestrator.server.builtin_scripts import check, without

# as AUTOMATIC1111 1.10's web UI sends them (its API payload), for a request with the same fields
UI_PAYLOAD = {"Seed": {"args": [1234, False, -1, 0, 0, 0]}, "Sampler": {"args": [20, "DPM++ 2M", "Karras"]},
              "Refiner": {"args": [False, "", 0.8]}, "Comments": {"args": []}, "Extra options": {"args": []},
              "Hypertile": {"args": []}}
FIELDS = {"prompt": "a cat", "seed": 1234, "steps": 20, "sampler_name": "DPM++ 2M", "scheduler": "Karras"}


def body(scripts: dict, **fields) -> schemas.Txt2ImgBody:
    return schemas.Txt2ImgBody(**(FIELDS | fields), alwayson_scripts=scripts)


def test_the_web_uis_own_payload_is_accepted():
    check(body(UI_PAYLOAD))
    check(body({"seed": {"args": [1234, True, 7, 0.25, 0, 0]}}, subseed=7, subseed_strength=0.25))
    check(body({"SEED": {"args": [1234, True, 7, 0, 256, 192]}}, seed_resize_from_w=256, seed_resize_from_h=192))
    check(body({"sampler": {"args": [20, "DPM++ 2M Karras"]}}))  # the name with its schedule: the same sampler
    check(body({"sampler": {"args": [20, "dpm++ 2m", "karras"]}}))  # names in any case, as AUTOMATIC1111 takes them
    check(body({"refiner": {"args": [True, "other", 0.6]}}, refiner_checkpoint="other", refiner_switch_at=0.6))
    check(body({"refiner": {"args": [True, "None", 0.6]}}))  # no checkpoint: no refiner, as its setup reads it
    check(body({"seed": {"args": [1234]}, "sampler": {}}))  # fewer values: those sent are compared
    check(body({"refiner": {"args": [True, "none", 0.6]}}))
    assert without(UI_PAYLOAD | {"controlnet": {"args": []}}) == {"controlnet": {"args": []}}


@pytest.mark.parametrize(("scripts", "fields", "message"), [
    ({"Seed": {"args": [99, False, -1, 0, 0, 0]}}, {}, "alwayson_scripts.Seed.args: seed 99 is not the request's 1234"),
    ({"Seed": {"args": [1234, True, 7, 0.5, 0, 0]}}, {}, "subseed_strength 0.5 is not the request's 0.0"),
    ({"Seed": {"args": [1234, False, 7, 0.5, 0, 0]}}, {"subseed_strength": 0.5}, "subseed_strength 0 is not"),
    ({"Seed": {"args": [1234, True, -1, 0, 64, 64]}}, {}, "seed_resize_from_w/_h (64, 64) is not the request's None"),
    ({"Sampler": {"args": [30, "DPM++ 2M", "Karras"]}}, {}, "steps 30 is not the request's 20"),
    ({"Sampler": {"args": [20, "Euler a", "Automatic"]}}, {}, "sampler_name and scheduler 'Euler a' is not"),
    ({"Refiner": {"args": [True, "other", 0.8]}}, {}, "refiner_checkpoint and refiner_switch_at ('other', 0.8)"),
    ({"Refiner": {"args": [False, "", 0.8]}}, {"refiner_checkpoint": "other"}, "None is not the request's ('other'"),
    ({"Comments": {"args": [True]}}, {}, "AUTOMATIC1111's Comments takes none over the API"),
    ({"Sampler": {"args": [20, "DPM++ 2M", "Karras", 1]}}, {}, "takes 3 (steps, sampler_name, scheduler)"),
    ({"Seed": {"args": 1234}}, {}, "alwayson_scripts.Seed.args must be a list"),
    ({"Sampler": {"args": [20, 5, "Automatic"]}}, {}, "alwayson_scripts.Sampler.args: the sampling method and"),
    ({"Sampler": {"args": [20, "no such sampler"]}}, {}, "alwayson_scripts.Sampler.args: "),
])
def test_a_value_the_request_does_not_hold_is_refused(scripts, fields, message):
    with pytest.raises(InputError, match="alwayson_scripts") as caught:
        check(body(scripts, **fields))
    assert message in str(caught.value)
