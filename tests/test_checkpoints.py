"""make_demo_model writes official RWKV checkpoints; RWKV-4 ones serve too."""

import pytest
import torch
from django.conf import settings
from django.core.management import call_command

from conftest import CHARACTER, DATA_DIR, Api, Server
from inference.backends import int8_supported, load_backend, parse_strategy, resolve_strategy
from inference.checkpoint import CheckpointError, _lora_size, detect_version, load_weights, resolve_path
from inference.runtime import get_engine

RWKV7_LAYER_SHAPES = {
    "att.x_r": (1, 1, 128), "att.w0": (1, 1, 128), "att.w1": (128, 32), "att.w2": (32, 128),
    "att.a1": (128, 32), "att.v1": (128, 32), "att.g1": (128, 32), "att.k_k": (1, 1, 128),
    "att.r_k": (2, 64), "att.receptance.weight": (128, 128), "att.ln_x.weight": (128,),
    "ffn.x_k": (1, 1, 128), "ffn.key.weight": (512, 128), "ffn.value.weight": (128, 512),
}


def test_the_demo_model_has_the_official_rwkv7_keys_and_shapes():
    path = DATA_DIR / "model" / "shape-check"
    call_command("make_demo_model", str(path), "--layers", "3", "--embd", "128")
    weights = load_weights(path)  # found without the .pth, like the original server
    assert resolve_path(path).name == "shape-check.pth"
    assert detect_version(weights) == 7
    assert weights["emb.weight"].shape == (65536, 128) and weights["head.weight"].shape == (65536, 128)
    assert weights["emb.weight"].dtype == torch.bfloat16
    for layer in range(3):
        for key, shape in RWKV7_LAYER_SHAPES.items():
            assert tuple(weights[f"blocks.{layer}.{key}"].shape) == shape, key
    assert "blocks.3.att.r_k" not in weights


def test_low_rank_sizes_match_the_released_0_1b_model():
    # RWKV-7 0.1B (768 wide): w1 [768, 64], a1 [768, 64], v1 [768, 32], g1 [768, 128]
    assert (_lora_size(768, 1.8), _lora_size(768, 1.3), _lora_size(768, 0.6, 0.8)) == (64, 32, 128)


def test_an_rwkv4_checkpoint_serves_the_same_api():
    path = DATA_DIR / "model" / "tiny-rwkv4.pth"
    call_command("make_demo_model", str(path), "--layers", "2", "--embd", "128", "--rwkv", "4")
    assert detect_version(load_weights(path)) == 4
    server = Server(model=path, name="rwkv4-server").start()
    try:
        api = Api(server.url)
        data = api.ok("/login/tmp")
        guest = Api(server.url, data["user_name"], data["token"])
        guest.ok("/characters/save", **CHARACTER)
        guest.chat("Mira")
        reply = guest.reply("Mira", "hello")
        guest.stream("/chat/resay", character_name="Mira")
        guest.ok("/chat/back", character_name="Mira", log_index=0)
        assert reply is not None and guest.chat("Mira") == [[None, "Hi friend! I'm Mira."]]
        assert "RWKV-4" in server.log()
    finally:
        server.stop()


def test_strategies_of_the_original_server_are_understood():
    assert parse_strategy("cpu fp32") == ("cpu", "fp32")
    assert parse_strategy("cpu bf16") == ("cpu", "bf16")
    assert parse_strategy("cpu fp32i8") == ("cpu", "int8")
    assert parse_strategy("cuda fp16i8 *10 -> cuda fp16") == ("cuda", "fp16")
    with pytest.raises(ValueError, match="unsupported strategy"):
        parse_strategy("tpu fp32")


def test_the_default_strategy_is_the_fastest_within_its_accuracy_bound():
    engine = get_engine()
    expected = "cuda fp16" if torch.cuda.is_available() else "cpu int8" if int8_supported() else "cpu fp32"
    assert settings.RPSERVER["STRATEGY"] == "auto" and resolve_strategy("auto") == expected
    assert parse_strategy("auto") == parse_strategy(expected)
    assert engine.backend.model.precision == parse_strategy(expected)[1]
    assert resolve_strategy("cpu fp32") == "cpu fp32"  # any other strategy is taken as given
    assert resolve_strategy("auto", version=5) in ("cuda fp16", "cpu fp32")  # the rwkv package: no int8 here


def test_a_missing_checkpoint_is_a_clear_error():
    with pytest.raises(CheckpointError, match="no RWKV checkpoint at"):
        load_backend(DATA_DIR / "model" / "no-such-model")
