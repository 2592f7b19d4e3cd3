import base64
import binascii
import re
import unicodedata

from django.conf import settings
from rest_framework import serializers

from .models import MAX_NAME_LENGTH

TRUE_VALUES = {"1", "true", "True", "TRUE", "on", "yes"}
FALSE_VALUES = {"", "0", "false", "False", "FALSE", "off", "no", "null", "None"}


class NameField(serializers.CharField):
    """Any name a person could type ("小雪", "Ann-Marie"), but no control characters."""

    def __init__(self, **kwargs):
        super().__init__(max_length=MAX_NAME_LENGTH, **kwargs)

    def to_internal_value(self, data):
        name = super().to_internal_value(data)
        if any(unicodedata.category(ch) == "Cc" for ch in name):
            raise serializers.ValidationError("must not contain control characters such as newlines")
        return name


class LegacyBooleanField(serializers.Field):
    """use_qa: 1/true/True are true; empty, 0, false or absent are false."""

    def to_internal_value(self, data):
        if isinstance(data, bool):
            return data
        text = str(data).strip()
        if text in TRUE_VALUES:
            return True
        if text in FALSE_VALUES:
            return False
        raise serializers.ValidationError("must be true or false (1/0)")

    def to_representation(self, value):
        return bool(value)


def text_field(setting, **kwargs):
    return serializers.CharField(max_length=settings.RPSERVER[setting], **kwargs)


class CharacterNameSerializer(serializers.Serializer):
    character_name = NameField()


class SaveCharacterSerializer(serializers.Serializer):
    bot = NameField()
    user = NameField()
    greeting = text_field("MAX_PROMPT_CHARS")
    bot_persona = text_field("MAX_PERSONA_CHARS")
    example_message = text_field("MAX_PERSONA_CHARS", required=False, allow_blank=True, default="")
    use_qa = LegacyBooleanField(required=False, default=False)
    avatar = serializers.CharField(required=False, allow_blank=True, trim_whitespace=True)


class ImportCardSerializer(serializers.Serializer):
    """POST /api/v1/characters/import: the card file as base64 (a data URL is fine), and optionally
    the name to import it under."""

    file = serializers.CharField()
    name = NameField(required=False)

    def validate_file(self, value):
        return decode_file(value)


class ExportCardSerializer(serializers.Serializer):
    format = serializers.ChoiceField(choices=["png", "json"], required=False, default="png")
    spec = serializers.ChoiceField(choices=["v2", "v3"], required=False, default="v3")


def decode_file(value, limit=None, what="the card file"):
    """The bytes of a file sent as base64 or as a data URL; the size limit (`limit` bytes, by
    default the card file's) checked before decoding."""
    limit = limit or settings.RPSERVER["MAX_CARD_FILE_BYTES"]
    payload = value.split(",", 1)[1] if value.startswith("data:") and "," in value else value
    if len(payload) > (limit * 4) // 3 + 4:
        raise serializers.ValidationError(f"{what} is too large: the limit is {limit // 1024} KB")
    try:
        return base64.b64decode(re.sub(r"\s+", "", payload), validate=True)
    except (binascii.Error, ValueError):
        raise serializers.ValidationError(f"must be {what} encoded as base64 (or a data: URL)")
