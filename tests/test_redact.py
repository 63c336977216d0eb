"""gateway.redact: secrets and credential-shaped strings are masked in text we show."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from gateway.config import load_settings
from gateway.redact import MASK, redact, secrets_of


def test_given_secret_values_are_masked_longest_first():
    text = "token abcdefgh and abcdefgh-extended and abcd"
    out = redact(text, ["abcdefgh", "abcdefgh-extended", "abcd"])
    assert out == "token *** and *** and ***"


@pytest.mark.parametrize("short", ["", "abc", None])
def test_empty_and_short_secrets_are_ignored(short):
    assert redact("abc is a word", [short]) == "abc is a word"


@pytest.mark.parametrize("text, expected", [
    ("HF says hf_AbCdEfGh12345 is bad", "HF says *** is bad"),
    ("key sk-proj_abc-DEF12345 leaked", "key *** leaked"),
    ("hf_short stays", "hf_short stays"),  # fewer than 8 characters after hf_
    ("a task-abcdefghijk id", "a task-abcdefghijk id"),  # sk- inside a word is not a key
])
def test_token_shapes(text, expected):
    assert redact(text) == expected


def test_bearer_tokens_and_authorization_headers():
    assert redact("curl -H 'x' Bearer abc.def-ghi/123= done") == "curl -H 'x' Bearer *** done"
    assert redact("Authorization: Basic dXNlcjpwYXNz\nnext line") == (
        "Authorization: ***\nnext line")
    assert redact("headers={'authorization': 'Bearer abc', 'x-y': '1'}") == (
        "headers={'authorization': '***', 'x-y': '1'}")
    assert redact("AUTHORIZATION=whatever") == "AUTHORIZATION=***"


@pytest.mark.parametrize("text, expected", [
    ("token=abc123", "token=***"),
    ("HF_TOKEN=hunter22", "HF_TOKEN=***"),
    ("api_key: xyz, next", "api_key: *** next"),
    ("api-key = xyz", "api-key = ***"),
    ("apikey=xyz", "apikey=***"),
    ('"password": "p4ss"', '"password": ***'),
    ("Secret:s3cr3t", "Secret:***"),
    ("passwd = x", "passwd = ***"),
])
def test_key_value_pairs(text, expected):
    assert redact(text) == expected


def test_ordinary_log_lines_survive():
    line = ("INFO 05-09 12:00:00 engine.py:300] max_num_batched_tokens=8192, "
            "tokenizer_mode=auto, max_tokens: 16, 100 tokens/s")
    assert redact(line) == line
    assert redact("") == ""


def test_masks_are_not_masked_again():
    once = redact("token=abc Authorization: Bearer xyz hf_abcdefghijk")
    assert once == "token=*** Authorization: ***"
    assert redact(once) == once
    assert MASK == "***"


def test_secrets_of_model_env_and_hf_token():
    settings = load_settings(raw={"docker": {"hf_token": "hf_from_config"}}, environ={})
    model = SimpleNamespace(env={"OPENAI_API_KEY": "k-value", "db_password": "pw-value",
                                 "MY_SECRET": "s-value", "HF_TOKEN": "t-value",
                                 "PATH": "/usr/bin", "EMPTY_TOKEN": ""})
    assert sorted(secrets_of(model, settings)) == sorted(
        ["hf_from_config", "k-value", "pw-value", "s-value", "t-value"])
    assert secrets_of(SimpleNamespace(env={}), None) == []
    assert secrets_of(None, settings) == ["hf_from_config"]


def test_secrets_of_values_are_masked_in_a_tail():
    model = SimpleNamespace(env={"VENDOR_KEY": "plainvalue99"})
    tail = "loading with plainvalue99 as credential\n"
    assert redact(tail, secrets_of(model)) == "loading with *** as credential\n"
