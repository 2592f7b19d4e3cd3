from django.apps import AppConfig


class InferenceConfig(AppConfig):
    """Model loading, tokenizer, sampling and the engine (no models, no views)."""

    name = "inference"
    verbose_name = "Inference"
