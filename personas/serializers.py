from rest_framework import serializers

from characters.serializers import LegacyBooleanField, NameField, text_field


class PersonaSerializer(serializers.Serializer):
    """A persona as it is sent to be created or changed (every field optional when changing)."""

    name = NameField()
    description = text_field("MAX_PERSONA_CHARS", required=False, allow_blank=True, default="")
    avatar = serializers.CharField(required=False, allow_blank=True)
    default = LegacyBooleanField(required=False)


class ChoosePersonaSerializer(serializers.Serializer):
    """The persona a chat speaks as: an id, or null for the owner's default."""

    persona = serializers.IntegerField(allow_null=True)
