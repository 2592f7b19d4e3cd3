"""/web/config's facts about the model come from the loaded engine (inference.runtime.loaded)."""

from inference import runtime
from inference.runtime import get_engine
from web.services import client_config


def test_the_client_config_names_the_loaded_model():
    engine = get_engine()
    assert runtime.loaded() is engine
    config = client_config()
    assert config["model"] == engine.backend.description and config["model"]
    assert config["demo_model"] is False  # the suite serves its own tiny model, not the demo checkpoint
