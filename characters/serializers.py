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
