"""Settings are checked when the app is made: a wrong one stops the service with a sentence naming it."""

import subprocess
import sys

import pytest
from flask import Flask

from app import SettingError, chat, create_app
from live_servers import ROOT, free_port, server_environment

# (setting, value as the environment gives it, words the sentence must contain)
BAD_SETTINGS = [
    ("CHAT_HEARTBEAT_SECONDS", "0", "CHAT_HEARTBEAT_SECONDS must be a number of seconds from 0.1 to 3600, not 0.0."),
    ("CHAT_HEARTBEAT_SECONDS", "nan", "CHAT_HEARTBEAT_SECONDS must be"),
    ("CHAT_FIRST_TOKEN_TIMEOUT", "-1", "CHAT_FIRST_TOKEN_TIMEOUT must be a number of seconds above 0"),
    ("CHAT_IDLE_TIMEOUT", "inf", "CHAT_IDLE_TIMEOUT must be"),
    ("CHAT_BODY_TIMEOUT", "ten", "CHAT_BODY_TIMEOUT must be a number of seconds above 0, at most 86400, not 'ten'."),
    ("CHAT_MAX_STREAMS", "abc", "CHAT_MAX_STREAMS must be an integer of at least 1, not 'abc'."),
    ("CHAT_MAX_STREAMS", "0", "CHAT_MAX_STREAMS must be an integer of at least 1, not 0."),
    ("CHAT_MAX_BODY_BYTES", "1e6", "CHAT_MAX_BODY_BYTES must be an integer"),
    ("CHAT_MAX_OUTPUT_TOKENS", "-5", "CHAT_MAX_OUTPUT_TOKENS must be an integer of at least 1"),
    ("CHAT_MAX_IMAGES", "-1", "CHAT_MAX_IMAGES must be an integer from 0 to 1000"),
    ("CHAT_UPSTREAM_RETRIES", "100", "CHAT_UPSTREAM_RETRIES must be an integer from 0 to 10"),
    ("CHAT_RETRY_MAX_WAIT", "-0.5", "CHAT_RETRY_MAX_WAIT must be"),
    ("CHAT_MODEL", " ", "CHAT_MODEL must be a model's name, not ' '."),
    ("CHAT_REASONING", "shown", "CHAT_REASONING must be one of show, hide, not 'shown'."),
    ("CHAT_STREAM_USAGE", "yes", "CHAT_STREAM_USAGE must be one of auto, on, off"),
    ("CHAT_EXTRA_BODY", "[1]", "CHAT_EXTRA_BODY must be a JSON object"),
    ("CHAT_EXTRA_BODY", "{oops", "CHAT_EXTRA_BODY must be a JSON object"),
    ("CHAT_METRICS", "yes", "CHAT_METRICS must be 1 (on), or 0 or unset (off), not 'yes'."),
    ("CHAT_RESUME_SECONDS", "-1", "CHAT_RESUME_SECONDS must be a number of seconds from 0 to 3600, not -1.0."),
    ("CHAT_RESUME_KEEP_SECONDS", "0", "CHAT_RESUME_KEEP_SECONDS must be a number of seconds above 0"),
    ("CHAT_RESUME_MAX_BYTES", "100", "CHAT_RESUME_MAX_BYTES must be an integer from 4096 to 4294967296, not 100."),
    ("CHAT_RESUME_READERS", "0", "CHAT_RESUME_READERS must be an integer from 1 to 16, not 0."),
    ("CHAT_RESUME_REDIS_URL", "http://:secret@redis:6379", "CHAT_RESUME_REDIS_URL must be a redis:// URL."),
]


@pytest.mark.parametrize("name, value, sentence", BAD_SETTINGS, ids=lambda x: str(x)[:30])
def test_bad_setting_in_the_environment_stops_the_app(monkeypatch, name, value, sentence):
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingError) as caught:
        create_app()
    assert sentence in str(caught.value)


def test_default_model_outside_the_allowed_ones(monkeypatch):
    monkeypatch.setenv("CHAT_MODELS", "a,b")
    monkeypatch.setenv("CHAT_MODEL", "c")
    with pytest.raises(SettingError, match=r"CHAT_MODEL='c' must be one of CHAT_MODELS \(a,b\)\."):
        create_app()


@pytest.mark.parametrize(
    "config, sentence",
    [
        ({"CHAT_HEARTBEAT_SECONDS": "15"}, "CHAT_HEARTBEAT_SECONDS must be a number of seconds from 0.1 to 3600"),
        ({"CHAT_MAX_MESSAGES": True}, "CHAT_MAX_MESSAGES must be an integer of at least 1, not True."),
        ({"CHAT_MAX_STREAMS": 2.5}, "CHAT_MAX_STREAMS must be an integer of at least 1, not 2.5."),
        ({"CHAT_MODEL": None}, "CHAT_MODEL must be a model's name, not None."),
        ({"OPENAI_API_KEY": b"sk-secret"}, "OPENAI_API_KEY must be a string."),  # the value is never shown
    ],
    ids=repr,
)
def test_bad_setting_in_a_host_apps_config_stops_the_blueprint(config, sentence):
    host = Flask(__name__)
    host.config.update(config)
    with pytest.raises(SettingError) as caught:
        host.register_blueprint(chat, url_prefix="/assistant")
    assert sentence in str(caught.value)
    assert "secret" not in str(caught.value)


def test_host_apps_own_value_wins_over_a_bad_one_in_the_environment(monkeypatch):
    """Only the values in use are judged: a host app's setting replaces the environment's."""
    monkeypatch.setenv("CHAT_MAX_STREAMS", "abc")
    app = create_app({"CHAT_MAX_STREAMS": 5, "CHAT_HEARTBEAT_SECONDS": 1})
    assert app.config["CHAT_MAX_STREAMS"] == 5


@pytest.mark.parametrize(
    "env, sentence",
    [
        (
            {"CHAT_HEARTBEAT_SECONDS": "0"},
            "CHAT_HEARTBEAT_SECONDS must be a number of seconds from 0.1 to 3600, not 0.0.",
        ),
        ({"CHAT_MAX_STREAMS": "abc"}, "CHAT_MAX_STREAMS must be an integer of at least 1, not 'abc'."),
        ({"CHAT_MODELS": "a,b", "CHAT_MODEL": "c"}, "CHAT_MODEL='c' must be one of CHAT_MODELS (a,b)."),
    ],
    ids=lambda x: str(x)[:40],
)
def test_gunicorn_with_a_bad_setting_says_which_and_exits(env, sentence):
    """Under gunicorn the worker cannot boot: the master stops, non-zero; our sentence is a line of its output."""
    env = server_environment(env)
    command = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "app:create_app()"]
    command += ["-b", f"127.0.0.1:{free_port()}", "-w", "1"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)

    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert sentence in output.splitlines(), output
