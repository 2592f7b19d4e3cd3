from django.conf import settings
from rest_framework import serializers

from characters.serializers import CharacterNameSerializer, NameField, decode_file
from inference.sampling import LIMITS, SamplingSettings, check_setting


class SettingField(serializers.Field):
    """A sampling field: a number within the API's range, or its default."""

    def to_internal_value(self, data):
        if isinstance(data, str) and data.strip() == "":
            return getattr(SamplingSettings, self.field_name)
        try:
            return check_setting(self.field_name, data)
        except ValueError as exc:
            raise serializers.ValidationError(str(exc).removeprefix(f"{self.field_name} "))


class SamplingFieldsSerializer(serializers.Serializer):
    """The sampling fields; `.sampling` gives SamplingSettings."""

    tau = SettingField(required=False, default=SamplingSettings.tau)
    rate = SettingField(required=False, default=SamplingSettings.rate)
    min_p = SettingField(required=False, default=SamplingSettings.min_p)
    temperature = SettingField(required=False, default=SamplingSettings.temperature)
    presence_penalty = SettingField(required=False, default=SamplingSettings.presence_penalty)

    @property
    def sampling(self):
        return SamplingSettings(**{name: self.validated_data[name] for name in LIMITS})


class SamplingSerializer(CharacterNameSerializer, SamplingFieldsSerializer):
    """character_name and the sampling fields; `.sampling` gives SamplingSettings."""


class ReplySerializer(SamplingSerializer):
    prompt = serializers.CharField(max_length=settings.RPSERVER["MAX_PROMPT_CHARS"])


class BackSerializer(CharacterNameSerializer):
    log_index = serializers.IntegerField(required=False, default=0, min_value=0)


class TamperSerializer(CharacterNameSerializer):
    message = serializers.CharField(max_length=settings.RPSERVER["MAX_PROMPT_CHARS"])


# ---- the REST API (/api/v1/chats/...) ----


class RoundSerializer(serializers.Serializer):
    """A round of the chat (a message: with `role`, the person's or the character's)."""

    round = serializers.IntegerField(min_value=1)


class EditSerializer(RoundSerializer):
    role = serializers.ChoiceField(choices=["user", "character"])
    text = serializers.CharField(max_length=settings.RPSERVER["MAX_PROMPT_CHARS"])


class TreeReplySerializer(SamplingFieldsSerializer):
    prompt = serializers.CharField(max_length=settings.RPSERVER["MAX_PROMPT_CHARS"])


class TreeSwipeSerializer(SamplingFieldsSerializer):
    round = serializers.IntegerField(min_value=1)


class ImportChatSerializer(serializers.Serializer):
    """POST /api/v1/chats/import: the character the chat is for, and the chat file (JSONL) as base64
    or a data URL."""

    character = NameField()
    file = serializers.CharField()

    def validate_file(self, value):
        return decode_file(value, settings.RPSERVER["MAX_CHAT_FILE_BYTES"], "the chat file")
