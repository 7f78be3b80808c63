"""Secrets never reach what vaepipe writes, and what it writes still loads.

Unit tests of ``pipeline.redact`` (URLs, DSNs, credential pairs, secret env values, config
dicts), of ``pipeline.credentials`` (the tracking URI's password moves into MLflow's env
vars; ``WorkerEnv`` prints no value), of the places that write a config (params, YAML),
and of the model blob loading with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import io
import json
import os

import pytest
import torch

from pipeline.config import ConfigError, flatten, from_dict, load_config, to_dict, to_yaml
from pipeline.credentials import WorkerEnv, move_userinfo_to_env, split_userinfo
from pipeline.redact import REDACTED, is_redacted, redact_config_dict, redact_text


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No secret env var set, no Ray token file; each one the test sets is undone afterwards."""
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "RAY_AUTH_TOKEN", "MLFLOW_TRACKING_PASSWORD",
                 "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
        monkeypatch.setenv(name, "x")  # recorded, so the delete below is undone too
        monkeypatch.delenv(name)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "no-token-here"))
    return monkeypatch


@pytest.mark.parametrize("text, secret, kept", [
    ("http://alice:SECRETPW@mlflow.internal:5000/api", "SECRETPW", "http://alice:***@mlflow.internal:5000/api"),
    ("https://bob:p%40ss@host", "p%40ss", "https://bob:***@host"),
    ("postgresql://mlflow:DBPASS99@db:5432/mlflow", "DBPASS99", "postgresql://mlflow:***@db:5432/mlflow"),
    ("postgresql+psycopg2://u:ab/c@d@db:5432/x", "ab/c@d", "postgresql+psycopg2://u:***@db:5432/x"),
    ("host=db user=mlflow password=DBPASS99 dbname=m", "DBPASS99", "host=db user=mlflow password=*** dbname=m"),
    ("s3://b/k?X-Amz-Signature=abcdef&X-Amz-Date=2024", "abcdef", "s3://b/k?X-Amz-Signature=***&X-Amz-Date=2024"),
    ("https://h/x?access_token=TOK123&page=2", "TOK123", "https://h/x?access_token=***&page=2"),
    ("ray://u:RAYPW@head:10001 and api_key=K123;", "RAYPW", "ray://u:***@head:10001 and api_key=***;"),
])
def test_redact_text_urls_dsns_and_pairs(clean_env, text, secret, kept):
    out = redact_text(text)
    assert secret not in out
    assert out == kept


@pytest.mark.parametrize("text", ["http://alice@host:5000/x", "models:/vae@champion", "sqlite:////tmp/a.db",
                                  "s3://bucket/prefix", "lr=0.001 beta=4 monkey=1", "http://host:80/p"])
def test_redact_text_leaves_non_secrets(clean_env, text):
    assert redact_text(text) == text


def test_redact_text_env_secrets_and_token_file(clean_env, tmp_path):
    clean_env.setenv("AWS_SECRET_ACCESS_KEY", "SECRETAWS/abc+def")
    clean_env.setenv("AWS_SESSION_TOKEN", "SESSIONTOKEN123")
    clean_env.setenv("MLFLOW_TRACKING_TOKEN", "short")  # too short to search for: not mangled everywhere
    token = tmp_path / "auth_token"
    token.write_text("RAYTOKEN0123456789\n")
    clean_env.setenv("RAY_AUTH_TOKEN_PATH", str(token))
    text = "boto failed with SECRETAWS/abc+def; session SESSIONTOKEN123; ray RAYTOKEN0123456789; a short story"
    out = redact_text(text)
    assert out == "boto failed with ***; session ***; ray ***; a short story"


def test_redact_config_dict_walks_nested_values(clean_env):
    clean_env.setenv("AWS_SESSION_TOKEN", "SESSIONTOKEN123")
    d = {"tracking": {"tracking_uri": "http://u:SECRETPW@h:1", "n": 3, "ok": None},
         "extra": {"api_key": "K1", "password": 12345678, "token": None, "auth": {"user": "me"}},
         "list": ["x?token=T1", 1.5, ("SESSIONTOKEN123",)]}
    out = redact_config_dict(d)
    assert out == {"tracking": {"tracking_uri": "http://u:***@h:1", "n": 3, "ok": None},
                   "extra": {"api_key": REDACTED, "password": REDACTED, "token": None, "auth": {"user": "me"}},
                   "list": ["x?token=***", 1.5, ("***",)]}
    assert d["tracking"]["tracking_uri"] == "http://u:SECRETPW@h:1"  # a copy: the live dict is untouched


def test_config_params_and_yaml_are_redacted_and_still_load(clean_env):
    cfg = load_config(None, ["tracking.tracking_uri=postgresql://mlflow:DBPASS99@db:5432/mlflow",
                             "dist.address=ray://u:RAYPW123@head:10001"])
    assert to_dict(cfg)["tracking"]["tracking_uri"].endswith("DBPASS99@db:5432/mlflow")  # live value kept
    params = json.dumps(flatten(cfg))
    assert "DBPASS99" not in params and "RAYPW123" not in params
    assert flatten(cfg)["tracking.tracking_uri"] == "postgresql://mlflow:***@db:5432/mlflow"
    assert "DBPASS99" not in to_yaml(cfg) and "RAYPW123" not in to_yaml(cfg)
    stored = from_dict(redact_config_dict(to_dict(cfg)))  # a saved config is still a valid config
    assert is_redacted(stored.tracking.tracking_uri) and is_redacted(stored.dist.address)


def test_split_userinfo_moves_password_to_mlflow_env(clean_env):
    assert split_userinfo("http://al%40ice:p%3Aw@h:5000/x") == ("http://h:5000/x", "al@ice", "p:w")
    clean_env.setenv("MLFLOW_TRACKING_URI", "http://alice:SECRETPW@h:5000")
    assert move_userinfo_to_env("http://alice:SECRETPW@h:5000") == "http://h:5000"
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "alice"
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "SECRETPW"
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://h:5000"  # Ray processes started later inherit this
    # SQLAlchemy can take a database password only in the URI: it stays there (and is redacted when written)
    assert move_userinfo_to_env("postgresql://u:DBPASS99@db/m") == "postgresql://u:DBPASS99@db/m"


def test_resolve_tracking_uri_never_uses_a_redacted_uri(clean_env):
    from pipeline.tracking import resolve_tracking_uri

    cfg = load_config(None, ["tracking.tracking_uri=http://alice:SECRETPW@h:5000"])
    assert resolve_tracking_uri(cfg) == "http://h:5000"
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "SECRETPW"
    saved = from_dict(redact_config_dict(to_dict(load_config(None, ["tracking.tracking_uri=postgresql://u:DBPASS99@db/m"]))))
    with pytest.raises(ConfigError, match="saved redacted"):
        resolve_tracking_uri(saved)
    clean_env.setenv("MLFLOW_TRACKING_URI", "postgresql://u:DBPASS99@db/m")
    assert resolve_tracking_uri(saved) == "postgresql://u:DBPASS99@db/m"


def test_worker_env_prints_no_value_and_applies(clean_env):
    from ray.train.v2._internal.state.schema import _to_json_serializable_value

    clean_env.setenv("MLFLOW_TRACKING_PASSWORD", "SECRETPW")
    env = WorkerEnv.capture(tracking_uri="postgresql://u:DBPASS99@db/m")
    clean_env.delenv("MLFLOW_TRACKING_PASSWORD")
    # Ray Train keeps train_loop_config in its run state only as this sanitised form
    shown = json.dumps(_to_json_serializable_value({"env": env, "run_id": "r"}))
    assert "SECRETPW" not in shown and "DBPASS99" not in shown and "MLFLOW_TRACKING_PASSWORD" in shown
    assert "SECRETPW" not in repr(env) + str(env)
    env.apply()
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "SECRETPW"
    assert env.tracking_uri == os.environ["MLFLOW_TRACKING_URI"] == "postgresql://u:DBPASS99@db/m"


def test_a_sweep_hands_aws_credentials_over_in_its_worker_env_and_not_to_tune(clean_env):
    """Tune copies the driver's AWS variables into each trial's runtime_env, which Ray's runtime-env
    agent logs in clear: while Tune launches trials they are out of the environment, and the
    trials get them in their WorkerEnv (which a plain training run does not ship)."""
    from pipeline.credentials import AWS_CREDENTIAL_ENV, SWEEP_CREDENTIAL_ENV, kept_out_of_environ
    from pipeline.tune import _credentials_held_back

    clean_env.setenv("AWS_SECRET_ACCESS_KEY", "SECRETAWS")
    assert "SECRETAWS" not in repr(WorkerEnv.capture("http://h", SWEEP_CREDENTIAL_ENV))  # names, not values
    swept = WorkerEnv.capture("http://h", SWEEP_CREDENTIAL_ENV)._values
    assert swept["AWS_SECRET_ACCESS_KEY"] == "SECRETAWS"
    assert "AWS_SECRET_ACCESS_KEY" not in WorkerEnv.capture("http://h")._values
    with kept_out_of_environ(AWS_CREDENTIAL_ENV):
        assert "AWS_SECRET_ACCESS_KEY" not in os.environ
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == "SECRETAWS"
    with _credentials_held_back("/local/tune"):
        assert "AWS_SECRET_ACCESS_KEY" not in os.environ
    with _credentials_held_back("s3://bucket/tune"):  # the driver syncs the experiment there itself
        assert os.environ["AWS_SECRET_ACCESS_KEY"] == "SECRETAWS"


def test_init_ray_takes_a_redacted_address_from_the_environment(clean_env):
    import ray

    from pipeline.train.trainer import init_ray

    calls = []
    clean_env.setattr(ray, "is_initialized", lambda: False)
    clean_env.setattr(ray, "init", lambda **kw: calls.append(kw))
    saved = from_dict(redact_config_dict(to_dict(load_config(None, ["dist.address=ray://u:RAYPW123@head:10001"]))))
    with pytest.raises(ConfigError, match="saved redacted"):
        init_ray(saved)
    clean_env.setenv("RAY_ADDRESS", "ray://head:10001")
    init_ray(saved)
    assert calls == [{"address": "ray://head:10001", "log_to_driver": True}]


def test_model_blob_is_redacted_and_loads_with_weights_only(clean_env, tmp_path):
    from models import build_model
    from pipeline.serving import VaePyfunc
    from pipeline.train.export import weights_blob

    cfg = load_config(None, ["model.flavor=debug", "data.resolution=32", "model.latent_dim=4",
                             "tracking.tracking_uri=http://u:SECRETPW@h:1"])
    model = build_model(cfg.model)
    model_config = {"name": cfg.model.name, **model.config, "shape": (1, 2)}  # a tuple, as a family may hold
    path = tmp_path / "weights.pt"
    torch.save(weights_blob(model_config, model.state_dict(), to_dict(cfg)), path)
    assert b"SECRETPW" not in path.read_bytes()
    blob = torch.load(path, map_location="cpu", weights_only=True)  # raises on any non-plain type
    assert blob["config"]["tracking"]["tracking_uri"] == "http://u:***@h:1"

    class Context:
        artifacts = {"weights": str(path)}

    served = VaePyfunc()
    served.load_context(Context())  # the pyfunc's own load path
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(served.model.reconstruct(x), model.eval().reconstruct(x))


def test_pickled_blob_is_refused_by_weights_only_load(tmp_path):
    """The guard the loaders rely on: an object that is not plain data does not load."""
    buf = io.BytesIO()
    torch.save({"config": object.__new__(WorkerEnv)}, buf)
    buf.seek(0)
    with pytest.raises(Exception, match="[Ww]eights only load failed"):
        torch.load(buf, weights_only=True)
