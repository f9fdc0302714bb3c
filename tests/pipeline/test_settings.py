from pathlib import Path

from pipeline.settings import Settings


def test_defaults_point_at_bundled_models_and_data():
    settings = Settings()
    assert (Path(settings.encoder) / "config.json").is_file()
    assert settings.responder_model.endswith(".gguf") and Path(settings.responder_model).is_file()
    assert (settings.kb_dir / "lost-or-stolen-card.md").is_file()


def test_environment_overrides(monkeypatch, tmp_path):
    monkeypatch.setenv("TANDEM_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("TANDEM_RESPONDER_BACKEND", "openai")
    monkeypatch.setenv("TANDEM_HANDOFF_INTENTS", '["a", "b"]')
    settings = Settings()
    assert settings.resolved_index_dir == tmp_path / "index"
    assert settings.responder_backend == "openai"
    assert settings.handoff_intents == ["a", "b"]
